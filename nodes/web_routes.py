"""HTTP routes the canvas extension (web/nodegraph.js) reads: LoRA metadata, previews and the default graph.

`GET /nodegraph/loras` lists every LoRA with its trigger words, base model and rank;
`GET /nodegraph/lora_info?name=` gives one; `GET /nodegraph/lora_preview?name=` sends the preview
image stored beside the file; `GET /nodegraph/default_workflow` is the first-start graph on the
installed models. Names go through `Folders.resolve`, so no request leaves the loras folder.
Reading a LoRA's description never loads its tensors: only the safetensors header and small sidecar files.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from nodegraph.env import Environment
from nodegraph.folders import ModelNotFoundError, PathEscapeError
from nodegraph.server.frontend import web_dir
from nodes.sd import demo

PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpeg", ".preview.jpg", ".jpg", ".jpeg", ".webp", ".gif")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the header size
MAX_TAGS = 12


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor names, shapes and `__metadata__`), nothing else."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is too short to be a .safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise ValueError(f"{path.name} has an implausible header size {size}; is it a .safetensors file?")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has no JSON object header")
    return header


def _split_words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def _tag_frequency_words(meta: dict[str, str]) -> list[str]:
    """kohya's `ss_tag_frequency` ({dataset: {tag: count}}): the most frequent training tags."""
    try:
        datasets = json.loads(meta.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: Counter[str] = Counter()
    for tags in datasets.values() if isinstance(datasets, dict) else ():
        if isinstance(tags, dict):
            counts.update({str(t).strip(): int(c) for t, c in tags.items() if str(t).strip()})
    return [tag for tag, _ in counts.most_common(MAX_TAGS)]


def _sidecar_words(path: Path) -> list[str]:
    """Trigger words kept beside the file by A1111 (`<name>.json`) or CivitAI helpers (`.civitai.info`)."""
    for sidecar, key in ((".civitai.info", "trainedWords"), (".json", "activation text")):
        file = path.with_suffix(sidecar)
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str):
            return _split_words(value)
        if isinstance(value, list):
            return [w for item in value if isinstance(item, str) for w in _split_words(item)]
    return []


def trigger_words(path: Path, meta: dict[str, str]) -> list[str]:
    """Trigger words: the trainer's stated phrase first, then sidecar files, then the top training tags."""
    words = _split_words(meta.get("modelspec.trigger_phrase", "")) or _sidecar_words(path)
    return words or _tag_frequency_words(meta)


def _rank(header: dict[str, Any]) -> int | None:
    """The most common inner dimension of the down (A) matrices."""
    ranks = Counter(
        int(v["shape"][0])
        for k, v in header.items()
        if isinstance(v, dict) and v.get("shape") and k.endswith(("lora_down.weight", "lora_A.weight"))
    )
    return ranks.most_common(1)[0][0] if ranks else None


