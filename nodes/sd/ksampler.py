"""One KSampler run, from a LATENT to a LATENT: ComfyUI's common_ksampler -> KSAMPLER.sample chain.

Sources: nodes.py `common_ksampler`, comfy/sample.py, comfy/samplers.py (`KSampler`, `CFGGuider`,
`KSAMPLER.sample`, `KSamplerX0Inpaint`) and comfy/latent_formats.py. The steps, in order:

1. Initial noise from the seed on CPU (or zeros when noise is disabled).
2. Sigmas from the scheduler (denoise tail, discarded penultimate sigma, start/end window).
3. The latent enters model space (x 0.18215; SDXL x 0.13025) only if it has a nonzero element.
4. x_T = latent + noise * sqrt(1 + sigma_0^2) at full denoise (sigma_0 ~ sigma_max), else noise * sigma_0.
5. The sampler runs inside the LoRA patch context and inference mode.
6. The result leaves model space (/ the same factor).

An inpainting UNet (9 input channels) gets model_base.BaseModel.concat_cond's extra channels per
conditioning entry (`InpaintConcat`); a 4-channel UNet ignores those options, as in ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nodes.sd import unet_patches
from nodes.sd.cond_entries import CondEntry
from nodes.sd.control import has_control_lora
from nodes.sd.device import Placement, place
from nodes.sd.guidance import CFGDenoiser, ConcatFor
from nodes.sd.guiders import CFGGuide, Guide
from nodes.sd.hypernetwork import hypernetworks_applied
from nodes.sd.latent_ops import common_upscale
from nodes.sd.model_sampling import EPS, LatentFormat, ModelSampling
from nodes.sd.noise import prepare_noise
from nodes.sd.patcher import patched
from nodes.sd.samplers import CFG_PP, DISCARD_PENULTIMATE, SAMPLERS
from nodes.sd.samplers.k_diffusion import Model, Sampler
from nodes.sd.schedules import DiscreteSchedule, sampler_sigmas, split_sigmas
from nodes.sd.values import Latent

SD15_SCALE = 0.18215
SDXL_SCALE = 0.13025  # comfy/latent_formats.py SDXL (base and refiner)
SD15_LATENT, SDXL_LATENT = LatentFormat(SD15_SCALE), LatentFormat(SDXL_SCALE)
INPAINT_IN_CHANNELS = 9  # an SD1.x inpainting UNet: latent (4) + mask (1) + masked-image latent (4)
# latent_formats.SD15 blank_inpaint_image_like: a grey (0.5) image in SD1.x latent space (scaled)
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, total steps, x0 in model space)


@dataclass(frozen=True)
class SamplingRequest:
    """Everything one KSampler / KSamplerAdvanced call decides."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0
    add_noise: bool = True
    start_step: int | None = None
    last_step: int | None = None
    force_full_denoise: bool = False


def sigmas_for(request: SamplingRequest, schedule: DiscreteSchedule) -> torch.Tensor | None:
    """The sigmas this request samples over; None when the window leaves nothing to do."""
    if request.sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {request.sampler_name!r}")
    sigmas = sampler_sigmas(
        schedule,
        request.scheduler,
        request.steps,
        request.denoise,
        discard_penultimate=request.sampler_name in DISCARD_PENULTIMATE,
    )
    return split_sigmas(sigmas, request.start_step, request.last_step, request.force_full_denoise)


def initial_noise(latent: Latent, request: SamplingRequest) -> torch.Tensor:
    samples: torch.Tensor = latent["samples"]
    if not request.add_noise:
        return torch.zeros(samples.size(), dtype=samples.dtype, layout=samples.layout)
    return prepare_noise(samples, request.seed, latent.get("batch_index"))


def _denoise_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """comfy.sampler_helpers.prepare_mask: bilinear to latent size, one copy per channel and item."""
    mask = torch.nn.functional.interpolate(
        mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float(),
        size=(shape[2], shape[3]),
        mode="bilinear",
    )
    mask = torch.cat([mask] * shape[1], dim=1)
    if mask.shape[0] < shape[0]:
        mask = mask.repeat(math.ceil(shape[0] / mask.shape[0]), 1, 1, 1)
    return mask[: shape[0]]


MaskFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, denoise mask) -> mask


