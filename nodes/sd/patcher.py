"""Where LoRA weights are actually changed: inside the consumer (sampler, text encoder), exactly.

`patched(module, loras, target)` makes `module`'s weights those of the LoRA stack `loras`:

1. Each module keeps a state: the stack now applied, the signature applied to each parameter and
   an exact backup (in the storage dtype) of every parameter a stack touches.
2. Same stack as applied: nothing to do. The weights are left patched on exit, so the next run
   with the same stack is free; another stack (a handle without LoRAs included) changes them.
3. Otherwise each parameter whose patch list changed is rebuilt from its backup, never by
   subtracting: `W = base + Σ s_i·ΔW_i` in fp32, in load order, using the cached decoded updates
   (a strength change re-reads no file). For the text encoder the sum is rounded to fp16 once
   (ComfyUI's convention: TE weights are stored in fp16). Parameters no longer touched are
   restored from their backup and the backup dropped.

So after any sequence of stacks, an empty stack leaves every weight bit-identical to the file's.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from nodes.sd.handles import LoraRef
from nodes.sd.lora.formats import LowRank, Update
from nodes.sd.lora.loader import decoded

Target = Literal["unet", "te"]
_Sig = tuple[tuple[str, tuple[int, int], float], ...]
_LOCK = threading.RLock()  # one worker thread today; the lock keeps a second one from half-patching


@dataclass
class _State:
    params: dict[str, torch.nn.Parameter]
    backups: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: dict[str, _Sig] = field(default_factory=dict)
    stack: _Sig = ()


_STATES: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()


def _state(module: Any) -> _State:
    state = _STATES.get(module)
    if state is None:
        state = _State(dict(module.named_parameters()))
        _STATES[module] = state
    return state


def _rebuild(
    param: torch.Tensor, base: torch.Tensor, patches: list[tuple[Update, float]], target: Target
) -> None:
    """param = base + Σ patches, in fp32, rounded to fp16 once for the text encoder."""
    w = param.data
    first, s0 = patches[0]
    if w.dtype == torch.float32 and base.dtype == torch.float32 and isinstance(first, LowRank):
        # One pass: read base, write W, plus the rank-r product (the benchmark's floor).
        out = w.view(w.shape[0], -1)
        torch.addmm(base.view(w.shape[0], -1), first.up, first.down, alpha=s0 * first.scale, out=out)
        rest = patches[1:]
        work = w
    else:
        work = w if w.dtype == torch.float32 else torch.empty(w.shape, dtype=torch.float32)
        work.copy_(base)
        rest = patches
    for update, strength in rest:
        update.apply(work, strength)
    if target == "te":
        _round_fp16(work)
    if work is not w:
        w.copy_(work)


_CHUNK = 1 << 16  # elements per rounding step: the fp16 scratch stays in cache, nothing is allocated
_SCRATCH = torch.empty(_CHUNK, dtype=torch.float16)


def _round_fp16(work: torch.Tensor) -> None:
    """Round an fp32 tensor to fp16 precision in place (ComfyUI stores the text encoder in fp16)."""
    flat = work.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        half = _SCRATCH[: part.numel()]
        half.copy_(part)
        part.copy_(half)


def _wanted(
    module: Any, loras: Sequence[LoraRef], target: Target
) -> dict[str, list[tuple[Update, float, Any]]]:
    wanted: dict[str, list[tuple[Update, float, Any]]] = {}
    for ref in loras:
        dec = decoded(ref.path, ref.stamp, module, target)
        ident = (str(ref.path), ref.stamp, ref.strength)
        for name, update in dec.updates.items():
            wanted.setdefault(name, []).append((update, ref.strength, ident))
    return wanted


def _restore_all(state: _State) -> None:
    for name, base in state.backups.items():
        state.params[name].data.copy_(base)
    state.backups.clear()
    state.applied.clear()
    state.stack = ()


def apply_stack(module: Any, loras: Sequence[LoraRef], target: Target) -> int:
    """Make `module`'s weights those of `loras`; returns how many parameters were rewritten."""
    active = [r for r in loras if r.strength != 0.0]
    stack: _Sig = tuple((str(r.path), r.stamp, r.strength) for r in active)
    state = _state(module)
    if state.stack == stack:
        return 0
    # inference_mode(False): backups made under an executor's inference mode must stay normal tensors.
    with _LOCK, torch.inference_mode(False), torch.no_grad():
        return _change(state, module, active, stack, target)


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
                state.backups[name] = param.data.clone()
            _rebuild(param, state.backups[name], [(u, s) for u, s, _ in patches], target)
            state.applied[name] = sig
            rewritten += 1
        state.stack = stack
        return rewritten
    except BaseException:
        _restore_all(state)  # never leave a half-patched model behind
        raise


def restore(module: Any) -> None:
    """Put every weight of `module` back to its base value (a no-op when nothing is patched)."""
    with _LOCK:
        state = _STATES.get(module)
        if state is not None:
            _restore_all(state)


@contextmanager
def patched(module: Any, loras: Sequence[LoraRef], *, target: Literal["unet", "te"]) -> Iterator[Any]:
    """Apply `loras` (in order) to `module`'s weights for the duration of the block.

    The weights stay patched afterwards until another stack is asked for; use `restore` to drop them.
    """
    with _LOCK:
        apply_stack(module, loras, target)
        yield module
