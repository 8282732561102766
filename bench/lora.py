"""LoRA patching on a full-size SD1.5-shaped UNet + CLIP-L: first application, strength change, add, remove.

The models are diffusers' standard SD1.5 UNet and transformers' CLIP-L text encoder with random
weights (nothing is downloaded). LoRA a is rank-32 kohya on every attention projection, feed-forward
layer and proj_in/proj_out plus every text-encoder linear; LoRA b is rank-16 on the attention
q/k/v and text-encoder layers 0-5. Each phase is timed (median) and its peak RSS growth sampled,
and set against the floor measured here in the same run: for every weight the phase rewrites, one
read and one write of the weight plus its rank-r product(s), as bare `torch.addmm(..., out=)`.

    .venv/bin/python -m bench.lora [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench import record, table
from nodes.sd.handles import LoraRef
from nodes.sd.lora.loader import clear_caches, decoded, file_stamp
from nodes.sd.patcher import apply_stack, held_bytes, restore

OUT = Path(__file__).resolve().parent / "out"
UNET_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def build_models() -> tuple[Any, Any]:
    """SD1.5's UNet (diffusers default config) and CLIP-L text model, random, fp32 holding fp16 values
    (what the checkpoint loader makes of an fp16 checkpoint file, the common Civitai/HF form)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
            )
        )
    for model in (unet, te):
        model.to_empty(device="cpu")
        for p in model.parameters():
            p.requires_grad_(False)
            p.normal_(0, 0.02)
            p.copy_(p.half().float())
    return unet.eval(), te.eval()


def _targets(model: Any, suffixes: tuple[str, ...], te_layers: range | None = None) -> list[str]:
    out = []
    for name, module in model.named_modules():
        if not name.endswith(suffixes) or not hasattr(module, "weight") or module.weight is None:
            continue
        if te_layers is not None and int(name.split("layers.")[1].split(".")[0]) not in te_layers:
            continue
        out.append(name)
    return out


def write_lora(path: Path, unet: Any, te: Any, rank: int, unet_sfx: tuple[str, ...], te_layers: range) -> int:
    """A kohya file (fp16) with random factors; returns the number of modules."""
    mods = [("lora_unet_", unet, m) for m in _targets(unet, unet_sfx)]
    mods += [("lora_te_text_model_", te, m) for m in _targets(te, TE_TARGETS, te_layers)]
    shapes = [(p + n.replace(".", "_"), tuple(m.get_submodule(n).weight.shape)) for p, m, n in mods]
    write_kohya(path, shapes, rank)
    return len(mods)


def write_kohya(path: Path, modules: list[tuple[str, tuple[int, ...]]], rank: int) -> None:
    """A kohya LoRA file (fp16, alpha = rank) with random factors for (stem, weight shape) pairs."""
    gen = torch.Generator().manual_seed(rank)
    tensors: dict[str, torch.Tensor] = {}
    for stem, shape in modules:
        k = shape[2:]
        tensors[stem + ".lora_down.weight"] = (torch.randn((rank, shape[1], *k), generator=gen) * 0.02).half()
        tensors[stem + ".lora_up.weight"] = (
            torch.randn((shape[0], rank, *((1, 1) if k else ())), generator=gen) * 0.02
        ).half()
        tensors[stem + ".alpha"] = torch.tensor(float(rank)).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
    )


