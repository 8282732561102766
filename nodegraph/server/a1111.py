"""AUTOMATIC1111's txt2img/img2img requests as ComfyUI API graphs (core node ids), and its infotext.

A request becomes the graph a ComfyUI user would build for the same settings: checkpoint,
CLIP skip (`CLIPSetLastLayer`), the prompt's `<lora:...>` tags (`LoraTagLoader`, whose text
output feeds the positive encoder), the latent (empty, or the encoded init image), KSampler, an
optional latent hires pass, decode, save. So the image is the one that graph gives through `/prompt`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

# A1111 sampler names -> ComfyUI sampler names (modules/sd_samplers_kdiffusion.py, _timesteps.py).
SAMPLERS = {
    "Euler a": "euler_ancestral",
    "Euler": "euler",
    "LMS": "lms",
    "Heun": "heun",
    "DPM2": "dpm_2",
    "DPM2 a": "dpm_2_ancestral",
    "DPM++ 2S a": "dpmpp_2s_ancestral",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DPM fast": "dpm_fast",
    "DPM adaptive": "dpm_adaptive",
    "LCM": "lcm",
    "DDIM": "ddim",
    "DDPM": "ddpm",
    "UniPC": "uni_pc",
    "Euler CFG++": "euler_cfg_pp",
    "DPM++ 2M CFG++": "dpmpp_2m_cfg_pp",
}
# A1111 schedule types (modules/sd_schedulers.py) -> ComfyUI schedulers; "Automatic" is the
# sampler's own schedule, ComfyUI's "normal" (the model's discrete sigmas), "ddim_uniform" for DDIM.
SCHEDULERS = {
    "Uniform": "normal",
    "Normal": "normal",
    "Karras": "karras",
    "Exponential": "exponential",
    "SGM Uniform": "sgm_uniform",
    "KL Optimal": "kl_optimal",
    "Simple": "simple",
    "DDIM": "ddim_uniform",
    "Beta": "beta",
    "Linear Quadratic": "linear_quadratic",
}
# Old combined names ("DPM++ 2M Karras") name the schedule as a suffix.
_SUFFIXES = {" Karras": "Karras", " Exponential": "Exponential", " SGM Uniform": "SGM Uniform"}
LATENT_UPSCALERS = {
    "Latent": "bilinear",
    "Latent (antialiased)": "bilinear",
    "Latent (bicubic)": "bicubic",
    "Latent (bicubic antialiased)": "bicubic",
    "Latent (nearest)": "nearest-exact",
    "Latent (nearest-exact)": "nearest-exact",
}
# A1111's image-space upscalers that need no model file (modules/upscaler.py: UpscalerNone, UpscalerLanczos,
# UpscalerNearest) -> ImageScale methods; "None" resizes with Lanczos (modules/images.py resize_image).
IMAGE_UPSCALERS = {"None": "lanczos", "Lanczos": "lanczos", "Nearest": "nearest-exact"}
# inpainting_fill -> A1111's infotext "Masked content" (1, "original", writes none)
MASKED_CONTENT = {0: "fill", 2: "latent noise", 3: "latent nothing"}
# Bounds of the numbers a request may give (ComfyUI's: MAX_RESOLUTION, KSampler's steps and seed,
# EmptyLatentImage's batch, CLIPSetLastLayer's depth); `n_iter` queues that many prompts at once.
MAX_SIDE = 16384
MAX_STEPS = 10000
MAX_BATCH = 4096
MAX_REPEAT = 64  # img2img repeats the init image batch_size times (RepeatLatentBatch's amount)
MAX_N_ITER = 100
MAX_SEED = 2**64 - 1
MAX_CLIP_SKIP = 24
_LORA = re.compile(r"<(?:lora|lyco):([^:>]+)[^>]*>", re.IGNORECASE)


class A1111Error(ValueError):
    """A request field nodegraph cannot honour; the message names the field."""


def read_int(body: dict[str, Any], key: str, default: int, low: int, high: int, name: str = "") -> int:
    """`body[key]` as an integer in [low, high] (`default` when absent or null); A1111Error naming the
    field (`name`, else `key`) for anything else: another type, a fraction, a number out of range."""
    raw = body.get(key)
    value = default if raw is None else raw
    if isinstance(value, float) and math.isfinite(value):
        value = int(value)  # A1111's pydantic fields take 512.0 (and cut 7.5 to 7)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) < 40:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise A1111Error(f"{name or key}: expected an integer, got {_shown(raw)}")
    if not low <= value <= high:
        raise A1111Error(f"{name or key}: must be between {low} and {high}, got {value}")
    return int(value)


def read_float(
    body: dict[str, Any], key: str, default: float, low: float, high: float, name: str = ""
) -> float:
    """`body[key]` as a finite number in [low, high]; A1111Error naming the field otherwise."""
    raw = body.get(key)
    value = default if raw is None else raw
    if isinstance(value, str) and len(value) < 40:
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise A1111Error(f"{name or key}: expected a number, got {_shown(raw)}")
    if not low <= value <= high:
        raise A1111Error(f"{name or key}: must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def lora_names(prompt: str) -> list[str]:
    """The LoRA names a prompt's `<lora:name:...>` tags give, in order."""
    return [m.group(1).strip() for m in _LORA.finditer(prompt)]


