"""ControlNet nodes: ComfyUI's declarations (nodes.py), the conditioning they build, the A1111 folder,
and which sampler steps a ControlNet runs at (start/end percent, inclusive)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes import all_nodes
from nodes.controlnet import ControlNetApply, ControlNetApplyAdvanced, ControlNetLoader
from nodes.loaders import CheckpointLoaderSimple
from nodes.sd.control import Control
from nodes.sd.ksampler import SamplingRequest, sample

BY_ID = {cls.NODE_ID: cls for cls in all_nodes()}
STRENGTH = {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}


def _percent(default: float) -> dict[str, float]:
    return {"default": default, "min": 0.0, "max": 1.0, "step": 0.001}


# node id -> (category, display name, required inputs (name, type, options), optional inputs, outputs, names)
COMFY: dict[str, Any] = {
    "ControlNetLoader": ("loaders", "Load ControlNet Model", [("control_net_name", "COMBO", {})], [],
                         ["CONTROL_NET"], ["CONTROL_NET"]),
    "DiffControlNetLoader": ("loaders", "Load ControlNet Model (diff)",
                             [("model", "MODEL", {}), ("control_net_name", "COMBO", {})], [],
                             ["CONTROL_NET"], ["CONTROL_NET"]),
    "ControlNetApply": ("conditioning/controlnet", "Apply ControlNet (OLD)",
                        [("conditioning", "CONDITIONING", {}), ("control_net", "CONTROL_NET", {}),
                         ("image", "IMAGE", {}), ("strength", "FLOAT", STRENGTH)], [],
                        ["CONDITIONING"], ["CONDITIONING"]),
    "ControlNetApplyAdvanced": ("conditioning/controlnet", "Apply ControlNet",
                                [("positive", "CONDITIONING", {}), ("negative", "CONDITIONING", {}),
                                 ("control_net", "CONTROL_NET", {}), ("image", "IMAGE", {}),
                                 ("strength", "FLOAT", STRENGTH), ("start_percent", "FLOAT", _percent(0.0)),
                                 ("end_percent", "FLOAT", _percent(1.0))], [("vae", "VAE")],
                                ["CONDITIONING", "CONDITIONING"], ["positive", "negative"]),
}  # fmt: skip


@pytest.mark.parametrize("node_id", sorted(COMFY))
def test_declaration_matches_comfyui(node_id: str) -> None:
    category, display, required, optional, outputs, names = COMFY[node_id]
    info = BY_ID[node_id].info(None)
    assert (info["category"], info["display_name"]) == (category, display)
    assert list(info["input"]["required"]) == [name for name, _, _ in required]
    for name, kind, options in required:
        spec = info["input"]["required"][name]
        assert isinstance(spec[0], list) if kind == "COMBO" else spec[0] == kind, name
        for key, value in options.items():
            assert spec[1].get(key) == value, (name, key)
    assert [(k, v[0]) for k, v in info["input"].get("optional", {}).items()] == optional
    assert (info["output"], info["output_name"]) == (outputs, names)
    assert info.get("deprecated", False) == (node_id == "ControlNetApply")


@pytest.fixture(scope="module")
def cn_env(
    tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, mini_controlnet: Path
) -> Environment:
    """Checkpoint in models/checkpoints, the ControlNet in A1111's models/ControlNet."""
    base = tmp_path_factory.mktemp("controlnet")
    for folder, file in (("checkpoints", mini_checkpoint), ("ControlNet", mini_controlnet)):
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / file.name).symlink_to(file)
    return Environment(Folders.at(base))


@pytest.fixture(scope="module")
def loaded(cn_env: Environment) -> Any:
    ctx = RecordingContext(cn_env)
    assert cn_env.folders.list("controlnet") == ["mini_controlnet.safetensors"]
    (net,) = ControlNetLoader().run(ctx, "mini_controlnet.safetensors")
    assert ControlNetLoader().run(ctx, "mini_controlnet.safetensors")[0] is net  # one shared copy
    model = CheckpointLoaderSimple().run(ctx, "mini_sd15.safetensors")[0]
    return ctx, net, model


HINT = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))


def _cond(seed: int, **opts: Any) -> list[Any]:
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), dict(opts)]]