class PeakRss:
    """Samples VmRSS in a thread: the peak growth over the RSS at entry."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _time(
    fn: Callable[[], object], setup: Callable[[], object] | None = None, repeats: int = 3
) -> tuple[float, int]:
    """(median seconds, max peak RSS growth in bytes) of `fn` after `setup`, over `repeats` runs."""
    times, peaks = [], []
    for _ in range(repeats):
        if setup is not None:
            setup()
        with PeakRss() as rss:
            # CPU time of the process, one torch thread: the machine is shared, so wall time mostly
            # measures the other jobs; CPU time measures this work.
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        peaks.append(rss.growth)
    return statistics.median(times), max(peaks)


def _jobs(
    pairs: list[tuple[Any, str]], refs: list[LoraRef], names: set[str] | None = None, shared_out: bool = False
) -> list[Any]:
    """(base, out, factors) per weight that `refs` touch (or only `names`), for the floor.

    `shared_out`: weights of one shape write into one buffer (a full-size SDXL UNet's attention
    weights are 3.5 GiB: a second copy does not fit beside the model on a shared machine)."""
    jobs = []
    outs: dict[tuple[int, ...], torch.Tensor] = {}
    for module, target in pairs:
        params = dict(module.named_parameters())
        decs = [decoded(r.path, r.stamp, module, target) for r in refs]  # type: ignore[arg-type]
        keys = set().union(*(d.updates for d in decs)) if decs else set()
        for key in sorted(keys if names is None else keys & names):
            base = params[key].data.reshape(params[key].shape[0], -1)
            factors = [(d.updates[key].up, d.updates[key].down) for d in decs if key in d.updates]
            if shared_out and tuple(base.shape) not in outs:
                outs[tuple(base.shape)] = torch.empty_like(base)
            jobs.append((base, outs[tuple(base.shape)] if shared_out else torch.empty_like(base), factors))
    return jobs


def _floor(jobs: list[Any], with_product: bool = True) -> Callable[[], None]:
    def run() -> None:
        for base, out, factors in jobs:
            if not with_product or not factors:
                out.copy_(base)
                continue
            torch.addmm(base, factors[0][0], factors[0][1], out=out)
            for up, down in factors[1:]:
                out.addmm_(up, down)

    return run


def comfy_style(
    pairs: list[tuple[Any, str]], ref: LoraRef
) -> tuple[Callable[[float], None], Callable[[], None]]:
    """ComfyUI's work on a strength change, for comparison: restore every backup, re-read the file,
    and per weight copy to fp32, materialise ΔW = up @ down, scale, add, cast back (`calculate_weight`).
    Returns (run at strength, cleanup)."""
    from safetensors.torch import load_file

    plan = []
    for module, target in pairs:
        params = dict(module.named_parameters())
        prefix = "lora_unet_" if target == "unet" else "lora_te_text_model_"
        for key in decoded(ref.path, ref.stamp, module, target).updates:  # type: ignore[arg-type]
            stem = prefix + key.rsplit(".", 1)[0].replace(".", "_")
            plan.append((params[key].data, params[key].data.clone(), stem, target))

    def run(strength: float) -> None:
        sd = load_file(str(ref.path))
        for w, backup, stem, target in plan:
            w.copy_(backup)
            t = w.to(torch.float32, copy=True)
            down = sd[stem + ".lora_down.weight"].float()
            diff = torch.mm(sd[stem + ".lora_up.weight"].float().flatten(1), down.flatten(1)).reshape(w.shape)
            t += (strength * float(sd[stem + ".alpha"]) / down.shape[0]) * diff
            w.copy_(t.half() if target == "te" else t)

    def cleanup() -> None:
        for w, backup, _, _ in plan:
            w.copy_(backup)
        plan.clear()

    return run, cleanup


def unet_step(unet: Any, repeats: int = 3) -> float:
    """Median CPU seconds of one batched (cond + uncond) UNet forward on a 32x32 latent (256 px)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 32, 32), generator=gen)
    ctx = torch.randn((2, 77, 768), generator=gen)
    t = torch.tensor([500.0, 500.0])
    times = []
    with torch.inference_mode():
        unet(x, t, ctx)  # warm-up
        for _ in range(repeats):
            t0 = time.process_time()
            unet(x, t, ctx)
            times.append(time.process_time() - t0)
    return statistics.median(times)


