"""GLIGEN (nodes/sd/gligen.py) against ComfyUI's comfy/gligen.py formulas, on a random-weight GLIGEN
file shaped for the mini SD1.5 UNet (tests/gligen_files.py) loaded by the loader real files use.

The boxes and masks are checked against values worked out by hand from Gligen.set_position, the
position net and the gated layer against ComfyUI's formulas written out in float64, the layer's
place in each transformer block against BasicTransformerBlock's `middle_patch`, and sampling with
boxes against sampling without them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.cond_entries import CondEntry, ConditioningError, prepare_sides
from nodes.sd.gligen import (
    MAX_OBJS,
    GligenError,
    GligenModel,
    Grounding,
    _fuser_groups,
    box_inputs,
    check_fits,
    gated_layers_attached,
    grounding_tokens,
    load_gligen,
    transformers_of,
)
from nodes.sd.ksampler import SamplingRequest, run_sampler
from tests.conftest import assert_within_floor
from tests.gligen_files import write_mini_gligen

FUSER = "transformer_blocks.0.fuser."
LAYERS = ("input_blocks.1.1", "middle_block.1", "output_blocks.2.1", "output_blocks.3.1")


@pytest.fixture(scope="module")
def gligen(mini_gligen: Path) -> GligenModel:
    return load_gligen(mini_gligen)


def _pooled(seed: int) -> torch.Tensor:
    return torch.randn(1, 768, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ loading


def test_the_file_layout_maps_onto_one_gated_layer_per_transformer(
    gligen: GligenModel, mini_gligen: Path
) -> None:
    """load_gligen's order (input blocks, middle, output blocks) and names: every tensor of the file
    lands in the module of its block, in float32, with 8 heads (SD1.x: 768-wide text)."""
    file = load_numpy(str(mini_gligen))
    assert [f.linear.out_features for f in gligen.fusers] == [320, 640, 320, 320]
    assert gligen.in_dim == 768 and all(f.linear.in_features == 768 for f in gligen.fusers)
    assert all(f.attn.heads == 8 for f in gligen.fusers)
    for block, fuser in zip(LAYERS, gligen.fusers, strict=True):
        state = fuser.state_dict()
        assert len(state) == 17  # linear, to_q/k/v, to_out.0, ff (2 layers), norm1, norm2, 2 gates
        for name, tensor in state.items():
            want = torch.from_numpy(file[f"{block}.{FUSER}{name}"].astype("float32"))
            assert tensor.dtype == torch.float32 and torch.equal(tensor, want.reshape(tensor.shape)), name
    net = gligen.position_net.state_dict()
    assert set(net) == {f"linears.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "null_positive_feature",
        "null_position_feature",
    }
    assert torch.equal(
        net["linears.0.weight"], torch.from_numpy(file["position_net.linears.0.weight"]).float()
    )
    assert net["linears.0.weight"].shape == (512, 768 + 64)


def test_layers_are_ordered_by_block_then_number_whatever_the_prefix() -> None:
    keys = [
        f"model.diffusion_model.{block}.{FUSER}linear.weight"
        for block in ("output_blocks.10.1", "middle_block.1", "output_blocks.9.1", "input_blocks.2.1")
    ] + ["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"]
    groups = _fuser_groups(keys, "x.safetensors")
    assert [g["linear.weight"].split(".transformer")[0][len("model.diffusion_model.") :] for g in groups] == [
        "input_blocks.2.1",
        "middle_block.1",
        "output_blocks.9.1",
        "output_blocks.10.1",
    ]


def test_a_prefixed_file_loads_the_same_layers(
    tmp_path: Path, mini_checkpoint: Path, gligen: GligenModel
) -> None:
    path = write_mini_gligen(
        tmp_path / "prefixed.safetensors", mini_checkpoint, prefix="model.diffusion_model."
    )
    other = load_gligen(path)
    for a, b in zip(other.fusers, gligen.fusers, strict=True):
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        )


@pytest.mark.parametrize(
    ("fixture", "what"),
    [("mini_checkpoint", "a checkpoint"), ("mini_controlnet", "a ControlNet"), ("mini_loras", "a LoRA")],
)
def test_other_model_files_are_refused_naming_the_file(
    request: pytest.FixtureRequest, fixture: str, what: str
) -> None:
    path = request.getfixturevalue(fixture)
    if path.is_dir():
        path = path / "mini_lora_a.safetensors"
    with pytest.raises(GligenError) as caught:
        load_gligen(path)
    message = str(caught.value)
    assert (
        f"'{path.name}' is not a GLIGEN model" in message and what in message and "models/gligen" in message
    )


def test_an_incomplete_gligen_file_is_refused_naming_it(tmp_path: Path, mini_gligen: Path) -> None:
    tensors = {k: torch.from_numpy(v) for k, v in load_numpy(str(mini_gligen)).items()}
    del tensors[f"middle_block.1.{FUSER}alpha_dense"]
    save_file(tensors, str(tmp_path / "cut.safetensors"))
    with pytest.raises(GligenError, match=r"'cut.safetensors'.*missing alpha_dense"):
        load_gligen(tmp_path / "cut.safetensors")
    del tensors["position_net.null_positive_feature"]
    save_file(tensors, str(tmp_path / "cut2.safetensors"))
    with pytest.raises(
        GligenError, match=r"'cut2.safetensors' is an incomplete GLIGEN model: it has no position"
    ):
        load_gligen(tmp_path / "cut2.safetensors")


# ------------------------------------------------------------------------------------------ boxes


def test_boxes_and_masks_are_set_position_s() -> None:
    """Two boxes (h, w, y, x) on a 2 x 4 x 8 x 12 latent: (x/W, y/H, (x+w)/W, (y+h)/H), masks 1 then 0,
    texts in order then zeros, all repeated over the batch."""
    a, b = _pooled(1), _pooled(2)
    boxes, masks, texts = box_inputs([(a, 7, 4, 0, 1), (b, 2, 12, 6, 0)], (2, 4, 8, 12), 768)
    assert (
        boxes.shape == (2, MAX_OBJS, 4) and masks.shape == (2, MAX_OBJS) and texts.shape == (2, MAX_OBJS, 768)
    )
    want = torch.tensor([[1 / 12, 0 / 8, 5 / 12, 7 / 8], [0 / 12, 6 / 8, 12 / 12, 8 / 8]])
    for item in range(2):
        assert torch.equal(boxes[item, :2], want)
        assert torch.equal(boxes[item, 2:], torch.zeros(MAX_OBJS - 2, 4))
        assert masks[item].tolist() == [1.0, 1.0] + [0.0] * (MAX_OBJS - 2)
        assert torch.equal(texts[item, 0], a[0]) and torch.equal(texts[item, 1], b[0])
        assert not texts[item, 2:].any()
    assert boxes[0, 0, 0].item() == pytest.approx(0.0833333358168602, abs=0)  # float32(1/12)


def test_more_than_thirty_boxes_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 30"):
        box_inputs([(_pooled(0), 1, 1, 0, 0)] * 31, (1, 4, 8, 8), 768)


def _comfy_position_net(
    net: Any, boxes: torch.Tensor, masks: torch.Tensor, texts: torch.Tensor
) -> torch.Tensor:
    """PositionNet.forward with FourierEmbedder(8, 100), written out in float64 (its freq bands in
    float32, as ComfyUI computes them)."""
    sd = {k: v.double() for k, v in net.state_dict().items()}
    freqs = 100 ** (torch.arange(8) / 8)  # float32, as FourierEmbedder
    parts = []
    for freq in freqs:
        angle = (freq * boxes).double()  # the product in float32, as ComfyUI's
        parts += [torch.sin(angle), torch.cos(angle)]
    masks, texts = masks.double().unsqueeze(-1), texts.double()
    xyxy = torch.cat(parts, -1)
    texts = texts * masks + (1 - masks) * sd["null_positive_feature"].view(1, 1, -1)
    xyxy = xyxy * masks + (1 - masks) * sd["null_position_feature"].view(1, 1, -1)
    h = torch.cat([texts, xyxy], -1)
    h = F.silu(F.linear(h, sd["linears.0.weight"], sd["linears.0.bias"]))
    h = F.silu(F.linear(h, sd["linears.2.weight"], sd["linears.2.bias"]))
    return F.linear(h, sd["linears.4.weight"], sd["linears.4.bias"])


def test_fourier_features_are_comfyuis_by_hand() -> None:
    """The 64 box features: for frequency k (100^(k/8)) sin of x1, y1, x2, y2, then cos of them."""
    from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox

    box = torch.tensor([[[0.125, 0.0, 0.625, 0.875]]])
    got = get_fourier_embeds_from_boundingbox(8, box)[0, 0]
    freqs = 100 ** (torch.arange(8) / 8)  # FourierEmbedder's bands: float32, and so is freq * x
    assert freqs[1].item() == pytest.approx(100 ** (1 / 8), rel=1e-7)
    for k in range(8):
        for j, value in enumerate((0.125, 0.0, 0.625, 0.875)):
            angle = (freqs[k] * torch.tensor(value)).item()
            assert got[8 * k + j].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert got[8 * k + 4 + j].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_grounding_tokens_are_comfyuis_position_net(gligen: GligenModel) -> None:
    grounding = Grounding("position", gligen, ((_pooled(1), 7, 4, 0, 1), (_pooled(2), 3, 3, 4, 4)))
    got = grounding_tokens(grounding, (2, 4, 8, 8), torch.device("cpu"))
    assert got.shape == (2, MAX_OBJS, 768) and got.dtype == torch.float32
    want = _comfy_position_net(gligen.position_net, *box_inputs(grounding.boxes, (2, 4, 8, 8), 768))
    assert_within_floor(got, want)
    # slots without a box all get the null features' token; those with one do not
    assert_within_floor(got[:, 29], got[:, 2])
    assert (got[:, 0] - got[:, 2]).abs().max() > 1e-3


def test_another_kind_is_set_empty_the_same_as_no_boxes(gligen: GligenModel) -> None:
    empty = grounding_tokens(
        Grounding("empty", gligen, ((_pooled(1), 7, 4, 0, 1),)), (1, 4, 8, 8), torch.device("cpu")
    )
    none = grounding_tokens(Grounding("position", gligen, ()), (1, 4, 8, 8), torch.device("cpu"))
    assert torch.equal(empty, none)
    assert_within_floor(empty[:, 0], empty[:, 29])


def test_an_area_entry_places_its_boxes_on_its_crop(gligen: GligenModel) -> None:
    """get_area_and_mult passes the crop's shape to set_position: boxes are fractions of the area."""
    from nodes.sd.guidance import _job

    grounding = Grounding("position", gligen, ((_pooled(1), 2, 2, 1, 1),))
    job = _job(CondEntry(_text(1), area=(4, 4, 2, 2), gligen=grounding), torch.zeros(1, 4, 8, 8), 0)
    cpu = torch.device("cpu")
    assert job.input_x.shape == (1, 4, 4, 4) and job.grounding is not None
    assert torch.equal(job.grounding.tokens, grounding_tokens(grounding, (1, 4, 4, 4), cpu))
    assert not torch.equal(job.grounding.tokens, grounding_tokens(grounding, (1, 4, 8, 8), cpu))


