"""Nodes: LoraLoader, LoraLoaderModelOnly, LoraTagLoader (A1111 prompt tags).

A LoRA node changes no weight: it validates the file against the model (the coverage report,
the family check) and returns handles that carry one more `LoraRef`. The sampler and the text
encoder apply the stack through `nodes.sd.patcher.patched`.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

from nodegraph.env import Environment
from nodegraph.node import FileChoice, Float, Node, Output, RunContext, Socket, String
from nodegraph.primitives import file_stamp
from nodegraph.types import CLIP, MODEL, STRING
from nodes.sd.handles import ClipHandle, LoraRef, ModelHandle
from nodes.sd.lora.coverage import Coverage, check, coverage
from nodes.sd.lora.loader import decoded, read_lora
from nodes.sd.lora.tags import LoraTag, find_tag, parse_tags
from nodes.sd.patcher import te_targets


def resolve_tag(env: Environment, tag: LoraTag) -> Path:
    """The file a prompt tag names in the `loras` folder; ValueError naming the tag when none fits."""
    return env.folders.resolve("loras", find_tag(env.folders.list("loras"), tag))


def load_lora(
    ctx: RunContext,
    model: ModelHandle | None,
    clip: ClipHandle | None,
    path: Path,
    name: str,
    strengths: tuple[float, float],
) -> tuple[ModelHandle | None, ClipHandle | None, Coverage]:
    """Validate one LoRA against the model and CLIP and return handles that carry it.

    Args:
        ctx: the running node (for the one partial-match warning).
        model, clip: the handles to extend; None when the node has no such input.
        path: the resolved LoRA file; name: the name the user picked (for messages).
        strengths: (strength_model, strength_clip); a zero strength leaves that side unchanged.
    """
    stamp = file_stamp(path)
    lora = read_lora(path, stamp)
    unet_dec = decoded(path, stamp, model.unet, "unet") if model is not None else None
    te_decs = {t: decoded(path, stamp, m, t) for m, t in te_targets(clip)} if clip is not None else {}
    te2_dec = te_decs.get("te2", te_decs.get("te_g"))
    report = coverage(lora, name, unet_dec, te_decs.get("te"), te2_dec)
    base = model if model is not None else clip
    assert base is not None
    warning = check(report, base.source, base.family)
    if warning:
        ctx.warn(warning, report.as_dict())
    s_model, s_clip = strengths
    if model is not None and s_model != 0.0:
        model = model.with_lora(LoraRef(path, stamp, float(s_model), name))
    if clip is not None and s_clip != 0.0:
        clip = clip.with_lora(LoraRef(path, stamp, float(s_clip), name))
    return model, clip, report


def _strength(name: str, tooltip: str | None = None) -> Float:
    """ComfyUI's LoRA strength widget: 1.0 in [-100, 100], step 0.01."""
    return Float(name, 1.0, min=-100.0, max=100.0, step=0.01, tooltip=tooltip)


class LoraLoader(Node):
    """Apply a LoRA to the model and the CLIP text encoder, each at its own strength."""

    DISPLAY_NAME = "Load LoRA"
    CATEGORY = "loaders"
    INPUTS = (
        Socket("model", socket_type=MODEL, tooltip="The diffusion model the LoRA will be applied to."),
        Socket("clip", socket_type=CLIP, tooltip="The CLIP model the LoRA will be applied to."),
        FileChoice("lora_name", folder="loras", tooltip="The name of the LoRA."),
        _strength(
            "strength_model", "How strongly to modify the diffusion model. This value can be negative."
        ),
        _strength("strength_clip", "How strongly to modify the CLIP model. This value can be negative."),
    )
    # Each output is made from its own side only: a strength_model change re-runs the sampler
    # chain and leaves every CLIPTextEncode downstream cached (ComfyUI re-encodes both prompts).
    OUTPUTS = (
        Output(
            MODEL,
            tooltip="The modified diffusion model.",
            depends_on=("model", "lora_name", "strength_model"),
        ),
        Output(CLIP, tooltip="The modified CLIP model.", depends_on=("clip", "lora_name", "strength_clip")),
    )

    def run(
        self,
        ctx: RunContext,
        model: ModelHandle,
        clip: ClipHandle,
        lora_name: str,
        strength_model: float,
        strength_clip: float,
    ) -> tuple[ModelHandle, ClipHandle]:
        if strength_model == 0 and strength_clip == 0:
            return model, clip  # ComfyUI: no file read at all
        path = ctx.env.folders.resolve("loras", lora_name)
        new_model, new_clip, _ = load_lora(ctx, model, clip, path, lora_name, (strength_model, strength_clip))
        assert new_model is not None and new_clip is not None
        return new_model, new_clip


