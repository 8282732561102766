"""Train a LoRA on an SD1.x or SDXL checkpoint, as kohya's `train_network.py` / `sdxl_train_network.py`.

One optimizer step:
1. Draw `gradient_accumulation_steps` batches of (image, caption); an epoch holds every image
   `repeats` times (regularisation images balanced against them), batched within a bucket.
2. Latents: a sample of the VAE's posterior (`mean + std * ε`) times 0.18215, drawn afresh each
   step from the kept (mean, std) — kohya without latent caching — or drawn once per image
   with `cache_latents` (kept in memory, and in `.npz` files with `cache_latents_to_disk`).
   SDXL scales by 0.13025.
3. Text: CLIP-L's final-layer-normed hidden state (of layer -clip_skip) of `BOS caption EOS`,
   in 75-token chunks. SDXL: both encoders' penultimate layers and bigG's pooled output, plus
   each image's size conditioning from its bucket (nodes/train/sdxl.py).
4. Noise ε (+ offset noise) and a timestep t uniform in [0, 1000); x_t = sqrt(ᾱ)·x_0 + sqrt(1-ᾱ)·ε.
5. Loss: per-sample ε-MSE, times the prior-loss weight for regularisation images, min-SNR
   weighted; gradients clipped at `max_grad_norm`; the schedule steps with the optimizer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from nodegraph.train_config import NATIVE_RESOLUTION
from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.convert_sdxl import SDXL_LATENT_SCALE
from nodes.sd.schedules import sd15_schedule
from nodes.sd.tokenizer import default_tokenizer
from nodes.train import te_cache
from nodes.train.buckets import Buckets, assign, epoch_batches, load_pixels
from nodes.train.captions import CaptionOptions, chunked_ids, join_chunks, process_caption
from nodes.train.dataset import Dataset, DatasetError, Sample
from nodes.train.latent_cache import LatentCache
from nodes.train.network import LoRANetwork
from nodes.train.optim import make_optimizer, make_scheduler
from nodes.train.sdxl import encode_sdxl, size_condition

LATENT_SCALE = 0.18215  # SD1.x VAE scaling factor (kohya multiplies the sample by it)
NUM_TIMESTEPS = 1000
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
Text = tuple[torch.Tensor, torch.Tensor | None]  # (hidden states, SDXL's pooled output or None)


@dataclass
class TrainOptions:
    """Hyper-parameters of one run (kohya's option names where they exist)."""

    rank: int = 16
    alpha: float = 16.0
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    unet_lr: float | None = None
    train_text_encoder: bool = True  # kohya trains it unless --network_train_unet_only
    batch_size: int = 1
    resolution: int | tuple[int, int] | None = 512  # (W, H); None: the family's (NATIVE_RESOLUTION)
    seed: int = 0
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs_to_disk: bool = False  # SDXL, UNet only: `<image>_te_outputs.npz` files
    prior_loss_weight: float = 1.0
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_dropout: float | None = None
    optimizer_type: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # kohya's --optimizer_args, parsed
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    @property
    def size(self) -> tuple[int, int]:
        r = NATIVE_RESOLUTION["sd15"] if self.resolution is None else self.resolution
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))

    def for_family(self, family: str) -> TrainOptions:
        """These options with the family's native size when none was given."""
        if self.resolution is not None:
            return self
        return replace(self, resolution=NATIVE_RESOLUTION.get(family, NATIVE_RESOLUTION["sd15"]))

    def buckets(self) -> Buckets:
        return Buckets(
            self.size,
            self.enable_bucket,
            self.min_bucket_reso,
            self.max_bucket_reso,
            self.bucket_reso_steps,
            self.bucket_no_upscale,
        )


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_resolution(size: tuple[int, int]) -> None:
    if min(size) < 64 or size[0] % 8 or size[1] % 8:
        raise DatasetError(f"resolution {size[0]},{size[1]} must be multiples of 8 and at least 64")


