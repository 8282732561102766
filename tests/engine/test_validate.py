"""validate_prompt: each ComfyUI error type, its node_errors shape, and partially valid prompts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from engine_stubs import NUMBER, chain_prompt, environment, registry

from nodegraph.env import Environment
from nodegraph.node import Int, Node, Output, RunContext
from nodegraph.validate import Validation, validate_prompt


def check(prompt: Any, tmp_path: Path, targets: list[str] | None = None) -> Validation:
    return validate_prompt(prompt, registry(), environment(tmp_path), targets)


def only_error(result: Validation, node_id: str) -> dict[str, Any]:
    errors = result.node_errors[node_id]["errors"]
    assert len(errors) == 1, errors
    return errors[0]


def test_valid_prompt_lists_its_outputs(tmp_path: Path) -> None:
    result = check(chain_prompt(), tmp_path)
    assert result.ok and result.error is None and result.node_errors == {}
    assert sorted(result.outputs) == ["3", "5"]


def test_constants_are_coerced_in_a_copy(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["1"]["inputs"]["value"] = "7"
    prompt["2"]["inputs"]["factor"] = 3
    result = check(prompt, tmp_path)
    assert result.prompt["1"]["inputs"]["value"] == 7
    assert isinstance(result.prompt["2"]["inputs"]["factor"], float)
    assert prompt["1"]["inputs"]["value"] == "7"  # the caller's prompt is untouched


def test_missing_class_type(tmp_path: Path) -> None:
    prompt = chain_prompt()
    del prompt["2"]["class_type"]
    result = check(prompt, tmp_path)
    assert not result.ok and result.error is not None
    assert result.error["type"] == "invalid_prompt" and result.error["details"] == "Node ID '#2'"


def test_unknown_class_type(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["2"]["class_type"] = "Nope"
    result = check(prompt, tmp_path)
    assert result.error is not None and result.error["type"] == "invalid_prompt"
    assert "Nope does not exist" in result.error["message"] and "#2" in result.error["details"]


def test_every_unknown_class_type_is_named_at_once(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["1"]["class_type"] = "CR Seed"
    prompt["2"]["class_type"] = "Nope"
    result = check(prompt, tmp_path)
    assert result.error is not None and result.error["type"] == "invalid_prompt"
    assert result.error["message"] == "Cannot execute because nodes CR Seed, Nope do not exist."
    details = result.error["details"]
    assert "CR Seed at Node ID '#1'" in details and "Nope at Node ID '#2'" in details
    assert "(from the custom node pack ComfyUI_Comfyroll_CustomNodes)" in details


def test_no_output_node(tmp_path: Path) -> None:
    prompt = {"1": {"class_type": "Source", "inputs": {"value": 1, "mode": "a"}}}
    result = check(prompt, tmp_path)
    assert result.error is not None and result.error["type"] == "prompt_no_outputs"


def test_missing_required_input(tmp_path: Path) -> None:
    prompt = chain_prompt()
    del prompt["2"]["inputs"]["factor"]
    result = check(prompt, tmp_path)
    err = only_error(result, "2")
    assert err["type"] == "required_input_missing" and err["details"] == "factor"
    assert err["extra_info"]["input_name"] == "factor"


def test_missing_optional_input_is_fine(tmp_path: Path) -> None:
    prompt = chain_prompt()
    del prompt["4"]["inputs"]["b"]
    assert check(prompt, tmp_path).node_errors == {}


def test_link_to_missing_node(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["3"]["inputs"]["x"] = ["99", 0]
    err = only_error(check(prompt, tmp_path), "3")
    assert err["type"] == "exception_during_inner_validation" and "'99' does not exist" in err["details"]


def test_link_with_integer_node_id(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["3"]["inputs"]["x"] = [2, 0]
    err = only_error(check(prompt, tmp_path), "3")
    assert err["type"] == "bad_linked_input" and 'string "2"' in err["details"]


def test_link_of_wrong_length(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["3"]["inputs"]["x"] = ["2", 0, 1]
    err = only_error(check(prompt, tmp_path), "3")
    assert err["type"] == "bad_linked_input" and err["extra_info"]["received_value"] == ["2", 0, 1]


def test_link_to_missing_output_slot(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["3"]["inputs"]["x"] = ["2", 4]
    err = only_error(check(prompt, tmp_path), "3")
    assert err["type"] == "bad_linked_input" and "no output 4" in err["details"]


def test_type_mismatch(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["9"] = {"class_type": "Word", "inputs": {"text": "x"}}
    prompt["3"]["inputs"]["x"] = ["9", 0]
    err = only_error(check(prompt, tmp_path), "3")
    assert err["type"] == "return_type_mismatch"
    assert err["details"] == "x, received_type(WORD) mismatch input_type(NUMBER)"
    assert err["extra_info"]["linked_node"] == ["9", 0]


@pytest.mark.parametrize(
    ("value", "kind"),
    [(101, "value_bigger_than_max"), (-1, "value_smaller_than_min"), ("abc", "invalid_input_type")],
)
def test_int_out_of_range_or_wrong_type(tmp_path: Path, value: Any, kind: str) -> None:
    prompt = chain_prompt()
    prompt["1"]["inputs"]["value"] = value
    err = only_error(check(prompt, tmp_path), "1")
    assert err["type"] == kind and err["extra_info"]["input_name"] == "value"
    assert err["extra_info"]["received_value"] == value


@pytest.mark.parametrize("value", [10**400, "1e999x", float("nan")])
def test_a_float_input_refuses_what_is_no_float_as_an_input_error(tmp_path: Path, value: Any) -> None:
    """An integer too large for a float (JSON allows it) fails its conversion like any other value
    (ComfyUI's invalid_input_type), not as an exception_during_validation."""
    prompt = chain_prompt()
    prompt["2"]["inputs"]["factor"] = value
    err = only_error(check(prompt, tmp_path), "2")
    assert err["type"] == "invalid_input_type" and err["extra_info"]["input_name"] == "factor"


def test_value_not_in_list(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["1"]["inputs"]["mode"] = "c"
    err = only_error(check(prompt, tmp_path), "1")
    assert err["type"] == "value_not_in_list" and err["details"] == "mode: 'c' not in ['a', 'b']"


def test_constant_for_a_socket_input(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["3"]["inputs"]["x"] = 5
    err = only_error(check(prompt, tmp_path), "3")
    assert err["type"] == "invalid_input_type" and "takes a link" in err["details"]


def test_custom_check_skips_bounds_and_reports_its_message(tmp_path: Path) -> None:
    prompt = {
        "1": {"class_type": "Pick", "inputs": {"name": "one", "n": 9}},  # above max 5: check_inputs decides
        "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}},
    }
    assert check(prompt, tmp_path).ok
    prompt["1"]["inputs"]["n"] = 60
    err = only_error(check(prompt, tmp_path), "1")
    assert err["type"] == "custom_validation_failed" and "n must be below 50" in err["details"]


def test_computed_combo_choices(tmp_path: Path) -> None:
    prompt = {
        "1": {"class_type": "Pick", "inputs": {"name": "three", "n": 1}},
        "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}},
    }
    assert only_error(check(prompt, tmp_path), "1")["type"] == "value_not_in_list"


def test_wrapped_list_value_is_unwrapped(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["9"] = {"class_type": "Word", "inputs": {"text": {"__value__": "wrapped"}}}
    prompt["10"] = {"class_type": "Show", "inputs": {"x": ["1", 0]}}
    result = check(prompt, tmp_path)
    assert result.ok  # Word is not reachable from an output, so it is not validated ...
    prompt["3"]["inputs"]["x"] = ["11", 0]
    prompt["11"] = {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": {"__value__": 2}}}
    result = check(prompt, tmp_path)
    assert result.prompt["11"]["inputs"]["factor"] == 2.0  # ... and reachable ones are unwrapped


def test_cycle_is_reported_on_its_nodes(tmp_path: Path) -> None:
    prompt = {
        "1": {"class_type": "Add", "inputs": {"a": ["2", 0]}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
    }
    result = check(prompt, tmp_path)
    assert not result.ok and result.error is not None
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert set(result.node_errors) == {"1", "2"}
    assert result.node_errors["1"]["errors"][0]["type"] == "dependency_cycle"


def test_valid_branch_runs_when_another_is_invalid(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["4"]["inputs"]["b"] = ["2", 7]
    result = check(prompt, tmp_path)
    assert result.ok and result.outputs == ["3"]
    assert result.node_errors["4"]["dependent_outputs"] == ["5"]
    assert result.node_errors["4"]["class_type"] == "Add"


def test_upstream_error_is_listed_once_with_every_dependent_output(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["1"]["inputs"]["value"] = 1000
    result = check(prompt, tmp_path)
    assert not result.ok and result.error is not None
    assert set(result.node_errors) == {"1"}  # downstream nodes fail silently, as in ComfyUI
    assert sorted(result.node_errors["1"]["dependent_outputs"]) == ["3", "5"]
    assert "Value 1000 bigger than max of 100: value" in result.error["details"]


def test_partial_targets(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["4"]["inputs"]["b"] = ["2", 7]
    assert check(prompt, tmp_path, ["3"]).node_errors == {}
    result = check(prompt, tmp_path, ["5"])
    assert not result.ok
    assert check(copy.deepcopy(prompt), tmp_path, ["1"]).error["type"] == "prompt_no_outputs"  # type: ignore[index]


def test_unreachable_nodes_are_not_validated(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["9"] = {"class_type": "Source", "inputs": {"value": "bad"}}
    assert check(prompt, tmp_path).node_errors == {}


def test_a_node_whose_check_raises_fails_alone(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["9"] = {"class_type": "Broken", "inputs": {"name": "x"}}
    prompt["10"] = {"class_type": "Show", "inputs": {"x": ["9", 0]}}
    result = check(prompt, tmp_path)
    assert result.ok and sorted(result.outputs) == ["3", "5"]
    err = only_error(result, "9")
    assert err["type"] == "exception_during_validation" and "models folder unreadable" in err["details"]
    assert err["extra_info"]["exception_type"] == "OSError"


class CheckRaises(Node):
    """A node whose own check_inputs raises."""

    INPUTS = (Int("n", 1),)
    OUTPUTS = (Output(NUMBER),)

    @classmethod
    def check_inputs(cls, env: Environment, n: int | None = None, **_: Any) -> str | None:
        raise KeyError("no table for n")

    def run(self, ctx: RunContext, n: int) -> tuple[int]:
        return (n,)


def test_a_node_whose_check_inputs_raises_fails_alone(tmp_path: Path) -> None:
    stubs = registry()
    stubs.add(CheckRaises)
    prompt = chain_prompt()
    prompt["9"] = {"class_type": "CheckRaises", "inputs": {"n": 2}}
    prompt["10"] = {"class_type": "Show", "inputs": {"x": ["9", 0]}}
    result = validate_prompt(prompt, stubs, environment(tmp_path))
    assert result.ok and sorted(result.outputs) == ["3", "5"]
    err = only_error(result, "9")
    assert err["type"] == "exception_during_validation" and err["details"] == "KeyError: 'no table for n'"
    assert err["extra_info"]["exception_type"] == "KeyError" and err["extra_info"]["traceback"]
