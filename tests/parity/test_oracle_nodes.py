"""Parity: the oracle's node-family workflows (workflows-nodes/) through the real engine.

ControlNet, custom sampling and model merging workflows, run on the oracle's generated files
(mini_sd15, mini_sd15_seed1, mini_controlnet) and held to the same gates as the core workflows.
These refs were made on another CPU than refs/ (README-nodes "Environment"); the gates hold.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ORACLE
from tests.parity.test_oracle_workflows import (
    IMAGE_MAX_ABS,
    LATENT_PSNR_MIN,
    LATENT_REL_MAX,
    PNG_MAX_LEVELS,
    _compare_refs,
    run_workflow,
)

NODE_WORKFLOWS = ["cn_apply", "cs_sampler_custom_advanced", "merge_simple", "nodes_baseline"]


@pytest.fixture(scope="module")
def nodes_engine(
    tmp_path_factory: pytest.TempPathFactory,
    mini_checkpoint: Path,
    mini_checkpoint_seed1: Path,
    mini_controlnet: Path,
    parity_engine_for: Any,
) -> Any:
    base = tmp_path_factory.mktemp("parity_nodes")
    for folder, files in (
        ("checkpoints", (mini_checkpoint, mini_checkpoint_seed1)),
        ("controlnet", (mini_controlnet,)),
    ):
        (base / "models" / folder).mkdir(parents=True)
        for f in files:
            (base / "models" / folder / f.name).symlink_to(f)
    (base / "input").mkdir()
    shutil.copy(ORACLE / "workflows-nodes" / "hint_64.png", base / "input" / "hint_64.png")
    return parity_engine_for(base)


def test_the_oracle_node_workflows_are_known() -> None:
    shipped = {p.stem for p in (ORACLE / "workflows-nodes").glob("*.json")}
    assert shipped == set(NODE_WORKFLOWS)


@pytest.mark.parametrize("workflow", NODE_WORKFLOWS)
def test_node_workflow_matches_comfyui(
    nodes_engine: Any, captured: dict[str, np.ndarray], workflow: str, tmp_path: Path
) -> None:
    run_workflow(nodes_engine, workflow, tmp_path / workflow, captured, folder="workflows-nodes")
    result = _compare_refs().compare_dir(str(ORACLE / "refs-nodes" / workflow), str(tmp_path / workflow))
    print(workflow, {k: round(v, 9) if isinstance(v, float) else v for k, v in result.items()})
    assert result["latent_psnr"] >= LATENT_PSNR_MIN, result
    assert result["latent_max_rel"] <= LATENT_REL_MAX, result
    assert result["image_max_abs"] <= IMAGE_MAX_ABS, result
    assert result["png_max_abs_levels"] <= PNG_MAX_LEVELS, result
