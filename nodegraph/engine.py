"""Settings and the engine they build: folders -> environment -> registry -> executor, in that order.

`build_engine` is the one place an engine is assembled. It takes the node classes from its caller:
the composition root (`nodegraph.cli`, for `run`, `serve` ...) gets them from the `nodes` package,
tests pass stubs. The engine itself never imports `nodes` (`tests/engine/test_layers.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nodegraph.env import Environment
from nodegraph.executor import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, Executor
from nodegraph.folders import Folders
from nodegraph.node import Node
from nodegraph.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """Everything a user can set, with ComfyUI's defaults and names."""

    base_directory: Path = field(default_factory=Path.cwd)
    output_directory: Path | None = None
    input_directory: Path | None = None
    temp_directory: Path | None = None
    user_directory: Path | None = None
    extra_model_paths_config: list[Path] = field(default_factory=list)
    disable_metadata: bool = False
    listen: str = "127.0.0.1"
    port: int = 8188
    auth_token: str | None = None
    api_auth: str | None = None  # "user:password[,...]": HTTP Basic for the A1111/OpenAI routes
    preview_method: str = "none"
    verbose: bool = False
    cache_entries: int = DEFAULT_MAX_ENTRIES
    cache_bytes: int = DEFAULT_MAX_BYTES
    enable_cors_header: str | None = None
    max_upload_size_mb: float = 100.0
    max_queue_size: int | None = None  # pending + running prompts; None: no cap
    front_end_root: Path | None = None
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto (fp16 on a GPU, fp32 on the CPU), fp32, fp16, bf16


@dataclass
class Engine:
    """One engine instance: what the CLI runs prompts on and what the server serves."""

    settings: Settings
    env: Environment
    registry: Registry
    executor: Executor
    # Imports the heavy model libraries up front; the server runs it on a thread before listening,
    # so first-time imports inside the worker never hold the GIL while requests wait.
    warm_up: Callable[[], None] | None = None

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's `/free`: drop cached outputs (they hold model handles), then let the services go.

        Call it between prompts (the server's worker does), never while a node runs.
        """
        if unload_models or free_memory:
            self.executor.reset()
        self.env.free(unload_models, free_memory)


def build_folders(settings: Settings) -> Folders:
    """The folders from the settings, plus `<base>/extra_model_paths.yaml` and each extra config.

    Raises:
        ValueError: an extra model paths file cannot be read.
    """
    folders = Folders.at(
        settings.base_directory,
        output_dir=settings.output_directory,
        input_dir=settings.input_directory,
        temp_dir=settings.temp_directory,
        user_dir=settings.user_directory,
    )
    default_yaml = folders.base_dir / "extra_model_paths.yaml"
    configs = [default_yaml] if default_yaml.is_file() else []
    for config in [*configs, *settings.extra_model_paths_config]:
        log.info("loading extra model paths from %s", config)
        folders.load_extra_model_paths(config)
    return folders


def build_engine(
    settings: Settings,
    nodes: Iterable[type[Node]],
    *,
    services: Callable[[Environment], None] | None = None,
    warm_up: Callable[[], None] | None = None,
) -> Engine:
    """Assemble an engine from settings and node classes.

    Args:
        settings: directories, flags and cache bounds.
        nodes: the node classes (`nodes.all_nodes()` for every node nodegraph ships).
        services: registers the node package's services in the environment
            (`nodes.register_services`: the LoRA catalog and device info the server reads).
        warm_up: imports the node package's heavy libraries (the server runs it before listening).
    """
    folders = build_folders(settings)
    env = Environment(
        folders,
        disable_metadata=settings.disable_metadata,
        preview_method=settings.preview_method,
        device=settings.device,
        precision=settings.precision,
    )
    if services is not None:
        services(env)
    registry = Registry(nodes)
    executor = Executor(registry, env, max_entries=settings.cache_entries, max_bytes=settings.cache_bytes)
    return Engine(settings, env, registry, executor, warm_up)
