"""Nodes: the LoRA nodes of the popular custom-node packs, written here with their ids, inputs and
widget values, so shared workflows that use them run unchanged.

* rgthree-comfy: "Power Lora Loader (rgthree)" (any number of `lora_N` rows, each
  `{on, lora, strength, strengthTwo}`) and "Lora Loader Stack (rgthree)" (four fixed slots).
* Efficiency Nodes: "LoRA Stacker" (up to 49 slots, simple or advanced strengths) -> LORA_STACK.
* Comfyroll: "CR LoRA Stack" (three switchable slots) -> LORA_STACK, "CR Apply LoRA Stack".

None of them changes a weight: each LoRA goes through `nodes.lora.load_lora`, the one path of
LoraLoader (coverage check, family check, a `LoraRef` on the handles), so the sampler's patching,
its caches and the fast strength-change path are the same as for a chain of LoraLoaders.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from nodegraph.env import Environment
from nodegraph.node import Combo, FileChoice, Float, Int, Node, Output, RunContext, Socket
from nodegraph.primitives import file_stamp
from nodegraph.types import CLIP, LORA_STACK, MODEL, STRING
from nodes.lora import load_lora
from nodes.lora_rows import power_rows, row_problem
from nodes.sd.handles import ClipHandle, ModelHandle

NONE = "None"
# One entry of a LORA_STACK, as the packs pass it: (lora name, strength_model, strength_clip).
StackEntry = tuple[str, float, float]


def _with_none(env: Environment) -> list[str]:
    """The packs' LoRA combos: "None", then the loras folder."""
    return [NONE, *env.folders.list("loras")]


def _lora_combo(name: str) -> FileChoice:
    return FileChoice(name, folder="loras", choices=_with_none)


def _strength(name: str) -> Float:
    """The packs' strength widget: 1.0 in [-10, 10], step 0.01."""
    return Float(name, 1.0, min=-10.0, max=10.0, step=0.01)


def apply_stack(
    ctx: RunContext, model: ModelHandle | None, clip: ClipHandle | None, stack: tuple[StackEntry, ...]
) -> tuple[ModelHandle | None, ClipHandle | None]:
    """Apply (name, strength_model, strength_clip) entries in order, each as one LoraLoader would."""
    for name, s_model, s_clip in stack:
        if s_model == 0 and s_clip == 0:
            continue  # LoraLoader reads no file then
        path = ctx.env.folders.resolve("loras", name)
        model, clip, _ = load_lora(ctx, model, clip, path, name, (s_model, s_clip))
    return model, clip


def _applied(
    ctx: RunContext, model: ModelHandle, clip: ClipHandle, stack: tuple[StackEntry, ...]
) -> tuple[ModelHandle, ClipHandle]:
    """`apply_stack` where both inputs are required: a given model and CLIP come back patched."""
    new_model, new_clip = apply_stack(ctx, model, clip, stack)
    assert new_model is not None and new_clip is not None
    return new_model, new_clip


