"""The measures of bench/sdxl.py, each run in its own process: `python -m bench._sdxl_child KIND FILE ...`.

Prints one JSON line. Peak RSS is the process's `ru_maxrss` (imports included); `base_gib` is the
RSS after the imports, before the measure.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.lora import _floor, _jobs, _time
from bench.sampling import interleaved
from nodegraph.primitives import file_stamp
from nodes.sd.checkpoint import SafetensorsSource, build_text_encoder, build_unet, load_checkpoint
from nodes.sd.checkpoint_sdxl import SDXL_HEAD_CHANNELS, SplitSource, build_text_encoder_g
from nodes.sd.convert import clip_config, unet_config, unet_key_map
from nodes.sd.convert_sdxl import clip_g_config, clip_g_key_map, clip_g_prefix, clip_l_key_map
from nodes.sd.device import make_placement, place
from nodes.sd.handles import LoraRef
from nodes.sd.lora.loader import Target, clear_caches
from nodes.sd.patcher import apply_stack, held_bytes, restore

GIB = 2**30


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def param_bytes(*modules: Any) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def load(kind: str, path: Path) -> dict[str, Any]:
    """bare: safetensors' `load_file` (memory-mapped) with every byte read once; nodegraph: the
    checkpoint loader (four modules)."""
    base = rss_gib()
    start = time.perf_counter()
    if kind == "bare":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        scratch = torch.empty(max(t.nbytes for t in tensors.values()), dtype=torch.uint8)
        for t in tensors.values():  # a lazy mapping reads nothing: copy each tensor's bytes once
            scratch[: t.nbytes].copy_(t.reshape(-1).view(torch.uint8))
        held = sum(t.nbytes for t in tensors.values())
        family = "-"
    else:
        ck = load_checkpoint(path)
        held = param_bytes(ck.unet, ck.vae, ck.text_encoder, ck.text_encoder_2)
        family = ck.family
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "base_gib": base,
        "peak_gib": peak_gib(),
        "end_gib": rss_gib(),
        "held_gib": held / GIB,
        "family": family,
    }


def load_unet(path: Path) -> Any:
    """The checkpoint's UNet alone, as load_checkpoint builds it (fp32)."""
    source = SafetensorsSource(path)
    keys = source.keys()
    config = unet_config(path.name, keys, source.shape, SDXL_HEAD_CHANNELS)
    return build_unet(config, unet_key_map(keys, source.shape, config), source, path.name)


def load_text_encoders(path: Path) -> tuple[Any, Any]:
    """(CLIP-L, bigG) of the checkpoint, as load_checkpoint builds them."""
    source = SafetensorsSource(path)
    keys = source.keys()
    l_map = clip_l_key_map(keys)
    te_l = build_text_encoder(clip_config(keys, source.shape, l_map), l_map, source, path.name)
    prefix = clip_g_prefix("sdxl")
    g_cfg = clip_g_config(keys, prefix, source.shape)
    te_g = build_text_encoder_g(g_cfg, clip_g_key_map(keys, prefix), SplitSource(source), path.name)
    return te_l, te_g


def sdxl_conditioning(seed: int) -> list[list[Any]]:
    """A random SDXL prompt: context [1, 77, 2048] and the pooled output [1, 1280]."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]


def sampling(path: Path, size: int, steps: int, repeats: int, device: str, precision: str) -> dict[str, Any]:
    where = make_placement(device, precision)
    unet = place(load_unet(path), where.device, where.unet)
    params = sum(p.numel() for p in unet.parameters())
    forward, step, outside = interleaved(unet, repeats, size, steps, sdxl_conditioning, "sdxl")
    return {
        "forward": forward,
        "step": step,
        "outside": outside,
        "params": params,
        "size": size,
        "steps": steps,
        "repeats": repeats,
        "device": str(where.device),
        "precision": str(where.unet).removeprefix("torch."),
        "peak_gib": peak_gib(),
    }


def lora(kind: str, path: Path, lora_file: Path) -> dict[str, Any]:
    """First application, strength change, fused again, re-applied from the file, and the floor,
    for the UNet (`lora-unet`, strength_model) or both text encoders (`lora-te`, strength_clip)."""
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # process CPU time of one thread: the machine is shared (as bench.lora)
    pairs: list[tuple[Any, Target]]
    if kind == "lora-unet":
        pairs = [(load_unet(path), "unet")]
    else:
        te_l, te_g = load_text_encoders(path)
        pairs = [(te_l, "te"), (te_g, "te2")]
    stamp = file_stamp(lora_file)
    strengths = iter([0.5, 0.75] * 100)
    counts: list[int] = []

    def apply(strength: float | None = None, exact: bool = False) -> None:
        ref = LoraRef(lora_file, stamp, next(strengths) if strength is None else strength, lora_file.name)
        counts.append(sum(apply_stack(m, [ref], t, exact=exact) for m, t in pairs))

    def reset() -> None:
        for module, _ in pairs:
            restore(module)
        clear_caches()

    def fused() -> None:  # strength 1 in the weights, no branch; the file's decoded updates cached
        apply(1.0, exact=True)

    def from_fused_uncached() -> None:
        fused()
        clear_caches()

    def branched() -> None:
        fused()
        apply(0.5)

    def applied_once() -> None:
        reset()
        apply(1.0)

    reset()
    first = _time(lambda: apply(1.0), reset)
    rewritten = counts[-1]
    change = _time(apply, fused)
    held = sum(held_bytes(m) for m, _ in pairs)
    from_file = _time(lambda: apply(exact=True), from_fused_uncached)
    out = {"first": first, "change": change, "from_file": from_file, "rewritten": rewritten}
    if kind == "lora-unet":  # the next run with the same strengths fuses the branches
        out["settle"] = _time(lambda: apply(0.5), branched)
    else:  # the first strength_clip change after applying computes and keeps each ΔW
        out["first_change"] = _time(apply, applied_once)
    out["held_gib"] = held / GIB
    reset()
    ref = LoraRef(lora_file, stamp, 1.0, lora_file.name)
    jobs = _jobs(list(pairs), [ref], shared_out=True)
    out["touched_gib"] = sum(base.numel() * 4 for base, _, _ in jobs) / GIB
    out["floor"] = _time(_floor(jobs))
    out["peak_gib"] = peak_gib()
    return out


def main(argv: list[str]) -> None:
    kind, path = argv[0], Path(argv[1])
    with torch.inference_mode(False):
        if kind in ("bare", "nodegraph"):
            result = load(kind, path)
        elif kind == "sampling":
            size, steps, repeats = (int(a) for a in argv[2:5])
            result = sampling(path, size, steps, repeats, argv[5], argv[6])
        else:
            result = lora(kind, path, Path(argv[2]))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
