"""The tiny random UNet the sampling-node tests run on, and the inputs they give it.

`tests/nodes/conftest.py` serves it as the `model` fixture (one per test module); the helpers here
build prompts, latents and the two sampling paths (KSampler, SamplerCustomAdvanced) on it.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes import custom_sampling as cs
from nodes import sigmas as sn
from nodes.sampling import KSampler
from nodes.sd.handles import ModelHandle

WIDTH = 32  # context width of the tiny UNet


def tiny_model() -> ModelHandle:
    """A tiny random UNet (2 levels, 32/64 channels, context width WIDTH), seeded."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    return ModelHandle(unet=unet, source="tiny", family="sd15")


def cond(seed: int, tokens: int = 77) -> list[list[Any]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, WIDTH, generator=g), {}]]


def latent(batch: int = 1) -> dict[str, Any]:
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def ksampler(env: Environment, model: ModelHandle, **kw: Any) -> torch.Tensor:
    """KSampler's samples: 4 euler steps, cfg 7, seed 42, cond(1) against cond(2), unless `kw` says."""
    args: dict[str, Any] = dict(
        seed=42,
        steps=4,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        positive=cond(1),
        negative=cond(2),
        latent_image=latent(),
        denoise=1.0,
    )
    args.update(kw)
    (out,) = KSampler().run(RecordingContext(env, "ksampler"), model, **args)
    samples: torch.Tensor = out["samples"]
    return samples


def guided_euler(ctx: RecordingContext, model: ModelHandle, guider: Any) -> torch.Tensor:
    """SamplerCustomAdvanced's samples for a GUIDER: 3 euler steps on the normal schedule of `model`,
    noise seed 7, from `latent()`."""
    (sigmas,) = sn.BasicScheduler().run(ctx, model, "normal", 3, 1.0)
    (sampler,) = cs.KSamplerSelect().run(ctx, "euler")
    (noise,) = cs.RandomNoise().run(ctx, 7)
    out, _ = cs.SamplerCustomAdvanced().run(ctx, noise, guider, sampler, sigmas, latent())
    samples: torch.Tensor = out["samples"]
    return samples