class PowerLoraLoader(Node):
    """Apply any number of LoRAs, each row with its own switch and strength (rgthree's Power Lora Loader)."""

    NODE_ID = "Power Lora Loader (rgthree)"
    DISPLAY_NAME = "Power Lora Loader (rgthree)"
    CATEGORY = "rgthree"
    EXTRA_INPUTS = True  # the rows arrive as lora_1, lora_2, ... (rgthree's flexible optional inputs)
    INPUTS = (
        Socket("model", socket_type=MODEL, optional=True),
        Socket("clip", socket_type=CLIP, optional=True),
    )
    OUTPUTS = (Output(MODEL, name="MODEL"), Output(CLIP, name="CLIP"))

    def run(
        self, ctx: RunContext, model: ModelHandle | None = None, clip: ClipHandle | None = None, **rows: Any
    ) -> tuple[ModelHandle | None, ClipHandle | None]:  # absent inputs pass through as None
        names = ctx.env.folders.list("loras")
        for row in power_rows(rows, names, has_clip=clip is not None):
            if model is None:
                break  # rgthree applies nothing without a model
            if row.clip_ignored:
                ctx.warn(f"{row.key}: a clip strength was given but no CLIP is connected; it is ignored")
            path = ctx.env.folders.resolve("loras", row.file)
            new_model, new_clip, _ = load_lora(ctx, model, clip, path, row.file, row.strengths)
            assert new_model is not None
            model, clip = new_model, new_clip
        return model, clip

    @classmethod
    def from_ui_widgets(cls, values: list[Any], properties: Mapping[str, Any]) -> dict[str, Any] | None:
        """rgthree's canvas rows: every `widgets_values` entry with a `lora` key is one row, named
        lora_1, lora_2 ... in order; the second strength is sent only in "Separate Model & Clip"
        mode (rgthree's serializeValue), otherwise the one strength sets both."""
        separate = properties.get("Show Strengths") == "Separate Model & Clip"
        inputs: dict[str, Any] = {"PowerLoraLoaderHeaderWidget": {"type": "PowerLoraLoaderHeaderWidget"}}
        count = 0
        for value in values:
            if not isinstance(value, dict) or "lora" not in value:
                continue
            count += 1
            row = dict(value)
            if separate:
                row["strengthTwo"] = 1 if row.get("strengthTwo") is None else row["strengthTwo"]
            else:
                row.pop("strengthTwo", None)
            inputs[f"lora_{count}"] = row
        inputs["➕ Add Lora"] = ""
        return inputs

    @classmethod
    def check_inputs(cls, env: Environment, **constants: Any) -> str | None:
        rows = {k: v for k, v in constants.items() if k not in ("model", "clip")}
        return row_problem(rows, env.folders.list("loras"))

    @classmethod
    def fingerprint(cls, env: Environment, **constants: Any) -> Hashable:
        try:
            rows = power_rows(constants, env.folders.list("loras"), has_clip=True)
            return tuple(file_stamp(env.folders.resolve("loras", row.file)) for row in rows)
        except (OSError, ValueError):
            return None


class LoraLoaderStack(Node):
    """Apply up to four LoRAs in order, one strength each for model and CLIP (rgthree's Lora Loader Stack)."""

    NODE_ID = "Lora Loader Stack (rgthree)"
    DISPLAY_NAME = "Lora Loader Stack (rgthree)"
    CATEGORY = "rgthree"
    INPUTS = (
        Socket("model", socket_type=MODEL),
        Socket("clip", socket_type=CLIP),
        *(inp for i in range(1, 5) for inp in (_lora_combo(f"lora_0{i}"), _strength(f"strength_0{i}"))),
    )
    OUTPUTS = (Output(MODEL), Output(CLIP))

    def run(
        self, ctx: RunContext, model: ModelHandle, clip: ClipHandle, **slots: Any
    ) -> tuple[ModelHandle, ClipHandle]:
        stack = tuple(
            (slots[f"lora_0{i}"], slots[f"strength_0{i}"], slots[f"strength_0{i}"])
            for i in range(1, 5)
            if slots[f"lora_0{i}"] != NONE
        )
        return _applied(ctx, model, clip, stack)


class LoRAStacker(Node):
    """Collect up to 49 LoRAs with their strengths into a LORA_STACK (Efficiency Nodes' LoRA Stacker)."""

    NODE_ID = "LoRA Stacker"
    CATEGORY = "Efficiency Nodes/Stackers"
    SLOTS = 49
    INPUTS = (
        Combo("input_mode", choices=("simple", "advanced")),
        Int("lora_count", 3, min=0, max=50, step=1),
        *(
            inp
            for i in range(1, SLOTS + 1)
            for inp in (
                _lora_combo(f"lora_name_{i}"),
                _strength(f"lora_wt_{i}"),
                _strength(f"model_str_{i}"),
                _strength(f"clip_str_{i}"),
            )
        ),
        Socket("lora_stack", socket_type=LORA_STACK, optional=True),
    )
    OUTPUTS = (Output(LORA_STACK, name="LORA_STACK"),)

    def run(
        self,
        ctx: RunContext,
        input_mode: str,
        lora_count: int,
        lora_stack: tuple[StackEntry, ...] | None = None,
        **slots: Any,
    ) -> tuple[tuple[StackEntry, ...]]:
        own: list[StackEntry] = []
        for i in range(1, min(lora_count, self.SLOTS) + 1):
            name = slots[f"lora_name_{i}"]
            if name == NONE:
                continue
            if input_mode == "simple":
                own.append((name, slots[f"lora_wt_{i}"], slots[f"lora_wt_{i}"]))
            else:
                own.append((name, slots[f"model_str_{i}"], slots[f"clip_str_{i}"]))
        # Efficiency puts its own LoRAs first, then the incoming stack's
        return (tuple(own) + tuple(e for e in lora_stack or () if e[0] != NONE),)

    @classmethod
    def from_ui_widgets(cls, values: list[Any], properties: Mapping[str, Any]) -> dict[str, Any] | None:
        """Canvas files saved with the pack's first version (three slots: name and weight each, no
        mode or count) read as simple mode with three slots; the current layout maps positionally."""
        if not values or values[0] in ("simple", "advanced"):
            return None
        inputs: dict[str, Any] = {"input_mode": "simple", "lora_count": 3}
        for i in range(3):
            pair = values[2 * i : 2 * i + 2]
            if len(pair) == 2:
                inputs[f"lora_name_{i + 1}"], inputs[f"lora_wt_{i + 1}"] = pair
        for inp in cls.INPUTS:
            if inp.is_widget and inp.name not in inputs:
                inputs[inp.name] = NONE if isinstance(inp, FileChoice) else inp.default_value()
        return inputs


