"""Train a LoRA on an SD1.x checkpoint, the way kohya's `train_network.py` does for SD1.x.

One step:
1. Draw a batch of (image, caption) pairs; each epoch holds every image `repeats` times, shuffled.
2. Latents: a sample of the VAE's posterior (`mean + std * ε`) times 0.18215. The encoder runs
   once per image (its mean and std are kept); the sample is drawn afresh every step, which is
   what kohya's `latent_dist.sample()` without latent caching computes.
3. Text: CLIP-L's final-layer-normed last hidden state of `BOS caption[:75] EOS PAD...`.
4. Noise ε and a timestep t uniform in [0, 1000); the DDPM forward process with SD1.x's scaled
   linear betas: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε.
5. Loss: mean squared error between the UNet's prediction at (x_t, t, text) and ε; AdamW on the
   LoRA weights only.
Everything is fp32; on CPU unless a CUDA device is present.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.schedules import sd15_schedule
from nodes.sd.tokenizer import ClipTokenizer, default_tokenizer
from nodes.train.dataset import Dataset, Sample, check_resolution, load_image
from nodes.train.network import LoRANetwork

LATENT_SCALE = 0.18215  # SD1.x VAE scaling factor (kohya multiplies the sample by it)
NUM_TIMESTEPS = 1000


@dataclass
class TrainOptions:
    """Hyper-parameters of one run (the CLI's flags)."""

    rank: int = 16
    alpha: float = 16.0
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # only used with train_text_encoder
    train_text_encoder: bool = False
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def token_ids(caption: str, tokenizer: ClipTokenizer) -> list[int]:
    """77 ids: BOS, at most 75 caption tokens, EOS, padding (kohya's max_token_length 75)."""
    ids = tokenizer.encode(caption)[: tokenizer.max_length - 2]
    ids = [tokenizer.bos, *ids, tokenizer.eos]
    return ids + [tokenizer.pad] * (tokenizer.max_length - len(ids))


class LoraTrainer:
    """Holds the models, the adapters (hooked in while the trainer lives) and the optimizer."""

    def __init__(
        self,
        models: LoadedCheckpoint,
        dataset: Dataset,
        options: TrainOptions,
        device: torch.device | None = None,
    ) -> None:
        check_resolution(options.resolution)
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
            self.network = LoRANetwork.create(models.unet, te, options.rank, options.alpha)
        self.network.to(self.device)
        self.network.apply_to()
        groups = self.network.param_groups(options.learning_rate, options.text_encoder_lr)
        self.optimizer = torch.optim.AdamW(groups)
        self.generator = torch.Generator("cpu").manual_seed(options.seed)
        self.order = random.Random(options.seed)
        self.alphas_cumprod = sd15_schedule().alphas_cumprod.to(self.device)
        self._moments: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._texts: dict[str, torch.Tensor] = {}
        self.step = 0

    def close(self) -> None:
        """Unhook the adapters: the checkpoint's modules compute as before."""
        self.network.remove()

    # ---------------------------------------------------------------- inputs

    def moments(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of one image, `[4, R/8, R/8]`, computed once."""
        found = self._moments.get(sample.image)
        if found is None:
            pixels = load_image(sample.image, self.options.resolution)[None].to(self.device)
            vae = self.models.vae
            with torch.no_grad():
                h = vae.encoder(pixels)
                if getattr(vae, "quant_conv", None) is not None:
                    h = vae.quant_conv(h)
                mean, logvar = torch.chunk(h.float(), 2, dim=1)
                std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
            found = (mean[0], std[0])
            self._moments[sample.image] = found
        return found

    def latents(self, samples: list[Sample]) -> torch.Tensor:
        """Scaled posterior samples `[B, 4, R/8, R/8]` (a fresh draw each call)."""
        means, stds = zip(*(self.moments(s) for s in samples), strict=True)
        mean, std = torch.stack(means), torch.stack(stds)
        eps = torch.randn(mean.shape, generator=self.generator).to(self.device)
        return (mean + std * eps) * LATENT_SCALE

    def text(self, captions: list[str]) -> torch.Tensor:
        """CLIP hidden states `[B, 77, 768]`; kept per caption unless the text encoder is trained.

        transformers' own forward, as kohya calls it (on CPU it gives `run_clip`'s numbers exactly,
        and unlike `run_clip` it builds its attention mask on the model's device).
        """
        if self.options.train_text_encoder:
            return self._encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._texts]
        if missing:
            with torch.no_grad():
                self._texts |= dict(zip(missing, self._encode(missing), strict=True))
        return torch.stack([self._texts[c] for c in captions])

    def _encode(self, captions: list[str]) -> torch.Tensor:
        ids = torch.tensor([token_ids(c, self.tokenizer) for c in captions], device=self.device)
        hidden: torch.Tensor = self.models.text_encoder(input_ids=ids).last_hidden_state
        return hidden

    # ---------------------------------------------------------------- loss and steps

    def loss(
        self, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Epsilon MSE of the (adapted) UNet at the DDPM-noised latents."""
        ac = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1.0 - ac).sqrt() * noise
        pred = self.models.unet(noisy, timesteps, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")

    def train_step(self, samples: list[Sample]) -> float:
        """One optimizer step on a batch; returns its loss."""
        with torch.inference_mode(False), torch.enable_grad():
            latents = self.latents(samples)
            cond = self.text([s.caption for s in samples])
            noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
            timesteps = torch.randint(0, NUM_TIMESTEPS, (len(samples),), generator=self.generator)
            loss = self.loss(latents, cond, noise, timesteps.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def epoch_batches(self) -> list[list[Sample]]:
        """One epoch: every image `repeats` times, shuffled, cut into batches."""
        items = self.dataset.epoch_items()
        self.order.shuffle(items)
        size = self.options.batch_size
        return [items[i : i + size] for i in range(0, len(items), size)]

    def steps_per_epoch(self) -> int:
        return math.ceil(self.dataset.num_train_images / self.options.batch_size)

    def run(
        self,
        max_steps: int,
        on_step: Callable[[int, int, float], None] | None = None,
        on_epoch: Callable[[int, int], None] | None = None,
    ) -> int:
        """Train for `max_steps` steps; `on_step(step, max_steps, loss)`, `on_epoch(epoch, step)`.

        Returns the number of epochs started.
        """
        epoch = 0
        while self.step < max_steps:
            epoch += 1
            for batch in self.epoch_batches():
                loss = self.train_step(batch)
                if on_step is not None:
                    on_step(self.step, max_steps, loss)
                if self.step >= max_steps:
                    break
            else:
                if on_epoch is not None and self.step < max_steps:
                    on_epoch(epoch, self.step)
        return epoch
