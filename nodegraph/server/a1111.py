"""AUTOMATIC1111's txt2img/img2img requests as ComfyUI API graphs (core node ids), and its infotext.

A request becomes the graph a ComfyUI user would build for the same settings: checkpoint,
CLIP skip (`CLIPSetLastLayer`), the prompt's `<lora:...>` tags (`LoraTagLoader`, whose text
output feeds the positive encoder), the latent (empty, or the encoded init image), KSampler, an
optional latent hires pass, decode, save. So the image is the one that graph gives through `/prompt`.
"""

from __future__ import annotations

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
_LORA = re.compile(r"<(?:lora|lyco):([^:>]+)[^>]*>", re.IGNORECASE)


class A1111Error(ValueError):
    """A request field nodegraph cannot honour; the message names the field."""


def lora_names(prompt: str) -> list[str]:
    """The LoRA names a prompt's `<lora:name:...>` tags give, in order."""
    return [m.group(1).strip() for m in _LORA.finditer(prompt)]


def sampler_and_scheduler(sampler: str, scheduler: str | None) -> tuple[str, str]:
    """ComfyUI (sampler_name, scheduler) for A1111's names; also takes ComfyUI's own names."""
    name, schedule = sampler.strip(), (scheduler or "Automatic").strip()
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
    save: bool = False

    def graph(self) -> dict[str, Any]:
        """The ComfyUI API prompt for these settings."""
        g: dict[str, Any] = {"4": _node("CheckpointLoaderSimple", ckpt_name=self.checkpoint)}
        model: list[Any] = ["4", 0]
        clip: list[Any] = ["4", 1]
        if self.clip_skip > 1:
            g["10"] = _node("CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-self.clip_skip)
            clip = ["10", 0]
        text: Any = self.prompt
        if lora_names(self.prompt):
            g["11"] = _node("LoraTagLoader", model=model, clip=clip, text=self.prompt)
            model, clip, text = ["11", 0], ["11", 1], ["11", 2]
        g["6"] = _node("CLIPTextEncode", text=text, clip=clip)
        g["7"] = _node("CLIPTextEncode", text=self.negative, clip=clip)
        if self.init_image is None:
            g["5"] = _node(
                "EmptyLatentImage", width=self.width, height=self.height, batch_size=self.batch_size
            )
            latent: list[Any] = ["5", 0]
        else:
            g["12"] = _node("LoadImage", image=self.init_image)
            g["13"] = _node(
                "ImageScale", image=["12", 0], upscale_method="lanczos", width=self.width, height=self.height,
                crop="disabled",
            )  # fmt: skip
            g["5"] = _node("VAEEncode", pixels=["13", 0], vae=["4", 2])
            latent = ["5", 0]
            if self.batch_size > 1:
                g["14"] = _node("RepeatLatentBatch", samples=latent, amount=self.batch_size)
                latent = ["14", 0]
        first_denoise = 1.0 if self.init_image is None else float(self.denoise or 0.75)
        g["3"] = self._sampler(model, latent, first_denoise, self.steps)
        samples: list[Any] = ["3", 0]
        if self.hires:
            g["15"] = _node("LatentUpscale", samples=samples, crop="disabled", **self.hires["size"])
            steps = int(self.hires.get("steps") or self.steps)
            g["16"] = self._sampler(model, ["15", 0], float(self.denoise or 0.7), steps)
            samples = ["16", 0]
        g["8"] = _node("VAEDecode", samples=samples, vae=["4", 2])
        kind = "SaveImage" if self.save else "PreviewImage"
        g["9"] = _node(kind, images=["8", 0], **({"filename_prefix": "a1111"} if self.save else {}))
        return g

    def _sampler(self, model: list[Any], latent: list[Any], denoise: float, steps: int) -> dict[str, Any]:
        return _node(
            "KSampler", model=model, positive=["6", 0], negative=["7", 0], latent_image=latent,
            seed=self.seed, steps=steps, cfg=self.cfg, sampler_name=self.sampler, scheduler=self.scheduler,
            denoise=denoise,
        )  # fmt: skip


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def hires_size(body: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """LatentUpscale's size and method for A1111's hires fix fields."""
    upscaler = str(body.get("hr_upscaler") or "Latent")
    method = LATENT_UPSCALERS.get(upscaler)
    if method is None:
        raise A1111Error(
            f"hr_upscaler: {upscaler!r} is not available; nodegraph's hires fix upscales the latent "
            f"({', '.join(LATENT_UPSCALERS)})"
        )
    x, y = int(body.get("hr_resize_x") or 0), int(body.get("hr_resize_y") or 0)
    if x <= 0 and y <= 0:
        scale = float(body.get("hr_scale") or 2.0)
        x, y = int(width * scale), int(height * scale)
    elif x <= 0:
        x = width * y // height
    elif y <= 0:
        y = height * x // width
    return {"upscale_method": method, "width": x // 8 * 8, "height": y // 8 * 8}


def infotext(job: Job, seed: int, model_hash: str | None, lora_hashes: dict[str, str], version: str) -> str:
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
        "Denoising strength": job.denoise if job.init_image is not None or job.hires else None,
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
