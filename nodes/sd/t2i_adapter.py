"""T2I-Adapters (TencentARC's, SD1.x and SDXL), loaded through ControlNetLoader as ComfyUI loads them.

Sources: comfy/controlnet.py `load_t2i_adapter` (format detection) and `T2IAdapter.get_control`
(the hint), comfy/t2i_adapter/adapter.py (`Adapter`, `Adapter_light`, `ResnetBlock`, `extractor`).

An adapter is a small convolutional network run once per sampling on the hint image; its features are
added to the UNet's hidden states after some input blocks (and, SDXL, after the middle block):

1. The hint is pixel-unshuffled (8x8 pixels per position; SDXL adapters 16x16), so a 3-channel hint
   becomes 192 (768) channels at the latent's size (half of it).
2. Full adapters (`conv_in`, `body.N.block1/block2`, `in_conv` where the width changes, `down_opt.op`
   only in files whose downsampling is a strided conv): `conv_in`, then 4 levels of 2 residual blocks
   `x + block2(relu(block1(x)))` at widths c, 2c, 4c, 4c (c = `conv_in`'s out channels). SD1.x levels
   1-3 start with a 2x downsample; SDXL (`conv_in` with 256 or 768 inputs) only level 2 does.
3. Light adapters (`body.N.in_conv`, `body.N.body.K.*`, `body.N.out_conv`): per level a downsample
   (levels 1-3), a 1x1 conv to a quarter width, residual blocks, a 1x1 conv to the level's width.
   ComfyUI builds them at 320/640/1280/1280 with 4 blocks; here the widths and block count are read
   from the keys, which is the same network for every released file.
4. The 2x downsample without a conv is an average pool padded by (H mod 2, W mod 2), zeros counted.
5. Each level's output is one feature, placed in ComfyUI's `control["input"]` list so that the UNet,
   popping one entry after each input block, adds level i's after input block 3i+2 (SD1.x: 2, 5, 8,
   11); SDXL's after input blocks 3, 5, 8 and the middle block (nodes/sd/control.py places them).

The diffusers layout (`adapter.body.N.resnets.K.*`) is renamed to the original one with ComfyUI's
prefix table; a pickle holding `{"adapter": state_dict}` is unwrapped. Stable Cascade ControlNets,
which ComfyUI also reads here, are refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nodes.sd.checkpoint import CheckpointError, TensorSource, _to_fp32, assign_weights

DIFFUSERS_MARKER = "adapter.body.0.resnets.0.block1.weight"
XL_CONV_IN = (256, 768)  # 1 or 3 hint channels x 16 x 16: ComfyUI's test for an SDXL adapter
LEVELS = 4
FULL_BLOCKS = 2  # residual blocks per level of a full adapter (ComfyUI's nums_rb=2)
Features = dict[str, list[torch.Tensor | None]]  # ComfyUI's control dict: "input" (and "middle")


class AdapterError(CheckpointError):
    """A file that looks like a T2I-Adapter but cannot be built (the message names the file)."""


@dataclass(frozen=True)
class AdapterSpec:
    """What the keys say about an adapter: kind, input width, level widths and blocks, kernel."""

    light: bool
    cin: int  # channels after the pixel unshuffle
    channels: tuple[int, ...]
    blocks: int  # residual blocks per level
    ksize: int = 3  # kernel of in_conv and block2 (full adapters; TencentARC's SD1.x files: 1)
    use_conv: bool = False  # full adapters: downsample with a strided conv (`down_opt.op`)
    xl: bool = False

    @property
    def unshuffle(self) -> int:
        return 16 if self.xl else 8

    @property
    def hint_channels(self) -> int:
        """1 (a grey hint: the image's channel mean) or 3; ComfyUI's `input_channels`."""
        return self.cin // (self.unshuffle * self.unshuffle)

    @property
    def family(self) -> str:
        return "sdxl" if self.xl else "sd15"


def is_adapter(keys: set[str]) -> bool:
    """Whether ComfyUI would read these keys as a T2I-Adapter (its last resort in load_controlnet)."""
    keys = set(original_names(keys))
    light = "body.0.in_conv.weight" in keys
    return light or ("conv_in.weight" in keys and any(k.startswith("body.") for k in keys))


def is_cascade(keys: set[str]) -> bool:
    return "backbone.0.0.weight" in keys or "backbone.10.blocks.0.weight" in keys


def original_names(keys: set[str]) -> dict[str, str]:
    """{original-layout key: file key}: ComfyUI's prefix table for diffusers' T2IAdapter files
    (`adapter.body.i.resnets.j.` -> `body.{2i+j}.`, `adapter.body.i.` -> `body.{2i}.`, `adapter.` -> ``),
    applied in its order, each key renamed by the first prefix it has; other files keep their names."""
    if DIFFUSERS_MARKER not in keys:
        return {k: k for k in keys}
    table = [(f"adapter.body.{i}.resnets.{j}.", f"body.{i * 2 + j}.") for i in range(4) for j in range(2)]
    table += [(f"adapter.body.{i}.", f"body.{i * 2}.") for i in range(4)] + [("adapter.", "")]
    out: dict[str, str] = {}
    for key in keys:
        new = next((to + key[len(old) :] for old, to in table if key.startswith(old)), key)
        out[new] = key
    return out


def _count(keys: set[str], prefix: str, suffix: str) -> int:
    found = [
        int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix) and k.endswith(suffix)
    ]
    return max(found) + 1 if found else 0


def read_spec(keys: set[str], shape: Any) -> AdapterSpec:
    """The adapter's structure from its (original-layout) key names and shapes (ComfyUI's rules)."""
    if "body.0.in_conv.weight" in keys:
        levels = _count(keys, "body.", "out_conv.weight")
        channels = tuple(shape(f"body.{i}.out_conv.weight")[0] for i in range(levels))
        blocks = _count(keys, "body.0.body.", "block1.weight")
        return AdapterSpec(True, shape("body.0.in_conv.weight")[1], channels, blocks)
    out, cin = shape("conv_in.weight")[:2]
    return AdapterSpec(
        light=False,
        cin=cin,
        channels=(out, out * 2, out * 4, out * 4),
        blocks=FULL_BLOCKS,
        ksize=shape("body.0.block2.weight")[2],
        use_conv=any(k.endswith("down_opt.op.weight") for k in keys),
        xl=cin in XL_CONV_IN,
    )


def _downsample(x: torch.Tensor, conv: nn.Conv2d | None) -> torch.Tensor:
    """ComfyUI's Downsample: a stride-2 3x3 conv, or a 2x2 average pool padded by (H%2, W%2)."""
    if conv is not None:
        out: torch.Tensor = conv(x)
        return out
    return F.avg_pool2d(x, 2, 2, padding=(x.shape[2] % 2, x.shape[3] % 2))