def test_apply_nodes_build_comfyuis_conditioning(loaded: Any) -> None:
    ctx, net, _ = loaded
    pos, neg = _cond(1), _cond(2)
    assert ControlNetApply().run(ctx, pos, net, HINT, 0.0)[0] is pos
    (first,) = ControlNetApply().run(ctx, pos, net, HINT, 0.8)
    control = first[0][1]["control"]
    assert first[0][1]["control_apply_to_uncond"] is True and control.strength == 0.8
    assert control.hint.shape == (1, 3, 64, 64) and "control" not in pos[0][1]
    p2, n2 = ControlNetApplyAdvanced().run(ctx, first, neg, net, HINT, 0.5, 0.1, 0.6)
    on_pos, on_neg = p2[0][1]["control"], n2[0][1]["control"]
    assert on_pos.previous is control and on_neg.previous is None  # each side chains its own
    assert (on_pos.start_percent, on_pos.end_percent) == (0.1, 0.6)
    assert p2[0][1]["control_apply_to_uncond"] is False
    p3, n3 = ControlNetApplyAdvanced().run(ctx, neg, neg, net, HINT, 1.0, 0.0, 1.0)
    assert p3[0][1]["control"] is n3[0][1]["control"]  # one object on both sides: batched together


def test_controlnet_runs_at_the_steps_inside_its_range(loaded: Any) -> None:
    """Normal schedule, 6 steps: sigma 14.61, 5.09, 2.28, 1.163, 0.571, 0.029; 0.1..0.6 is 8.31..1.163."""
    ctx, net, model = loaded
    pos, neg = ControlNetApplyAdvanced().run(ctx, _cond(1), _cond(2), net, HINT, 1.0, 0.1, 0.6)
    seen: list[tuple[int, int]] = []
    hook = net.net.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((round(float(args[1][0])), args[0].shape[0])),
        with_kwargs=True,
    )
    try:
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        out = sample(model, pos, neg, latent, SamplingRequest(42, 6, 7.0, "euler", "normal"))
    finally:
        hook.remove()
    assert out["samples"].shape == (1, 4, 8, 8)
    # timesteps 799, 599, 400 (the 1.163 bound is one of the schedule's sigmas), cond + uncond in one batch
    assert [s for s, _ in seen] == [799, 599, 400] and all(b == 2 for _, b in seen)


def test_a_conditioning_with_a_foreign_control_value_is_refused(loaded: Any) -> None:
    ctx, net, model = loaded
    pos = _cond(1, control="not a controlnet")
    with pytest.raises(ValueError, match="control"):
        sample(
            model,
            pos,
            _cond(2),
            {"samples": torch.zeros(1, 4, 8, 8)},
            SamplingRequest(1, 1, 7.0, "euler", "normal"),
        )
    assert isinstance(ControlNetApply().run(ctx, _cond(1), net, HINT, 1.0)[0][0][1]["control"], Control)


def test_diff_controlnet_adds_the_models_unet_weights(
    loaded: Any, cn_env: Environment, mini_controlnet: Path
) -> None:
    """A diff file (control_model.* = ControlNet - UNet, plus a `difference` key) of the mini ControlNet:
    DiffControlNetLoader adds the model's UNet weights back (in the file's fp16, as ComfyUI does)."""
    from safetensors.torch import load_file, save_file

    from nodes.controlnet import DiffControlNetLoader
    from nodes.sd.checkpoint import ldm_names

    ctx, net, model = loaded
    unet = {ldm[len("model.diffusion_model.") :]: p for ldm, p in (ldm_names(model.unet) or {}).items()}
    params = dict(model.unet.named_parameters())
    diff: dict[str, torch.Tensor] = {"difference": torch.zeros(1)}
    for key, value in load_file(str(mini_controlnet)).items():
        base = params[unet[key]].detach().half() if key in unet else None
        diff["control_model." + key] = value - base if base is not None else value
    assert len(diff) > 100 and sum(k[len("control_model.") :] in unet for k in diff) > 50
    folder = cn_env.folders.paths("controlnet")[0]  # models/controlnet, beside A1111's models/ControlNet
    folder.mkdir(exist_ok=True)
    save_file(diff, str(folder / "diff.safetensors"))
    (got,) = DiffControlNetLoader().run(ctx, model, "diff.safetensors")
    want = dict(net.net.state_dict())
    for name, tensor in got.net.state_dict().items():
        assert torch.allclose(tensor, want[name], atol=2e-3, rtol=2e-3), name  # fp16 rounding of the sum
    with pytest.raises(ValueError, match="model"):
        DiffControlNetLoader().run(ctx, None, "diff.safetensors")
