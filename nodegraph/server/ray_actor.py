"""One engine worker as a Ray actor: its own engine, model store and output cache.

The class is plain Python (wrapped with `ray.remote` by the pool), so it can be read and tested
without Ray. It runs prompts through the same executor a single-process server uses and streams
the executor's events back as they happen; output files are shipped back when the worker's
folders are not the server's (a worker on another machine).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nodegraph.engine import Engine, Settings
from nodegraph.server import ray_files
from nodegraph.server.ray_files import ShippedFile
from nodegraph.services import ModelReads

EngineFactory = Callable[[Settings], Engine]
FILE_KINDS = ("output", "temp")


@dataclass(frozen=True)
class WorkerInfo:
    """Who and where a worker is, and how many model files its engine has read."""

    name: str
    pid: int
    host: str
    device: str
    loads: int  # model files read by its services (`ModelReads`), for routing tests

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunEnd:
    """The last item a run yields: how the prompt ended and its UI outputs."""

    status: str
    outputs: dict[str, dict[str, Any]]


class EngineActor:
    """A worker: builds its engine once, then runs one prompt at a time (interrupts may arrive meanwhile)."""

    def __init__(self, name: str, settings: Settings, build: EngineFactory, ship_outputs: bool) -> None:
        # Ray limits an actor's OpenMP threads to the CPUs it reserved. A different thread count
        # changes the order of float reductions, so torch (not imported yet in this process) keeps
        # the default a single-process server has: its images are then the same, bit for bit.
        os.environ.pop("OMP_NUM_THREADS", None)
        self.name = name
        self.ship_outputs = ship_outputs
        self.engine = build(settings)
        if self.engine.warm_up is not None:
            self.engine.warm_up()

    def info(self) -> WorkerInfo:
        """Who and where this worker is, and how many model files it has read (for routing tests)."""
        services = self.engine.env.services.values()
        return WorkerInfo(
            name=self.name,
            pid=os.getpid(),
            host=socket.gethostname(),
            device=self.engine.settings.device,
            loads=sum(s.loads for s in services if isinstance(s, ModelReads)),
        )

    def run(
        self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any], outputs: list[str] | None
    ) -> Iterator[Any]:
        """Run one prompt: yields its events as they happen, then any shipped files, then a `RunEnd`."""
        events: queue.Queue[Any] = queue.Queue()
        done = object()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["outcome"] = self.engine.executor.execute(
                    prompt, prompt_id, events.put, extra_data=extra_data, outputs=outputs
                )
            except Exception as exc:  # reported by the server as the prompt's error
                result["error"] = exc
            finally:
                events.put(done)

        thread = threading.Thread(target=work, name=f"nodegraph-{self.name}", daemon=True)
        thread.start()
        while (event := events.get()) is not done:
            yield event
        thread.join()
        if "error" in result:
            raise result["error"]
        outcome = result["outcome"]
        ui = {str(node): dict(value) for node, value in dict(outcome.outputs).items()}
        if self.ship_outputs:
            yield from self._files(ui)
        yield RunEnd(str(outcome.status), ui)

    def interrupt(self, prompt_id: str | None) -> None:
        self.engine.executor.interrupt(prompt_id)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's /free on this worker: the output cache always, the services as `Engine.free` does."""
        self.engine.executor.reset()
        self.engine.free(unload_models, free_memory)

    def _files(self, ui: dict[str, dict[str, Any]]) -> Iterator[ShippedFile]:
        folders = self.engine.env.folders
        return ray_files.collect(ui, {"output": Path(folders.output_dir), "temp": Path(folders.temp_dir)})
