"""Workflows people share, stored unmodified in tests/data/shared_workflows (SOURCES.md says where
each comes from), run end to end on the mini models as a user would run them.

Each file is loaded with `load_workflow` (canvas files are converted as the frontend queues them;
one API prompt; one canvas file carried in a PNG), its model files are put into a models folder
under the names the workflow asks for (symlinks to the mini SD1.5 / SDXL checkpoints, the mini
LoRAs, ControlNet and GLIGEN; a generated image, a generated A1111 embedding), then it is validated and
run by the real executor. The test edits only sizes and step counts, in the loaded prompt, never
in the stored file: pixel sizes divided by 8 (SD1.5) or 16 (SDXL), samplers cut to 2 steps.
Every stored workflow runs (`RUNS`), or needs custom nodes nodegraph does not implement and must be
refused with one message naming each (`MISSING`); no other kind is kept, so no test is skipped or
expected to fail. A shared workflow that needs a core node nodegraph lacks is added with that node.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from nodegraph.cli import main
from nodegraph.engine import Settings, build_engine
from nodegraph.events import Event, NodeWarning
from nodegraph.file_inputs import FileChoice, ImageUpload
from nodegraph.graph import WorkflowError, load_workflow
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.sd.model_store import ModelStore

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[1] / "data" / "shared_workflows"
SD15, SDXL = "sd15", "sdxl"
SHRINK = {SD15: 8, SDXL: 16}  # 512 px -> 64 px on SD1.5, 1024 px -> 64 px on SDXL
STEPS = 2
# The widgets that set pixel sizes, by node type (the types in the stored workflows), with the
# step their values keep: latent and padded image sizes stay multiples of 8.
SIZE_WIDGETS: dict[str, tuple[int, tuple[str, ...]]] = {
    "EmptyLatentImage": (8, ("width", "height")),
    "ConditioningSetArea": (8, ("width", "height", "x", "y")),
    "GLIGENTextBoxApply": (8, ("width", "height", "x", "y")),
    "ImagePadForOutpaint": (8, ("left", "top", "right", "bottom")),
    "SolidMask": (1, ("width", "height")),
    "MaskComposite": (1, ("x", "y")),
    "FeatherMask": (1, ("left", "top", "right", "bottom")),
}


@dataclass(frozen=True)
class Case:
    """A workflow that runs: its model family and, per image output node, (count, width, height)."""

    family: str
    images: dict[str, tuple[int, int, int]]


IMAGE_W, IMAGE_H = 128, 96  # the generated input image
RUNS: dict[str, Case] = {
    "cubiq_basic_workflow.json": Case(SD15, {"9": (1, 64, 64)}),
    "cubiq_multiple_loras.json": Case(SD15, {"9": (1, 64, 64)}),
    "cubiq_conditioning_average.json": Case(SD15, {"9": (1, 64, 64)}),
    "cubiq_embeddings.json": Case(SD15, {"9": (1, 64, 64)}),
    "cubiq_conditioning_area.json": Case(SD15, {"33": (1, 96, 64), "32": (1, 144, 96)}),
    "cubiq_upscale_latent.json": Case(SD15, {"13": (1, 64, 64), "9": (1, 96, 96)}),
    "cubiq_canny.json": Case(SD15, {"17": (1, IMAGE_W, IMAGE_H), "9": (1, 64, 64)}),
    "cubiq_inpaint.json": Case(SD15, {"15": (1, 96, 64), "94": (1, 96, 64), "119": (1, 96, 64)}),
    "cubiq_gligen_box.json": Case(SD15, {"33": (1, 64, 64)}),
    "cubiq_SDXL_base_only.json": Case(SDXL, {"9": (1, 64, 64)}),
    "cubiq_outpaint_seam_fix_SDXL.json": Case(
        SDXL, {"15": (1, 64, 64), "22": (1, 96, 64), "88": (1, 96, 64), "86": (1, 96, 64)}
    ),
    "comfyui_default_graph_sdxl1_0.json": Case(SDXL, {"13": (1, 64, 64)}),
    "hanzoui_sdxlturbo_example.json": Case(SDXL, {"27": (1, 32, 32)}),
}
# Custom nodes nodegraph does not implement: the one error names every one of them.
MISSING: dict[str, list[str]] = {
    "cubiq_depth.json": ["Zoe-DepthMapPreprocessor"],
    "comfyroll_CR_SimpleMultiModelMerge_v01a.json": [
        "CR Apply Model Merge",
        "CR Model Merge Stack",
        "Save Text File",
    ],
}


MODELS: dict[str, dict[str, list[Path]]] = {}  # filled by the engine fixture
STORES: dict[str, ModelStore] = {}


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory,
    mini_checkpoint: Path,
    mini_loras: Path,
    mini_controlnet: Path,
    mini_gligen: Path,
) -> Iterator[Any]:
    """One engine for the module. Every name a workflow gives a model file is a symlink to a mini
    model, so each family's checkpoint loads once: SD1.5 into a store of the module's own, SDXL
    into the session's store (the mini SDXL is often loaded already), asked for only by the first
    SDXL case (`sdxl_family`), so SD1.5 cases run alone stay small."""
    base = tmp_path_factory.mktemp("shared_workflows")
    built = build_engine(Settings(base_directory=base, preview_method="none"), all_nodes())
    STORES.update({SD15: ModelStore(capacity=1)})
    MODELS.update(
        {  # what each models folder's entries link to, per family
            SD15: {
                "checkpoints": [mini_checkpoint],
                "vae": [mini_checkpoint],  # the VAE loader reads a checkpoint's first_stage_model
                "loras": [mini_loras / "mini_lora_a.safetensors", mini_loras / "mini_lora_b.safetensors"],
                "controlnet": [mini_controlnet],
                "gligen": [mini_gligen],
            },
        }
    )
    yield built
    built.executor.reset()  # cached handles would keep the models alive
    STORES.pop(SD15).free(unload_models=True, free_memory=True)
    STORES.clear()


def sdxl_family(request: pytest.FixtureRequest, family: str) -> None:
    """The session's mini SDXL checkpoint and store, fetched when an SDXL case first needs them."""
    if family == SDXL and SDXL not in STORES:
        checkpoint = request.getfixturevalue("mini_sdxl_checkpoint")
        MODELS[SDXL] = {"checkpoints": [checkpoint], "vae": [checkpoint]}
        STORES[SDXL] = request.getfixturevalue("sdxl_store")