class LoraLoaderModelOnly(Node):
    """Apply a LoRA to the diffusion model only."""

    CATEGORY = "loaders"
    INPUTS = (
        Socket("model", socket_type=MODEL),
        FileChoice("lora_name", folder="loras"),
        _strength("strength_model"),
    )
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model: ModelHandle, lora_name: str, strength_model: float
    ) -> tuple[ModelHandle]:
        if strength_model == 0:
            return (model,)
        path = ctx.env.folders.resolve("loras", lora_name)
        new_model, _, _ = load_lora(ctx, model, None, path, lora_name, (strength_model, 0.0))
        assert new_model is not None
        return (new_model,)


class LoraTagLoader(Node):
    """Apply the <lora:name:weight> tags of an A1111/Civitai prompt and output the prompt without them."""

    DISPLAY_NAME = "Load LoRA Tags"
    CATEGORY = "loaders"
    INPUTS = (
        Socket("model", socket_type=MODEL),
        Socket("clip", socket_type=CLIP),
        String(
            "text",
            multiline=True,
            dynamic_prompts=True,
            tooltip="A prompt with <lora:name:weight> or <lora:name:te_weight:unet_weight> tags.",
        ),
    )
    # The MODEL is made from the tags' UNet weights, the CLIP from their text-encoder weights, the
    # text from the text alone: editing the prose or one side's weight re-runs only what reads it.
    OUTPUTS = (
        Output(MODEL, depends_on=("model", ("text", lambda text: _tag_weights(text, "unet")))),
        Output(CLIP, depends_on=("clip", ("text", lambda text: _tag_weights(text, "te")))),
        Output(STRING, name="text", depends_on=(("text", lambda text: _tag_weights(text, "prose")),)),
    )

    def run(
        self, ctx: RunContext, model: ModelHandle, clip: ClipHandle, text: str
    ) -> tuple[ModelHandle, ClipHandle, str]:
        tags, cleaned = parse_tags(text)
        for tag in tags:
            if tag.unet_weight == 0 and tag.te_weight == 0:
                continue
            path = resolve_tag(ctx.env, tag)
            new_model, new_clip, _ = load_lora(
                ctx, model, clip, path, tag.name, (tag.unet_weight, tag.te_weight)
            )
            assert new_model is not None and new_clip is not None
            model, clip = new_model, new_clip
        return model, clip, cleaned

    @classmethod
    def fingerprint(cls, env: Environment, **constants: Any) -> Hashable:
        text = constants.get("text")
        if not isinstance(text, str):
            return None
        try:
            tags, _ = parse_tags(text)
        except ValueError:
            return None
        return tuple(_tag_stamp(env, tag) for tag in tags)

    @classmethod
    def check_inputs(cls, env: Environment, **constants: Any) -> str | None:
        text = constants.get("text")
        if not isinstance(text, str):
            return None
        try:
            for tag in parse_tags(text)[0]:
                resolve_tag(env, tag)
        except ValueError as exc:
            return str(exc)
        return None


def _tag_weights(text: str, side: str) -> Hashable:
    """What of a tagged prompt one output is made from: for "unet" or "te", (name, weight) of each
    tag that changes that side, in order; for "prose", the text without its tags. The whole text
    when a tag does not parse (the node reports it)."""
    try:
        tags, prose = parse_tags(text)
    except ValueError:
        return text
    if side == "prose":
        return prose
    weights = ((tag.name, tag.unet_weight if side == "unet" else tag.te_weight) for tag in tags)
    return tuple((name, weight) for name, weight in weights if weight != 0)


def _tag_stamp(env: Environment, tag: LoraTag) -> Hashable:
    try:
        return file_stamp(resolve_tag(env, tag))
    except (OSError, ValueError):
        return None


NODES: tuple[type[Node], ...] = (LoraLoader, LoraLoaderModelOnly, LoraTagLoader)
