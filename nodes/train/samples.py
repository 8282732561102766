"""Sample images while training, from kohya's prompt file, rendered by nodegraph's own sampler.

A prompt file holds one prompt a line (`#` lines and blank lines skipped) with kohya's options:
`--n negative`, `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--ss` sampler. The
images are drawn with the model as it is being trained (adapters hooked in, dropout off) through
`nodes.sd.ksampler.run_sampler`, the KSampler's own code, and saved as kohya names them
(`NAME_e000001_00_<time>_<seed>.png`, `NAME_000010_...` for step samples) in `output/NAME/samples/`.
SDXL prompts go through the SDXL text path (both encoders, pooled output; sizes from the latent, as
kohya's SDXL sampler: original = target = W×H, crop 0) and the sampler's added conditioning.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nodes.sd.handles import ClipHandle
from nodes.sd.ksampler import SamplingRequest, run_sampler
from nodes.sd.prompt import tokenize
from nodes.sd.text_encoder import encode_prompt
from nodes.sd.text_encoder_sdxl import encode_sdxl, tokenize_sdxl
from nodes.sd.vae import decode
from nodes.sd.values import Conditioning, Latent

# kohya's --sample_sampler names -> nodegraph's (ComfyUI's) sampler names
SAMPLERS = {
    "ddim": "ddim", "pndm": "ipndm", "lms": "lms", "k_lms": "lms", "euler": "euler", "k_euler": "euler",
    "euler_a": "euler_ancestral", "k_euler_a": "euler_ancestral", "heun": "heun", "dpm_2": "dpm_2",
    "k_dpm_2": "dpm_2", "dpm_2_a": "dpm_2_ancestral", "k_dpm_2_a": "dpm_2_ancestral",
    "dpmsolver": "dpmpp_2m", "dpmsolver++": "dpmpp_2m", "dpmsingle": "dpmpp_2s_ancestral",
}  # fmt: skip
_OPTION = re.compile(r"\s--(n|w|h|d|l|s|ss)\s+")


class SampleError(ValueError):
    """A prompt file that cannot be used; names the file and line."""


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the prompt file with kohya's defaults (512x512, 30 steps, CFG 7.5)."""

    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = 7.5
    steps: int = 30
    sampler: str | None = None


def read_prompts(path: Path) -> list[SamplePrompt]:
    """Parse a kohya prompt file (text; kohya's .toml/.json prompt files are not read)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleError(f"--sample_prompts '{path}' cannot be read as UTF-8 text ({exc})") from exc
    prompts = [
        _parse(line, path, n)
        for n, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise SampleError(f"--sample_prompts '{path}' holds no prompt lines")
    return prompts


def _parse(line: str, path: Path, number: int) -> SamplePrompt:
    parts = _OPTION.split(" " + line.strip())
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    fields = {
        "n": ("negative", str),
        "w": ("width", int),
        "h": ("height", int),
        "d": ("seed", int),
        "l": ("scale", float),
        "s": ("steps", int),
        "ss": ("sampler", str),
    }
    for key, raw in zip(parts[1::2], parts[2::2], strict=True):
        name, kind = fields[key]
        try:
            values[name] = kind(raw.strip())
        except ValueError as exc:
            raise SampleError(
                f"{path}:{number}: --{key} {raw.strip()!r} is not a valid {kind.__name__}"
            ) from exc
    if "sampler" in values and values["sampler"] not in SAMPLERS:
        raise SampleError(
            f"{path}:{number}: sampler {values['sampler']!r} is not one of {', '.join(SAMPLERS)}"
        )
    for side in ("width", "height"):  # kohya: max(64, v - v % 8)
        if side in values:
            values[side] = max(64, values[side] - values[side] % 8)
    return SamplePrompt(**values)


def render(
    prompts: list[SamplePrompt], models: Any, trainer: Any, folder: Path, name: str, suffix: str, sampler: str
) -> list[Path]:
    """Draw every prompt with the adapters as they are now; returns the PNG paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    cond = _encoder(models, trainer)
    written = []
    trainer.network.eval()
    try:
        for i, p in enumerate(prompts):
            seed = p.seed if p.seed is not None else trainer.options.seed + i
            request = SamplingRequest(seed, p.steps, p.scale, SAMPLERS[p.sampler or sampler], "normal")
            with torch.inference_mode():
                positive, negative = cond(p.prompt), cond(p.negative)
                latent: Latent = {"samples": torch.zeros(1, 4, p.height // 8, p.width // 8)}
                samples = run_sampler(models.unet, positive, negative, latent, request, None, trainer.device)
                image = decode(models.vae, samples)[0]
            pixels = (image.numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
            path = folder / f"{name}_{suffix}_{i:02d}_{stamp}_{seed}.png"
            Image.fromarray(pixels).save(path)
            written.append(path)
    finally:
        trainer.network.train()
    return written


def _encoder(models: Any, trainer: Any) -> Any:
    """prompt -> Conditioning with the (hooked) text encoders of the run's family."""
    if models.text_encoder_2 is not None:  # SDXL: kohya ignores --clip_skip here too
        sdxl = ClipHandle(
            models.text_encoder, trainer.tokenizer, "training", "sdxl", text_encoder_2=models.text_encoder_2
        )

        def encode_xl(text: str) -> Conditioning:
            hidden, pooled = encode_sdxl(sdxl, tokenize_sdxl(sdxl, text))
            return [(hidden, {"pooled_output": pooled})]

        return encode_xl
    skip = trainer.options.clip_skip
    layer = -skip if skip and skip > 1 else None
    clip = ClipHandle(models.text_encoder, trainer.tokenizer, "training", "sd15", layer_idx=layer)

    def encode(text: str) -> Conditioning:
        return [(encode_prompt(clip, tokenize(text, trainer.tokenizer))[0], {})]

    return encode
