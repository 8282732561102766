"""Where LoRA weights are actually changed: inside the consumer (sampler, text encoder), exactly.

`patched(module, loras, target)` makes `module` compute with the LoRA stack `loras`:

1. Each module keeps a state: the stack its weights hold ("fused"), the signature fused into each
   parameter, an exact backup (in the storage dtype) of every parameter a stack touches, and the
   stack it computes with, which differs from the fused one while a strength is being changed.
2. Same stack as before: nothing to do. The weights are left patched on exit, so the next run
   with the same stack is free; another stack (a handle without LoRAs included) changes them.
3. A strength change of low-rank LoRAs already fused into the UNet (same files, same order, no
   strength 0) rewrites no weight: each affected layer gets a runtime branch adding
   `(s_new − s_fused)·scale·up(down(x))` to its output, so the change costs O(layers), not
   O(weights). When the same stack is asked for again ("the user stopped changing it"), or
   `exact=True` (CheckpointSave), the branches are dropped and the weights rebuilt as in 4, so
   settled runs compute with ComfyUI's merged weights exactly and pay nothing per step.
4. Otherwise each parameter whose patch list changed is rebuilt from its backup, never by
   subtracting: `W = base + Σ s_i·ΔW_i` in fp32, in load order, using the cached decoded updates
   (a strength change re-reads no file). For the text encoder the sum is rounded to fp16 once
   (ComfyUI's convention: TE weights are stored in fp16), which is also why the text encoder
   never uses branches; instead, while one LoRA's text-encoder strength is being changed, its
   unscaled ΔW is kept, so each further change is one add per weight, not a rank-r product.
   Parameters no longer touched are restored from their backup and the backup dropped. Backups
   are kept in fp16 when the weights hold fp16 values (half the memory and half the reads).

So after any sequence of stacks, an empty stack leaves every weight bit-identical to the file's.

A UNet stored in fp8 (UNETLoader's fp8 weight_dtype, `nodes.sd.float8`) gets ComfyUI's treatment:
each rebuilt weight is rounded back to fp8 stochastically, seeded by its ComfyUI key, and strength
changes are rebuilt rather than branched (a branch would compute with the unrounded sum).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from nodes.sd.float8 import key_seed, stochastic_round, storage_dtype
from nodes.sd.handles import ClipHandle, LoraRef
from nodes.sd.lora.formats import Dense, LowRank, Update
from nodes.sd.lora.ldm_export import UNET_PREFIX, unet_key
from nodes.sd.lora.loader import Target, decoded

_Sig = tuple[tuple[str, tuple[int, int], float], ...]
_LOCK = threading.RLock()  # one worker thread today; the lock keeps a second one from half-patching


class _Branch:
    """Unfused low-rank terms added to one layer's output: `out += Σ c·up(down(x))`."""

    def __init__(self, layer: torch.nn.Module, terms: list[tuple[LowRank, float]]) -> None:
        self.terms = terms
        self.handle = layer.register_forward_hook(self)
        self._factors: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def factors(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(down, up) of each term on x's device in x's dtype, converted once."""
        key = (x.device, x.dtype)
        found = self._factors.get(key)
        if found is None:
            found = [(u.down.to(x.device, x.dtype), u.up.to(x.device, x.dtype)) for u, _ in self.terms]
            self._factors[key] = found
        return found

    def __call__(self, layer: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for (_, coeff), (down, up) in zip(self.terms, self.factors(x), strict=True):
            if isinstance(layer, torch.nn.Conv2d):
                kernel = down.view(down.shape[0], layer.in_channels, *layer.kernel_size)
                h = F.conv2d(x, kernel, None, layer.stride, layer.padding, layer.dilation)
                out = out + F.conv2d(h * coeff, up.view(*up.shape, 1, 1))
                continue
            h = F.linear(x, down) * coeff
            if out.is_contiguous():  # addmm into the output: no output-sized temporary
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
            else:
                out = out + F.linear(h, up)
        return out


def _branchable(layer: torch.nn.Module) -> bool:
    if isinstance(layer, torch.nn.Linear):
        return True
    return (
        isinstance(layer, torch.nn.Conv2d)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


@dataclass
class _State:
    params: dict[str, torch.nn.Parameter]
    backups: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: dict[str, _Sig] = field(default_factory=dict)
    fused: _Sig = ()  # the stack the weights hold
    stack: _Sig = ()  # the stack the module computes with: fused weights plus branches
    last: _Sig | None = None  # the stack asked for by the previous call
    branches: list[_Branch] = field(default_factory=list)
    # Text encoder: the unscaled ΔW of the one LoRA whose strength alone changed last, kept while it
    # stays in the stack, so each further change of it is an add per weight, not a rank-r product.
    held_lora: tuple[str, tuple[int, int]] | None = None
    held: dict[str, torch.Tensor] = field(default_factory=dict)

    def drop_branches(self) -> None:
        for branch in self.branches:
            branch.handle.remove()
        self.branches.clear()
        self.stack = self.fused


_STATES: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()
# Text encoder -> the LoRA naming it answers to, recorded by `te_targets` (every LoRA loader calls it),
# so `patched(bigG, loras, target="te")` still applies `lora_te2_*` keys to SDXL's bigG.
_ROLES: weakref.WeakKeyDictionary[Any, Target] = weakref.WeakKeyDictionary()


def _state(module: Any) -> _State:
    state = _STATES.get(module)
    if state is None:
        state = _State(dict(module.named_parameters()))
        _STATES[module] = state
    return state


# Per patch, for a text-encoder low-rank update of the LoRA whose strength is being adjusted: where
# its unscaled ΔW is kept, and whether it is already there (else this rebuild fills it).
_Keep = tuple[torch.Tensor, bool] | None


def _rebuild(
    param: torch.Tensor,
    base: torch.Tensor,
    patches: list[tuple[Update, float]],
    target: Target,
    keeps: list[_Keep] | None = None,
    fp8: tuple[torch.dtype, int] | None = None,
) -> None:
    """param = base + Σ patches, in fp32, rounded to fp16 once for the text encoder; `fp8`
    (format, seed): rounded back to that fp8 format stochastically, as ComfyUI does (on the CPU)."""
    w = param.data
    on_cpu = w.device.type == "cpu" and w.dtype == torch.float32
    if on_cpu and all(isinstance(u, LowRank | Dense) for u, _ in patches):
        _rebuild_rows(w, base, patches, target, keeps or [None] * len(patches))
        if fp8 is not None:
            w.copy_(stochastic_round(w, *fp8))
        return
    # Elsewhere (an fp16 UNet, a GPU) the sum is made on the CPU in fp32, where the decoded updates
    # live, and cast once into the weight (ComfyUI's convention for fp16 weights).
    work = w if on_cpu else torch.empty(w.shape, dtype=torch.float32)
    work.copy_(base)
    for update, strength in patches:
        update.apply(work, strength)
    if target != "unet":
        _round_fp16(work.view(-1))
    if fp8 is not None:
        work.copy_(stochastic_round(work, *fp8))
    if work is not w:
        w.copy_(work)


_CHUNK = 1 << 17  # elements per step of a rebuild: a block of rows stays in cache between its steps
_HALF = torch.empty(_CHUNK, dtype=torch.float16)
_DELTA = torch.empty(_CHUNK, dtype=torch.float32)


def _rebuild_rows(
    w: torch.Tensor,
    base: torch.Tensor,
    patches: list[tuple[Update, float]],
    target: Target,
    keeps: list[_Keep],
) -> None:
    """The same sum, a block of output rows at a time: the base is read once (in its backup dtype,
    fp16 for a checkpoint stored in fp16), the weight written once, and the products, the sums
    and the fp16 rounding happen while the block is in cache. Row-local updates only.

    UNet: `W += (s·scale)·up@down` as one addmm. Text encoder: ComfyUI's order, `ΔW = up@down`
    then `W += (s·scale)·ΔW`, so that a kept ΔW (see `_State.held`) gives the very same sum."""
    rows, base_rows = w.view(w.shape[0], -1), base.view(w.shape[0], -1)
    step = max(1, _CHUNK // rows.shape[1])
    for r0 in range(0, rows.shape[0], step):
        part = rows[r0 : r0 + step]
        part.copy_(base_rows[r0 : r0 + step])
        for (update, strength), keep in zip(patches, keeps, strict=True):
            alpha = strength * update.scale  # type: ignore[attr-defined]
            if isinstance(update, Dense):
                part.add_(update.raw.reshape(w.shape[0], -1)[r0 : r0 + step], alpha=alpha)
            elif target == "unet":
                part.addmm_(update.up[r0 : r0 + step], update.down, alpha=alpha)  # type: ignore[attr-defined]
            elif keep is not None and keep[1]:
                part.add_(keep[0][r0 : r0 + step], alpha=alpha)
            else:
                out = _DELTA[: part.numel()] if part.numel() <= _CHUNK else torch.empty(part.numel())
                delta = torch.mm(update.up[r0 : r0 + step], update.down, out=out.view(part.shape))  # type: ignore[attr-defined]
                if keep is not None:
                    keep[0][r0 : r0 + step].copy_(delta)
                part.add_(delta, alpha=alpha)
        if target != "unet":
            _round_fp16(part.view(-1))


def _round_fp16(flat: torch.Tensor) -> None:
    """Round fp32 values to fp16 precision in place, through a small cached fp16 scratch."""
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        half = _HALF[: part.numel()]
        half.copy_(part)
        part.copy_(half)


def _backup(weight: torch.Tensor) -> torch.Tensor:
    """An exact copy in the narrowest dtype that holds it: fp16 when every value is fp16-exact (a
    checkpoint stored in fp16, as almost all are; half the memory and half the reads), else its own.
    Always in CPU memory, as ComfyUI keeps its backups on the offload device: a GPU's memory is
    the scarce one, and rebuilds there are summed on the CPU anyway."""
    weight = weight.detach()
    if weight.dtype == torch.float32:
        half = weight.to("cpu", torch.float16)
        if torch.equal(half.to(weight.device, torch.float32), weight):
            return half
    return weight.to("cpu", copy=True)


def _updates(ref: Any, module: Any, target: Target) -> dict[str, Update]:
    """A patch's updates per parameter: a LoRA file's (decoded, cached) or a merge's."""
    if hasattr(ref, "updates"):  # nodes.sd.merge.MergeRef: model2's weights, read when applied
        found: dict[str, Update] = ref.updates(module, target)
        return found
    return decoded(ref.path, ref.stamp, module, target).updates


def _wanted(
    module: Any, loras: Sequence[LoraRef], target: Target
) -> dict[str, list[tuple[Update, float, Any]]]:
    wanted: dict[str, list[tuple[Update, float, Any]]] = {}
    for ref in loras:
        ident = (str(ref.path), ref.stamp, ref.strength)
        for name, update in _updates(ref, module, target).items():
            wanted.setdefault(name, []).append((update, ref.strength, ident))
    return wanted


def base_weight(module: Any, name: str) -> torch.Tensor:
    """Parameter `name` of `module` as loaded, whatever stack its weights hold now."""
    state = _STATES.get(module)
    if state is not None and name in state.backups:
        return state.backups[name]
    param: torch.Tensor = dict(module.named_parameters())[name]
    return param.detach()


def patch_list(
    module: Any, loras: Sequence[LoraRef], target: Target, name: str
) -> list[tuple[Update, float]]:
    """The updates a stack makes to one parameter, in order (a merge reads model2's weight so)."""
    return [(u, s) for u, s, _ in _wanted(module, loras, target).get(name, [])]


def _restore_all(state: _State) -> None:
    state.drop_branches()
    state.held_lora, state.held = None, {}
    for name, base in state.backups.items():
        state.params[name].data.copy_(base)
    state.backups.clear()
    state.applied.clear()
    state.fused = state.stack = ()
    state.last = None


def apply_stack(module: Any, loras: Sequence[LoraRef], target: Target, *, exact: bool = False) -> int:
    """Make `module` compute with `loras`; returns how many parameters were rewritten.

    `exact`: the weights themselves must hold the stack (no runtime branches), e.g. to save them.
    """
    if target == "te":
        target = _ROLES.get(module, target)  # a bigG recorded by `te_targets` keeps its "te2"/"te_g" role
    active = [r for r in loras if r.strength != 0.0]
    stack: _Sig = tuple((str(r.path), r.stamp, r.strength) for r in active)
    state = _state(module)
    # inference_mode(False): backups made under an executor's inference mode must stay normal tensors.
    with _LOCK, torch.inference_mode(False), torch.no_grad():
        settled, state.last = state.last == stack, stack
        if state.stack == stack and not (state.branches and (exact or settled)):
            return 0
        if stack == state.fused:
            state.drop_branches()
            return 0
        if not exact and not settled and target == "unet" and _branch(state, module, active, stack):
            return 0
        state.drop_branches()
        if target != "unet":
            _hold(state, stack)
        return _change(state, module, active, stack, target)


def _hold(state: _State, stack: _Sig) -> None:
    """Choose the text-encoder LoRA whose ΔW is kept: the one whose strength alone just changed."""
    files = [s[:2] for s in stack]
    changed = [s[:2] for s, f in zip(stack, state.fused, strict=False) if s != f]
    if files == [f[:2] for f in state.fused] and len(changed) == 1 and changed[0] != state.held_lora:
        state.held_lora, state.held = changed[0], {}
    elif state.held_lora not in files:
        state.held_lora, state.held = None, {}


def _branch(state: _State, module: Any, active: list[LoraRef], stack: _Sig) -> bool:
    """Express a strength change of the fused LoRAs as runtime branches; False when it cannot be."""
    if storage_dtype(module) is not None:
        return False  # fp8 weights are rounded after the sum: a branch would skip the rounding
    if not state.fused or [f[:2] for f in state.fused] != [s[:2] for s in stack]:
        return False  # not the same files in the same order: an add, a removal or a swap
    if any(hasattr(ref, "updates") for ref in active):
        return False  # a merge scales the weights: a LoRA's change is no longer a plain sum
    terms: dict[str, list[tuple[LowRank, float]]] = {}
    for ref, (_, _, old) in zip(active, state.fused, strict=True):
        if ref.strength == old:
            continue
        for name, update in decoded(ref.path, ref.stamp, module, "unet").updates.items():
            path, _, kind = name.rpartition(".")
            if kind != "weight" or not isinstance(update, LowRank):
                return False  # dense, DoRA or bias updates are rebuilt exactly instead
            terms.setdefault(path, []).append((update, (ref.strength - old) * update.scale))
    layers = {path: module.get_submodule(path) for path in terms}
    if not all(_branchable(layer) for layer in layers.values()):
        return False
    state.drop_branches()
    state.branches = [_Branch(layers[path], t) for path, t in terms.items()]
    state.stack = stack
    return True


def _change(state: _State, module: Any, active: list[LoraRef], stack: _Sig, target: Target) -> int:
    try:
        wanted = _wanted(module, active, target)
        rewritten = 0
        for name in [n for n in state.applied if n not in wanted]:
            state.params[name].data.copy_(state.backups.pop(name))
            del state.applied[name]
            rewritten += 1
        for name, patches in wanted.items():
            sig: _Sig = tuple(ident for _, _, ident in patches)
            if state.applied.get(name) == sig:
                continue
            param = state.params[name]
            if name not in state.backups:
                state.backups[name] = _backup(param.data)
            rows = param.device.type == "cpu" and param.dtype == torch.float32  # where a kept ΔW is used
            keeps = _keeps(state, name, patches, param) if target != "unet" and rows else None
            fp8 = _fp8_rounding(module, name) if target == "unet" else None
            _rebuild(param, state.backups[name], [(u, s) for u, s, _ in patches], target, keeps, fp8)
            state.applied[name] = sig
            rewritten += 1
        state.fused = state.stack = stack
        return rewritten
    except BaseException:
        _restore_all(state)  # never leave a half-patched model behind
        raise


def _fp8_rounding(module: Any, name: str) -> tuple[torch.dtype, int] | None:
    """(fp8 format, seed) for a parameter of a UNet stored in fp8: the seed is that of the weight's
    ComfyUI key, `diffusion_model.<LDM name>` (string_to_seed in patch_weight_to_device)."""
    dtype = storage_dtype(module)
    if dtype is None:
        return None
    key = "diffusion_model." + unet_key(name, module.config)[len(UNET_PREFIX) :]
    return dtype, key_seed(key)


def _keeps(
    state: _State, name: str, patches: list[tuple[Update, float, Any]], param: torch.Tensor
) -> list[_Keep]:
    """Per patch of one text-encoder parameter: the kept ΔW of the held LoRA, if any, and whether
    it is filled (decided once per parameter: a LoRA twice in the stack fills it twice, the same)."""
    ready = name in state.held
    out: list[_Keep] = []
    for update, _, ident in patches:
        if not isinstance(update, LowRank) or ident[:2] != state.held_lora:
            out.append(None)
            continue
        if name not in state.held:
            state.held[name] = torch.empty((param.shape[0], param[0].numel()), dtype=torch.float32)
        out.append((state.held[name], ready))
    return out


def restore(module: Any) -> None:
    """Put every weight of `module` back to its base value and drop its branches."""
    with _LOCK:
        state = _STATES.get(module)
        if state is not None:
            _restore_all(state)


def held_bytes(module: Any) -> int:
    """Bytes the patcher holds for `module`: exact backups plus any kept text-encoder ΔW."""
    state = _STATES.get(module)
    if state is None:
        return 0
    tensors = [*state.backups.values(), *state.held.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def branched(module: Any) -> int:
    """How many layers of `module` run with a runtime branch now (0 once the stack is fused)."""
    state = _STATES.get(module)
    return len(state.branches) if state is not None else 0


@contextmanager
def patched(module: Any, loras: Sequence[LoraRef], *, target: Target, exact: bool = False) -> Iterator[Any]:
    """Make `module` compute with `loras` (in order) for the duration of the block.

    It keeps doing so afterwards until another stack is asked for; use `restore` to drop them.
    `exact=True` fuses the stack into the weights (no runtime branches), for code that reads them.
    """
    with _LOCK:
        apply_stack(module, loras, target, exact=exact)
        yield module


def te_targets(clip: ClipHandle) -> list[tuple[Any, Target]]:
    """The text encoders of a CLIP handle with the LoRA naming each answers to.

    SD1.x: CLIP-L ("te"). SDXL: CLIP-L ("te") and bigG ("te2", `lora_te2_*`). The refiner's bigG
    alone answers to first-encoder names (`lora_te_*`, `text_encoder.*`), as in ComfyUI ("te_g").
    """
    out: list[tuple[Any, Target]] = []
    if clip.text_encoder is not None:
        out.append((clip.text_encoder, "te"))
    second = getattr(clip, "text_encoder_2", None)
    if second is not None:
        out.append((second, "te2" if clip.text_encoder is not None else "te_g"))
    for module, target in out:
        _ROLES[module] = target
    return out


@contextmanager
def patched_clip(clip: ClipHandle) -> Iterator[ClipHandle]:
    """Make every text encoder of `clip` compute with its LoRA stack (see `patched`)."""
    with _LOCK:
        for module, target in te_targets(clip):
            apply_stack(module, clip.loras, target)
        yield clip
