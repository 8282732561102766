"""Shared parity fixtures: one engine on the oracle's generated model files, with a capture node."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph.engine import Settings, build_engine
from nodegraph.node import Node, Result, RunContext, Socket
from nodegraph.types import CONDITIONING, IMAGE
from nodes import all_nodes
from tests.conftest import ORACLE

CAPTURED: dict[str, np.ndarray] = {}


class ParityCapture(Node):
    """Test only: keep the decoded float image before SaveImage quantises it."""

    CATEGORY = "_for_testing"
    OUTPUT_NODE = True
    INPUTS = (Socket("images", IMAGE),)
    OUTPUTS = ()

    def run(self, ctx: RunContext, images: torch.Tensor) -> Result:
        CAPTURED[ctx.node_id] = images.detach().float().cpu().numpy()
        return Result((), None)


@pytest.fixture(scope="session")
def engine_base(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, mini_loras: Path) -> Path:
    base = tmp_path_factory.mktemp("parity")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "loras").mkdir(parents=True)
    (base / "input").mkdir()
    (base / "models" / "checkpoints" / "mini_sd15.safetensors").symlink_to(mini_checkpoint)
    for lora in mini_loras.glob("*.safetensors"):
        (base / "models" / "loras" / lora.name).symlink_to(lora)
    shutil.copy(ORACLE / "workflows" / "init_64.png", base / "input" / "init_64.png")
    return base


@pytest.fixture(scope="session")
def engine(engine_base: Path) -> Any:
    return build_engine(
        Settings(base_directory=engine_base, preview_method="none"), [*all_nodes(), ParityCapture]
    )


@pytest.fixture(scope="session")
def captured() -> dict[str, np.ndarray]:
    """The float images ParityCapture nodes saw, by node id."""
    return CAPTURED


@pytest.fixture
def make_engine(engine_base: Path) -> Any:
    """Builds further engines on the same files, each with its own cache and loaded checkpoint."""
    return lambda **settings: build_engine(
        Settings(base_directory=engine_base, preview_method="none", **settings), [*all_nodes(), ParityCapture]
    )


@pytest.fixture(scope="session")
def parity_engine_for() -> Any:
    """Builds an engine (with the capture node) on another base directory."""
    return lambda base: build_engine(
        Settings(base_directory=base, preview_method="none"), [*all_nodes(), ParityCapture]
    )


def run_for_latent(engine: Any, prompt: dict[str, Any], name: str) -> np.ndarray:
    """Validate and execute `prompt`; the latent its `save_latent` node wrote."""
    from nodegraph.validate import validate_prompt
    from nodes.sd.latent_ops import load_latent_file

    checked = validate_prompt(prompt, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    outcome = engine.executor.execute(checked.prompt, name, lambda e: None, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    saved = outcome.outputs["save_latent"]["latents"][0]
    return load_latent_file(engine.env.folders.output_dir / saved["subfolder"] / saved["filename"]).numpy()


@pytest.fixture
def latent_of() -> Any:
    """`run_for_latent`, for tests that run several prompts."""
    return run_for_latent


class SdxlCondCapture(Node):
    """Test only: keep a conditioning's tensors (cond, pooled output) and options by node id."""

    CATEGORY = "_for_testing"
    OUTPUT_NODE = True
    INPUTS = (Socket("conditioning", CONDITIONING),)
    OUTPUTS = ()

    def run(self, ctx: RunContext, conditioning: Any) -> Result:
        CONDS[ctx.node_id] = conditioning
        return Result((), None)


CONDS: dict[str, Any] = {}


@pytest.fixture(scope="session")
def sdxl_engine(
    tmp_path_factory: pytest.TempPathFactory,
    mini_sdxl_checkpoint: Path,
    mini_sdxl_loras: Path,
    sdxl_store: Any,
) -> Any:
    """An engine on the mini SDXL checkpoint and LoRA, sharing the session's loaded SDXL model store."""
    from nodes.sd.model_store import ModelStore

    base = tmp_path_factory.mktemp("parity_sdxl")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "loras").mkdir(parents=True)
    (base / "models" / "checkpoints" / mini_sdxl_checkpoint.name).symlink_to(mini_sdxl_checkpoint)
    for lora in mini_sdxl_loras.glob("*.safetensors"):
        (base / "models" / "loras" / lora.name).symlink_to(lora)
    engine = build_engine(
        Settings(base_directory=base, preview_method="none"), [*all_nodes(), ParityCapture, SdxlCondCapture]
    )
    engine.env.services[ModelStore] = sdxl_store
    return engine


@pytest.fixture(scope="session")
def captured_conds() -> dict[str, Any]:
    """The conditionings SdxlCondCapture nodes saw, by node id."""
    return CONDS
