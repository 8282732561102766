"""Declarative file inputs: the engine lists, fingerprints and checks FileChoice and ImageUpload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine_stubs import NUMBER, Show

from nodegraph.env import Environment
from nodegraph.executor import Executor
from nodegraph.folders import Folders
from nodegraph.node import FileChoice, ImageUpload, Node, Output, RunContext
from nodegraph.registry import Registry
from nodegraph.validate import validate_prompt


class PickModel(Node):
    """Read a model file's size (a loader in miniature)."""

    INPUTS = (FileChoice("ckpt", folder="checkpoints", builtin=("none",)),)
    OUTPUTS = (Output(NUMBER),)

    def run(self, ctx: RunContext, ckpt: str) -> tuple[int]:
        return (0 if ckpt == "none" else ctx.env.folders.resolve("checkpoints", ckpt).stat().st_size,)


class PickImage(Node):
    """Read an input image's size."""

    INPUTS = (ImageUpload("image"),)
    OUTPUTS = (Output(NUMBER),)

    def run(self, ctx: RunContext, image: str) -> tuple[int]:
        return (len((ctx.env.folders.input_dir / image).read_bytes()),)


def setup(tmp_path: Path) -> Executor:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "a.safetensors").write_bytes(b"one")
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "cat.png").write_bytes(b"png")
    (tmp_path / "input" / "notes.txt").write_bytes(b"text")
    return Executor(Registry([PickModel, PickImage, Show]), Environment(Folders.at(tmp_path)))


def prompt(kind: str, **inputs: Any) -> dict[str, Any]:
    return {
        "1": {"class_type": kind, "inputs": inputs},
        "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}},
    }


def ran(ex: Executor, p: dict[str, Any]) -> list[str]:
    checked = validate_prompt(p, ex.registry, ex.env)
    assert checked.ok and checked.graph is not None, checked.node_errors
    return ex.execute(checked.graph, "p", lambda event: None).executed


def test_object_info_is_a_combos(tmp_path: Path) -> None:
    ex = setup(tmp_path)
    assert PickModel.info(ex.env)["input"]["required"]["ckpt"] == [["a.safetensors", "none"], {}]
    assert PickImage.info(ex.env)["input"]["required"]["image"] == [["cat.png"], {"image_upload": True}]


def test_a_changed_model_file_reruns_its_node(tmp_path: Path) -> None:
    ex = setup(tmp_path)
    assert ran(ex, prompt("PickModel", ckpt="a.safetensors")) == ["1", "2"]
    assert ran(ex, prompt("PickModel", ckpt="a.safetensors")) == []
    path = tmp_path / "models" / "checkpoints" / "a.safetensors"
    path.write_bytes(b"three")
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    assert ran(ex, prompt("PickModel", ckpt="a.safetensors")) == ["1", "2"]
    assert ran(ex, prompt("PickModel", ckpt="none")) == ["1", "2"]


def test_an_unlisted_model_name_fails_validation(tmp_path: Path) -> None:
    ex = setup(tmp_path)
    checked = validate_prompt(prompt("PickModel", ckpt="b.safetensors"), ex.registry, ex.env)
    (err,) = checked.node_errors["1"]["errors"]
    assert not checked.ok and err["type"] == "value_not_in_list"


def test_an_image_is_fingerprinted_by_its_contents(tmp_path: Path) -> None:
    ex = setup(tmp_path)
    assert ran(ex, prompt("PickImage", image="cat.png")) == ["1", "2"]
    (tmp_path / "input" / "cat.png").write_bytes(b"other png")
    assert ran(ex, prompt("PickImage", image="cat.png")) == ["1", "2"]
    assert ran(ex, prompt("PickImage", image="cat.png")) == []


def test_any_existing_input_file_is_accepted_and_a_missing_one_named(tmp_path: Path) -> None:
    ex = setup(tmp_path)
    assert ran(ex, prompt("PickImage", image="notes.txt")) == ["1", "2"]  # not listed, but exists
    checked = validate_prompt(prompt("PickImage", image="dog.png"), ex.registry, ex.env)
    (err,) = checked.node_errors["1"]["errors"]
    assert err["type"] == "custom_validation_failed"
    assert err["details"] == "image - Invalid image file: dog.png"
