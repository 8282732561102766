"""Custom-sampling and merge nodes declare ComfyUI's ids, inputs, defaults, ranges and outputs
(copied by hand from comfy_extras/nodes_custom_sampler.py, nodes_align_your_steps.py and
nodes_model_merging.py)."""

from __future__ import annotations

from typing import Any

import pytest

from nodes import all_nodes

BY_ID = {cls.NODE_ID: cls for cls in all_nodes()}

# node id -> (required inputs as (name, type, {option: value}), output types, output names)
COMFY: dict[str, tuple[list[tuple[str, str, dict[str, Any]]], list[str], list[str] | None]] = {
    "SamplerCustom": (
        [
            ("model", "MODEL", {}),
            ("add_noise", "BOOLEAN", {"default": True}),
            ("noise_seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            ("cfg", "FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            ("positive", "CONDITIONING", {}),
            ("negative", "CONDITIONING", {}),
            ("sampler", "SAMPLER", {}),
            ("sigmas", "SIGMAS", {}),
            ("latent_image", "LATENT", {}),
        ],
        ["LATENT", "LATENT"],
        ["output", "denoised_output"],
    ),
    "SamplerCustomAdvanced": (
        [(n, t, {}) for n, t in (("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                                 ("sigmas", "SIGMAS"), ("latent_image", "LATENT"))],
        ["LATENT", "LATENT"],
        ["output", "denoised_output"],
    ),
    "KarrasScheduler": (
        [
            ("steps", "INT", {"default": 20, "min": 1, "max": 10000}),
            ("sigma_max", "FLOAT", {"default": 14.614642, "min": 0.0, "max": 5000.0, "step": 0.01}),
            ("sigma_min", "FLOAT", {"default": 0.0291675, "min": 0.0, "max": 5000.0, "step": 0.01}),
            ("rho", "FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.01}),
        ],
        ["SIGMAS"],
        None,
    ),
    "BasicScheduler": (
        [
            ("model", "MODEL", {}),
            ("scheduler", "COMBO", {}),
            ("steps", "INT", {"default": 20, "min": 1, "max": 10000}),
            ("denoise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        ],
        ["SIGMAS"],
        None,
    ),
    "SDTurboScheduler": (
        [
            ("model", "MODEL", {}),
            ("steps", "INT", {"default": 1, "min": 1, "max": 10}),
            ("denoise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        ],
        ["SIGMAS"],
        None,
    ),
    "AlignYourStepsScheduler": (
        [
            ("model_type", "COMBO", {}),
            ("steps", "INT", {"default": 10, "min": 1, "max": 10000}),
            ("denoise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        ],
        ["SIGMAS"],
        None,
    ),
    "SplitSigmas": (
        [("sigmas", "SIGMAS", {}), ("step", "INT", {"default": 0, "min": 0, "max": 10000})],
        ["SIGMAS", "SIGMAS"],
        ["high_sigmas", "low_sigmas"],
    ),
    "CFGGuider": (
        [
            ("model", "MODEL", {}),
            ("positive", "CONDITIONING", {}),
            ("negative", "CONDITIONING", {}),
            ("cfg", "FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        ],
        ["GUIDER"],
        None,
    ),
    "RandomNoise": (
        [("noise_seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF})], ["NOISE"], None
    ),
    "DisableNoise": ([], ["NOISE"], None),
    "KSamplerSelect": ([("sampler_name", "COMBO", {})], ["SAMPLER"], None),
    "SamplerLMS": ([("order", "INT", {"default": 4, "min": 1, "max": 100})], ["SAMPLER"], None),
    "ModelMergeSimple": (
        [
            ("model1", "MODEL", {}),
            ("model2", "MODEL", {}),
            ("ratio", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        ],
        ["MODEL"],
        None,
    ),
    "ModelMergeBlocks": (
        [("model1", "MODEL", {}), ("model2", "MODEL", {})]
        + [(n, "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})
           for n in ("input", "middle", "out")],
        ["MODEL"],
        None,
    ),
    "ModelMergeSubtract": (
        [
            ("model1", "MODEL", {}),
            ("model2", "MODEL", {}),
            ("multiplier", "FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
        ],
        ["MODEL"],
        None,
    ),
    "CLIPMergeAdd": ([("clip1", "CLIP", {}), ("clip2", "CLIP", {})], ["CLIP"], None),
}  # fmt: skip


@pytest.mark.parametrize("node_id", sorted(COMFY))
def test_declaration_matches_comfyui(node_id: str) -> None:
    info = BY_ID[node_id].info(None)
    inputs, outputs, names = COMFY[node_id]
    required = info["input"]["required"]
    assert list(required) == [name for name, _, _ in inputs]
    for name, kind, options in inputs:
        spec = required[name]
        if kind == "COMBO":
            assert isinstance(spec[0], list) and spec[0], name
        else:
            assert spec[0] == kind, name
        for key, value in options.items():
            assert spec[1].get(key) == value, (name, key, spec[1])
    assert info["output"] == outputs
    if names is not None:
        assert info["output_name"] == names
