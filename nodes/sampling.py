"""Nodes: KSampler and KSamplerAdvanced, with ComfyUI's inputs, defaults and sampler/scheduler lists.

The math lives in `nodes.sd.ksampler` (and the modules it names); these nodes turn inputs into
a `SamplingRequest`, report progress (with a latent preview) every step, and turn bad input into
errors that name the node's input.
"""

from __future__ import annotations

from typing import Any

import torch

from nodegraph.node import MAX_SEED, Combo, Float, Int, Node, Output, Preview, RunContext, Socket
from nodegraph.types import CONDITIONING, LATENT, MODEL
from nodes.sd.adm import AdmError, adm_width
from nodes.sd.device import placement
from nodes.sd.guidance import ConditioningError
from nodes.sd.handles import ModelHandle
from nodes.sd.ksampler import SamplingRequest, StepCallback, sample
from nodes.sd.model_sampling import PLAYGROUND_2_5
from nodes.sd.preview import preview_jpeg
from nodes.sd.samplers import SAMPLER_NAMES
from nodes.sd.schedules import SCHEDULER_NAMES
from nodes.sd.values import Conditioning, Latent

_TIP_CFG = (
    "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values "
    "result in images more closely matching the prompt however too high values will negatively impact "
    "quality."
)


def progress(ctx: RunContext, model: Any = None) -> StepCallback:
    """Report each step to the engine (which also raises Interrupted), with a preview when enabled
    (in the colours of `model`'s latent space: SDXL's differ from SD1.5's)."""

    # The prompt's own method (the client may ask for previews the server does not send by default).
    method = getattr(ctx, "preview_method", ctx.env.preview_method)
    sdxl = model is not None and adm_width(getattr(model, "unet", None)) is not None
    fmt = getattr(getattr(model, "sampling", None), "latent_format", None)
    playground = fmt == PLAYGROUND_2_5

    def on_step(i: int, total: int, x0: torch.Tensor) -> None:
        preview = None
        if method != "none":
            preview = Preview("image/jpeg", preview_jpeg(x0, sdxl=sdxl, playground=playground))
        ctx.progress(i + 1, total, preview)

    return on_step


def check_latent(latent: Any) -> None:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4:
        raise ValueError("latent_image: expected a LATENT with 'samples' [batch, 4, height/8, width/8]")
    if samples.shape[1] != 4:
        raise ValueError(
            f"latent_image: has {samples.shape[1]} channels but SD1.x and SDXL models sample 4; "
            "use a latent from EmptyLatentImage or VAEEncode of an SD/SDXL VAE"
        )


SAMPLED_FAMILIES = ("sd15", "sdxl", "sdxl_refiner")


def check_model(model: Any) -> None:
    """A MODEL the samplers can use, or an error naming the input."""
    if model is None or not hasattr(model, "unet"):
        raise ValueError("model: expected a MODEL from a checkpoint loader")
    if getattr(model, "family", "sd15") not in SAMPLED_FAMILIES:
        raise ValueError(
            f"model: {model.source} is a {model.family} model; the samplers support SD1.x and SDXL only"
        )


def run_ksampler(
    ctx: RunContext,
    model: ModelHandle,
    positive: Conditioning,
    negative: Conditioning,
    latent: Latent,
    request: SamplingRequest,
) -> tuple[Latent]:
    """Shared by both nodes: validate, sample, and say which input was wrong when it fails."""
    check_model(model)
    check_latent(latent)
    try:
        where = placement(ctx.env)
        return (sample(model, positive, negative, latent, request, progress(ctx, model), where),)
    except (ConditioningError, AdmError) as exc:
        raise ValueError(str(exc)) from exc


class KSampler(Node):
    """Uses the provided model, positive and negative conditioning to denoise the latent image."""

    DISPLAY_NAME = "KSampler"
    CATEGORY = "sampling"
    INPUTS = (
        Socket("model", MODEL, tooltip="The model used for denoising the input latent."),
        Int(
            "seed",
            0,
            min=0,
            max=MAX_SEED,
            control_after_generate=True,
            tooltip="The random seed used for creating the noise.",
        ),
        Int("steps", 20, min=1, max=10000, tooltip="The number of steps used in the denoising process."),
        Float("cfg", 8.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=_TIP_CFG),
        Combo(
            "sampler_name",
            choices=SAMPLER_NAMES,
            tooltip="The algorithm used when sampling, this can affect the quality, speed, and style of the "
            "generated output.",
        ),
        Combo(
            "scheduler",
            choices=SCHEDULER_NAMES,
            tooltip="The scheduler controls how noise is gradually removed to form the image.",
        ),
        Socket(
            "positive",
            CONDITIONING,
            tooltip="The conditioning describing the attributes you want to include in the image.",
        ),
        Socket(
            "negative",
            CONDITIONING,
            tooltip="The conditioning describing the attributes you want to exclude from the image.",
        ),
        Socket("latent_image", LATENT, tooltip="The latent image to denoise."),
        Float(
            "denoise",
            1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="The amount of denoising applied, lower values will maintain the structure of the "
            "initial image allowing for image to image sampling.",
        ),
    )
    OUTPUTS = (Output(LATENT, tooltip="The denoised latent."),)

    def run(
        self,
        ctx: RunContext,
        model: ModelHandle,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Conditioning,
        negative: Conditioning,
        latent_image: Latent,
        denoise: float,
    ) -> tuple[Latent]:
        request = SamplingRequest(seed, steps, cfg, sampler_name, scheduler, denoise=denoise)
        return run_ksampler(ctx, model, positive, negative, latent_image, request)


class KSamplerAdvanced(Node):
    """Denoise a latent over a window of steps, optionally without adding noise or leaving noise in."""

    DISPLAY_NAME = "KSampler (Advanced)"
    CATEGORY = "sampling"
    INPUTS = (
        Socket("model", MODEL),
        Combo("add_noise", choices=("enable", "disable")),
        Int("noise_seed", 0, min=0, max=MAX_SEED, control_after_generate=True),
        Int("steps", 20, min=1, max=10000),
        Float("cfg", 8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        Combo("sampler_name", choices=SAMPLER_NAMES),
        Combo("scheduler", choices=SCHEDULER_NAMES),
        Socket("positive", CONDITIONING),
        Socket("negative", CONDITIONING),
        Socket("latent_image", LATENT),
        Int("start_at_step", 0, min=0, max=10000),
        Int("end_at_step", 10000, min=0, max=10000),
        Combo("return_with_leftover_noise", choices=("disable", "enable")),
    )
    OUTPUTS = (Output(LATENT),)

    def run(
        self,
        ctx: RunContext,
        model: ModelHandle,
        add_noise: str,
        noise_seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Conditioning,
        negative: Conditioning,
        latent_image: Latent,
        start_at_step: int,
        end_at_step: int,
        return_with_leftover_noise: str,
    ) -> tuple[Latent]:
        request = SamplingRequest(
            noise_seed,
            steps,
            cfg,
            sampler_name,
            scheduler,
            add_noise=add_noise != "disable",
            start_step=start_at_step,
            last_step=end_at_step,
            force_full_denoise=return_with_leftover_noise != "enable",
        )
        return run_ksampler(ctx, model, positive, negative, latent_image, request)


NODES: tuple[type[Node], ...] = (KSampler, KSamplerAdvanced)