def sampler_and_scheduler(sampler: str, scheduler: str | None) -> tuple[str, str]:
    """ComfyUI (sampler_name, scheduler) for A1111's names; also takes ComfyUI's own names."""
    name, schedule = sampler.strip(), str(scheduler or "Automatic").strip()
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix) and name not in SAMPLERS:
            name, schedule = name[: -len(suffix)], kind
    comfy = SAMPLERS.get(name) or next((v for k, v in SAMPLERS.items() if k.lower() == name.lower()), None)
    if comfy is None and name in SAMPLERS.values():
        comfy = name
    if comfy is None:
        raise A1111Error(f"sampler_name: unknown sampler {sampler!r}; GET /sdapi/v1/samplers lists them")
    if schedule.lower() == "automatic":
        return comfy, "ddim_uniform" if comfy == "ddim" else "normal"
    by_label = {k.lower(): v for k, v in SCHEDULERS.items()}
    found = by_label.get(schedule.lower()) or (schedule if schedule in SCHEDULERS.values() else None)
    if found is None:
        raise A1111Error(
            f"scheduler: unknown schedule type {scheduler!r}; GET /sdapi/v1/schedulers lists them"
        )
    return comfy, found


@dataclass
class Inpaint:
    """img2img's inpainting: the mask (already blurred, inverted and sized by the route, as A1111
    prepares it) as a LoadImageMask name, and how the masked area starts (`inpainting_fill`)."""

    mask_image: str  # at the processing size (width x height)
    # inpainting_fill: 0 fill -> VAEEncodeForInpaint (grey fill), 1 original, 2 latent noise,
    # 3 latent nothing -> the encoded image with SetLatentNoiseMask (2 and 3 replace the masked latent)
    fill: int
    blur: int = 4  # mask_blur, for the infotext (the route blurred the mask)
    # "Only masked" (inpaint_full_res): the (x, y, width, height) of the init image that is cut out,
    # scaled to the processing size, repainted and pasted back through `overlay_mask` (crop-sized).
    region: tuple[int, int, int, int] | None = None
    overlay_mask: str | None = None