def differential_mask(strength: float, sigmas: torch.Tensor, schedule: DiscreteSchedule) -> MaskFunction:
    """DifferentialDiffusion's denoise_mask_function: at each step the mask is 1 where it reaches the
    run's progress in timesteps (1 at the first sigma, 0 at the last or sigma_min), blended with the
    soft mask by 1 − strength."""
    sigma_to = sigmas[-1] if sigmas[-1] > schedule.sigma_min else schedule.sigma_min
    ts_from, ts_to = schedule.timestep(sigmas[0]), schedule.timestep(sigma_to)

    def mask_for(sigma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        threshold = (schedule.timestep(sigma[0]) - ts_to) / (ts_from - ts_to)
        binary = (mask >= threshold).to(mask.dtype)
        return strength * binary + (1 - strength) * mask if strength and strength < 1 else binary

    return mask_for


class _Inpaint:
    """KSamplerX0Inpaint: keep the unmasked region on the noised original latent (the mask passed
    through the model's denoise_mask_function, DifferentialDiffusion's, at each call)."""

    def __init__(
        self,
        model: CFGDenoiser,
        mask: torch.Tensor,
        latent: torch.Tensor,
        noise: torch.Tensor,
        mask_function: MaskFunction | None = None,
    ) -> None:
        self.model, self.mask, self.mask_function = model, mask, mask_function
        self.latent, self.noise = latent, noise

    @property
    def uncond_denoised(self) -> torch.Tensor | None:
        return self.model.uncond_denoised

    @property
    def schedule(self) -> DiscreteSchedule:
        return self.model.schedule

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mask = self.mask if self.mask_function is None else self.mask_function(sigma, self.mask)
        keep = 1.0 - mask
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))
        x = x * mask + (self.noise * s + self.latent) * keep
        return self.model(x, sigma) * mask + self.latent * keep


def resize_to_batch_size(t: torch.Tensor, batch: int) -> torch.Tensor:
    """comfy.utils.resize_to_batch_size: pick (not repeat) items spread evenly over the batch."""
    have = t.shape[0]
    if have == batch:
        return t
    if batch <= 1:
        return t[:batch]
    if batch < have:
        scale = (have - 1) / (batch - 1)
        picks = [min(round(i * scale), have - 1) for i in range(batch)]
    else:
        scale = have / batch
        picks = [min(math.floor((i + 0.5) * scale), have - 1) for i in range(batch)]
    return t[picks]