def measure(unet: Any, te: Any, a: Path, b: Path) -> tuple[list[list[str]], list[list[str]]]:
    pairs = [(unet, "unet"), (te, "te")]

    def ref(path: Path, s: float) -> LoraRef:
        return LoraRef(path, file_stamp(path), s, path.name)

    def stack(*refs: LoraRef, exact: bool = False) -> Callable[[], None]:
        return lambda: [apply_stack(m, list(refs), t, exact=exact) for m, t in pairs]  # type: ignore[arg-type,func-returntype]

    def reset() -> None:
        restore(unet)
        restore(te)
        clear_caches()

    strengths = iter([0.5, 0.75] * 100)

    def change(unet_changes: bool, te_changes: bool) -> tuple[Callable[[], None], Callable[[], None]]:
        """A strength change of LoRA a from a settled (fused) stack, of the UNet and/or TE strength."""
        state: dict[str, float] = {}

        def setup() -> None:
            stack(a1, exact=True)()
            state["s"] = next(strengths)

        def run() -> None:
            apply_stack(unet, [ref(a, state["s"] if unet_changes else 1.0)], "unet")
            apply_stack(te, [ref(a, state["s"] if te_changes else 1.0)], "te")

        return setup, run

    a1, b1 = ref(a, 1.0), ref(b, 0.8)
    reset()
    first = _time(stack(a1), reset)
    setup, run = change(True, True)
    both = _time(run, setup)
    setup, run = change(True, False)
    unet_only = _time(run, setup)
    setup, run = change(False, True)
    te_only = _time(run, setup)
    held = held_bytes(unet) + held_bytes(te)  # backups of both + the TE ΔW kept for LoRA a

    def te_first_setup() -> None:
        reset()
        stack(a1)()

    te_first = _time(lambda: apply_stack(te, [ref(a, next(strengths))], "te"), te_first_setup)
    settle_state: dict[str, LoraRef] = {}

    def settle_setup() -> None:
        stack(a1, exact=True)()
        settle_state["r"] = ref(a, next(strengths))
        apply_stack(unet, [settle_state["r"]], "unet")  # branches, as after a strength change

    settle = _time(lambda: apply_stack(unet, [settle_state["r"]], "unet"), settle_setup)

    def from_file_setup() -> None:
        stack(a1, exact=True)()
        clear_caches()

    from_file = _time(lambda: stack(ref(a, next(strengths)), exact=True)(), from_file_setup)
    add_b = _time(stack(a1, b1), stack(a1, exact=True))
    remove_b = _time(stack(a1), stack(a1, b1, exact=True))
    remove_all = _time(stack(), stack(a1, exact=True))
    stack(a1, exact=True)()
    fused_step = unet_step(unet)
    apply_stack(unet, [ref(a, 0.5)], "unet")
    branch_step = unet_step(unet)
    reset()
    comfy_run, comfy_cleanup = comfy_style(pairs, a1)
    comfy = _time(lambda: comfy_run(next(strengths)))
    comfy_cleanup()
    reset()
    a_jobs = _jobs(pairs, [a1])
    b_keys = {k for m, t in pairs for k in decoded(b, b1.stamp, m, t).updates}  # type: ignore[arg-type]
    floors = {
        "a": _time(_floor(a_jobs)),
        "a_unet": _time(_floor(_jobs([(unet, "unet")], [a1]))),
        "a_te": _time(_floor(_jobs([(te, "te")], [a1]))),
        "ab": _time(_floor(_jobs(pairs, [a1, b1], b_keys))),
        "a_on_b": _time(_floor(_jobs(pairs, [a1], b_keys))),
        "copy_a": _time(_floor(a_jobs, with_product=False)),
    }
    touched = sum(base.numel() * 4 for base, _, _ in a_jobs)
    del a_jobs
    rows = []
    for label, (secs, peak), floor in (
        ("first application (read, decode, fuse)", first, "a"),
        ("strength change, UNet and TE (e.g. an A1111 tag)", both, "a"),
        ("strength change, UNet only (strength_model)", unet_only, "a_unet"),
        ("strength change, TE only (strength_clip)", te_only, "a_te"),
        ("first TE strength change after applying (keeps ΔW)", te_first, "a_te"),
        ("same stack asked again: UNet branches fused", settle, "a_unet"),
        ("re-applied from the file (read, decode, rewrite UNet + TE)", from_file, "a"),
        ("ComfyUI-style (restore, re-read, materialise ΔW)", comfy, "a"),
        ("second LoRA added", add_b, "ab"),
        ("second LoRA removed", remove_b, "a_on_b"),
        ("all LoRAs removed", remove_all, "copy_a"),
    ):
        f_secs = floors[floor][0]
        rows.append(
            [
                label,
                f"{secs * 1e3:.1f} ms",
                f"{f_secs * 1e3:.0f} ms",
                f"{secs / f_secs:.3f}×",
                f"{peak / 2**20:.0f} MiB",
                f"{peak / touched:.2f}×",
            ]
        )
    ratios = [
        ["re-applied from the file / strength change, UNet and TE", f"{from_file[0] / both[0]:.1f}×"],
        ["re-applied from the file / strength change, UNet only", f"{from_file[0] / unet_only[0]:.0f}×"],
        ["re-applied from the file / strength change, TE only", f"{from_file[0] / te_only[0]:.1f}×"],
        ["ComfyUI-style / strength change, UNet and TE", f"{comfy[0] / both[0]:.1f}×"],
        [
            "UNet forward (256 px, batch 2): fused / with branches",
            f"{fused_step:.2f} s / {branch_step:.2f} s (+{(branch_step / fused_step - 1) * 100:.1f} %)",
        ],
        [f"touched weights (LoRA a): {touched / 2**20:.0f} MiB fp32", ""],
        [
            "held by the patcher while adjusting (backups + kept TE ΔW)",
            f"{held / 2**20:.0f} MiB = {held / touched:.2f}× touched",
        ],
    ]
    return rows, ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    unet, te = build_models()
    a, b = OUT / "lora_a_r32.safetensors", OUT / "lora_b_r16.safetensors"
    n_a = write_lora(a, unet, te, 32, UNET_TARGETS, range(12))
    n_b = write_lora(b, unet, te, 16, ("to_q", "to_k", "to_v"), range(6))
    load_before = os.getloadavg()[0]
    rows, ratios = measure(unet, te, a, b)
    load = f"Load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
    load += " (shared 2-core machine); times are process CPU time with one torch thread."
    headers = ["phase (median of 3)", "CPU time", "floor", "time/floor", "peak RSS growth", "RSS/touched"]
    lines = [
        f"Full-size SD1.5 UNet + CLIP-L, random weights; LoRA a rank 32 on {n_a} modules, "
        f"b rank 16 on {n_b}. Targets: strength change ≤ 2× floor and ≥ 5× faster than from the file; "
        "memory growth ≤ touched weights.",
        load,
        "",
        *table(headers, rows),
        "",
        *table(["comparison", "figure"], ratios),
    ]
    print("\n".join(lines))
    if not args.no_record:
        record("LoRA (issue 4)", lines)


if __name__ == "__main__":
    main()
