"""GLIGEN text boxes as ComfyUI runs them (comfy/gligen.py, comfy/sd.py `load_gligen`,
comfy/samplers.py `get_area_and_mult` / `apply_empty_x_to_equal_area`), on diffusers' GLIGEN modules
(`GLIGENTextBoundingboxProjection`, `GatedSelfAttentionDense`: the same layers and key names).

A GLIGEN file holds a position net (`position_net.*`) and one gated self-attention layer per
SpatialTransformer of the UNet (`<blocks>.<n>.….fuser.*`), taken in ComfyUI's order: input blocks,
the middle block, output blocks, each by block number. GLIGENTextBoxApply puts
`("position", model, [(pooled text, h, w, y, x), ...])` (latent pixels) into the conditioning;
while sampling, every UNet call of such an entry goes as follows:

1. Boxes (`Gligen.set_position`): each box becomes (x/W, y/H, (x+w)/W, (y+h)/H) of the latent (or
   the area crop) the entry predicts on; 30 slots, the unused ones zero with mask 0; batch-repeated.
2. Position net, in float32: sin and cos of box·100^(k/8), k < 8 (64 features per box), the masked
   slots replaced by the learned null features, then Linear-SiLU-Linear-SiLU-Linear: one grounding
   token per slot [B, 30, C].
3. In every transformer block, after self-attention's residual and before cross-attention (ComfyUI's
   `middle_patch`, diffusers' `fuser`), the transformer's gated layer adds
   tanh(alpha_attn)·attn(norm1([x, linear(objs)]))[:, :N] and then tanh(alpha_dense)·ff(norm2(x)).
4. The entry runs in a UNet call of its own (ComfyUI's patches never batch), and the positive
   entries' boxes also go to the negative entries without area (cond_entries.prepare_sides).

A conditioning entry whose `gligen` kind is not "position" runs with 30 empty slots (`set_empty`).
Note that empty slots still reach the gated layers as null features: only closed gates
(alpha 0) leave the UNet's output unchanged, in ComfyUI as here.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nodes.sd.checkpoint import CheckpointError, TensorSource, _few, _to_fp32, assign_weights, open_source
from nodes.sd.convert import _what_is_it

MAX_OBJS = 30  # Gligen.max_objs
FOURIER_FREQS = 8  # PositionNet(fourier_freqs=8)
POSITION = "position"
BLOCKS = ("input_blocks", "middle_block", "output_blocks")  # load_gligen's order
_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")
FUSER = ".fuser."
POSITION_NET = "position_net."

Box = tuple[torch.Tensor, int, int, int, int]  # (pooled text [1, C], h, w, y, x) in latent pixels


class GligenError(CheckpointError):
    """A file that is not a GLIGEN model nodegraph can run, or a GLIGEN that does not fit the model."""


@dataclass(frozen=True, eq=False)
class GligenModel:
    """GLIGEN: the position net and the gated layers (fp32, eval), one per UNet transformer in
    ComfyUI's order. `in_dim` is the pooled text width the boxes carry (768 for SD1.x)."""

    name: str
    position_net: Any
    fusers: tuple[Any, ...]
    in_dim: int
    _placed: dict[tuple[str, str, torch.dtype], tuple[Any, ...]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fusers_for(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
        """The gated layers on the UNet's device and in its dtype (a kept copy unless CPU fp32)."""
        if device.type == "cpu" and dtype == torch.float32:
            return self.fusers
        key = ("fusers", str(device), dtype)
        with self._lock:
            if key not in self._placed:
                self._placed[key] = tuple(
                    copy.deepcopy(f).to(device=device, dtype=dtype) for f in self.fusers
                )
            return self._placed[key]

    def position_net_on(self, device: torch.device) -> Any:
        """The position net in float32 on `device` (ComfyUI computes it in float32: manual_cast)."""
        if device.type == "cpu":
            return self.position_net
        key = ("position_net", str(device), torch.float32)
        with self._lock:
            if key not in self._placed:
                self._placed[key] = (copy.deepcopy(self.position_net).to(device=device, dtype=torch.float32),)
            return self._placed[key][0]


@dataclass(frozen=True, eq=False)
class Grounding:
    """A conditioning entry's `gligen` option: ("position", model, boxes) as GLIGENTextBoxApply sets it."""

    kind: str
    model: GligenModel
    boxes: tuple[Box, ...]


def read_grounding(value: Any, what: str) -> Grounding | None:
    """Check a `gligen` conditioning option; ValueError naming the side and what is wrong."""
    if value is None:
        return None
    usage = "set it with GLIGENTextBoxApply"
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not isinstance(value[0], str):
        raise ValueError(f"{what}: conditioning option 'gligen' must be (kind, GLIGEN, boxes); {usage}")
    kind, model, boxes = value
    if not isinstance(model, GligenModel):
        raise ValueError(
            f"{what}: conditioning option 'gligen' holds {type(model).__name__}, not a GLIGEN model; {usage}"
        )
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(f"{what}: conditioning option 'gligen' has no list of boxes; {usage}")
    checked: list[Box] = []
    for box in boxes if kind == POSITION else ():
        ints = (
            isinstance(box, (list, tuple))
            and len(box) == 5
            and all(isinstance(v, int) and not isinstance(v, bool) for v in box[1:])
        )
        if not ints or not isinstance(box[0], torch.Tensor):
            raise ValueError(
                f"{what}: a GLIGEN box must be (pooled text, height, width, y, x) in latent pixels; {usage}"
            )
        if box[0].numel() != model.in_dim:
            raise ValueError(
                f"{what}: a GLIGEN box's text is {box[0].numel()} wide, GLIGEN '{model.name}' reads "
                f"{model.in_dim}; encode the box text with the CLIP of an SD1.x checkpoint"
            )
        checked.append((box[0], box[1], box[2], box[3], box[4]))
    if len(checked) > MAX_OBJS:
        raise ValueError(
            f"{what}: GLIGEN takes at most {MAX_OBJS} text boxes per conditioning, this one has "
            f"{len(checked)} (GLIGENTextBoxApply nodes chained)"
        )
    return Grounding(kind, model, tuple(checked))


# ---------------------------------------------------------------------------------------- loading


def _fuser_groups(keys: Sequence[str], name: str) -> list[dict[str, str]]:
    """{parameter name: file key} per gated layer, in load_gligen's order: keys holding ".fuser."
    grouped by their block (`input_blocks.1.`, `middle_block.1.`, ...), blocks in order, then by number."""
    groups: dict[tuple[int, int], dict[str, str]] = {}
    owners: dict[tuple[int, int], str] = {}
    for key in keys:
        found = _BLOCK.search(key) if FUSER in key else None
        if found is None:
            continue
        where = (BLOCKS.index(found.group(1)), int(found.group(2)))
        owner, parameter = key.rsplit(FUSER, 1)
        if owners.setdefault(where, owner) != owner:
            raise GligenError(
                f"'{name}' has two gated layers in {found.group(1)}.{found.group(2)} "
                f"({owners[where]}, {owner}); GLIGEN has one per transformer"
            )
        groups.setdefault(where, {})[parameter] = key
    return [groups[where] for where in sorted(groups)]


def _heads(query_dim: int, key_dim: int) -> tuple[int, int]:
    """(heads, head width) as load_gligen picks them: 8 heads for SD1.x (key width 768), else 64-wide."""
    if key_dim == 768:
        return 8, query_dim // 8
    return query_dim // 64, 64


def _build_fuser(group: dict[str, str], source: TensorSource, name: str) -> Any:
    from diffusers.models.attention import GatedSelfAttentionDense

    if "linear.weight" not in group:
        raise GligenError(f"'{name}': a gated layer lacks linear.weight ({_few(sorted(group.values()))})")
    query_dim, key_dim = source.shape(group["linear.weight"])
    heads, head_dim = _heads(query_dim, key_dim)
    if heads < 1:
        raise GligenError(
            f"'{name}': a gated layer of width {query_dim} cannot be split into attention heads"
        )
    with torch.device("meta"):
        fuser = GatedSelfAttentionDense(query_dim, key_dim, heads, head_dim)
    return _assigned(fuser, group, source, name, "GLIGEN gated layer")


def _assigned(module: Any, mapping: dict[str, str], source: TensorSource, name: str, what: str) -> Any:
    try:
        return assign_weights(module, mapping, source, name, what, _to_fp32)
    except CheckpointError as exc:
        raise GligenError(str(exc)) from exc


def _build_position_net(source: TensorSource, keys: Sequence[str], name: str) -> tuple[Any, int]:
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    try:
        in_dim = source.shape(POSITION_NET + "null_positive_feature")[0]
        out_dim = source.shape(POSITION_NET + "linears.4.weight")[0]
    except (KeyError, IndexError) as exc:
        raise GligenError(f"'{name}': its position net lacks {exc}; the GLIGEN file is incomplete") from exc
    with torch.device("meta"):
        net = GLIGENTextBoundingboxProjection(in_dim, out_dim, "text-only", FOURIER_FREQS)
    mapping = {k[len(POSITION_NET) :]: k for k in keys if k.startswith(POSITION_NET)}
    return _assigned(net, mapping, source, name, "GLIGEN position net"), in_dim


def load_gligen(path: Path, name: str | None = None) -> GligenModel:
    """Load a GLIGEN file (ComfyUI's gligen_sd14_textbox_pruned layout: `position_net.*` and the
    `...fuser.*` layers, keys with or without a prefix). `name` (the file's name by default) is
    how messages and the model name it, e.g. the name a workflow gave a symlink.

    Raises:
        GligenError: not a GLIGEN file (the message says what it looks like), or an incomplete one.
    """
    path = Path(path)
    name = name or path.name
    source = open_source(path)
    keys = source.keys()
    groups = _fuser_groups(keys, name)
    has_net = POSITION_NET + "null_positive_feature" in keys
    if bool(groups) != has_net:
        lacking = "position net (position_net.*)" if groups else "gated layers (*.fuser.*)"
        raise GligenError(f"'{name}' is an incomplete GLIGEN model: it has no {lacking}")
    if not groups:
        what = _what_is_it(set(keys))
        if any(k.startswith("model.diffusion_model.") for k in keys):
            what = "it is a checkpoint (a whole model); put it in models/checkpoints"
        elif any(k.startswith(("zero_convs.", "control_model.")) for k in keys):
            what = "it is a ControlNet; put it in models/controlnet"
        raise GligenError(
            f"'{name}' is not a GLIGEN model (no position_net.* and fuser.* keys): {what}. "
            "GLIGEN files (e.g. gligen_sd14_textbox_pruned.safetensors) go in models/gligen"
        )
    with torch.inference_mode(False):
        fusers = tuple(_build_fuser(group, source, name) for group in groups)
        position_net, in_dim = _build_position_net(source, keys, name)
    out_dim = position_net.linears[4].out_features
    wrong = [f.linear.in_features for f in fusers if f.linear.in_features != out_dim]
    if wrong:
        raise GligenError(
            f"'{name}': its gated layers read {wrong[0]}-wide grounding tokens but its position net "
            f"makes {out_dim}-wide ones; the file mixes two GLIGEN models"
        )
    return GligenModel(name, position_net, fusers, in_dim)


# ---------------------------------------------------------------------------------------- boxes


def box_inputs(
    boxes: Sequence[Box], shape: Sequence[int], key_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gligen.set_position's tensors for a latent (or crop) of `shape` [B, C, H, W]: boxes [B, 30, 4]
    as fractions (x1, y1, x2, y2), masks [B, 30], pooled texts [B, 30, key_dim], unused slots zero."""
    batch, height, width = shape[0], shape[2], shape[3]
    if len(boxes) > MAX_OBJS:
        raise ValueError(
            f"GLIGEN takes at most {MAX_OBJS} text boxes per conditioning; this one has {len(boxes)} "
            "(GLIGENTextBoxApply nodes chained)"
        )
    masks = torch.zeros([MAX_OBJS])
    rows: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    for pooled, h, w, y, x in boxes:
        masks[len(rows)] = 1.0
        rows.append(torch.tensor((x / width, y / height, (x + w) / width, (y + h) / height)).unsqueeze(0))
        texts.append(pooled.float().cpu().reshape(1, -1))
    free = MAX_OBJS - len(rows)
    if free:
        rows.append(torch.zeros([free, 4]))
        texts.append(torch.zeros([free, key_dim]))
    return (
        torch.cat(rows).unsqueeze(0).repeat(batch, 1, 1),
        masks.unsqueeze(0).repeat(batch, 1),
        torch.cat(texts).unsqueeze(0).repeat(batch, 1, 1),
    )


def grounding_tokens(grounding: Grounding, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The grounding tokens [B, 30, C] (float32) of one UNet call on a latent (or crop) of `shape`:
    set_position for "position", set_empty (all slots empty) for any other kind (get_area_and_mult)."""
    model = grounding.model
    placed, masks, texts = box_inputs(
        grounding.boxes if grounding.kind == POSITION else (), shape, model.in_dim
    )
    net = model.position_net_on(device)
    with torch.no_grad():
        objs: torch.Tensor = net(
            boxes=placed.to(device), masks=masks.to(device), positive_embeddings=texts.to(device)
        )
    return objs


# ---------------------------------------------------------------------------------------- the UNet


def transformers_of(unet: Any) -> list[Any]:
    """The UNet's transformers (ComfyUI's SpatialTransformers) in the order its forward runs them,
    which is the order of `transformer_index`: down blocks, the middle block, up blocks."""
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    return [t for block in blocks for t in getattr(block, "attentions", None) or ()]


def check_fits(model: GligenModel, unet: Any) -> list[Any]:
    """The UNet's transformers, after checking one gated layer of the right width meets each."""
    transformers = transformers_of(unet)
    widths = [t.transformer_blocks[0].norm1.normalized_shape[0] for t in transformers]
    have = [f.linear.out_features for f in model.fusers]
    if widths != have:
        raise ValueError(
            f"GLIGEN '{model.name}' has {len(have)} gated layers of widths {have}, but this model's UNet "
            f"has {len(widths)} transformers of widths {widths}: the GLIGEN was made for another model "
            "family (GLIGEN text boxes need an SD1.x GLIGEN with an SD1.x model)"
        )
    return transformers


class _Tokens(torch.nn.Module):
    """diffusers' UNet runs `position_net(**gligen)` itself; ours are computed beforehand (float32,
    as in ComfyUI), so this one hands them on."""

    def forward(self, objs: torch.Tensor) -> torch.Tensor:
        return objs


@contextmanager
def gated_layers_attached(unet: Any, model: GligenModel) -> Iterator[None]:
    """Give every transformer block of the UNet its GLIGEN gated layer (diffusers' `fuser`, run
    when the call's cross_attention_kwargs hold `gligen`) for one UNet call, then take them off."""
    transformers = check_fits(model, unet)
    first = next(unet.parameters())
    fusers = model.fusers_for(first.device, first.dtype)
    blocks = [
        (block, fuser)
        for t, fuser in zip(transformers, fusers, strict=True)
        for block in t.transformer_blocks
    ]
    for block, fuser in blocks:
        block.fuser = fuser
    unet.position_net = _Tokens()
    try:
        yield
    finally:
        for block, _ in blocks:
            del block.fuser
        del unet.position_net
