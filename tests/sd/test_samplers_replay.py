"""Samplers replayed on ComfyUI's recorded denoised predictions: each update rule must give ComfyUI's x.

The refs hold x at the start of every step and the CFG-combined denoised prediction the sampler
saw there, so a sampler fed those predictions must reproduce the next x without any model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nodes.sd.noise import prepare_noise
from nodes.sd.samplers import SAMPLERS
from tests.conftest import ORACLE

REFS = ORACLE / "refs"
SCALE = 0.18215


def load(workflow: str) -> dict[str, torch.Tensor]:
    folder = REFS / workflow
    names = ("step_x", "step_denoised", "sigmas", "noise", "latent")
    return {n: torch.from_numpy(np.load(folder / f"{n}.npy")) for n in names}


def sampler_of(workflow: str) -> tuple[str, int]:
    wf = json.loads((REFS.parent / "workflows" / f"{workflow}.json").read_text())
    inputs = wf["ksampler"]["inputs"]
    return inputs["sampler_name"], inputs["seed"]


WORKFLOWS = sorted(p.name for p in REFS.iterdir() if (p / "step_x.npy").exists())
SINGLE_EVAL = [w for w in WORKFLOWS if sampler_of(w)[0] in ("euler", "euler_ancestral", "dpmpp_2m")]


def test_refs_cover_the_samplers_we_replay() -> None:
    assert {sampler_of(w)[0] for w in SINGLE_EVAL} == {"euler", "euler_ancestral", "dpmpp_2m"}


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_initial_noise_and_x_T(workflow: str) -> None:
    ref = load(workflow)
    _, seed = sampler_of(workflow)
    noise = prepare_noise(torch.zeros(ref["noise"].shape), seed)
    assert torch.equal(noise, ref["noise"])
    sigma0 = ref["sigmas"][0]
    assert torch.equal(noise * torch.sqrt(1.0 + sigma0**2.0), ref["step_x"][0])


@pytest.mark.parametrize("workflow", SINGLE_EVAL)
def test_single_eval_sampler_reproduces_every_step(workflow: str) -> None:
    ref = load(workflow)
    name, seed = sampler_of(workflow)
    seen: list[torch.Tensor] = []

    def replay(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        i = len(seen)
        seen.append(x)
        assert float(sigma[0]) == float(ref["sigmas"][i])
        return ref["step_denoised"][i]

    out = SAMPLERS[name](replay, ref["step_x"][0].clone(), ref["sigmas"], seed, None)
    for i, x in enumerate(seen):
        assert torch.allclose(x, ref["step_x"][i], rtol=0, atol=1e-6 * float(ref["step_x"][i].abs().max()))
    final = out / SCALE
    assert torch.allclose(final, ref["latent"], rtol=0, atol=3e-6 * float(ref["latent"].abs().max()))


def test_euler_ancestral_needs_the_exact_seed() -> None:
    ref = load("sampler_euler_ancestral")
    seen: list[torch.Tensor] = []

    def replay(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return ref["step_denoised"][len(seen) - 1]

    SAMPLERS["euler_ancestral"](replay, ref["step_x"][0].clone(), ref["sigmas"], 43, None)
    # another seed gives other ancestral noise (ComfyUI on CPU does not offset the seed)
    assert (seen[1] - ref["step_x"][1]).abs().max() > 1.0


def test_heun_call_pattern_and_final_euler_step() -> None:
    """Heun's refs record only the first evaluation of each step; the second is recovered from x.

    x_{i+1} = x_i + (d_i + d2_i)/2 * dt gives d2_i, so a replay that returns the first predictions
    and the recovered second ones checks the call pattern (sigma_i, then sigma_{i+1} at the Euler
    point) and that the last step is a plain Euler step onto ComfyUI's final latent.
    """
    ref = load("sampler_heun")
    sig, xs, ds = ref["sigmas"], ref["step_x"], ref["step_denoised"]
    calls: list[tuple[float, torch.Tensor]] = []

    def replay(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append((float(sigma[0]), x))
        step, second = divmod(len(calls) - 1, 2)
        if not second:
            return ds[step]
        dt = sig[step + 1] - sig[step]
        d = (xs[step] - ds[step]) / sig[step]
        d2 = 2 * (xs[step + 1] - xs[step]) / dt - d
        assert torch.allclose(x, xs[step] + d * dt, atol=1e-4)  # evaluated at the Euler point
        return x - d2 * sig[step + 1]

    out = SAMPLERS["heun"](replay, xs[0].clone(), sig, 42, None)
    n = len(sig) - 1
    assert [round(s, 5) for s, _ in calls] == [round(float(sig[(k + 1) // 2]), 5) for k in range(2 * n - 1)]
    assert torch.allclose(out / SCALE, ref["latent"], rtol=0, atol=3e-6 * float(ref["latent"].abs().max()))