# ------------------------------------------------------------------------------------------ the UNet


def _comfy_gated(fuser: Any, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
    """GatedSelfAttentionDense.forward (CrossAttention with 8 heads, GEGLU feed-forward) in float64."""
    sd = {k: v.double() for k, v in fuser.state_dict().items()}
    x, objs = x.double(), objs.double()
    width, visual = x.shape[-1], x.shape[1]
    objs = F.linear(objs, sd["linear.weight"], sd["linear.bias"])
    h = F.layer_norm(torch.cat([x, objs], 1), (width,), sd["norm1.weight"], sd["norm1.bias"], 1e-5)
    heads = 8
    q, k, v = (F.linear(h, sd[f"attn.to_{n}.weight"]) for n in "qkv")
    q, k, v = (t.view(t.shape[0], -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) * (width // heads) ** -0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape[0], -1, width)
    out = F.linear(out, sd["attn.to_out.0.weight"], sd["attn.to_out.0.bias"])
    x = x + torch.tanh(sd["alpha_attn"]) * out[:, :visual]
    n = F.layer_norm(x, (width,), sd["norm2.weight"], sd["norm2.bias"], 1e-5)
    a, gate = F.linear(n, sd["ff.net.0.proj.weight"], sd["ff.net.0.proj.bias"]).chunk(2, dim=-1)
    ff = F.linear(a * F.gelu(gate), sd["ff.net.2.weight"], sd["ff.net.2.bias"])
    return x + torch.tanh(sd["alpha_dense"]) * ff


def test_the_gated_layer_is_comfyuis(gligen: GligenModel) -> None:
    x = torch.randn(2, 64, 320, generator=torch.Generator().manual_seed(3))
    objs = torch.randn(2, MAX_OBJS, 768, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = gligen.fusers[0](x, objs)
    assert_within_floor(got, _comfy_gated(gligen.fusers[0], x, objs))
    assert (got - x).abs().max() > 0.1  # the open gates do change the hidden states


def test_the_layer_runs_where_comfyui_s_middle_patch_does(
    gligen: GligenModel, loaded_mini: LoadedCheckpoint
) -> None:
    """In each transformer block: after self-attention's residual, before cross-attention's norm."""
    unet = loaded_mini.unet
    block = transformers_of(unet)[0].transformer_blocks[0]
    x = torch.randn(1, 64, 320, generator=torch.Generator().manual_seed(5))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(6))
    objs = torch.randn(1, MAX_OBJS, 768, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        h = block.attn1(block.norm1(x)) + x
        h = gligen.fusers[0](h, objs)  # middle_patch
        h = block.attn2(block.norm2(h), encoder_hidden_states=context) + h
        want = block.ff(block.norm3(h)) + h
        with gated_layers_attached(unet, gligen):
            got = block(x, encoder_hidden_states=context, cross_attention_kwargs={"gligen": {"objs": objs}})
    assert_within_floor(got, want)
    assert not hasattr(block, "fuser") and not hasattr(unet, "position_net")  # taken off again


def test_a_gligen_for_another_unet_is_refused(gligen: GligenModel, loaded_mini: LoadedCheckpoint) -> None:
    short = GligenModel("short.safetensors", gligen.position_net, gligen.fusers[:3], 768)
    with pytest.raises(ValueError, match=r"'short.safetensors' has 3 gated layers.*4 transformers"):
        check_fits(short, loaded_mini.unet)
    assert check_fits(gligen, loaded_mini.unet) == transformers_of(loaded_mini.unet)


# ------------------------------------------------------------------------------------------ sampling


def _sample(unet: Any, positive: Any, negative: Any, cfg: float = 7.0) -> torch.Tensor:
    request = SamplingRequest(seed=11, steps=2, cfg=cfg, sampler_name="euler", scheduler="normal")
    with torch.inference_mode():
        return run_sampler(unet, positive, negative, {"samples": torch.zeros(1, 4, 8, 8)}, request)


def _text(seed: int) -> torch.Tensor:
    return torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed))


def _boxed(gligen: GligenModel, *boxes: tuple[int, int, int, int]) -> list[Any]:
    return [(_text(1), {"gligen": ("position", gligen, [(_pooled(9 + i), *b) for i, b in enumerate(boxes)])})]


def test_boxes_change_the_image_and_leave_no_trace(
    gligen: GligenModel, loaded_mini: LoadedCheckpoint
) -> None:
    unet, negative = loaded_mini.unet, [(_text(2), {})]
    plain = _sample(unet, [(_text(1), {})], negative)
    boxed = _sample(unet, _boxed(gligen, (4, 4, 0, 0)), negative)
    moved = _sample(unet, _boxed(gligen, (4, 4, 4, 4)), negative)
    peak = plain.abs().max()
    # measured: boxes 36% of the peak, moving the box 0.5% (float32 noise is 3e-5 of it)
    assert (boxed - plain).abs().max() > 0.05 * peak and (moved - boxed).abs().max() > 1e-3 * peak
    assert torch.equal(_sample(unet, [(_text(1), {})], negative), plain)  # the UNet is as before


def test_closed_gates_change_nothing(
    tmp_path: Path, mini_checkpoint: Path, loaded_mini: LoadedCheckpoint
) -> None:
    """alpha_attn = alpha_dense = 0: tanh(0) = 0, the gated layers add exact zeros."""
    closed = load_gligen(
        write_mini_gligen(tmp_path / "closed.safetensors", mini_checkpoint, alphas=(0.0, 0.0))
    )
    unet = loaded_mini.unet
    plain = _sample(unet, [(_text(1), {})], [], cfg=1.0)
    assert torch.equal(_sample(unet, _boxed(closed, (4, 4, 0, 0)), [], cfg=1.0), plain)


def test_boxed_entries_run_alone_and_the_negative_gets_the_boxes(
    gligen: GligenModel, loaded_mini: LoadedCheckpoint
) -> None:
    """ComfyUI: a GLIGEN entry's patches never batch; apply_empty_x_to_equal_area gives the positive
    boxes to the negative entry without area. So each step runs two UNet calls of batch 1, each with
    the gated layers (without boxes: one call of batch 2)."""
    unet = loaded_mini.unet
    batches: list[int] = []
    gated: list[int] = []
    hook = unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    inner = gligen.fusers[0].register_forward_pre_hook(lambda _m, args: gated.append(args[0].shape[0]))
    try:
        _sample(unet, [(_text(1), {})], [(_text(2), {})])
        assert batches == [2, 2] and gated == []
        batches.clear()
        _sample(unet, _boxed(gligen, (4, 4, 0, 0)), [(_text(2), {})])
    finally:
        hook.remove()
        inner.remove()
    assert batches == [1, 1, 1, 1] and gated == [1, 1, 1, 1]


def test_negative_entries_take_the_positive_boxes_only_when_they_have_none(gligen: GligenModel) -> None:
    mine = Grounding("position", gligen, ((_pooled(1), 4, 4, 0, 0),))
    theirs = Grounding("position", gligen, ((_pooled(2), 2, 2, 0, 0),))
    pos = [CondEntry(_text(1), gligen=mine), CondEntry(_text(3), area=(4, 4, 0, 0), gligen=theirs)]
    _, neg = prepare_sides(pos, [CondEntry(_text(2)), CondEntry(_text(4))], 8, 8)
    assert neg[0].gligen is mine and neg[1].gligen is None  # the area entry's boxes stay (and its twin's)
    assert neg[2].gligen is theirs and neg[2].area == (4, 4, 0, 0)
    _, kept = prepare_sides(pos, [CondEntry(_text(2), gligen=theirs)], 8, 8)
    assert kept[0].gligen is theirs


def test_a_wrong_gligen_option_is_refused_naming_the_side(gligen: GligenModel) -> None:
    from nodes.sd.cond_entries import cond_entries
    from nodes.sd.schedules import sd15_schedule

    schedule = sd15_schedule()
    wide = [(_text(1), {"gligen": ("position", gligen, [(torch.zeros(1, 1280), 4, 4, 0, 0)])})]
    with pytest.raises(ConditioningError, match=r"positive: a GLIGEN box's text is 1280 wide"):
        cond_entries(wide, schedule, "positive")
    with pytest.raises(ConditioningError, match="negative: .*not a GLIGEN model"):
        cond_entries([(_text(1), {"gligen": ("position", "x", [])})], schedule, "negative")
