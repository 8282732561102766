"""The browser canvas: ComfyUI's own frontend (PyPI `comfyui-frontend-package`, one pinned version)
plus nodegraph's extension modules from the repository's `web/` folder.

The server registers its API routes first and then calls `add_frontend_routes`, whose catch-all
static route serves the frontend's files. Nothing here talks to a host other than our own.
"""

from __future__ import annotations

import asyncio
import gzip
import mimetypes
import sys
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodegraph.folders import PathEscapeError, safe_join

if TYPE_CHECKING:
    from nodegraph.engine import Engine


def _pinned_frontend_version() -> str:
    """The canvas version: the installed `comfyui-frontend-package`, else pyproject.toml's one pin.

    The installed one comes first: the settings report it to the page (`Comfy.InstalledVersion`),
    and a checkout run on an environment installed from an older pin serves that older version.
    """
    try:
        return metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        pass
    try:
        for requirement in metadata.requires("nodegraph") or []:
            name, sep, rest = requirement.partition("==")
            if sep and name.strip() == "comfyui-frontend-package":
                return rest.split(";")[0].strip()
    except metadata.PackageNotFoundError:  # run from a source tree without `make install`
        pass
    return "unknown"


FRONTEND_VERSION = _pinned_frontend_version()  # a metadata file read, no import of the frontend
EXTENSION_PREFIX = "/extensions/nodegraph"
NO_CACHE = {"Cache-Control": "no-cache"}

# Settings the server reports under the user's own ones. Each one removes a dialog or an outside call.
DEFAULT_SETTINGS: dict[str, Any] = {
    # Without it the frontend shows the new-user template browser instead of the default graph.
    "Comfy.TutorialCompleted": True,
    # A known user: no "installed version" bookkeeping and no what's-new popups at first start.
    "Comfy.InstalledVersion": FRONTEND_VERSION,
    # Otherwise the frontend asks api.comfy.org for ComfyUI releases at every start.
    "Comfy.Notification.ShowVersionUpdates": False,
    # Keep node text readable when zoomed out (the default 8 draws grey boxes below ~60 % zoom).
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,
    # That dialog offers to download the files a shared workflow names from outside hosts; here a
    # missing file is reported by validation instead, naming the node and the input.
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    # The canvas asks for live sampler previews with each prompt (`extra_data.preview_method`); the
    # server sends none to clients that did not ask (ComfyUI's `--preview-method none` default).
    "Comfy.Execution.PreviewMethod": "auto",
}

# The frontend's ~20 MB of JS/CSS shrink to ~4 MB gzipped, in ~0.4 s of CPU once per server; worth
# it for anyone not on loopback (aiohttp's static route never compresses).
COMPRESSIBLE = frozenset({".js", ".css", ".json", ".html", ".svg", ".map", ".txt"})

CANVAS_USER_FOLDERS = ("workflows", "subgraphs")
CANVAS_USER_FILES = {"user.css": "", "comfy.templates.json": "[]"}

# Entry modules the frontend imports, in this order (helpers they import are not listed).
EXTENSION_FILES = ("nodegraph.js",)


def web_dir() -> Path:
    """Our extension modules: the checkout's `web/` beside the package (source and editable installs),
    else `<prefix>/share/nodegraph/web` where a wheel's data-files put it."""
    checkout = Path(__file__).resolve().parents[2] / "web"
    installed = Path(sys.prefix) / "share" / "nodegraph" / "web"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


def extension_urls() -> list[str]:
    """URLs of our JS extension modules, as `GET /extensions` lists them for the frontend."""
    return [f"{EXTENSION_PREFIX}/{name}" for name in EXTENSION_FILES if (web_dir() / name).is_file()]


def frontend_root(override: str | Path | None = None) -> Path:
    """The folder with the frontend's `index.html`: `override` (`--front-end-root`) or the pinned package.

    Args:
        override: a folder with another frontend build, for people testing other versions.
    """
    if override:
        root = Path(override).expanduser().absolute()
    else:
        try:
            import comfyui_frontend_package
        except ImportError as exc:  # pragma: no cover - a broken install
            raise RuntimeError(
                f"the canvas needs comfyui-frontend-package=={FRONTEND_VERSION}; "
                f"run `pip install comfyui-frontend-package=={FRONTEND_VERSION}`"
            ) from exc
        root = Path(str(resources.files(comfyui_frontend_package) / "static"))
    if not (root / "index.html").is_file():
        raise RuntimeError(f"no index.html in the frontend folder {root}; check --front-end-root")
    return root


