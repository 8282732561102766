"""Fixtures shared by every test directory: the oracle's generated model files, cached between runs."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# ComfyUI's reference outputs, workflows and the mini-model generators: a copy of ../shared/oracle
# kept in the repository (see its PROVENANCE; `scripts/refresh_oracle.sh` refreshes it), so a clone
# runs every test with nothing beside it. Tests refer to the oracle through this constant only.
ORACLE = ROOT / "tests" / "oracle"
CACHE = ROOT / "tests" / ".cache"

# The oracle's measured noise floor (tests/oracle/README.md, "ComfyUI's noise floor"): ComfyUI rerun
# with another attention kernel, thread count or torch build moves its outputs by up to 8.2e-6 of
# their peak magnitude. Two float32 computations of one result along different kernel paths (a batch
# against single items, a tile against the whole, one CPU's SIMD width against another's) are held
# to the oracle's suggested gate, 3x that floor relative to the peak: never to one machine's rounding.
FLOAT32_FLOOR = 3e-5


def assert_within_floor(got: Any, want: Any, floor: float = FLOAT32_FLOOR) -> None:
    """max |got - want| <= floor x max |want| (tensors or arrays of one shape)."""
    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    peak, err = float(np.abs(b).max()), float(np.abs(a - b).max())
    assert err <= floor * peak, f"max |diff| {err:.3g} exceeds {floor:g} x peak {peak:.3g}"


@functools.cache
def oracle_module(name: str, oracle: Path = ORACLE) -> ModuleType:
    """One of the oracle's scripts (`make_mini_sd15`, `make_mini_sdxl`, `compare_refs` ...) imported
    as a module, once per session: its specs, configs, name maps and safetensors writer. It is also
    registered under its own name, as the scripts import each other (`import make_mini_sd15 as base`)."""
    spec = importlib.util.spec_from_file_location(name, oracle / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _generate(script: str, out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(ORACLE / script), str(out), *args], check=True, capture_output=True)


TIERS = {"e2e": pytest.mark.e2e, "parity": pytest.mark.parity}

# `slow`: what `make test-fast` leaves out (`make test` runs everything). A test is slow when it uses
# one of these fixtures (the mini SDXL checkpoint: 2.3 GB read, 4.6 GB of fp32 modules) or is listed
# below (node ids or files, from `--durations` on the 2-core machine: seconds each, not milliseconds).
# Whole files marked `pytestmark = pytest.mark.slow` (Ray workers, SIGTERM, A1111/v2 API on the mini
# checkpoint, SDXL variants) are slow as well.
SLOW_FIXTURES = frozenset({"mini_sdxl_checkpoint", "mini_sdxl_loras", "sdxl_store", "sdxl_env"})
SLOW = (
    "tests/nodes/test_sampling_nodes.py::test_every_sampler_runs_through_the_node[dpm_adaptive]",
    "tests/nodes/test_sampling_nodes.py::test_every_sampler_runs_through_the_node[dpmpp_2s_ancestral]",
    "tests/nodes/test_sampling_nodes.py::test_advanced_split_with_leftover_noise_equals_one_run",
    "tests/nodes/test_sampling_nodes.py::test_same_inputs_same_bits_and_seed_matters",
    "tests/nodes/test_hypernetwork.py::test_sampling_with_a_hypernetwork",
    "tests/nodes/test_gligen_nodes.py::test_sampling_with_a_text_box_differs_from_without",
    "tests/nodes/test_gligen_nodes.py::test_text_boxes_append_comfyuis_position_params",
    "tests/sd/test_gligen.py::test_boxes_change_the_image_and_leave_no_trace",
    "tests/sd/test_gligen.py::test_boxed_entries_run_alone_and_the_negative_gets_the_boxes",
    "tests/sd/test_gligen.py::test_closed_gates_change_nothing",
    "tests/nodes/test_component_loaders.py",  # part files cut from the mini checkpoint, several UNet loads
    "tests/nodes/test_example_workflows.py",
    "tests/nodes/test_free.py",
    "tests/nodes/test_inpaint_model.py",
    "tests/nodes/test_lora_cache_keys.py",
    "tests/nodes/test_lora_checkpoint_save.py",
    "tests/nodes/test_lora_stack_workflows.py",
    "tests/nodes/test_merge_blocks.py",
    "tests/nodes/test_model_patch_workflow.py",
    "tests/nodes/test_t2i_adapter_nodes.py",  # a workflow per layout on the mini checkpoint's CLIP
    "tests/nodes/test_upscale_model.py",
    "tests/nodes/test_sdxl_refiner.py",
    "tests/nodes/test_vae_tiled.py",
    "tests/sd/test_demo.py::test_demo_sdxl_writes_two_sdxl_loras_that_fit_the_sdxl_demo_model",
    "tests/sd/test_patcher_branches.py::test_te_strength_changes_reuse_the_kept_delta_and_equal_a_fresh_application",
    "tests/server/test_real_workflow.py",
    "tests/server/test_route_fields.py::test_every_field_of_every_body_made_hostile",  # 4,286 requests, 18 s
    "tests/server/test_serve_announce.py::test_the_serving_line_comes_when_the_socket_listens",
    "tests/train/test_train_guide.py",
    "tests/train/test_train_locon.py",
    "tests/train/test_train_lora.py",
    "tests/train/test_train_node.py",
)


def _is_slow(item: pytest.Item) -> bool:
    if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    node_id = item.nodeid
    return any(node_id == entry or node_id.startswith(entry + "::") for entry in SLOW)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the browser and parity tiers by folder and the slow tests from `SLOW_FIXTURES` and `SLOW`,
    so `-m "not e2e and not parity and not slow"` (`make test-fast`) leaves them out."""
    tests = ROOT / "tests"
    for item in items:
        parts = item.path.relative_to(tests).parts if item.path.is_relative_to(tests) else ()
        if parts and parts[0] in TIERS:
            item.add_marker(TIERS[parts[0]])
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def no_process_caches_between_tests() -> Iterator[None]:
    """The node layer's process-wide LoRA caches (read files, decoded weights: up to 3 GB) are
    emptied after every test, so no test sees another's entries and the session's memory stays flat.
    Only when a test loaded them: engine tests never import torch."""
    yield
    loader = sys.modules.get("nodes.sd.lora.loader")
    if loader is not None:
        loader.clear_caches()


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    if not ORACLE.is_dir():
        pytest.fail(f"the oracle is missing: expected {ORACLE} (run scripts/refresh_oracle.sh)")
    return ORACLE