class LoraTrainer:
    """Holds the models, the adapters (hooked in while the trainer lives), optimizer and schedule."""

    def __init__(
        self, models: LoadedCheckpoint, dataset: Dataset, options: TrainOptions,
        device: torch.device | None = None, max_steps: int = 1,
    ) -> None:  # fmt: skip
        options = options.for_family("sdxl" if models.text_encoder_2 is not None else "sd15")
        check_resolution(options.size)
        if options.batch_size < 1:
            raise ValueError(f"batch size {options.batch_size} must be at least 1")
        self.models, self.dataset, self.options = models, dataset, options
        self.sdxl = models.text_encoder_2 is not None
        self.latent_scale = SDXL_LATENT_SCALE if self.sdxl else LATENT_SCALE
        self.device = device or default_device()
        for module in (models.unet, models.text_encoder, models.text_encoder_2, models.vae):
            if module is not None:
                module.to(self.device)
        self.tokenizer = default_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)  # the adapters' Kaiming init is part of the seeded run
            train_te = options.train_text_encoder
            self.network = LoRANetwork.create(
                models.unet,
                models.text_encoder if train_te else None,
                options.rank,
                options.alpha,
                options.conv_dim,
                options.conv_alpha,
                options.network_dropout,
                text_encoder_2=models.text_encoder_2 if train_te else None,
                sdxl=self.sdxl,
            )
        self.network.to(self.device)
        self.network.apply_to()
        groups = self.network.param_groups(*effective_lrs(options))
        self.optimizer = make_optimizer(
            options.optimizer_type, groups, options.learning_rate, self.device, options.optimizer_args
        )
        self.max_steps = max_steps
        self.scheduler = make_scheduler(
            options.lr_scheduler,
            self.optimizer,
            options.lr_warmup_steps,
            max_steps,
            options.lr_scheduler_num_cycles,
            options.lr_scheduler_power,
        )
        fp16 = options.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.generator = torch.Generator("cpu").manual_seed(options.seed)
        self.order = random.Random(options.seed)
        self.caption_rng = random.Random(options.seed + 1)
        schedule = sd15_schedule().alphas_cumprod
        self.alphas_cumprod = schedule.to(self.device)
        self.all_snr = (schedule / (1.0 - schedule)).to(self.device)
        self.items = dataset.balanced_items()
        self.placement = assign(self.items, options.buckets())
        self.latent_cache = LatentCache(models.vae, self.device, options, self.placement)
        self._texts: dict[str, Text] = {}
        self.te_reused = 0  # images whose text encoder outputs came from a disk cache
        self.step = 0
        self.epoch = 0  # the epoch in progress (1-based once training starts)
        self.batch_index = 0  # batches of the current epoch already used
        self.epoch_rng_state: Any = self.order.getstate()
        self._set_checkpointing(options.gradient_checkpointing)

    def _set_checkpointing(self, on: bool) -> None:
        unet = self.models.unet
        encoders = [te for te in (self.models.text_encoder, self.models.text_encoder_2) if te is not None]
        if on:
            unet.enable_gradient_checkpointing()
            if self.options.train_text_encoder:
                for te in encoders:
                    _te_checkpointing(te, True)
        elif getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
            for te in encoders:
                _te_checkpointing(te, False)

    def close(self) -> None:
        """Unhook the adapters: the checkpoint's modules compute as before."""
        self.network.remove()
        self._set_checkpointing(False)

    # ---------------------------------------------------------------- inputs

    def moments(self, sample: Sample, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of one image in its bucket (computed once)."""
        return self.latent_cache.moments(sample, flipped)

    def prepare(self, on_image: Callable[[int, int], None] | None = None) -> None:
        """Encode every image before the first step (and write/read the disk cache)."""
        samples = [s for s, _ in self.items]
        for i, sample in enumerate(samples, 1):
            self.latent_cache.prepare(sample, self.generator)
            if on_image is not None:
                on_image(i, len(samples))
        opts = self.options
        if opts.cache_text_encoder_outputs_to_disk and self.sdxl and not opts.train_text_encoder:
            self._cache_texts(list(dict.fromkeys(samples)))

    def _cache_texts(self, samples: list[Sample]) -> None:
        """kohya's `--cache_text_encoder_outputs_to_disk`: each image's caption encoded once, kept in
        `<image>_te_outputs.npz` and read back by later runs while caption and encoders are the same."""
        te_print = te_cache.fingerprint(self.models.text_encoder, self.models.text_encoder_2)
        tokens = (self.options.max_token_length or 75) + 2
        missing: list[tuple[Any, str]] = []
        for sample in samples:
            caption = sample.caption.split("\n")[0]  # what process_caption gives without dropout
            path = te_cache.cache_path(sample.image)
            found = te_cache.read(path, caption, te_print, tokens, self.device)
            if found is None:
                missing.append((path, caption))
                continue
            self._texts.setdefault(caption, found)
            self.te_reused += 1
        batch = max(1, self.options.batch_size)
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            with torch.no_grad():
                hidden, pooled = self._encode([caption for _, caption in chunk])
            assert pooled is not None  # SDXL
            for i, (path, caption) in enumerate(chunk):
                outputs = (hidden[i], pooled[i])
                self._texts.setdefault(caption, outputs)
                te_cache.write(path, outputs, caption, te_print)

    def latents(self, samples: list[Sample], flips: list[bool]) -> torch.Tensor:
        """Scaled posterior samples `[B, 4, h, w]` (cached, or a fresh draw each call)."""
        return self.latent_cache.latents(samples, flips, self.generator) * self.latent_scale

    def text(self, captions: list[str]) -> torch.Tensor:
        """Hidden states `[B, 75n+2, 768]` (SDXL: 2048); see `encode`."""
        return self.encode(captions)[0]

    def encode(self, captions: list[str]) -> Text:
        """(hidden states, SDXL's pooled `[B, 1280]` or None); kept per caption unless the text
        encoders are trained."""
        if self.options.train_text_encoder:
            return self._encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._texts]
        if missing:
            with torch.no_grad():
                hidden, pooled = self._encode(missing)
                for i, caption in enumerate(missing):
                    self._texts[caption] = (hidden[i], None if pooled is None else pooled[i])
        kept = [self._texts[c] for c in captions]
        pooled_rows = [p for _, p in kept if p is not None]
        return torch.stack([h for h, _ in kept]), torch.stack(pooled_rows) if pooled_rows else None

    def _encode(self, captions: list[str]) -> Text:
        if self.sdxl:
            with self._autocast():
                te_l, te_g = self.models.text_encoder, self.models.text_encoder_2
                return encode_sdxl(
                    te_l, te_g, self.tokenizer, captions, self.options.max_token_length, self.device
                )
        n = (self.options.max_token_length or 75) // 75
        chunks = [
            chunk for c in captions for chunk in chunked_ids(c, self.tokenizer, self.options.max_token_length)
        ]
        ids = torch.tensor(chunks, device=self.device)
        te = self.models.text_encoder
        skip = self.options.clip_skip
        with self._autocast():
            if skip is None or skip <= 1:
                hidden: torch.Tensor = te(input_ids=ids).last_hidden_state
            else:  # kohya: hidden_states[-clip_skip], then the final layer norm
                hidden = te.final_layer_norm(
                    te(input_ids=ids, output_hidden_states=True).hidden_states[-skip]
                )
        return join_chunks(hidden.float(), n), None

    def _autocast(self) -> Any:
        dtype = AUTOCAST.get(self.options.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # ---------------------------------------------------------------- loss and steps

    def loss(
        self, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
        weights: torch.Tensor | None = None, added: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Weighted epsilon MSE of the (adapted) UNet at the DDPM-noised latents (kohya's reduction).

        `added`: SDXL's (pooled `[B, 1280]`, size values `[B, 6]`), the UNet's `text_time` input.
        """
        ac = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1.0 - ac).sqrt() * noise
        extra: dict[str, Any] = {}
        if added is not None:
            extra["added_cond_kwargs"] = {"text_embeds": added[0], "time_ids": added[1]}
        with self._autocast():
            pred = self.models.unet(noisy, timesteps, encoder_hidden_states=cond, **extra).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean([1, 2, 3])
        if weights is not None:
            loss = loss * weights
        if self.options.min_snr_gamma:
            snr = self.all_snr[timesteps]
            loss = loss * torch.minimum(snr, torch.full_like(snr, self.options.min_snr_gamma)) / snr
        return loss.mean()

    def micro_step(self, samples: list[Sample], scale: float) -> float:
        """Forward and backward of one batch (the loss divided by `scale` for accumulation)."""
        opts = self.options
        flips = [opts.flip_aug and self.caption_rng.random() < 0.5 for _ in samples]
        latents = self.latents(samples, flips)
        captions = [process_caption(s.caption, opts.captions, self.caption_rng, self.epoch) for s in samples]
        cond, pooled = self.encode(captions)
        added = None
        if pooled is not None:
            added = (pooled, self.size_values(samples, flips).to(self.device))
        noise = torch.randn(latents.shape, generator=self.generator)
        if opts.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=self.generator)
            noise = noise + opts.noise_offset * offset
        noise = noise.to(self.device)
        timesteps = torch.randint(0, NUM_TIMESTEPS, (len(samples),), generator=self.generator).to(self.device)
        weights = torch.tensor(
            [opts.prior_loss_weight if s.is_reg else 1.0 for s in samples], device=self.device
        )
        loss = self.loss(latents, cond, noise, timesteps, weights, added)
        self.scaler.scale(loss / scale).backward()
        return float(loss.detach())

    def size_values(self, samples: list[Sample], flips: list[bool]) -> torch.Tensor:
        """SDXL's `[B, 6]` (original H, W, crop top, left, target H, W) as kohya records them."""
        rows = [
            size_condition(s.size, self.placement[s][0], f, self.options.enable_bucket)
            for s, f in zip(samples, flips, strict=True)
        ]
        return torch.tensor(rows, dtype=torch.float32)

    def optimizer_step(self) -> None:
        if self.options.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.options.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def train_step(self, batches: list[list[Sample]]) -> float:
        """One optimizer step over `batches` (gradient accumulation); returns their mean loss.

        Each loss is divided by `gradient_accumulation_steps`, also for the shorter group that ends an
        epoch, as accelerate's `Accelerator.backward` does in kohya's loop.
        """
        self.network.train()
        accum = self.options.gradient_accumulation_steps
        with torch.inference_mode(False), torch.enable_grad():
            losses = [self.micro_step(b, accum) for b in batches]
            self.optimizer_step()
        return sum(losses) / len(losses)

    def epoch_batches(self) -> list[list[Sample]]:
        """One epoch: every image `repeats` times, bucketed, shuffled, cut into batches."""
        return epoch_batches(self.items, self.placement, self.options.batch_size, self.order)

    def steps_per_epoch(self) -> int:
        batches = len(self.epoch_plan())
        return math.ceil(batches / self.options.gradient_accumulation_steps)

    def epoch_plan(self) -> list[list[Sample]]:
        rng = random.Random(0)
        return epoch_batches(self.items, self.placement, self.options.batch_size, rng)

    def run(
        self,
        max_steps: int,
        on_step: Callable[[int, int, float], None] | None = None,
        on_epoch: Callable[[int, int], None] | None = None,
    ) -> int:
        """Train until `max_steps`; `on_step(step, max_steps, loss)`, `on_epoch(epoch, step)` after
        each whole epoch. Resumes mid-epoch when a state was loaded. Returns the last epoch number.
        """
        accum = self.options.gradient_accumulation_steps
        while self.step < max_steps:
            if self.batch_index == 0:
                self.epoch += 1
                self.epoch_rng_state = self.order.getstate()
            else:  # resumed: draw this epoch's order again from its saved start
                self.order.setstate(self.epoch_rng_state)
            batches = self.epoch_batches()
            while self.batch_index < len(batches) and self.step < max_steps:
                group = batches[self.batch_index : self.batch_index + accum]
                self.batch_index += len(group)
                loss = self.train_step(group)
                if on_step is not None:
                    on_step(self.step, max_steps, loss)
            if self.batch_index >= len(batches):
                self.batch_index = 0
                if on_epoch is not None:
                    on_epoch(self.epoch, self.step)
        return self.epoch


def _te_checkpointing(te: Any, on: bool) -> None:
    # transformers 5 renamed the switch (activation_*); older releases have only gradient_*
    name = "enable" if on else "disable"
    switch = getattr(te, f"activation_checkpointing_{name}", None) or getattr(
        te, f"gradient_checkpointing_{name}"
    )
    switch()


def pixels_for(sample: Sample, trainer: LoraTrainer) -> torch.Tensor:
    reso, resized = trainer.placement[sample]
    return load_pixels(sample, reso, resized)


def effective_lrs(options: TrainOptions) -> tuple[float, float]:
    """(UNet, text encoder) rates as kohya resolves them: each falls back to `--learning_rate` only
    when unset, so an explicit 0 stays 0 (and that group is not trained)."""
    unet = options.learning_rate if options.unet_lr is None else options.unet_lr
    te = options.learning_rate if options.text_encoder_lr is None else options.text_encoder_lr
    return unet, te