def _override_of(engine: Engine | None) -> str | Path | None:
    """`--front-end-root` if the engine's settings carry one."""
    return engine.settings.front_end_root if engine is not None else None


class _GzipCache:
    """Gzipped bodies of the frontend's text files, made once (off the event loop) and kept."""

    def __init__(self) -> None:
        self._bodies: dict[Path, tuple[float, bytes]] = {}

    async def body(self, path: Path) -> bytes:
        mtime = path.stat().st_mtime
        kept = self._bodies.get(path)
        if kept is None or kept[0] != mtime:
            data = await asyncio.get_running_loop().run_in_executor(None, _gzip_file, path)
            kept = (mtime, data)
            self._bodies[path] = kept
        return kept[1]


def _gzip_file(path: Path) -> bytes:
    return gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)


def _static_handler(root: Path) -> Any:
    """GET handler for the frontend's files under `root`, gzipped for clients that accept it."""
    cache = _GzipCache()

    async def static_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"]
        try:
            path = safe_join(root, name)
        except PathEscapeError as exc:
            raise web.HTTPNotFound(text="no such file in the frontend") from exc
        if not path.is_file():
            raise web.HTTPNotFound(text="no such file in the frontend")
        if path.suffix not in COMPRESSIBLE or "gzip" not in request.headers.get("Accept-Encoding", ""):
            return web.FileResponse(path)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding", "Content-Type": kind}
        return web.Response(body=await cache.body(path), headers=headers)

    return static_file


def _seed_user_files(user: Path) -> None:
    """The folders and files the canvas reads at every start, so a first start sees empty ones
    rather than 404s: the workflow and subgraph folders, the user stylesheet, the old-style
    user template list. Existing ones are left as they are."""
    for folder in CANVAS_USER_FOLDERS:
        (user / folder).mkdir(parents=True, exist_ok=True)
    for name, text in CANVAS_USER_FILES.items():
        path = user / name
        if not path.exists():
            path.write_text(text)


def add_frontend_routes(app: web.Application, engine: Engine | None) -> None:
    """Serve the canvas: `/`, our extensions, an empty template list and the frontend's static files.

    Args:
        app: the server's application, with its API routes already registered.
        engine: the running engine; only its settings' `front_end_root` is read.
    """
    root = frontend_root(_override_of(engine))
    extensions = web_dir()

    async def index(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(root / "index.html", headers=NO_CACHE)

    async def extension_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:  # a NUL or an over-long name is refused like any other unknown file (was a 500)
            path = safe_join(extensions, name, follow_symlinks=True).resolve()
        except PathEscapeError as exc:
            raise web.HTTPNotFound(text=f"no nodegraph extension file {name!r}") from exc
        # Only plain files directly inside web/ (and its sub-folders); nothing outside it.
        if extensions.resolve() not in path.parents or not path.is_file():
            raise web.HTTPNotFound(text=f"no nodegraph extension file {name!r}")
        return web.FileResponse(path, headers=NO_CACHE)

    async def templates_index(_: web.Request) -> web.StreamResponse:
        # The template browser stays empty: the default graph is ours (web/default_workflow.json).
        return web.json_response([], headers=NO_CACHE)

    async def user_css(_: web.Request) -> web.StreamResponse:
        # The canvas asks for a user stylesheet at every start; none is an empty sheet, not a 404.
        return web.Response(text="", content_type="text/css", headers=NO_CACHE)

    if engine is not None:  # None: the static routes alone (tests serve them bare)
        _seed_user_files(Path(engine.env.folders.user_dir) / "default")

    app.router.add_get("/", index)
    app.router.add_get("/user.css", user_css)
    app.router.add_get(EXTENSION_PREFIX + "/{name:.+}", extension_file)
    app.router.add_get("/templates/index.json", templates_index)
    # Last: every other GET path is a file of the frontend (the API routes are registered before).
    app.router.add_get("/{path:.+}", _static_handler(root))
