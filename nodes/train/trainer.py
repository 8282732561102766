"""Train a LoRA on an SD1.x checkpoint, the way kohya's `train_network.py` does for SD1.x.

One optimizer step:
1. Draw `gradient_accumulation_steps` batches of (image, caption); an epoch holds every image
   `repeats` times (regularisation images balanced against them), batched within a bucket.
2. Latents: a sample of the VAE's posterior (`mean + std * ε`) times 0.18215, drawn afresh each
   step from the kept (mean, std) — kohya without latent caching — or drawn once per image
   with `cache_latents` (kept in memory, and in `.npz` files with `cache_latents_to_disk`).
3. Text: CLIP-L's final-layer-normed hidden state (of layer -clip_skip) of `BOS caption EOS`,
   in 75-token chunks.
4. Noise ε (+ offset noise) and a timestep t uniform in [0, 1000); x_t = sqrt(ᾱ)·x_0 + sqrt(1-ᾱ)·ε.
5. Loss: per-sample ε-MSE, times the prior-loss weight for regularisation images, min-SNR
   weighted; gradients clipped at `max_grad_norm`; the schedule steps with the optimizer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.schedules import sd15_schedule
from nodes.sd.tokenizer import default_tokenizer
from nodes.train.buckets import Buckets, assign, epoch_batches, load_pixels
from nodes.train.captions import CaptionOptions, chunked_ids, join_chunks, process_caption
from nodes.train.dataset import Dataset, DatasetError, Sample
from nodes.train.latent_cache import LatentCache
from nodes.train.network import LoRANetwork
from nodes.train.optim import make_optimizer, make_scheduler

LATENT_SCALE = 0.18215  # SD1.x VAE scaling factor (kohya multiplies the sample by it)
NUM_TIMESTEPS = 1000
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


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
    resolution: int | tuple[int, int] = 512  # (W, H)
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
        r = self.resolution
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))

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
        check_resolution(options.size)
        if options.batch_size < 1:
            raise ValueError(f"batch size {options.batch_size} must be at least 1")
        self.models, self.dataset, self.options = models, dataset, options
        self.device = device or default_device()
        for module in (models.unet, models.text_encoder, models.vae):
            module.to(self.device)
        self.tokenizer = default_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)  # the adapters' Kaiming init is part of the seeded run
            te = models.text_encoder if options.train_text_encoder else None
            self.network = LoRANetwork.create(
                models.unet,
                te,
                options.rank,
                options.alpha,
                options.conv_dim,
                options.conv_alpha,
                options.network_dropout,
            )
        self.network.to(self.device)
        self.network.apply_to()
        unet_lr = options.unet_lr or options.learning_rate
        groups = self.network.param_groups(unet_lr, options.text_encoder_lr or options.learning_rate)
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
        self._texts: dict[str, torch.Tensor] = {}
        self.step = 0
        self.epoch = 0  # the epoch in progress (1-based once training starts)
        self.batch_index = 0  # batches of the current epoch already used
        self.epoch_rng_state: Any = self.order.getstate()
        self._set_checkpointing(options.gradient_checkpointing)

    def _set_checkpointing(self, on: bool) -> None:
        unet, te = self.models.unet, self.models.text_encoder
        # transformers 5 renamed the switch (activation_*); older releases have only gradient_*
        te_on = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
        te_off = getattr(te, "activation_checkpointing_disable", None) or te.gradient_checkpointing_disable
        if on:
            unet.enable_gradient_checkpointing()
            if self.options.train_text_encoder:
                te_on()
        elif getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
            te_off()

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

    def latents(self, samples: list[Sample], flips: list[bool]) -> torch.Tensor:
        """Scaled posterior samples `[B, 4, h, w]` (cached, or a fresh draw each call)."""
        return self.latent_cache.latents(samples, flips, self.generator) * LATENT_SCALE

    def text(self, captions: list[str]) -> torch.Tensor:
        """CLIP hidden states `[B, 75n+2, 768]`; kept per caption unless the text encoder is trained."""
        if self.options.train_text_encoder:
            return self._encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._texts]
        if missing:
            with torch.no_grad():
                self._texts |= dict(zip(missing, self._encode(missing), strict=True))
        return torch.stack([self._texts[c] for c in captions])

    def _encode(self, captions: list[str]) -> torch.Tensor:
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
        return join_chunks(hidden.float(), n)

    def _autocast(self) -> Any:
        dtype = AUTOCAST.get(self.options.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # ---------------------------------------------------------------- loss and steps

    def loss(
        self, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Weighted epsilon MSE of the (adapted) UNet at the DDPM-noised latents (kohya's reduction)."""
        ac = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1.0 - ac).sqrt() * noise
        with self._autocast():
            pred = self.models.unet(noisy, timesteps, encoder_hidden_states=cond).sample
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
        cond = self.text(captions)
        noise = torch.randn(latents.shape, generator=self.generator)
        if opts.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=self.generator)
            noise = noise + opts.noise_offset * offset
        noise = noise.to(self.device)
        timesteps = torch.randint(0, NUM_TIMESTEPS, (len(samples),), generator=self.generator).to(self.device)
        weights = torch.tensor(
            [opts.prior_loss_weight if s.is_reg else 1.0 for s in samples], device=self.device
        )
        loss = self.loss(latents, cond, noise, timesteps, weights)
        self.scaler.scale(loss / scale).backward()
        return float(loss.detach())

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
        """One optimizer step over `batches` (gradient accumulation); returns their mean loss."""
        self.network.train()
        with torch.inference_mode(False), torch.enable_grad():
            losses = [self.micro_step(b, len(batches)) for b in batches]
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


def pixels_for(sample: Sample, trainer: LoraTrainer) -> torch.Tensor:
    reso, resized = trainer.placement[sample]
    return load_pixels(sample, reso, resized)