class _Down(nn.Module):
    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, 2, 1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _downsample(x, self.op)


class ResnetBlock(nn.Module):
    """A full adapter's block (ComfyUI's ResnetBlock with sk=True, the only kind its loader builds)."""

    def __init__(self, cin: int, cout: int, down: bool, ksize: int, use_conv: bool) -> None:
        super().__init__()
        self.down_opt = _Down(cin, use_conv) if down else None
        self.in_conv = nn.Conv2d(cin, cout, ksize, 1, ksize // 2) if cin != cout else None
        self.block1 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.block2 = nn.Conv2d(cout, cout, ksize, 1, ksize // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        out: torch.Tensor = self.block2(F.relu(self.block1(x))) + x
        return out


class LightBlock(nn.Module):
    """A light adapter's residual block (ComfyUI's ResnetBlock_light)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.block2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block2(F.relu(self.block1(x))) + x
        return out


class Extractor(nn.Module):
    """A light adapter's level (ComfyUI's extractor): downsample, 1x1 in, residual blocks, 1x1 out."""

    def __init__(self, cin: int, inner: int, cout: int, blocks: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(cin, inner, 1, 1, 0)
        self.body = nn.Sequential(*[LightBlock(inner) for _ in range(blocks)])
        self.out_conv = nn.Conv2d(inner, cout, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = _downsample(x, None)
        out: torch.Tensor = self.out_conv(self.body(self.in_conv(x)))
        return out


class Adapter(nn.Module):
    """A T2I-Adapter (full, light or SDXL) whose forward gives ComfyUI's control dict."""

    def __init__(self, spec: AdapterSpec) -> None:
        super().__init__()
        self.spec = spec
        ch = spec.channels
        self.conv_in: nn.Conv2d | None = None
        if spec.light:
            cins = (spec.cin, *ch[:-1])
            self.body = nn.ModuleList(
                Extractor(cins[i], ch[i] // 4, ch[i], spec.blocks, down=i > 0) for i in range(len(ch))
            )
            return
        self.conv_in = nn.Conv2d(spec.cin, ch[0], 3, 1, 1)
        down_levels, widen_levels = ((2,), (1,)) if spec.xl else ((1, 2, 3), ())
        body: list[nn.Module] = []
        for i in range(len(ch)):
            for j in range(spec.blocks):
                first = j == 0 and (i in down_levels or i in widen_levels)
                cin = ch[i - 1] if first else ch[i]
                body.append(ResnetBlock(cin, ch[i], first and i in down_levels, spec.ksize, spec.use_conv))
        self.body = nn.ModuleList(body)

    def levels(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """Each level's output for a hint [B, hint_channels, H, W] (H, W multiples of the unshuffle)."""
        x = F.pixel_unshuffle(hint, self.spec.unshuffle)
        if self.conv_in is not None:
            x = self.conv_in(x)
        per_level = 1 if self.spec.light else self.spec.blocks
        out = []
        for i in range(len(self.spec.channels)):
            for block in self.body[i * per_level : (i + 1) * per_level]:
                x = block(x)
            out.append(x)
        return out

    def forward(self, hint: torch.Tensor) -> Features:
        """ComfyUI's features: per level (None, None, x); SDXL's levels (None x3, x), (None, x),
        (None x2, x), (None, x); reversed, and for SDXL the last level's split off as `middle`."""
        gaps = (3, 1, 2, 1) if self.spec.xl else (2,) * len(self.spec.channels)
        features: list[torch.Tensor | None] = []
        for gap, x in zip(gaps, self.levels(hint), strict=True):
            features += [None] * gap + [x]
        features.reverse()
        if self.spec.xl:
            return {"input": features[1:], "middle": features[:1]}
        return {"input": features}


class _Renamed:
    """A source read under original-layout names."""

    def __init__(self, inner: TensorSource, names: dict[str, str]) -> None:
        self.inner, self.names = inner, names

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self.names[key])

    def get(self, key: str) -> torch.Tensor:
        return self.inner.get(self.names[key])


def build_adapter(name: str, source: TensorSource) -> Adapter:
    """The adapter in `source` (original or diffusers layout), fp32, eval; every tensor used.

    Raises:
        AdapterError: the keys do not make a T2I-Adapter ComfyUI's loader builds (names the file).
    """
    renamed = _Renamed(source, original_names(set(source.keys())))
    keys = set(renamed.keys())
    try:
        spec = read_spec(keys, renamed.shape)
    except (KeyError, IndexError, ValueError) as exc:
        raise AdapterError(f"'{name}' is an incomplete T2I-Adapter (no {exc}); download it again") from exc
    if spec.light and (len(spec.channels) != LEVELS or spec.blocks == 0):
        raise AdapterError(
            f"'{name}' is a light T2I-Adapter of an unknown layout ({len(spec.channels)} levels, "
            f"{spec.blocks} blocks); ComfyUI's loader cannot build it either"
        )
    if spec.cin % (spec.unshuffle * spec.unshuffle) or spec.hint_channels not in (1, 3):
        raise AdapterError(
            f"'{name}': a T2I-Adapter whose first conv takes {spec.cin} channels, which is no 1- or "
            f"3-channel hint unshuffled by {spec.unshuffle}; it cannot be run"
        )
    with torch.inference_mode(False):
        with torch.device("meta"):
            adapter = Adapter(spec)
        try:
            assigned: Adapter = assign_weights(
                adapter, {k: k for k in keys}, renamed, name, "T2I-Adapter", _to_fp32
            )
        except CheckpointError as exc:
            raise AdapterError(str(exc)) from exc
    return assigned


def hint_size(spec: AdapterSpec, latent_height: int, latent_width: int) -> tuple[int, int]:
    """(height, width) the hint is resized to: 8x the latent, rounded up to a multiple of the
    unshuffle (T2IAdapter.scale_image_to; 16 for SDXL adapters)."""
    step = spec.unshuffle
    return (math.ceil(latent_height * 8 / step) * step, math.ceil(latent_width * 8 / step) * step)


def input_block_modules(unet: Any) -> list[nn.Module]:
    """The diffusers modules whose outputs are ComfyUI's input blocks' outputs, in ComfyUI's order:
    `conv_in`; per level, each layer's last module (its attention, else its resnet); the level's
    downsampler."""
    out: list[nn.Module] = [unet.conv_in]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            out.append(attentions[j] if attentions is not None else resnet)
        if block.downsamplers is not None:
            out.extend(block.downsamplers)
    return out


def _adder(feature: torch.Tensor, where: str, notes: list[str]) -> Any:
    """A forward hook adding `feature` to a block's output when its shape fits (openaimodel's
    apply_control: `h += ctrl`, skipped with a warning when that fails)."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1:] != feature.shape[1:] or feature.shape[0] not in (1, hidden.shape[0]):
            notes.append(f"{where}: feature {list(feature.shape[1:])}, UNet {list(hidden.shape[1:])}")
            return output
        added = (hidden + feature).to(hidden.dtype)  # in place in ComfyUI: the hidden states keep their dtype
        return (added, *output[1:]) if isinstance(output, tuple) else added

    return hook


@contextmanager
def features_added(
    unet: Any, inputs: list[torch.Tensor | None], middle: torch.Tensor | None
) -> Iterator[list[str]]:
    """For one UNet call: ComfyUI's `control["input"]` entries added after the input blocks (block k
    takes `inputs[-1-k]`: openaimodel pops one entry after each block) and `middle` after the middle
    block. An entry whose shape does not fit is left out, as ComfyUI leaves it out (with a warning);
    entries beyond the last input block are never reached. Yields notes of what was left out."""
    notes: list[str] = []
    modules = input_block_modules(unet)
    handles = []
    for k, module in enumerate(modules[: len(inputs)]):
        feature = inputs[len(inputs) - 1 - k]
        if feature is not None:
            handles.append(module.register_forward_hook(_adder(feature, f"input block {k}", notes)))
    for j in range(len(inputs) - len(modules)):
        if inputs[j] is not None:
            notes.append(f"input block {len(inputs) - 1 - j}: this UNet has {len(modules)} input blocks")
    if middle is not None:
        handles.append(unet.mid_block.register_forward_hook(_adder(middle, "middle block", notes)))
    try:
        yield notes
    finally:
        for handle in handles:
            handle.remove()
