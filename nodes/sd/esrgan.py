"""ESRGAN-family upscale models (RRDBNet): reading the file, detecting its layout, the network.

Written from the published architecture (Wang et al., "ESRGAN", 2018; BasicSR's RRDBNet) because
the library ComfyUI uses for this, spandrel, is one more dependency for a small network. Three key
layouts are in circulation and all load into one module whose parameter names are BasicSR's:

* BasicSR / Real-ESRGAN: `conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_upI`, `conv_hr`,
  `conv_last` (RealESRGAN_x4plus, 4x-UltraSharp, 4x_NMKD-Siax, ...);
* xinntao's ESRGAN repository: `RRDB_trunk.N.RDBK.convJ`, `trunk_conv`, `upconvI`, `HRconv`;
* the original ESRGAN release: one `nn.Sequential` named `model` (`model.0`, `model.1.sub.N.RDBK.
  convJ.0`, `model.1.sub.<nb>`, then an upsampling conv every 3 indices, then the two last convs).

Real-ESRGAN's x2 and x1 models pixel-unshuffle the input first (by 2 and 4): their first conv takes
4 or 16 times the image channels, which is how they are recognised.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (
    "ESRGAN/RRDBNet in the BasicSR/Real-ESRGAN layout (conv_first, body.N.rdb1...), "
    "xinntao's ESRGAN layout (RRDB_trunk.N.RDB1...) or the original ESRGAN layout (model.0, "
    "model.1.sub.N.RDB1...)"
)
NEGATIVE_SLOPE = 0.2  # every activation in ESRGAN is LeakyReLU(0.2)
RESIDUAL_SCALE = 0.2  # each dense block and each RRDB adds 0.2 x its output to its input


class UpscaleModelError(ValueError):
    """An upscale model file cannot be used; the message names the file."""


@dataclass(frozen=True)
class EsrganConfig:
    """The hyperparameters of one RRDBNet, read from a state dict's keys and shapes."""

    in_channels: int  # image channels (before any pixel-unshuffle)
    out_channels: int
    filters: int  # nf
    blocks: int  # nb, the number of RRDBs
    growth: int  # gc, channels each dense conv adds
    upsamples: int  # nearest x2 + conv steps
    unshuffle: int  # 1, or Real-ESRGAN's pixel-unshuffle factor (2 for x2 models, 4 for x1)

    @property
    def scale(self) -> int:
        """Output pixels per input pixel along each side."""
        return int(2**self.upsamples // self.unshuffle)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the input and every earlier conv's output (dense connections)."""

    def __init__(self, filters: int, growth: int) -> None:
        super().__init__()
        for j in range(1, 5):
            self.add_module(f"conv{j}", nn.Conv2d(filters + (j - 1) * growth, growth, 3, padding=1))
        self.conv5 = nn.Conv2d(filters + 4 * growth, filters, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for j in range(1, 5):
            conv = getattr(self, f"conv{j}")
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), NEGATIVE_SLOPE))
        out: torch.Tensor = self.conv5(torch.cat(features, 1))
        return out * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks in a row, plus a scaled skip."""

    def __init__(self, filters: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(filters, growth)
        self.rdb2 = ResidualDenseBlock(filters, growth)
        self.rdb3 = ResidualDenseBlock(filters, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: image [B, C, H, W] in [0, 1] -> [B, C', s*H, s*W] (not clamped)."""

    def __init__(self, config: EsrganConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.conv_first = nn.Conv2d(c.in_channels * c.unshuffle**2, c.filters, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(c.filters, c.growth) for _ in range(c.blocks)))
        self.conv_body = nn.Conv2d(c.filters, c.filters, 3, padding=1)
        for i in range(1, c.upsamples + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(c.filters, c.filters, 3, padding=1))
        self.conv_hr = nn.Conv2d(c.filters, c.filters, 3, padding=1)
        self.conv_last = nn.Conv2d(c.filters, c.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2], x.shape[3]
        factor = self.config.unshuffle
        # 1. Real-ESRGAN x2/x1: pad right and bottom to a multiple of the factor, fold pixels into channels.
        if factor > 1:
            x = F.pixel_unshuffle(_pad_to_multiple(x, factor), factor)
        # 2. Features, the RRDB trunk with its long skip, then nearest x2 + conv per upsampling step.
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.config.upsamples + 1):
            up = getattr(self, f"conv_up{i}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), NEGATIVE_SLOPE)
        out: torch.Tensor = self.conv_last(F.leaky_relu(self.conv_hr(feat), NEGATIVE_SLOPE))
        # 3. Drop what the padding added.
        scale = self.config.scale
        return out[:, :, : height * scale, : width * scale]


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad_h, pad_w = -x.shape[2] % multiple, -x.shape[3] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    # Reflection needs a side longer than its padding; a 1-2 pixel image repeats its edge instead.
    mode = "reflect" if pad_h < x.shape[2] and pad_w < x.shape[3] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


@dataclass(frozen=True, eq=False)
class UpscaleModel:
    """A loaded upscale model: the network (eval mode, float32, never modified) and its file's name."""

    net: RRDBNet
    source: str

    @property
    def scale(self) -> int:
        return self.net.config.scale

    @property
    def config(self) -> EsrganConfig:
        return self.net.config


# ---- reading files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors/.sft or a pickle (.pth/.pt/...) read with `weights_only=True`."""
    if path.suffix.lower() in (".safetensors", ".sft"):
        return _read_safetensors(path)
    try:
        data = _torch_load(path)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # it asks for no code (a class or function): damaged
            raise UpscaleModelError(
                f"'{path.name}' cannot be read as a PyTorch file; download it again"
            ) from exc
        raise UpscaleModelError(
            f"'{path.name}' is a pickle that needs code to run to be loaded; nodegraph refuses to run it. "
            "Use a .safetensors version of the model, or convert it with a tool you trust"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise UpscaleModelError(
            f"'{path.name}' cannot be read as a PyTorch file ({exc}); download it again"
        ) from exc
    # BasicSR saves {"params_ema": ..., "params": ...}; the EMA weights are the released ones.
    for wrapper in ("params_ema", "params", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict):
        raise UpscaleModelError(f"'{path.name}' does not hold a state dict (found {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _torch_load(path: Path) -> object:
    try:  # memory-mapped: a checkpoint picked by mistake is not read whole
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)  # old (non-zip) format


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())  # noqa: SIM118 - safe_open has no iteration
            # Refuse before reading any tensor: a checkpoint picked by mistake is gigabytes.
            if _layout(_strip_module(keys) or keys) is None:
                raise UpscaleModelError(
                    f"'{path.name}' is not an ESRGAN/RRDBNet model{_looks_like(keys)}; supported: {SUPPORTED}"
                )
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UpscaleModelError(
            f"'{path.name}' cannot be read as a safetensors file ({exc}); download it again"
        ) from exc


def load_upscale_model(path: Path, name: str | None = None) -> UpscaleModel:
    """Read, detect and strictly load an ESRGAN-family model file."""
    label = name or path.name
    state = read_state_dict(path)
    state = to_basicsr_names(state, label)
    config = detect_config(state, label)
    net = RRDBNet(config)
    missing, unexpected = _key_differences(net, state)
    if missing or unexpected:
        raise UpscaleModelError(
            f"'{label}' looks like an RRDBNet but its keys do not fit one "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}); supported: {SUPPORTED}"
        )
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:  # a shape that does not match the detected hyperparameters
        first = str(exc).strip().splitlines()[-1].strip()
        raise UpscaleModelError(f"'{label}' has a tensor of the wrong shape for an RRDBNet: {first}") from exc
    net.eval().requires_grad_(False)
    return UpscaleModel(net=net, source=label)


