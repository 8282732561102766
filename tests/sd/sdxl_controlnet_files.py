"""SDXL ControlNet files shaped for the oracle's mini SDXL checkpoint, in the layouts users download.

Built like the oracle's `make_mini_controlnet.py` (its PCG64-per-key tensors, fp16, its deterministic
safetensors writer), from the mini SDXL generator's own UNet specs and config (`make_mini_sdxl.py`):

* `write_sgm`: ComfyUI's / the original layout of SDXL ControlNets (`time_embed.*`, `label_emb.*`,
  `input_blocks.*`, `middle_block.*` as the UNet's encoder half, `zero_convs.N.0` (9 here),
  `input_hint_block.{0..14}`, `middle_block_out.0`), optionally with A1111's `control_model.` prefix.
  The "zero" convs have gain 0.5, as the oracle's SD1.5 ControlNet, so the control shows.
* `write_diffusers`: the same tensors under diffusers' `ControlNetModel` names, the layout of
  `diffusers/controlnet-canny-sdxl-1.0` and the other public SDXL ControlNets
  (`controlnet_cond_embedding.*`, `down_blocks.*`, `controlnet_down_blocks.*`, `add_embedding.*`).
  The encoder names come from the oracle's own LDM -> diffusers map (`unet_ldm_to_diffusers`), the
  ControlNet-only ones from diffusers' layout, written out here. `variant="small"` / `"mid"` write
  the reduced-depth layouts of `controlnet-canny-sdxl-1.0-small` / `-mid` (`VARIANTS`): the same
  tensors less the transformer blocks past each level's depth, every attention slot keeping its
  `norm` / `proj_in` / `proj_out` (a depth-0 `Transformer2DModel`, as diffusers saves one).
* `write_control_lora`: a Stability-style control LoRA (what ComfyUI's ControlLoraSave writes): every
  encoder weight of two or more dimensions as `<name>.up` `[out, r(, 1, 1)]` / `<name>.down`
  `[r, in(, k, k)]`, biases and norms and the ControlNet's own layers as full tensors, and an empty
  `lora_controlnet` marker. `merged_control_lora` gives the full SGM ControlNet it stands for on given
  UNet weights (weight + up @ down in fp32), the reference a control LoRA run is held to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from tests.sd.sdxl_lora_fixtures import oracle_sdxl

SEED = "cnxl0"
ZERO_CONV_GAIN = 0.5
HINT_CHANS = [16, 16, 32, 32, 96, 96, 256]
ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
RANK = 8
UNET = "model.diffusion_model."
# (transformer blocks per level, in the middle block) of diffusers' reduced SDXL ControlNets, on the
# mini's levels (its own are (0, 1, 2) / 2): controlnet-canny-sdxl-1.0-small and -mid
VARIANTS = {"small": ((0, 0, 0), 0), "mid": ((0, 0, 1), 1)}
_BLOCK = re.compile(r"(?:input_blocks\.(\d+)|middle_block)\.1\.transformer_blocks\.(\d+)\.")


def _zero_conv_channels(cfg: dict[str, Any]) -> list[int]:
    """Channels of each input block's output: conv_in, then per level its res blocks and downsampler."""
    mc = cfg["model_channels"]
    chans, ch = [mc], mc
    levels = len(cfg["channel_mult"])
    for level, mult in enumerate(cfg["channel_mult"]):
        for _ in range(cfg["num_res_blocks"]):
            ch = mult * mc
            chans.append(ch)
        if level != levels - 1:
            chans.append(ch)
    return chans


def controlnet_specs(oracle: Path) -> list[tuple[Any, ...]]:
    """(key, shape, kind, fan_in, gain) of the mini SDXL ControlNet, original names without prefix."""
    x = oracle_sdxl(oracle)
    cfg = x.UNET_CFG
    s = x.base.Specs()
    for spec in x.unet_specs(cfg, prefix=""):
        if spec[0].startswith(ENCODER):
            s.add(*spec)
    chans = _zero_conv_channels(cfg)
    for i, c in enumerate(chans):
        s.conv(f"zero_convs.{i}.0", c, c, 1, gain=ZERO_CONV_GAIN)
    cin = 3
    for j, cout in enumerate([*HINT_CHANS, cfg["model_channels"]]):
        s.conv(f"input_hint_block.{2 * j}", cin, cout, 3)
        cin = cout
    s.conv("middle_block_out.0", chans[-1], chans[-1], 1, gain=ZERO_CONV_GAIN)
    return list(s.items)


def sgm_tensors(oracle: Path, seed: str = SEED) -> dict[str, np.ndarray]:
    x = oracle_sdxl(oracle)
    return {spec[0]: x.base.make_tensor(seed, spec, "fp16") for spec in controlnet_specs(oracle)}


def write_sgm(oracle: Path, out: Path, prefix: str = "") -> Path:
    tensors = {prefix + k: v for k, v in sgm_tensors(oracle).items()}
    return _save(oracle, out, tensors)