def use_family(engine: Any, family: str) -> None:
    """The family's model store; leaving SD1.5 for SDXL lets go of the SD1.5 models first, so the
    process never holds both (the cases run SD1.5 first)."""
    store = STORES[family]
    current = engine.env.services.get(ModelStore)
    if current is store:
        return
    if current is STORES[SD15]:
        engine.executor.reset()
        current.free(unload_models=True, free_memory=True)
    engine.env.services[ModelStore] = store


def provide_files(engine: Any, prompt: dict[str, Any], family: str) -> None:
    """Put every file the prompt names where a user would: models under the workflow's own file
    names (symlinks to the mini models), images in the input folder, embeddings as A1111 files."""
    folders = engine.env.folders
    for node in prompt.values():
        cls = engine.registry.get(node["class_type"])
        for inp in cls.INPUTS:
            value = node["inputs"].get(inp.name)
            if not isinstance(value, str):
                continue
            if isinstance(inp, ImageUpload):
                write_input_image(Path(folders.input_dir) / value)
            elif isinstance(inp, FileChoice) and value != "None":
                targets = MODELS[family][inp.folder]
                link = folders.paths(inp.folder)[0] / value
                if not link.is_symlink():
                    used = sum(1 for _ in link.parent.glob("*")) if link.parent.is_dir() else 0
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(targets[used % len(targets)])  # two LoRAs: a, then b
            for name in re.findall(r"embedding:([\w.\-]+)", value):
                write_embedding(folders.paths("embeddings")[0] / f"{name}.pt", name)