@dataclass
class Job:
    """One A1111 request, resolved: the settings that went into the graph, for the infotext."""

    prompt: str
    negative: str
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    seed: int
    width: int
    height: int
    batch_size: int
    checkpoint: str
    clip_skip: int
    denoise: float | None = None  # img2img or hires
    hires: dict[str, Any] = field(default_factory=dict)
    init_image: str | None = None  # a LoadImage name in the input folder
    inpaint: Inpaint | None = None
    vae: str | None = None  # a vae-folder file (`sd_vae`); None: the checkpoint's own
    save: bool = False

    def graph(self) -> dict[str, Any]:
        """The ComfyUI API prompt for these settings."""
        g: dict[str, Any] = {"4": _node("CheckpointLoaderSimple", ckpt_name=self.checkpoint)}
        model: list[Any] = ["4", 0]
        clip: list[Any] = ["4", 1]
        vae: list[Any] = ["4", 2]
        if self.vae is not None:
            g["17"] = _node("VAELoader", vae_name=self.vae)
            vae = ["17", 0]
        if self.clip_skip > 1:
            g["10"] = _node("CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-self.clip_skip)
            clip = ["10", 0]
        text: Any = self.prompt
        if lora_names(self.prompt):
            g["11"] = _node("LoraTagLoader", model=model, clip=clip, text=self.prompt)
            model, clip, text = ["11", 0], ["11", 1], ["11", 2]
        g["6"] = _node("CLIPTextEncode", text=text, clip=clip)
        g["7"] = _node("CLIPTextEncode", text=self.negative, clip=clip)
        latent = self._latent(g, vae)
        if self.inpaint is not None and self.inpaint.fill in (2, 3):
            latent = self._masked_content(g, latent)
        first_denoise = 1.0 if self.init_image is None else float(self.denoise or 0.75)
        g["3"] = self._sampler(model, latent, first_denoise, self.steps)
        samples: list[Any] = ["3", 0]
        if self.hires:
            steps = int(self.hires.get("steps") or self.steps)
            g["16"] = self._sampler(model, self._upscaled(g, samples, vae), float(self.denoise or 0.7), steps)
            samples = ["16", 0]
        g["8"] = _node("VAEDecode", samples=samples, vae=vae)
        image: list[Any] = ["8", 0]
        if self.inpaint is not None:
            image = self._pasted_back(g, image)
        kind = "SaveImage" if self.save else "PreviewImage"
        g["9"] = _node(kind, images=image, **({"filename_prefix": "a1111"} if self.save else {}))
        return g

    def _pasted_back(self, g: dict[str, Any], image: list[Any]) -> list[Any]:
        """A1111 pastes the result over the init image through the (blurred) mask; for "Only masked"
        the result is first scaled back to the cut-out's size and pasted where it was cut."""
        assert self.inpaint is not None
        destination, mask, x, y = ["13", 0], ["22", 0], 0, 0
        if self.inpaint.region is not None:
            x, y, width, height = self.inpaint.region
            g["26"] = _node("ImageScale", image=image, upscale_method="lanczos", width=width, height=height,
                            crop="disabled")  # fmt: skip
            g["27"] = _node("LoadImageMask", image=self.inpaint.overlay_mask, channel="red")
            destination, mask, image = ["12", 0], ["27", 0], ["26", 0]
        if self.batch_size > 1:  # the composite takes the destination's batch size
            g["28"] = _node("RepeatImageBatch", image=destination, amount=self.batch_size)
            destination = ["28", 0]
        g["23"] = _node("ImageCompositeMasked", destination=destination, source=image, x=x, y=y,
                        resize_source=False, mask=mask)  # fmt: skip
        return ["23", 0]

    def _latent(self, g: dict[str, Any], vae: list[Any]) -> list[Any]:
        """The first pass's latent: empty, the encoded init image, or that with the inpainting mask."""
        if self.init_image is None:
            g["5"] = _node(
                "EmptyLatentImage", width=self.width, height=self.height, batch_size=self.batch_size
            )
            return ["5", 0]
        g["12"] = _node("LoadImage", image=self.init_image)
        pixels: list[Any] = ["12", 0]
        if self.inpaint is not None and self.inpaint.region is not None:
            x, y, width, height = self.inpaint.region
            g["25"] = _node("ImageCrop", image=pixels, width=width, height=height, x=x, y=y)
            pixels = ["25", 0]
        g["13"] = _node(
            "ImageScale", image=pixels, upscale_method="lanczos", width=self.width, height=self.height,
            crop="disabled",
        )  # fmt: skip
        if self.inpaint is None:
            g["5"] = _node("VAEEncode", pixels=["13", 0], vae=vae)
        else:
            g["22"] = _node("LoadImageMask", image=self.inpaint.mask_image, channel="red")
            if self.inpaint.fill == 0:
                g["5"] = _node(
                    "VAEEncodeForInpaint", pixels=["13", 0], vae=vae, mask=["22", 0], grow_mask_by=0
                )
            elif self.inpaint.fill == 1:
                g["24"] = _node("VAEEncode", pixels=["13", 0], vae=vae)
                g["5"] = _node("SetLatentNoiseMask", samples=["24", 0], mask=["22", 0])
            else:  # 2, 3: the masked latent is replaced once the batch is made (_masked_content)
                g["5"] = _node("VAEEncode", pixels=["13", 0], vae=vae)
        latent: list[Any] = ["5", 0]
        if self.batch_size > 1:
            g["14"] = _node("RepeatLatentBatch", samples=latent, amount=self.batch_size)
            latent = ["14", 0]
        return latent

    def _masked_content(self, g: dict[str, Any], latent: list[Any]) -> list[Any]:
        """A1111's "latent noise" (2) and "latent nothing" (3) (modules/processing.py,
        StableDiffusionProcessingImg2Img.init): the init latent's masked area is replaced by unit
        Gaussian noise drawn from the image's seed, or by zeros, before img2img adds its own noise.

        In core nodes: LatentCompositeMasked puts zeros (EmptyLatentImage) or that noise over the
        encoded batch under the mask, then SetLatentNoiseMask keeps the rest. The noise is SamplerCustom
        with `add_noise` on zeros and the one-sigma schedule [1.0] (KarrasScheduler 1 step from 1 to 1,
        SplitSigmas at 0): no model step runs, so its output is the seed's noise at sigma 1, the same
        draw as the KSampler's (same seed and batch shape), as A1111 reuses its seeds' first draw.
        The masked area therefore starts at (1 + sigma_0) x noise, as in A1111. Not copied: A1111's
        blurred-colour fill of the masked pixels before encoding (it only reaches the latent at the
        mask's edge) and its rounding of the latent mask."""
        assert self.inpaint is not None
        g["29"] = _node("EmptyLatentImage", width=self.width, height=self.height, batch_size=self.batch_size)
        source: list[Any] = ["29", 0]
        if self.inpaint.fill == 2:
            g["30"] = _node("KarrasScheduler", steps=1, sigma_max=1.0, sigma_min=1.0, rho=7.0)
            g["31"] = _node("SplitSigmas", sigmas=["30", 0], step=0)
            g["32"] = _node("KSamplerSelect", sampler_name="euler")
            g["33"] = _node(
                "SamplerCustom", model=["4", 0], add_noise=True, noise_seed=self.seed, cfg=1.0,
                positive=["6", 0], negative=["7", 0], sampler=["32", 0], sigmas=["31", 0],
                latent_image=source,
            )  # fmt: skip
            source = ["33", 0]
        g["34"] = _node(
            "LatentCompositeMasked", destination=latent, source=source, x=0, y=0, resize_source=False,
            mask=["22", 0],
        )  # fmt: skip
        g["35"] = _node("SetLatentNoiseMask", samples=["34", 0], mask=["22", 0])
        return ["35", 0]

    def _upscaled(self, g: dict[str, Any], samples: list[Any], vae: list[Any]) -> list[Any]:
        """Hires fix's upscale: of the latent, or (an image upscaler) decode, upscale, encode again."""
        size = self.hires["size"]
        if self.hires.get("latent"):
            g["15"] = _node("LatentUpscale", samples=samples, upscale_method=self.hires["latent"],
                            crop="disabled", **size)  # fmt: skip
            return ["15", 0]
        g["18"] = _node("VAEDecode", samples=samples, vae=vae)
        image: list[Any] = ["18", 0]
        if self.hires.get("model"):
            g["19"] = _node("UpscaleModelLoader", model_name=self.hires["model"])
            g["20"] = _node("ImageUpscaleWithModel", upscale_model=["19", 0], image=image)
            image = ["20", 0]
        g["21"] = _node(
            "ImageScale", image=image, upscale_method=self.hires["image"], crop="disabled", **size
        )
        g["15"] = _node("VAEEncode", pixels=["21", 0], vae=vae)
        return ["15", 0]

    def _sampler(self, model: list[Any], latent: list[Any], denoise: float, steps: int) -> dict[str, Any]:
        return _node(
            "KSampler", model=model, positive=["6", 0], negative=["7", 0], latent_image=latent,
            seed=self.seed, steps=steps, cfg=self.cfg, sampler_name=self.sampler, scheduler=self.scheduler,
            denoise=denoise,
        )  # fmt: skip


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def hires_size(body: dict[str, Any], width: int, height: int, models: dict[str, str]) -> dict[str, Any]:
    """Hires fix's target size and upscaler: a latent method (`latent`), or an image method (`image`)
    with an optional upscale model file (`model`, from `models`: A1111 name -> upscale_models file)."""
    upscaler = str(body.get("hr_upscaler") or "Latent")
    how: dict[str, Any]
    if upscaler in LATENT_UPSCALERS:
        how = {"latent": LATENT_UPSCALERS[upscaler]}
    elif upscaler in IMAGE_UPSCALERS:
        how = {"image": IMAGE_UPSCALERS[upscaler]}
    elif upscaler in models:
        how = {"image": "lanczos", "model": models[upscaler]}
    else:
        choices = [*LATENT_UPSCALERS, *IMAGE_UPSCALERS, *models]
        raise A1111Error(
            f"hr_upscaler: {upscaler!r} is not available; GET /sdapi/v1/upscalers and "
            f"/sdapi/v1/latent-upscale-modes list them ({', '.join(choices)})"
        )
    x = read_int(body, "hr_resize_x", 0, 0, MAX_SIDE)
    y = read_int(body, "hr_resize_y", 0, 0, MAX_SIDE)
    if x <= 0 and y <= 0:
        scale = read_float({"hr_scale": body.get("hr_scale") or None}, "hr_scale", 2.0, 0.01, 8.0)
        x, y = int(width * scale), int(height * scale)
    elif x <= 0:
        x = width * y // height
    elif y <= 0:
        y = height * x // width
    if max(x, y) > MAX_SIDE:
        raise A1111Error(f"hr_scale: the hires size {x}x{y} is over {MAX_SIDE} pixels a side")
    return {**how, "size": {"width": x // 8 * 8, "height": y // 8 * 8}}


def infotext(
    job: Job, seed: int, model_hash: str | None, lora_hashes: dict[str, str], version: str,
    vae_hash: str | None = None,
) -> str:  # fmt: skip
    """A1111's "parameters" text (modules/processing.py create_infotext) for one image."""
    params: dict[str, Any] = {
        "Steps": job.steps,
        "Sampler": next((k for k, v in SAMPLERS.items() if v == job.sampler), job.sampler),
        "Schedule type": next((k for k, v in SCHEDULERS.items() if v == job.scheduler), job.scheduler),
        "CFG scale": f"{job.cfg:g}",
        "Seed": seed,
        "Size": f"{job.width}x{job.height}",
        "Model hash": model_hash,
        "Model": job.checkpoint.rsplit(".", 1)[0],
        "VAE hash": vae_hash if job.vae else None,
        "VAE": job.vae.rsplit("/", 1)[-1] if job.vae else None,
        "Denoising strength": job.denoise if job.init_image is not None or job.hires else None,
        "Mask blur": job.inpaint.blur if job.inpaint else None,
        "Masked content": MASKED_CONTENT.get(job.inpaint.fill) if job.inpaint else None,
        "Clip skip": job.clip_skip if job.clip_skip > 1 else None,
    }
    if job.hires:
        params["Hires upscale"] = None
        params["Hires resize"] = f"{job.hires['size']['width']}x{job.hires['size']['height']}"
        params["Hires steps"] = job.hires.get("steps") or None
        params["Hires upscaler"] = job.hires.get("upscaler")
    if lora_hashes:
        params["Lora hashes"] = '"' + ", ".join(f"{k}: {v}" for k, v in lora_hashes.items()) + '"'
    params["Version"] = version
    line = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {job.negative}" if job.negative else ""
    return f"{job.prompt}{negative}\n{line}"


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext back into fields (modules/infotext_utils.py parse_generation_parameters)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines and re.search(r"\w+: [^,]+,", lines[-1] + ",") else ""
    body = lines[:-1] if last else lines
    prompt: list[str] = []
    negative: list[str] = []
    into_negative = False
    for line in body:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if into_negative else prompt).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            result[f"{key.strip()}-1"], result[f"{key.strip()}-2"] = size.group(1), size.group(2)
        result[key.strip()] = value
    return result
