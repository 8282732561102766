"""The Train LoRA panel's routes: the dataset list and the options that follow the checkpoint's family."""

from __future__ import annotations

from typing import Any

import pytest

from nodegraph.server import create_app
from nodegraph.services import CheckpointCatalog

pytestmark = pytest.mark.asyncio


class Kinds:
    """A `CheckpointCatalog` answering from a table (the real one reads the file's header)."""

    def kind(self, name: str) -> str:
        return {"xl.safetensors": "sdxl", "refiner.safetensors": "sdxl_refiner"}.get(name, "other")


async def test_the_training_size_follows_the_checkpoint_family(aiohttp_client: Any, engine: Any) -> None:
    client = await aiohttp_client(create_app(engine))

    async def ask(query: str) -> dict[str, Any]:
        reply = await client.get(f"/nodegraph/train/defaults{query}")
        assert reply.status == 200
        found: dict[str, Any] = await reply.json()
        return found

    # no catalog registered: nothing is known about the file, SD1.x's size
    assert await ask("?checkpoint=xl.safetensors") == {
        "checkpoint": "xl.safetensors", "kind": "other", "resolution": "512,512"
    }  # fmt: skip
    engine.env.services[CheckpointCatalog] = Kinds()
    assert (await ask("?checkpoint=xl.safetensors"))["resolution"] == "1024,1024"
    assert (await ask("?checkpoint=refiner.safetensors"))["resolution"] == "1024,1024"
    assert (await ask("?checkpoint=v1-5.safetensors"))["resolution"] == "512,512"
    assert await ask("") == {"checkpoint": None, "kind": "other", "resolution": "512,512"}
    reply = await client.get("/api/nodegraph/train/defaults?checkpoint=xl.safetensors")
    assert (await reply.json())["kind"] == "sdxl"  # served under /api too, as every route