def base_model(header: dict[str, Any], meta: dict[str, str]) -> str:
    """The model family a LoRA was trained for: from its metadata, else from its tensor shapes."""
    stated = meta.get("ss_base_model_version") or meta.get("modelspec.architecture", "")
    if stated:
        return stated
    keys = [k for k in header if k != "__metadata__"]
    if any(k.startswith("lora_te2_") or "text_encoder_2" in k for k in keys):
        return "SDXL"
    # Cross-attention keys project the text embedding: 768 wide for SD1.x, 1024 for SD2.x.
    for k in keys:
        if "attn2" in k and "to_k" in k and k.endswith(("lora_down.weight", "lora_A.weight")):
            width = header[k]["shape"][-1]
            return {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(width, f"unknown (context {width})")
    return "unknown"


def preview_path(path: Path) -> Path | None:
    """An image stored beside the LoRA with the same stem (`x.png`, `x.preview.png`, ...)."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for suffix in PREVIEW_SUFFIXES:
        candidate = path.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def describe_lora(name: str, path: Path) -> dict[str, Any]:
    """What the canvas shows for one LoRA; a file it cannot read gets an `error` entry, not an exception."""
    info: dict[str, Any] = {"name": name, "trigger_words": [], "base_model": "unknown", "rank": None}
    info["preview_url"] = f"/nodegraph/lora_preview?name={quote(name)}" if preview_path(path) else None
    if path.suffix != ".safetensors":
        info["error"] = "only .safetensors files carry readable metadata"
        info["trigger_words"] = _sidecar_words(path)
        return info
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError) as exc:
        info["error"] = str(exc)
        return info
    meta = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    info["trigger_words"] = trigger_words(path, meta)
    info["base_model"] = base_model(header, meta)
    info["rank"] = _rank(header)
    info["alpha"] = meta.get("ss_network_alpha")
    return info


def _prefer(names: list[str], demo_first: bool) -> str | None:
    """The first name of the wanted kind (the demo's own files, or the user's), else the first at all."""
    wanted = [n for n in names if (Path(n).name.startswith("nodegraph_demo")) == demo_first]
    return (wanted or names or [None])[0]


def default_workflow(env: Environment) -> dict[str, Any]:
    """The canvas's first-start graph (web/default_workflow.json) set to the models this server has.

    A user's own checkpoint comes first. On the random-weight demo checkpoint (`make run` on a fresh
    machine) the image is noise whatever its size, so the graph asks for 128x128 in 8 steps, which
    a CPU finishes in seconds rather than minutes.
    """
    graph: dict[str, Any] = json.loads((web_dir() / "default_workflow.json").read_text(encoding="utf-8"))
    checkpoint = _prefer(env.folders.list("checkpoints"), demo_first=False)
    on_demo = checkpoint == demo.CHECKPOINT_NAME
    lora = _prefer(env.folders.list("loras"), demo_first=on_demo)
    for node in graph["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "CheckpointLoaderSimple" and checkpoint:
            values[0] = checkpoint
        elif node["type"] == "LoraLoader" and lora:
            values[0] = lora
        elif node["type"] == "EmptyLatentImage" and on_demo:
            values[0:2] = [128, 128]
        elif node["type"] == "KSampler" and on_demo:
            values[2] = 8  # [seed, control_after_generate, steps, cfg, sampler, scheduler, denoise]
    return graph


def _resolve(env: Environment, request: web.Request) -> tuple[str, Path]:
    name = request.query.get("name", "")
    if not name:
        raise web.HTTPBadRequest(text="give the LoRA file name as ?name=<name in the loras folder>")
    try:
        return name, env.folders.resolve("loras", name)
    except PathEscapeError as exc:
        raise web.HTTPForbidden(text=f"refused LoRA name: {exc}") from exc
    except (ModelNotFoundError, FileNotFoundError) as exc:
        raise web.HTTPNotFound(text=f"no LoRA named {name!r} in the loras folder") from exc


def routes(env: Environment) -> list[web.RouteDef]:
    """The canvas extension's routes (the server mounts them under `/` and `/api`)."""

    async def loras(_: web.Request) -> web.Response:
        out = []
        for name in env.folders.list("loras"):
            try:
                out.append(describe_lora(name, env.folders.resolve("loras", name)))
            except (PathEscapeError, FileNotFoundError):
                continue  # removed between listing and reading
        return web.json_response(out)

    async def lora_info(request: web.Request) -> web.Response:
        name, path = _resolve(env, request)
        return web.json_response(describe_lora(name, path))

    async def lora_preview(request: web.Request) -> web.StreamResponse:
        name, path = _resolve(env, request)
        image = preview_path(path)
        if image is None:
            raise web.HTTPNotFound(text=f"no preview image beside LoRA {name!r}")
        return web.FileResponse(image)

    async def workflow(_: web.Request) -> web.Response:
        return web.json_response(default_workflow(env))

    # Plain `web.route` (not `web.get`, which adds HEAD via an `allow_head` keyword) so that the server
    # can re-register each RouteDef under `/` and `/api` with `router.add_route`.
    return [
        web.route("GET", "/nodegraph/loras", loras),
        web.route("GET", "/nodegraph/lora_info", lora_info),
        web.route("GET", "/nodegraph/lora_preview", lora_preview),
        web.route("GET", "/nodegraph/default_workflow", workflow),
    ]
