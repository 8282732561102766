"""A1111's listing and housekeeping routes in A1111's shapes, on the stub engine (no models run)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.server.clients import client_for
from tests.server.stubs import make_engine


def safetensors_header(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file whose header declares `shapes` (the data is zeros)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.mark.asyncio
async def test_lists_and_housekeeping_in_a1111_shapes(aiohttp_client: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for folder in ("vae", "embeddings", "hypernetworks", "upscale_models", "checkpoints"):
        (models / folder).mkdir(parents=True)
    (models / "vae" / "ft-mse.safetensors").write_bytes(b"")
    (models / "hypernetworks" / "anime.pt").write_bytes(b"")
    (models / "upscale_models" / "4x-Ultra.pth").write_bytes(b"")
    (models / "checkpoints" / "sd15.safetensors").write_bytes(b"")
    safetensors_header(models / "embeddings" / "easyneg.safetensors", {"emb_params": [8, 768]})
    client = await client_for(aiohttp_client, make_engine(tmp_path))

    async def get(path: str) -> Any:
        reply = await client.get(path)
        assert reply.status == 200, path
        return await reply.json()

    vae = await get("/sdapi/v1/sd-vae")
    assert vae == [
        {"model_name": "ft-mse.safetensors", "filename": str(models / "vae" / "ft-mse.safetensors")}
    ]
    assert await get("/sdapi/v1/embeddings") == {"loaded": {"easyneg": {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 8}},
        "skipped": {}}  # fmt: skip
    assert [h["name"] for h in await get("/sdapi/v1/hypernetworks")] == ["anime"]
    assert [u["name"] for u in await get("/sdapi/v1/upscalers")] == ["None", "Lanczos", "Nearest", "4x-Ultra"]
    for path in ("/sdapi/v1/prompt-styles", "/sdapi/v1/face-restorers", "/sdapi/v1/realesrgan-models"):
        assert await get(path) == []
    assert await get("/internal/ping") == {}
    memory = await get("/sdapi/v1/memory")
    assert memory["ram"]["total"] >= memory["ram"]["used"] > 0 and "cuda" in memory
    assert (await client.post("/sdapi/v1/unload-checkpoint")).status == 200
    # sd_vae: a listed file (any of its names), "Automatic" or "None"; anything else is named.
    assert (await client.post("/sdapi/v1/options", json={"sd_vae": "ft-mse"})).status == 200
    assert (await get("/sdapi/v1/options"))["sd_vae"] == "ft-mse.safetensors"
    refused = await client.post("/sdapi/v1/options", json={"sd_vae": "missing.pt"})
    assert refused.status == 422 and (await refused.json())["detail"].startswith("sd_vae:")
    refused = await client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "two"})
    assert refused.status == 422 and (await refused.json())["detail"].startswith("CLIP_stop_at_last_layers:")
    options = await get("/sdapi/v1/options")
    assert options["sd_model_checkpoint"] == (await get("/sdapi/v1/sd-models"))[0]["title"]