CR_CATEGORY = "🧩 Comfyroll Studio/✨ Essential/💊 LoRA"


class CRLoRAStack(Node):
    """Add up to three switchable LoRAs to a LORA_STACK (Comfyroll's CR LoRA Stack)."""

    NODE_ID = "CR LoRA Stack"
    DISPLAY_NAME = "💊 CR LoRA Stack"
    CATEGORY = CR_CATEGORY
    INPUTS = (
        *(
            inp
            for i in range(1, 4)
            for inp in (
                Combo(f"switch_{i}", choices=("Off", "On")),
                _lora_combo(f"lora_name_{i}"),
                _strength(f"model_weight_{i}"),
                _strength(f"clip_weight_{i}"),
            )
        ),
        Socket("lora_stack", socket_type=LORA_STACK, optional=True),
    )
    OUTPUTS = (Output(LORA_STACK, name="LORA_STACK"), Output(STRING, name="show_help"))

    def run(
        self, ctx: RunContext, lora_stack: tuple[StackEntry, ...] | None = None, **slots: Any
    ) -> tuple[tuple[StackEntry, ...], str]:
        # Comfyroll puts the incoming stack first, then its own switched-on slots
        out = [e for e in lora_stack or () if e[0] != NONE]
        for i in range(1, 4):
            name = slots[f"lora_name_{i}"]
            if name != NONE and slots[f"switch_{i}"] == "On":
                out.append((name, slots[f"model_weight_{i}"], slots[f"clip_weight_{i}"]))
        return tuple(out), CR_HELP + "#cr-lora-stack"


CR_HELP = "https://github.com/Suzie1/ComfyUI_Comfyroll_CustomNodes/wiki/LoRA-Nodes"


class CRApplyLoRAStack(Node):
    """Apply every LoRA of a LORA_STACK to the model and CLIP, in order (Comfyroll's CR Apply LoRA Stack)."""

    NODE_ID = "CR Apply LoRA Stack"
    DISPLAY_NAME = "💊 CR Apply LoRA Stack"
    CATEGORY = CR_CATEGORY
    INPUTS = (
        Socket("model", socket_type=MODEL),
        Socket("clip", socket_type=CLIP),
        Socket("lora_stack", socket_type=LORA_STACK),
    )
    OUTPUTS = (Output(MODEL, name="MODEL"), Output(CLIP, name="CLIP"), Output(STRING, name="show_help"))

    def run(
        self, ctx: RunContext, model: ModelHandle, clip: ClipHandle, lora_stack: tuple[StackEntry, ...]
    ) -> tuple[ModelHandle, ClipHandle, str]:
        new_model, new_clip = _applied(ctx, model, clip, tuple(lora_stack or ()))
        return new_model, new_clip, CR_HELP + "#cr-apply-lora-stack"


NODES: tuple[type[Node], ...] = (PowerLoraLoader, LoraLoaderStack, LoRAStacker, CRLoRAStack, CRApplyLoRAStack)
