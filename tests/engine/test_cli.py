"""The nodegraph command, on stub nodes (the engine is built with them instead of the SD nodes)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from engine_stubs import STUBS, Source

from nodegraph import cli
from nodegraph import engine as engine_module


@pytest.fixture(autouse=True)
def stub_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(settings: engine_module.Settings, nodes: Any = None, **_: Any) -> engine_module.Engine:
        return engine_module.build_engine(settings, STUBS)

    package = SimpleNamespace(all_nodes=lambda: STUBS, register_services=None, warm_up=None)
    monkeypatch.setattr(cli, "build_engine", build)
    monkeypatch.setattr(cli, "node_package", lambda: package)


def workflow(tmp_path: Path, name: str = "wf.json", **changes: Any) -> Path:
    prompt: dict[str, Any] = {
        "1": {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}},
        "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0}},
        "3": {"class_type": "SaveText", "inputs": {"x": ["2", 0], "filename_prefix": "n"}},
    }
    for key, value in changes.items():
        node, _, name_ = key.partition("__")
        prompt[node]["inputs"][name_] = value
    path = tmp_path / name
    path.write_text(json.dumps(prompt))
    return path


def base(tmp_path: Path) -> list[str]:
    return ["--base-directory", str(tmp_path / "base")]


def test_run_prints_the_files_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(workflow(tmp_path)), *base(tmp_path)]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written.parent == tmp_path / "base" / "output" and written.read_text() == "6.0"


def test_set_overrides_a_widget_typed_by_its_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", str(workflow(tmp_path)), "--set", "1.value=5", "--set", "2.factor=0.5", *base(tmp_path)]
    assert cli.main(args) == 0
    assert Path(capsys.readouterr().out.strip()).read_text() == "2.5"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("1.value=x", "Failed to convert an input value to a INT value"),
        ("1.value=500", "bigger than max of 100"),
        ("9.value=1", "no node '9'"),
        ("1.nope=1", "has no input 'nope' (its inputs: value, mode)"),
        ("2.x=1", "is a NUMBER link"),
        ("value=1", "write NODE_ID.INPUT=VALUE"),
    ],
)
def test_bad_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    assert cli.main(["run", str(workflow(tmp_path)), "--set", override, *base(tmp_path)]) == 1
    assert message in capsys.readouterr().err


def test_several_workflows_share_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = workflow(tmp_path, "a.json")
    second = workflow(tmp_path, "b.json", **{"2__factor": 3.0})
    assert cli.main(["run", str(first), str(second), *base(tmp_path)]) == 0
    assert Source.RUNS[0] == 1  # the second file's Source was cached
    assert len(capsys.readouterr().out.split()) == 2


def test_in_a_multi_file_run_every_error_and_warning_names_its_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = workflow(tmp_path, "good.json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"nodes": [{"id": 1, "type": "Seed (rgthree)", "mode": 0}], "links": []}))
    no_node_5 = workflow(tmp_path, "other.json")
    failing = tmp_path / "fail.json"
    failing.write_text(
        json.dumps(
            {
                "1": {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}},
                "2": {"class_type": "Fail", "inputs": {"x": ["1", 0], "fail": True}},
                "3": {"class_type": "SaveText", "inputs": {"x": ["2", 0], "filename_prefix": "n"}},
            }
        )
    )
    warned = tmp_path / "warn.json"
    warned.write_text(
        json.dumps(
            {
                "1": {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}},
                "2": {"class_type": "Warn", "inputs": {"x": ["1", 0]}},
                "3": {"class_type": "SaveText", "inputs": {"x": ["2", 0], "filename_prefix": "w"}},
            }
        )
    )
    files = [str(p) for p in (good, unknown, failing, warned)]
    assert cli.main(["run", *files, *base(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {unknown}: the workflow needs 1 node type(s)" in err and "rgthree-comfy" in err
    assert f"error: {failing}: node 2 (Fail) failed" in err
    assert "warning: warn.json: node 2: careful" in err
    assert "2 of 4 workflows failed" in err
    assert cli.main(["run", str(good), str(no_node_5), "--set", "5.value=1", *base(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {good}: --set '5.value=1'" in err and f"error: {no_node_5}: --set" in err


def test_run_rejects_an_invalid_workflow_listing_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = workflow(tmp_path, **{"1__value": 1000, "2__factor": "abc"})
    assert cli.main(["run", str(path), *base(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "node 1 (Source), input 'value': Value 1000 bigger than max of 100" in err
    assert "node 2 (Scale), input 'factor': Failed to convert an input value to a FLOAT value" in err
    assert not (tmp_path / "base" / "output").exists()


def test_a_failing_node_is_one_paragraph_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = {
        "1": {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}},
        "2": {"class_type": "Fail", "inputs": {"x": ["1", 0], "fail": True}},
        "3": {"class_type": "SaveText", "inputs": {"x": ["2", 0], "filename_prefix": "n"}},
    }
    path = tmp_path / "fail.json"
    path.write_text(json.dumps(prompt))
    assert cli.main(["run", str(path), *base(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "node 2 (Fail) failed: ValueError: asked to fail" in err and "Traceback" not in err
    assert cli.main(["run", str(path), "--verbose", *base(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_validate_reports_each_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = workflow(tmp_path, "good.json")
    bad = workflow(tmp_path, "bad.json", **{"3__x": ["7", 0]})
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert cli.main(["validate", str(good), str(bad), str(broken), *base(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "good.json: ok (api format, 1 output node(s))" in out
    assert (
        "node 3 (SaveText), input 'x': Exception when validating inner node: "
        "x: linked node '7' does not exist" in out
    )
    assert "broken.json: " in out and "not valid JSON" in out
    assert cli.main(["validate", str(good), *base(tmp_path)]) == 0


def test_missing_workflow_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(tmp_path / "none.json"), *base(tmp_path)]) == 1
    assert "cannot read workflow file" in capsys.readouterr().err


def test_nodes_lists_and_prints_object_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nodes", *base(tmp_path)]) == 0
    assert "Source" in capsys.readouterr().out
    assert cli.main(["nodes", "--json", *base(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["Source"]["input"]["required"]["value"][1]["control_after_generate"] is True


def test_bad_extra_model_paths_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "extra.yaml"
    bad.write_text("a: [unclosed")
    assert (
        cli.main(
            ["validate", str(workflow(tmp_path)), "--extra-model-paths-config", str(bad), *base(tmp_path)]
        )
        == 1
    )
    assert "cannot read extra model paths file" in capsys.readouterr().err


def test_settings_from_flags(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--port",
            "9000",
            "--listen",
            "0.0.0.0",
            "--output-directory",
            str(tmp_path),
            "--disable-metadata",
            "--max-upload-size",
            "5",
        ]
    )
    settings = cli.settings_from(args)
    assert settings.max_upload_size_mb == 5.0 and settings.front_end_root is None
    assert (settings.port, settings.listen, settings.output_directory) == (9000, "0.0.0.0", tmp_path)
    assert settings.disable_metadata and settings.base_directory == Path.cwd()


def test_build_engine_loads_the_default_extra_model_paths(tmp_path: Path) -> None:
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra_model_paths.yaml").write_text("mine:\n  base_path: extra\n  loras: loras\n")
    engine = engine_module.build_engine(engine_module.Settings(base_directory=tmp_path), STUBS)
    assert tmp_path / "extra" / "loras" in engine.env.folders.paths("loras")
    assert engine.registry.get("Source") is Source and engine.env.services == {}  # no node-layer services


def test_a_cached_rerun_writes_and_lists_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workflow(tmp_path)
    assert cli.main(["run", str(path), str(path), *base(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 1  # only the first run wrote a file
    assert "nothing new written" in captured.err
