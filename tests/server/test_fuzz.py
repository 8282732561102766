"""Seeded, time-bounded fuzz of POST /prompt, the uploads and /userdata: never a 5xx (runs in `make test`).

Also the memory estimate that refuses a prompt whose images cannot fit (D7).
"""

from __future__ import annotations

import copy
import json
import random
import time
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from nodegraph.memory_budget import OverMemoryBudget, check_node, memory_errors
from nodegraph.registry import Registry
from nodegraph.server import create_app
from tests.server.stubs import txt2img

SEED = 1234
BUDGET_S = 4.0  # inputs keep coming for this long ...
MIN_INPUTS = 60  # ... and at least this many are sent however slow the machine is
VALUES: list[Any] = [
    None, True, -1, 2**63, 2**64 + 1, 10**40, 1e308, "x" * 10_000, "\x00", "\ud800", ["999", 0], ["1", 99],
    ["1", -1], {"a": 1}, [], "", 0.5, "../../etc/passwd", [[[[[]]]]],
]  # fmt: skip


def _value(rng: random.Random) -> Any:
    """A copy of one of VALUES: an inserted dict or list must not be shared, or the prompt could come to
    contain itself (a dict put in as `inputs` and then given itself as an input) and JSON refuse it."""
    return copy.deepcopy(rng.choice(VALUES))


def _mutate(rng: random.Random) -> bytes:
    prompt: dict[str, Any] = copy.deepcopy(txt2img())
    for _ in range(rng.randint(1, 3)):
        node = prompt.get(rng.choice(list(prompt) or ["1"]))
        choice = rng.random()
        if isinstance(node, dict) and choice < 0.6:
            inputs = node.setdefault("inputs", {})
            if isinstance(inputs, dict):
                inputs[rng.choice([*inputs, "extra"])] = _value(rng)
        elif isinstance(node, dict) and choice < 0.8:
            node[rng.choice(["class_type", "inputs", "_meta"])] = _value(rng)
        else:
            prompt[rng.choice(["1", "2", "3", "99", ""])] = _value(rng)
    body: dict[str, Any] = {"prompt": prompt}
    if rng.random() < 0.3:
        body[rng.choice(["number", "front", "prompt_id", "client_id", "extra_data"])] = _value(rng)
    text = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    if rng.random() < 0.2:  # byte-level damage
        cut = rng.randrange(len(text))
        text = text[:cut] + bytes([rng.randrange(256)]) + text[cut + 1 :]
    return text


@pytest.mark.asyncio
async def test_fuzz_prompt_upload_and_userdata(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    rng = random.Random(SEED)
    deadline = time.monotonic() + BUDGET_S
    sent, failures = 0, []
    while sent < MIN_INPUTS or time.monotonic() < deadline:
        kind = rng.random()
        if kind < 0.6:
            resp = await client.post("/prompt", data=_mutate(rng))
        elif kind < 0.8:
            form = FormData()
            name = rng.choice(["a.png", "..", "x" * 300, "s/../a.png", "a.svg", " ", "a\\b.png"])
            form.add_field("image", rng.randbytes(rng.randrange(64)), filename=name)
            form.add_field("subfolder", rng.choice(["", "sub", "../x", "a/" * 50, "x" * 300]))
            form.add_field("overwrite", rng.choice(["true", "false", "1"]))
            resp = await client.post(rng.choice(["/upload/image", "/upload/mask"]), data=form)
        else:
            name = rng.choice(["w.json", "a%2Fb.json", "x" * 300, "..%2F..%2Fx", "d%2F" * 40 + "f", "%00"])
            method = rng.choice(["GET", "POST", "DELETE"])
            resp = await client.request(method, "/userdata/" + name, data=rng.randbytes(rng.randrange(200)))
        sent += 1
        if resp.status >= 500:
            failures.append(f"{resp.method} {resp.url.path[:60]}: {resp.status} {(await resp.text())[:160]}")
        resp.release()
    assert not failures, "\n".join(failures)


def test_a_prompt_whose_images_cannot_fit_is_refused_naming_the_node() -> None:
    from nodes import all_nodes

    registry = Registry(all_nodes())
    huge = {
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 16384, "height": 16384, "batch_size": 64},
        },
        "6": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": ["1", 0], "height": 512}},
    }
    errors = memory_errors(huge, registry, available=4 * 2**30)
    assert list(errors) == ["5"]
    message = errors["5"]["errors"][0]["message"]
    assert "64 x 16384x16384" in message and "192.0 GiB" in message and "4.0 GiB" in message
    assert memory_errors(huge, registry, available=1 << 50) == {}


def test_widths_and_heights_that_are_not_tensor_sizes_never_count() -> None:
    """Size conditioning and areas are numbers: only nodes that output an image, latent or mask count."""
    from nodes import all_nodes

    registry = Registry(all_nodes())
    sizes = {"width": 16384, "height": 16384, "target_width": 16384, "target_height": 16384}
    numbers = {
        "1": {"class_type": "CLIPTextEncodeSDXL", "inputs": {**sizes, "crop_w": 16384, "crop_h": 16384}},
        "2": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {**sizes, "ascore": 6.0}},
        "3": {"class_type": "ConditioningSetArea", "inputs": {**sizes, "x": 0, "y": 0, "strength": 1.0}},
    }
    assert memory_errors(numbers, registry, available=1) == {}
    for node in numbers.values():
        check_node(_cls(registry, node["class_type"]), node["inputs"], available=1)  # nothing to refuse
    tensors = {
        "4": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16384, "height": 16384}},
        "5": {"class_type": "LatentUpscale", "inputs": {"width": 16384, "height": 16384}},
    }
    assert sorted(memory_errors(numbers | tensors, registry, available=2**30)) == ["4", "5"]
    with pytest.raises(OverMemoryBudget, match="1 x 16384x16384"):
        check_node(_cls(registry, "SolidMask"), tensors["4"]["inputs"], available=2**30)


def _cls(registry: Registry, name: str) -> Any:
    cls = registry.get(name)
    assert cls is not None, name
    return cls
