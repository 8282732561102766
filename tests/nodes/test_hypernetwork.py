"""HypernetworkLoader: ComfyUI's declaration, its layer-building rules (structures, activations, layer
norm, dropout), the k/v patch on the UNet's attentions against a hand computation, and sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes import all_nodes
from nodes.hypernetwork import HypernetworkLoader
from nodes.loaders import CheckpointLoaderSimple
from nodes.sd.hypernetwork import HypernetworkError, HypernetworkProcessor, build, patch_kv
from nodes.sd.ksampler import SamplingRequest, sample
from tests.conftest import assert_within_floor


def test_declaration_matches_comfyui() -> None:
    info = {cls.NODE_ID: cls for cls in all_nodes()}["HypernetworkLoader"].info(None)
    required = info["input"]["required"]
    assert list(required) == ["model", "hypernetwork_name", "strength"]
    assert required["model"][0] == "MODEL" and isinstance(required["hypernetwork_name"][0], list)
    kind, options = required["strength"][:2]
    assert kind == "FLOAT" and {k: options[k] for k in ("default", "min", "max", "step")} == {
        "default": 1.0,
        "min": -10.0,
        "max": 10.0,
        "step": 0.01,
    }
    assert (info["output"], info["category"]) == (["MODEL"], "loaders")


def _mlp(widths: list[int], layer_norm: bool, seed: int) -> dict[str, torch.Tensor]:
    """A1111's key layout: linear.N / its LayerNorm, interleaved in insertion order."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    index = 0
    for fin, fout in zip(widths, widths[1:], strict=False):
        sd[f"linear.{index}.weight"] = torch.randn(fout, fin, generator=gen) / fin**0.5
        sd[f"linear.{index}.bias"] = torch.randn(fout, generator=gen) * 0.05
        index += 1
        if layer_norm:
            sd[f"linear.{index}.weight"] = 1 + 0.1 * torch.randn(fout, generator=gen)
            sd[f"linear.{index}.bias"] = 0.1 * torch.randn(fout, generator=gen)
            index += 1
        index += 1  # the activation's slot
    return sd


def _write(path: Path, structure: list[float], **opts: Any) -> Path:
    obj: dict[Any, Any] = {}
    for n, dim in enumerate((320, 640, 768)):
        widths = [int(dim * m) for m in structure]
        obj[dim] = [_mlp(widths, bool(opts.get("is_layer_norm")), 10 * n + i) for i in (0, 1)]
    obj |= {"layer_structure": structure, "name": path.stem, **opts}
    torch.save(obj, path)
    return path


def _kinds(seq: torch.nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


@pytest.mark.parametrize(
    ("structure", "opts", "kinds"),
    [
        ([1, 2, 1], {"activation_func": "relu"}, ["Linear", "ReLU", "Linear"]),
        ([1, 2, 1], {"activation_func": "relu", "activate_output": True},
         ["Linear", "ReLU", "Linear", "ReLU"]),
        ([1, 1.5, 1], {"activation_func": "swish"}, ["Linear", "Hardswish", "Linear"]),  # swish is Hardswish
        ([1, 2, 2, 1], {}, ["Linear", "Linear", "Linear"]),  # "linear" (the default) adds nothing
        # with layer norms the last Linear is not the last key: it still gets its activation (ComfyUI's rule)
        ([1, 2, 1], {"activation_func": "tanh", "is_layer_norm": True},
         ["Linear", "Tanh", "LayerNorm", "Linear", "Tanh", "LayerNorm"]),
        ([1, 2, 2, 1], {"activation_func": "elu", "use_dropout": True},
         ["Linear", "ELU", "Dropout", "Linear", "ELU", "Linear"]),
        ([1, 2, 2, 1], {"activation_func": "mish", "use_dropout": True, "last_layer_dropout": True},
         ["Linear", "Mish", "Dropout", "Linear", "Mish", "Dropout", "Linear"]),
    ],
)  # fmt: skip
def test_layers_follow_comfyuis_rules(
    tmp_path: Path, structure: list[float], opts: Any, kinds: list[str]
) -> None:
    net = build(_write(tmp_path / "hn.pt", structure, **opts))
    assert net is not None and sorted(net.modules) == [320, 640, 768]
    k, v = net.modules[640]
    assert _kinds(k) == kinds and _kinds(v) == kinds
    assert k[0].in_features == 640 and k[0].out_features == int(640 * structure[1])


def test_unknown_activation_and_bad_files(tmp_path: Path) -> None:
    assert build(_write(tmp_path / "odd.pt", [1, 2, 1], activation_func="gelu")) is None
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(HypernetworkError, match="junk.pt"):
        build(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(HypernetworkError, match="not an A1111 hypernetwork"):
        build(tmp_path / "other.pt")


def test_the_mini_hypernetwork_patches_k_and_v_by_width(mini_hypernetwork: Path) -> None:
    raw = torch.load(mini_hypernetwork, weights_only=True)
    net = build(mini_hypernetwork)
    assert net is not None and _kinds(net.modules[768][0]) == ["Linear", "ReLU", "Linear"]
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))

    def by_hand(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ sd["linear.0.weight"].T + sd["linear.0.bias"])
        return h @ sd["linear.2.weight"].T + sd["linear.2.bias"]

    k, v = patch_kv([(net, 0.7), (net, -0.2)], ctx, ctx)
    k1, v1 = ctx + by_hand(raw[768][0], ctx) * 0.7, ctx + by_hand(raw[768][1], ctx) * 0.7
    assert_within_floor(k, k1 + by_hand(raw[768][0], k1) * -0.2)  # the second one sees the first's output
    assert_within_floor(v, v1 + by_hand(raw[768][1], v1) * -0.2)
    other = torch.randn(1, 5, 1024)
    assert patch_kv([(net, 1.0)], other, other)[0] is other  # no module for that width: untouched