def diffusers_names(oracle: Path) -> dict[str, str]:
    """Original ControlNet key -> diffusers `ControlNetModel` key."""
    x = oracle_sdxl(oracle)
    names = {k: v for k, v in x.unet_ldm_to_diffusers(x.UNET_CFG).items() if k.startswith(ENCODER)}
    zero = len(_zero_conv_channels(x.UNET_CFG))
    hint = [f"input_hint_block.{2 * j}" for j in range(len(HINT_CHANS) + 1)]
    own = {f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(zero)}
    own |= {"middle_block_out.0": "controlnet_mid_block", hint[0]: "controlnet_cond_embedding.conv_in"}
    own |= {h: f"controlnet_cond_embedding.blocks.{j}" for j, h in enumerate(hint[1:-1])}
    own[hint[-1]] = "controlnet_cond_embedding.conv_out"
    for ldm, dif in own.items():
        names |= {f"{ldm}.weight": f"{dif}.weight", f"{ldm}.bias": f"{dif}.bias"}
    return names


def _input_levels(cfg: dict[str, Any]) -> dict[int, int]:
    """Input block index -> level, for the blocks holding a res block (and perhaps a transformer)."""
    levels, idx = {}, 1
    for level in range(len(cfg["channel_mult"])):
        for _ in range(cfg["num_res_blocks"]):
            levels[idx] = level
            idx += 1
        idx += 1  # the level's downsampler
    return levels


def _in_variant(key: str, levels: dict[int, int], variant: str) -> bool:
    """Whether the original key `key` is in the reduced-depth `variant`."""
    found = _BLOCK.match(key)
    if found is None:
        return True
    depths, mid = VARIANTS[variant]
    depth = mid if found.group(1) is None else depths[levels[int(found.group(1))]]
    return int(found.group(2)) < depth


def write_diffusers(oracle: Path, out: Path, variant: str | None = None) -> Path:
    names = diffusers_names(oracle)
    levels = _input_levels(oracle_sdxl(oracle).UNET_CFG)
    tensors = {
        names[k]: v
        for k, v in sgm_tensors(oracle).items()
        if variant is None or _in_variant(k, levels, variant)
    }
    return _save(oracle, out, tensors)


def _lora_parts(oracle: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(full tensors, {weight key: (up, down)}) of the mini control LoRA."""
    x = oracle_sdxl(oracle)
    full: dict[str, np.ndarray] = {}
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec in controlnet_specs(oracle):
        key, shape = spec[0], spec[1]
        if len(shape) < 2 or not key.startswith(ENCODER):
            full[key] = x.base.make_tensor(SEED, spec, "fp16")
            continue
        stem, kernel = key[: -len(".weight")], tuple(shape[2:])
        fan_in = int(np.prod(shape[1:]))
        up_shape, down_shape = (shape[0], RANK, *([1] * len(kernel))), (RANK, shape[1], *kernel)
        # delta ~ 0.3 of the weight's own scale: up @ down has std gain_up * gain_down / sqrt(fan_in)
        up = x.base.make_tensor(SEED, (stem + ".up", up_shape, "w", RANK, 0.3), "fp16")
        down = x.base.make_tensor(SEED, (stem + ".down", down_shape, "w", fan_in, 1.0), "fp16")
        pairs[key] = (up, down)
    return full, pairs


def write_control_lora(oracle: Path, out: Path) -> Path:
    full, pairs = _lora_parts(oracle)
    tensors = dict(full)
    for key, (up, down) in pairs.items():
        stem = key[: -len(".weight")]
        tensors[stem + ".up"], tensors[stem + ".down"] = up, down
    tensors["lora_controlnet"] = np.zeros((0,), np.float16)
    return _save(oracle, out, tensors)


def checkpoint_encoder(oracle: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The encoder-half UNet weights of `checkpoint` a ControlNet copies, by full LDM key, in fp32."""
    keys = [spec[0] for spec in controlnet_specs(oracle) if spec[0].startswith(ENCODER)]
    with safe_open(str(checkpoint), "pt") as f:
        return {UNET + k: f.get_tensor(UNET + k).float() for k in keys}


def merged_control_lora(oracle: Path, unet: Mapping[str, torch.Tensor], out: Path) -> Path:
    """The full original-layout ControlNet (fp32) the control LoRA makes on a UNet whose weights are
    `unet` (full LDM keys): its weight + up @ down in fp32, the file's full tensors on top."""
    full, pairs = _lora_parts(oracle)
    tensors = {k: v.astype(np.float32) for k, v in full.items()}
    for key, (up, down) in pairs.items():
        weight = unet[UNET + key].float()
        up_t, down_t = torch.from_numpy(up).float(), torch.from_numpy(down).float()
        tensors[key] = (weight + (up_t.flatten(1) @ down_t.flatten(1)).reshape(weight.shape)).numpy()
    return _save(oracle, out, tensors)


def _save(oracle: Path, out: Path, tensors: dict[str, np.ndarray]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    oracle_sdxl(oracle).base.save_safetensors(str(out), tensors)
    return out