@dataclass(frozen=True)
class InpaintConcat:
    """BaseModel.concat_cond for an inpainting UNet (concat keys "mask", "masked_image").

    `latent_image` is the KSampler's latent in model space; `denoise_mask` its prepared noise mask
    ([B, C, h, w], see `_denoise_mask`) or None.
    """

    latent_image: torch.Tensor
    denoise_mask: torch.Tensor | None
    latent_format: LatentFormat = SD15_LATENT

    def __call__(self, entry: CondEntry, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The entry's c_concat for a latent of `shape`: cat([mask, masked-image latent])."""
        batch, height, width = shape[0], shape[-2], shape[-1]
        # 1. The entry's own mask wins over the latent's noise mask; its image over the latent.
        mask = entry.concat_mask if entry.concat_mask is not None else self.denoise_mask
        image = self.latent_image
        if entry.concat_latent_image is not None:
            image = self.latent_format.process_in(entry.concat_latent_image.to(device, torch.float32))
        if tuple(image.shape[1:]) != (shape[1], height, width):
            image = common_upscale(image.float(), width, height, "bilinear", "center")
        image = resize_to_batch_size(image, batch)
        if mask is None:  # 2. no mask anywhere: everything is to be painted, on a blank image
            blank = torch.tensor(BLANK_INPAINT_LATENT, device=device).reshape(1, -1, 1, 1)
            return torch.cat([torch.ones((batch, 1, height, width), device=device), blank.expand(shape)], 1)
        # 3. One mask channel at latent size, rounded, spread over the batch.
        mask = mask.to(device, torch.float32)
        if mask.dim() == 4:
            mask = mask[:, :1]
        mask = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        if tuple(mask.shape[-2:]) != (height, width):
            mask = common_upscale(mask, width, height, "bilinear", "center")
        mask = resize_to_batch_size(mask.round(), batch)
        return torch.cat([mask, image.to(device, torch.float32)], dim=1)


def run_sampler(
    unet: Any,
    positive: Any,
    negative: Any,
    latent: Latent,
    request: SamplingRequest,
    on_step: StepCallback | None = None,
    device: torch.device | None = None,
    sampling: ModelSampling = EPS,
) -> torch.Tensor:
    """Sample with a UNet that is already patched; returns the new latent samples (unscaled, CPU)."""
    noise = initial_noise(latent, request)
    sigmas = sigmas_for(request, sampling.schedule)
    if sigmas is None or sigmas.shape[-1] == 0:
        samples: torch.Tensor = latent["samples"]
        return samples.float()  # nothing to sample: ComfyUI returns the input latent as is
    guide = CFGGuide(positive, negative, request.cfg)
    sampler = SAMPLERS[request.sampler_name]
    return run_guided(
        unet,
        guide,
        latent,
        noise,
        sigmas,
        request.sampler_name,
        sampler,
        request.seed,
        on_step,
        device,
        sampling,
    )


def run_guided(
    unet: Any,
    guide: Guide,
    latent: Latent,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    sampler_name: str,
    sampler: Sampler,
    seed: int,
    on_step: StepCallback | None = None,
    device: torch.device | None = None,
    sampling: ModelSampling = EPS,
) -> torch.Tensor:
    """CFGGuider.sample with a UNet that is already patched: the latent, noise and sigmas given.

    `sampling`: the model's parameterisation, sigma table and latent format (the MODEL handle's;
    without a format of its own, the UNet's: `latent_format`).

    The noise is drawn on the CPU (as ComfyUI does) and, like the latent, the sigmas and the
    conditioning, moved to `device` (the UNet's) for sampling. Returns unscaled CPU samples.
    """
    device = device or torch.device("cpu")
    schedule = sampling.schedule
    samples: torch.Tensor = latent["samples"].float()
    if sigmas.shape[-1] == 0:
        return samples
    noise, sigmas = noise.to(device), sigmas.to(device)
    samples = samples.to(device)
    fmt = latent_format(unet, sampling)
    model_latent = fmt.process_in(samples) if torch.count_nonzero(samples) > 0 else samples
    config = getattr(unet, "config", None)
    mask = _denoise_mask(latent["noise_mask"], samples.shape).to(device) if "noise_mask" in latent else None
    concat_for: ConcatFor | None = None
    if getattr(config, "in_channels", 4) == INPAINT_IN_CHANNELS:
        concat_for = InpaintConcat(model_latent, mask, fmt)
    guider = guide.denoiser(unet, sampling, device, sampler_name in CFG_PP, concat_for)
    denoiser: Model = guider
    if mask is not None:
        inpaint_noise = noise
        if sampler_name == "ddim":  # ComfyUI's ddim re-noises the kept region from seed + 1
            generator = torch.manual_seed((seed + 1) % 2**64)
            inpaint_noise = torch.randn(noise.shape, generator=generator).to(device)
        functions = [
            p for p in unet_patches.active(unet) if isinstance(p, unet_patches.DifferentialDiffusion)
        ]
        mask_function = differential_mask(functions[-1].strength, sigmas, schedule) if functions else None
        denoiser = _Inpaint(guider, mask, model_latent, inpaint_noise, mask_function)
    sigma_max, sigma0 = float(schedule.sigma_max), float(sigmas[0])
    max_denoise = math.isclose(sigma_max, sigma0, rel_tol=1e-5) or sigma0 > sigma_max
    s0 = sigmas[0]
    x = noise * torch.sqrt(1.0 + s0**2.0) if max_denoise else noise * s0
    x += model_latent
    total = len(sigmas) - 1

    def callback(i: int, denoised: torch.Tensor, _x: torch.Tensor) -> None:
        if on_step is not None:
            on_step(i, total, denoised)

    result: torch.Tensor = sampler(denoiser, x, sigmas, seed, callback)
    return fmt.process_out(result.to(torch.float32).cpu())


def latent_scale(unet: Any) -> float:
    """The latent format's scale factor for a UNet: SDXL's (base and refiner: a UNet with SDXL's
    `text_time` added conditioning) 0.13025, else SD1.x's 0.18215."""
    config = getattr(unet, "config", None)
    return SDXL_SCALE if getattr(config, "addition_embed_type", None) == "text_time" else SD15_SCALE


def latent_format(unet: Any, sampling: ModelSampling = EPS) -> LatentFormat:
    """The model's latent format: the sampling's own (Playground v2.5), else the UNet's scale."""
    if sampling.latent_format is not None:
        return sampling.latent_format
    return SDXL_LATENT if latent_scale(unet) == SDXL_SCALE else SD15_LATENT


def sample(
    model: Any,
    positive: Any,
    negative: Any,
    latent: Latent,
    request: SamplingRequest,
    on_step: StepCallback | None = None,
    where: Placement | None = None,
) -> Latent:
    """common_ksampler: patch the model's LoRAs in, sample, and return a new LATENT dict."""
    if where is not None:
        place(model.unet, where.device, where.unet)
    with (
        patched(model.unet, model.loras, target="unet", exact=has_control_lora(positive, negative)) as unet,
        hypernetworks_applied(unet, model.hypernetworks),
        unet_patches.applied(unet, model.patches),
        torch.inference_mode(),
    ):
        device = next(unet.parameters()).device
        samples = run_sampler(unet, positive, negative, latent, request, on_step, device, model.sampling)
    out = latent.copy()
    out["samples"] = samples
    return out