@pytest.fixture(scope="module")
def hn_env(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, mini_hypernetwork: Path) -> Any:
    base = tmp_path_factory.mktemp("hypernetwork")
    for folder, file in (("checkpoints", mini_checkpoint), ("hypernetworks", mini_hypernetwork)):
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / file.name).symlink_to(file)
    env = Environment(Folders.at(base))
    ctx = RecordingContext(env)
    return ctx, CheckpointLoaderSimple().run(ctx, mini_checkpoint.name)[0]


def test_the_processor_is_attention_on_patched_k_and_v(hn_env: Any, mini_hypernetwork: Path) -> None:
    _, model = hn_env
    net = build(mini_hypernetwork)
    assert net is not None
    attn = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1  # self-attention, width 320
    x = torch.randn(2, 64, 320, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = HypernetworkProcessor([(net, 0.5)], attn.processor)(attn, x)
        k_in, v_in = patch_kv([(net, 0.5)], x, x)
        q, k, v = (
            t.view(2, -1, attn.heads, 40).transpose(1, 2)
            for t in (attn.to_q(x), attn.to_k(k_in), attn.to_v(v_in))
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) / 40**0.5, dim=-1)
        want = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, -1, 320))
    assert_within_floor(got, want)


def test_sampling_with_a_hypernetwork(hn_env: Any) -> None:
    ctx, model = hn_env
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(3)), {}]]
    neg = [[torch.zeros(1, 77, 768), {}]]

    def run(m: Any) -> torch.Tensor:
        return sample(
            m, cond, neg, {"samples": torch.zeros(1, 4, 8, 8)}, SamplingRequest(7, 3, 6.0, "euler", "normal")
        )["samples"]

    plain = run(model)
    (patched,) = HypernetworkLoader().run(ctx, model, "mini_hypernetwork.pt", 1.0)
    assert patched.hypernetworks[0].strength == 1.0 and model.hypernetworks == ()
    changed = run(patched)
    assert (changed - plain).abs().max() > 1e-2  # it changes the image
    assert torch.equal(run(HypernetworkLoader().run(ctx, model, "mini_hypernetwork.pt", 0.0)[0]), plain)
    assert torch.equal(run(model), plain)  # the UNet's attention is restored after sampling
    assert torch.equal(run(patched), changed)


def test_an_unsupported_activation_leaves_the_model_as_comfyui_does(hn_env: Any) -> None:
    ctx, model = hn_env
    _write(ctx.env.folders.paths("hypernetworks")[0] / "gelu.pt", [1, 2, 1], activation_func="gelu")
    assert HypernetworkLoader().run(ctx, model, "gelu.pt", 1.0)[0] is model
    assert "gelu" in ctx.warnings[-1][0] and "gelu.pt" in ctx.warnings[-1][0]