def write_input_image(path: Path) -> None:
    """A noisy picture with a transparent hole (LoadImage's MASK), as PNG or, by its name, JPEG."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_H, IMAGE_W, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[24:72, 32:96, 3] = 0
    image = Image.fromarray(pixels, "RGBA")
    (image if path.suffix.lower() == ".png" else image.convert("RGB")).save(path)


def write_embedding(path: Path, name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(len(name))) * 0.01
    torch.save({"string_to_param": {"*": vectors}, "name": name}, path)


def shrink(prompt: dict[str, Any], family: str) -> None:
    """Smaller images and fewer steps, in the loaded prompt (the stored file stays as shared)."""
    factor = SHRINK[family]
    for node in prompt.values():
        inputs = node["inputs"]
        unit, names = SIZE_WIDGETS.get(node["class_type"], (1, ()))
        for name in names:
            if isinstance(inputs.get(name), int):
                smaller = inputs[name] // factor // unit * unit
                inputs[name] = max(smaller, unit) if name in ("width", "height") else smaller
        steps = inputs.get("steps")
        if isinstance(steps, int) and steps > STEPS:
            inputs["steps"] = STEPS
            for name in ("start_at_step", "end_at_step"):  # KSamplerAdvanced's hand-over point
                if isinstance(inputs.get(name), int) and inputs[name] < 10000:
                    inputs[name] = round(inputs[name] * STEPS / steps)


def run_shared(engine: Any, name: str, case: Case) -> dict[str, Any]:
    use_family(engine, case.family)
    loaded = load_workflow(SHARED / name, engine.registry)
    provide_files(engine, loaded.prompt, case.family)
    shrink(loaded.prompt, case.family)
    checked = validate_prompt(loaded.prompt, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    events: list[Event] = []
    extra = {"extra_pnginfo": {"workflow": loaded.workflow}} if loaded.workflow else {}
    outcome = engine.executor.execute(
        checked.graph, name, events.append, extra_data=extra, outputs=checked.outputs
    )
    assert outcome.status == "success", outcome.error
    warnings = [e.message for e in events if isinstance(e, NodeWarning)]
    assert warnings == [], warnings
    return dict(outcome.outputs)


def check_images(engine: Any, outputs: dict[str, Any], case: Case) -> None:
    assert {k for k, v in outputs.items() if v.get("images")} == set(case.images)
    for node_id, (count, width, height) in case.images.items():
        entries = outputs[node_id]["images"]
        assert len(entries) == count, (node_id, entries)
        for entry in entries:
            root = engine.env.folders.output_dir if entry["type"] == "output" else engine.env.folders.temp_dir
            with Image.open(Path(root) / entry["subfolder"] / entry["filename"]) as image:
                assert image.size == (width, height), (node_id, entry["filename"])
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
                if entry["type"] == "output":  # SaveImage embeds the prompt, as ComfyUI does
                    assert "prompt" in image.info
            assert pixels.std() > 0, f"node {node_id} wrote a constant image"


@pytest.mark.parametrize("name", sorted(RUNS, key=lambda name: (RUNS[name].family, name)))
def test_shared_workflow_runs_unchanged(engine: Any, name: str, request: pytest.FixtureRequest) -> None:
    sdxl_family(request, RUNS[name].family)
    check_images(engine, run_shared(engine, name, RUNS[name]), RUNS[name])


@pytest.mark.parametrize("name", sorted(MISSING))
def test_custom_nodes_are_named_together_in_one_error(engine: Any, name: str) -> None:
    with pytest.raises(WorkflowError) as caught:
        load_workflow(SHARED / name, engine.registry)
    message = str(caught.value)
    assert f"needs {len(MISSING[name])} node type(s) nodegraph does not have" in message
    for missing in MISSING[name]:
        assert f"'{missing}'" in message
    workflow = json.loads((SHARED / name).read_text(encoding="utf-8"))
    known = {node["type"] for node in workflow["nodes"]} - set(MISSING[name])
    assert not [t for t in known if f"'{t}'" in message]  # the nodes nodegraph has are not blamed


def test_a_png_carrying_a_shared_workflow_loads_like_the_file(engine: Any, tmp_path: Path) -> None:
    """The same canvas file dropped as a PNG (its `workflow` text chunk) gives the same prompt."""
    text = (SHARED / "cubiq_basic_workflow.json").read_text(encoding="utf-8")
    info = PngInfo()
    info.add_text("workflow", text)
    png = tmp_path / "shared.png"
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    from_png = load_workflow(png, engine.registry)
    from_json = load_workflow(SHARED / "cubiq_basic_workflow.json", engine.registry)
    assert from_png.format == "png" and from_png.prompt == from_json.prompt


def test_the_cli_runs_a_shared_canvas_file(engine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`nodegraph run FILE --set ...` on the stored file, over the same models folder."""
    name = "cubiq_basic_workflow.json"
    provide_files(engine, load_workflow(SHARED / name, engine.registry).prompt, SD15)
    small = ["--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=2", "--set", "3.seed=7"]
    base = str(engine.settings.base_directory)
    args = ["run", str(SHARED / name), *small, "--base-directory", base, "--preview-method", "none"]
    assert main(args) == 0
    (written,) = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert written.name.startswith("Result_")
    with Image.open(written) as image:
        assert image.size == (64, 64) and json.loads(image.info["workflow"]) == json.loads(
            (SHARED / name).read_text(encoding="utf-8")
        )  # the canvas file travels in the PNG, as ComfyUI's SaveImage writes it


def test_every_stored_workflow_is_tested_and_has_a_source() -> None:
    stored = sorted(p.name for p in SHARED.glob("*.json"))
    assert stored == sorted([*RUNS, *MISSING])
    sources = (SHARED / "SOURCES.md").read_text(encoding="utf-8")
    assert [name for name in stored if f"`{name}`" not in sources] == []