def _key_differences(net: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(net.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


# ---- layouts


_XINNTAO = [
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)$"), r"body.\1.rdb\2.conv\3.\4"),
    (re.compile(r"^trunk_conv\.(weight|bias)$"), r"conv_body.\1"),
    (re.compile(r"^upconv(\d+)\.(weight|bias)$"), r"conv_up\1.\2"),
    (re.compile(r"^HRconv\.(weight|bias)$"), r"conv_hr.\1"),
]
_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_OLD_TRUNK_END = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")


def to_basicsr_names(state: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """The state dict renamed to BasicSR's names; an unknown layout is a clear error."""
    if _strip_module(list(state)) is not None and state:
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from nn.DataParallel
    layout = _layout(list(state))
    if layout == "esrgan+":
        raise UpscaleModelError(
            f"'{label}' is an ESRGAN+ model (conv1x1 layers), which is not supported; supported: {SUPPORTED}"
        )
    if layout == "basicsr":
        return dict(state)
    if layout == "xinntao":
        return {_rename(k, _XINNTAO): v for k, v in state.items()}
    if layout == "esrgan":
        return _from_old_layout(state, label)
    raise UpscaleModelError(
        f"'{label}' is not an ESRGAN/RRDBNet model{_looks_like(list(state))}; supported: {SUPPORTED}"
    )


def _strip_module(keys: list[str]) -> list[str] | None:
    """The keys without nn.DataParallel's "module." prefix, or None when they do not all carry it."""
    if keys and all(k.startswith("module.") for k in keys):
        return [k[len("module.") :] for k in keys]
    return None


def _layout(keys: list[str] | None) -> str | None:
    """Which RRDBNet naming the keys use, from a few marker keys; None for anything else."""
    if keys is None:
        return None
    names = set(keys)
    if any(".conv1x1." in k for k in names):
        return "esrgan+"
    if "conv_first.weight" in names and "body.0.rdb1.conv1.weight" in names:
        return "basicsr"
    if "conv_first.weight" in names and "RRDB_trunk.0.RDB1.conv1.weight" in names:
        return "xinntao"
    if "model.0.weight" in names and "model.1.sub.0.RDB1.conv1.0.weight" in names:
        return "esrgan"
    return None


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in rules:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def _from_old_layout(state: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """Map the original ESRGAN `model.N` sequence onto BasicSR names.

    The sequence is: 0 conv_first, 1 the trunk (`sub.0..nb-1` RRDBs, `sub.nb` conv_body), then per
    upsampling step [Upsample, conv, LeakyReLU] (convs at 3, 6, ...), then conv_hr, LeakyReLU,
    conv_last: so with k steps the convs sit at 3..3k, 3k+2 and 3k+4.
    """
    out: dict[str, torch.Tensor] = {}
    top: dict[int, dict[str, torch.Tensor]] = {}
    trunk_end = -1
    for key, value in state.items():
        if m := _OLD_RDB.match(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := _OLD_TRUNK_END.match(key):
            out[f"conv_body.{m[2]}"] = value  # checked against nb below
            trunk_end = int(m[1])
        elif m := _OLD_TOP.match(key):
            top.setdefault(int(m[1]), {})[m[2]] = value
        else:
            out[key] = value  # left as is: the strict load names it
    blocks = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("body."))
    indices = sorted(i for i in top if i != 0)
    steps = (len(indices) - 2) if len(indices) >= 2 else -1
    expected = [*(3 * i for i in range(1, steps + 1)), 3 * steps + 2, 3 * steps + 4]
    if "conv_body.weight" not in out or trunk_end != blocks or indices != expected:
        raise UpscaleModelError(
            f"'{label}' has the original ESRGAN names but not its layer sequence "
            f"(convs at model.{indices}, expected model.{expected}); supported: {SUPPORTED}"
        )
    names = {0: "conv_first", **{3 * i: f"conv_up{i}" for i in range(1, steps + 1)}}
    names |= {3 * steps + 2: "conv_hr", 3 * steps + 4: "conv_last"}
    for index, params in top.items():
        for kind, value in params.items():
            out[f"{names[index]}.{kind}"] = value
    return out


def _looks_like(keys: list[str]) -> str:
    if any("lora_down" in k or "lora_A" in k or k.startswith("lora_") for k in keys):
        return " (it looks like a LoRA: put it in models/loras)"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return " (it looks like a Stable Diffusion checkpoint: put it in models/checkpoints)"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return " (it looks like a VAE: put it in models/vae)"
    if not keys:
        return " (it holds no tensors)"
    return f" (first keys: {keys[:3]})"


def detect_config(state: dict[str, torch.Tensor], label: str) -> EsrganConfig:
    """nb, nf, gc, channels and scale from a state dict in BasicSR names."""
    try:
        first, last = state["conv_first.weight"], state["conv_last.weight"]
        growth = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as exc:
        raise UpscaleModelError(
            f"'{label}' lacks {exc} and is not a complete RRDBNet; supported: {SUPPORTED}"
        ) from exc
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    upsamples = len({k.split(".")[0] for k in state if re.match(r"^conv_up\d+\.", k)})
    out_channels, first_in = last.shape[0], first.shape[1]
    # Real-ESRGAN's unshuffled inputs: 4x (x2 models) or 16x (x1 models) the output's channels.
    unshuffle = {out_channels * 4: 2, out_channels * 16: 4}.get(first_in, 1)
    if 2**upsamples % unshuffle:
        raise UpscaleModelError(
            f"'{label}' unshuffles by {unshuffle} but upsamples only {2**upsamples}x; supported: {SUPPORTED}"
        )
    return EsrganConfig(
        in_channels=first_in // unshuffle**2,
        out_channels=out_channels,
        filters=first.shape[0],
        blocks=blocks,
        growth=growth,
        upsamples=upsamples,
        unshuffle=unshuffle,
    )