@pytest.fixture(scope="session")
def mini_checkpoint(oracle_dir: Path) -> Path:
    """The oracle's random SD1.5-shaped checkpoint (original LDM single file, fp16), made by its script."""
    path = CACHE / "mini_sd15.safetensors"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # an interrupted run must not leave a truncated cache
        _generate("make_mini_sd15.py", partial)
        partial.rename(path)
    return path


@pytest.fixture(scope="session")
def mini_loras(oracle_dir: Path) -> Path:
    """A folder with the oracle's kohya LoRAs mini_lora_a/b.safetensors."""
    folder = CACHE / "loras"
    if not (folder / "mini_lora_b.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        _generate("make_mini_lora.py", folder)
    return folder


@pytest.fixture(scope="session")
def mini_sdxl_checkpoint(oracle_dir: Path) -> Path:
    """The oracle's random SDXL-family checkpoint (SGM single file, fp16, 2.3 GB), made by its script."""
    path = CACHE / "mini_sdxl.safetensors"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        _generate("make_mini_sdxl.py", partial)
        partial.rename(path)
    return path


@pytest.fixture(scope="session")
def mini_sdxl_loras(oracle_dir: Path) -> Path:
    """A folder with the oracle's kohya SDXL LoRA mini_sdxl_lora.safetensors."""
    folder = CACHE / "sdxl_loras"
    if not (folder / "mini_sdxl_lora.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "partial"
        partial.mkdir(exist_ok=True)
        _generate("make_mini_sdxl_lora.py", partial)
        (partial / "mini_sdxl_lora.safetensors").rename(folder / "mini_sdxl_lora.safetensors")
    return folder


@pytest.fixture(scope="session")
def sdxl_store(mini_sdxl_checkpoint: Path) -> Any:
    """One model store for the whole session with the mini SDXL checkpoint loaded once (about 4.6 GB
    as fp32 modules). Engines that run SDXL share it: `engine.env.services[ModelStore] = sdxl_store`."""
    from nodes.sd.model_store import ModelStore

    store = ModelStore(capacity=3)
    store.checkpoint(mini_sdxl_checkpoint)
    return store


def _cached(name: str, script: str, *args: str) -> Path:
    """A generated oracle model file in the shared cache, made atomically when missing."""
    path = CACHE / name
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        _generate(script, partial, *args)
        partial.rename(path)
    return path


@pytest.fixture(scope="session")
def mini_checkpoint_seed1(oracle_dir: Path) -> Path:
    """The oracle's second mini SD1.5 checkpoint (`--seed 1`), model2 of its merge workflows."""
    return _cached("mini_sd15_seed1.safetensors", "make_mini_sd15.py", "--seed", "1")


@pytest.fixture(scope="session")
def mini_controlnet(oracle_dir: Path) -> Path:
    """The oracle's SD1.5 ControlNet shaped for the mini UNet (original `control_*` layout)."""
    return _cached("mini_controlnet.safetensors", "make_mini_controlnet.py")


@pytest.fixture(scope="session")
def mini_gligen(mini_checkpoint: Path) -> Path:
    """A random-weight GLIGEN file for the mini SD1.5 UNet, in the public files' layout
    (`position_net.*`, `input_blocks.1.1.transformer_blocks.0.fuser.*` ...; tests/gligen_files.py)."""
    from tests.gligen_files import GENERATOR_VERSION, write_mini_gligen

    path = CACHE / f"mini_gligen_v{GENERATOR_VERSION}.safetensors"
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        write_mini_gligen(partial, mini_checkpoint)
        partial.rename(path)
    return path


@pytest.fixture(scope="session")
def mini_t2i_adapters() -> Path:
    """A folder of small random-weight T2I-Adapter files, one per layout (SD1 full with 1x1 or conv
    downsampling, light, diffusers; SDXL), named in `tests/t2i_adapter_files.py`'s FILES."""
    from tests.t2i_adapter_files import FILES, GENERATOR_VERSION, write

    folder = CACHE / f"t2i_adapters_v{GENERATOR_VERSION}"
    for name, (specs, seed, diffusers) in FILES.items():
        path = folder / name
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            write(partial, specs, seed, diffusers)
            partial.rename(path)
    return folder


@pytest.fixture(scope="session")
def sd15_shaped_unet() -> Path:
    """A narrow SD1.x UNet alone with SD1.5's block structure (UNETLoader's file), which the SD1 test
    adapters fit (tests/t2i_adapter_files.py)."""
    from tests.t2i_adapter_files import GENERATOR_VERSION, write_sd15_shaped_unet

    path = CACHE / f"sd15_shaped_unet_v{GENERATOR_VERSION}.safetensors"
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        write_sd15_shaped_unet(partial)
        partial.rename(path)
    return path


@pytest.fixture(scope="session")
def mini_hypernetwork(oracle_dir: Path) -> Path:
    """The oracle's A1111-format hypernetwork for the mini UNet (widths 320, 640, 768; relu, [1, 2, 1])."""
    return _cached("mini_hypernetwork.pt", "make_mini_hypernetwork.py")


@pytest.fixture(scope="session")
def sdxl_env(tmp_path_factory: pytest.TempPathFactory, mini_sdxl_checkpoint: Path, sdxl_store: Any) -> Any:
    """An environment with the mini SDXL checkpoint as `models/checkpoints/mini_sdxl.safetensors`
    (and an empty `models/embeddings`), sharing the session's loaded SDXL model store."""
    from nodegraph.env import Environment
    from nodegraph.folders import Folders
    from nodes.sd.model_store import ModelStore

    base = tmp_path_factory.mktemp("sdxl_env")
    for sub in ("models/checkpoints", "models/embeddings", "models/loras", "input", "output", "temp"):
        (base / sub).mkdir(parents=True)
    (base / "models" / "checkpoints" / mini_sdxl_checkpoint.name).symlink_to(mini_sdxl_checkpoint)
    env = Environment(Folders.at(base))
    env.services[ModelStore] = sdxl_store
    return env
