"""Scale-out on Ray: the server's SQLite queue drained by N engine workers, each a Ray actor.

The server keeps everything it has without Ray (queue, history, websocket, routes). Ray only runs
the engines. One dispatcher thread takes prompts in queue order whenever a worker is idle and
hands each to the idle worker that already holds its checkpoint (by content hash), else to an
idle one (`routing.choose_worker`). Each worker has a runner thread: a `Worker` whose executor is
the remote actor, so progress, previews, outputs and errors become the same ComfyUI messages and
history entries as in one process. A worker that dies mid-prompt is replaced; its prompt is
retried once on another worker, then recorded as an error.

Imported only for `nodegraph serve --workers N` / `--ray-address`: without them there is no Ray.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from nodegraph import events as ev
from nodegraph.engine import Engine
from nodegraph.env import Environment
from nodegraph.executor import Outcome
from nodegraph.server import ray_files
from nodegraph.server.messages import Message, PromptMessages
from nodegraph.server.queue import PromptStore, QueueItem
from nodegraph.server.ray_actor import EngineActor, EngineFactory, RunEnd, WorkerInfo
from nodegraph.server.ray_files import ShippedFile
from nodegraph.server.routing import ContentHashes, WorkerView, choose_worker, referenced_models
from nodegraph.server.worker import Finished, Worker, status_message
from nodegraph.server.ws import Hub

log = logging.getLogger(__name__)
MAX_REMEMBERED = 10_000  # prompt id -> worker entries kept for interrupts and tests
START_TIMEOUT = 300.0  # seconds for a worker to import its libraries and build its engine


class RayStartError(RuntimeError):
    """Ray could not be started or reached, or the workers could not be placed."""


class WorkerLost(RuntimeError):
    """The worker's process died (or Ray lost it) while it ran a prompt."""


class _Requeue(Exception):
    """Raised out of a runner's `_run`: the prompt goes back to the queue for another worker."""


def start_ray(address: str | None, workers: int) -> None:
    """Connect to the cluster at `address`, or start a local one for `workers` workers on this machine.

    Raises:
        RayStartError: the head is unreachable, or Ray fails to start.
    """
    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
    else:
        # A local cluster nodegraph starts for itself stays on the loopback interface (Ray would
        # otherwise bind the machine's public address); nobody else is meant to join it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray gives its own processes ~20 s to come up; a busy machine needs longer.
        os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", "120")
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            cpus = max(workers, os.cpu_count() or 1)
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    except Exception as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RayStartError(f"could not start or join {where}: {exc}") from exc


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at the head's address."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise RayStartError(
            f"the Ray head at {address} cannot be reached ({exc}); start it with `ray start --head` "
            "or check --ray-address"
        ) from exc


class RemoteExecutor:
    """The executor interface (`execute`, `interrupt`) over one worker actor."""

    def __init__(self, slot: _Slot, env: Environment) -> None:
        self.slot = slot
        self.env = env  # the server's: its preview method decides which frames reach the clients

    def execute(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        emit: ev.Emit,
        *,
        extra_data: dict[str, Any] | None = None,
        outputs: list[str] | None = None,
    ) -> Outcome:
        stream = self.slot.actor.run.options(num_returns="streaming").remote(
            prompt, prompt_id, dict(extra_data or {}), list(outputs) if outputs is not None else None
        )
        end: RunEnd | None = None
        shipped: list[ShippedFile] = []
        for item in self._items(stream):
            if isinstance(item, RunEnd):
                end = item
            elif isinstance(item, ShippedFile):
                shipped.append(item)
            else:
                emit(item)
        if end is None:
            raise WorkerLost(f"worker {self.slot.name} ended prompt {prompt_id} without a result")
        ui = self.slot.pool.receive_files(shipped, end.outputs)
        status = end.status if end.status in ("success", "error", "interrupted") else "error"
        return Outcome(status, ui)  # type: ignore[arg-type]

    def _items(self, stream: Any) -> Iterator[Any]:
        try:
            for ref in stream:
                yield ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            raise WorkerLost(f"worker {self.slot.name} died: {exc}") from exc

    def interrupt(self, prompt_id: str | None = None) -> None:
        try:
            self.slot.actor.interrupt.remote(prompt_id)
        except ray.exceptions.RayActorError:
            pass  # already gone: its prompt is handled as lost


class _Slot(Worker):
    """One worker: a runner thread feeding its actor, with the single-process worker's messages."""

    def __init__(self, pool: RayWorkers, index: int) -> None:
        self.pool = pool
        self.index = index
        self.view = WorkerView(f"worker-{index}")
        self.inbox: queue.Queue[QueueItem | None] = queue.Queue()
        self.actor: Any = None
        self.pid = 0
        self.lost = False  # its actor died during the current prompt
        executor = RemoteExecutor(self, pool.engine.env)
        super().__init__(pool.store, executor, pool.hub, pool.on_finished, self._free_remote, pool.after)
        self.name = self.view.name
        self._thread = threading.Thread(target=self._serve, name=f"nodegraph-{self.name}", daemon=True)

    def spawn(self) -> None:
        """Create (or replace) the actor and wait until its engine is built."""
        self.actor = self.pool.make_actor(self.view.name)
        try:
            info = ray.get(self.actor.info.remote(), timeout=START_TIMEOUT)
        except Exception as exc:
            raise RayStartError(f"{self.name} did not start: {exc}") from exc
        self.pid = _worker_info(info).pid
        self.view.holds.clear()

    def info(self) -> WorkerInfo:
        return _worker_info(ray.get(self.actor.info.remote(), timeout=30))

    def _free_remote(self, unload_models: bool, free_memory: bool) -> None:
        ray.get(self.actor.free.remote(unload_models, free_memory), timeout=60)
        if unload_models:
            self.view.holds.clear()

    def _serve(self) -> None:
        while (item := self.inbox.get()) is not None:
            self._maybe_free()
            self.lost = False
            try:
                self._run(item)
            except _Requeue:  # back to the front of the queue first, so another worker starts on it now
                self.running_id = self.running_client = self.current_node = self._messages = None
                self.store.requeue(item.prompt_id)
            finally:
                if self.lost:
                    self._respawn()  # this slot takes no prompt until its new actor is up
                self.pool.released(self)

    def _respawn(self) -> None:
        while not self._stop.is_set():
            try:
                self.pool.replace(self)
                return
            except RayStartError as exc:  # Ray itself is struggling: try again, never lose the thread
                log.error("could not replace %s: %s", self.view.name, exc)
                self._stop.wait(5.0)

    def _execute(self, item: QueueItem, emit: ev.Emit, messages: PromptMessages) -> str:
        try:
            outcome = self.executor.execute(
                item.prompt, item.prompt_id, emit, extra_data=item.extra_data, outputs=item.outputs
            )
        except WorkerLost as lost:
            log.warning("%s", lost)
            self.lost = True
            if self.pool.retry(item.prompt_id):
                raise _Requeue() from lost
            emit(_error(item.prompt_id, "WorkerLost", f"{lost}; it had already failed once on another one"))
            return "error"
        except Exception as exc:  # the engine failed outside any node: that prompt only
            log.exception("prompt %s failed on %s outside any node", item.prompt_id, self.view.name)
            emit(_error(item.prompt_id, type(exc).__name__, f"the engine failed on {self.name}: {exc}", exc))
            return "error"
        for node, ui in outcome.outputs.items():
            messages.outputs.setdefault(str(node), ui)
        return str(outcome.status)


def _worker_info(found: object) -> WorkerInfo:
    """The actor's `info()` as it comes out of `ray.get` (typed `Any` there), checked."""
    if not isinstance(found, WorkerInfo):
        raise RayStartError(f"a worker answered info() with {type(found).__name__}, not WorkerInfo")
    return found


def _error(prompt_id: str, kind: str, message: str, exc: BaseException | None = None) -> ev.ExecutionError:
    trace = tuple(traceback.format_exception(exc)) if exc is not None else ()
    return ev.ExecutionError(
        prompt_id, node_id="", node_type="", exception_type=kind, message=message, traceback=trace
    )


class RayWorkers:
    """N Ray workers behind the single-process `Worker` interface the server already uses."""

    def __init__(
        self,
        store: PromptStore,
        hub: Hub,
        on_finished: Finished,
        *,
        engine: Engine,
        build: EngineFactory,
        count: int,
        ship_outputs: bool = False,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.store, self.hub, self.on_finished, self.after = store, hub, on_finished, after
        self.engine, self.build, self.ship_outputs = engine, build, ship_outputs
        self.hashes = ContentHashes()
        self._lock = threading.Condition()
        self._retried: set[str] = set()
        self._stop = threading.Event()
        self._remote_dirs = Path(tempfile.mkdtemp(prefix="nodegraph-workers-")) if ship_outputs else None
        self.slots = [_Slot(self, i) for i in range(count)]
        self._dispatcher = threading.Thread(target=self._dispatch, name="nodegraph-dispatch", daemon=True)
        self.dispatched: dict[str, str] = {}  # prompt id -> worker name, for tests and /system_stats

    # -- the Worker interface the server uses -------------------------------------------------

    def _first_running(self) -> _Slot | None:
        return next((slot for slot in self.slots if slot.running_id is not None), None)

    @property
    def running_id(self) -> str | None:
        slot = self._first_running()
        return slot.running_id if slot is not None else None

    @property
    def step(self) -> tuple[int, int] | None:
        slot = self._first_running()
        return slot.step if slot is not None else None

    @property
    def preview(self) -> Any:
        slot = self._first_running()
        return slot.preview if slot is not None else None

    def start(self) -> None:
        for slot in self.slots:
            slot.spawn()
            slot._thread.start()
        self._dispatcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        for slot in self.slots:
            slot._stop.set()
            if slot.running_id is not None:
                slot.interrupt(slot.running_id)
            slot.inbox.put(None)
        for slot in self.slots:
            slot._thread.join(timeout)
        self._dispatcher.join(timeout)
        for slot in self.slots:
            try:
                ray.kill(slot.actor)
            except Exception:  # already gone
                pass

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt `prompt_id` wherever it runs or waits for its worker (all running ones when None)."""
        if prompt_id is not None and prompt_id in self.dispatched and prompt_id not in self._running():
            slot = self._slot_named(self.dispatched[prompt_id])
            if slot is not None and self.store.state_of(prompt_id) == "running":
                slot._cancelled.add(prompt_id)  # waiting behind another prompt: stopped before it starts
                return True
        hit = False
        for slot in self.slots:
            if slot.running_id is not None and prompt_id in (None, slot.running_id):
                hit = slot.interrupt(slot.running_id) or hit
        return hit

    def _running(self) -> set[str]:
        return {slot.running_id for slot in self.slots if slot.running_id is not None}

    def _slot_named(self, name: str) -> _Slot | None:
        return next((slot for slot in self.slots if slot.view.name == name), None)

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        for slot in self.slots:
            slot.request_free(unload_models, free_memory)

    def broadcast_status(self) -> None:
        self.hub.broadcast_sync(status_message(self.store.remaining()))

    def on_connect(self, sid: str) -> list[Message]:
        sent = [status_message(self.store.remaining(), sid)]
        for slot in self.slots:
            if sid == slot.running_client and slot.current_node is not None:
                node, running = slot.current_node, slot.running_id
                sent.append(Message("executing", {"node": node, "display_node": node, "prompt_id": running}))
        return sent

    def outputs_so_far(self, prompt_id: str) -> dict[str, Any]:
        for slot in self.slots:
            if slot.running_id == prompt_id:
                return slot.outputs_so_far(prompt_id)
        return {}

    def nodes_so_far(self, prompt_id: str) -> tuple[int, int]:
        for slot in self.slots:
            if slot.running_id == prompt_id:
                return slot.nodes_so_far(prompt_id)
        return 0, 0

    def describe(self) -> list[dict[str, Any]]:
        """The workers for /system_stats: name, process, host, device, models read, what runs."""
        out = []
        for slot in self.slots:
            try:
                info = slot.info().as_json()
            except Exception as exc:
                info = {"name": slot.name, "error": str(exc)}
            info["running"] = slot.running_id
            out.append(info)
        return out

    # -- dispatching -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                # take the next prompt only once some worker is idle: until then it stays pending
                # (listed, cancellable, reorderable) in the queue
                while not self._stop.is_set() and not any(s.view.idle for s in self.slots):
                    self._lock.wait(0.5)
            if self._stop.is_set():
                return
            try:
                item = self.store.take(timeout=0.25)
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("cannot read the prompt queue")
                continue
            if item is None:
                continue
            models = self.hashes.models(referenced_models(item.prompt), self.engine.env.folders.resolve)
            with self._lock:
                slot = self._slot_for(choose_worker(models, [s.view for s in self.slots]))
                slot.view.load += 1
                slot.view.remember(models)
            self.dispatched[item.prompt_id] = slot.view.name
            while len(self.dispatched) > MAX_REMEMBERED:  # a long-running server forgets the oldest
                self.dispatched.pop(next(iter(self.dispatched)))
            slot.inbox.put(item)

    def _slot_for(self, view: WorkerView | None) -> _Slot:
        for slot in self.slots:
            if slot.view is view:
                return slot
        raise RuntimeError("the dispatcher chose no idle worker")  # cannot happen: it waited for one

    def released(self, slot: _Slot) -> None:
        with self._lock:
            slot.view.load = max(0, slot.view.load - 1)
            self._lock.notify_all()

    def retry(self, prompt_id: str) -> bool:
        """True the first time a prompt's worker dies under it (run it again elsewhere), then False."""
        with self._lock:
            if prompt_id in self._retried:
                return False
            self._retried.add(prompt_id)
            return True

    def replace(self, slot: _Slot) -> None:
        """A dead worker is replaced by a fresh actor in the same slot."""
        log.warning("replacing %s", slot.name)
        try:
            ray.kill(slot.actor)
        except Exception:  # already gone
            pass
        slot.spawn()

    # -- actors and their files ------------------------------------------------------------------

    def make_actor(self, name: str) -> Any:
        settings = self.engine.settings
        if self._remote_dirs is not None:  # a worker with folders of its own, as on another machine
            root = self._remote_dirs / name
            settings = replace(settings, output_directory=root / "output", temp_directory=root / "temp")
        gpus = float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
        wants_gpu = settings.device != "cpu" and gpus >= len(self.slots)
        options: dict[str, Any] = {"num_gpus": 1} if wants_gpu else {"num_cpus": 1}
        remote = ray.remote(EngineActor).options(max_concurrency=4, **options)  # run + interrupt/info
        return remote.remote(name, settings, self.build, self._remote_dirs is not None)

    def receive_files(
        self, files: list[ShippedFile], ui: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        folders = self.engine.env.folders
        return ray_files.place(
            files, ui, {"output": Path(folders.output_dir), "temp": Path(folders.temp_dir)}
        )


def worker_factory(
    engine: Engine, build: EngineFactory, count: int, *, ship_outputs: bool = False
) -> Callable[..., RayWorkers]:
    """What `create_app(engine, workers=...)` calls in place of the single `Worker` constructor."""

    def make(
        store: PromptStore,
        _executor: Any,
        hub: Hub,
        on_finished: Finished,
        _free: Any,
        after: Callable[[], None] | None = None,
    ) -> RayWorkers:
        return RayWorkers(
            store,
            hub,
            on_finished,
            engine=engine,
            build=build,
            count=count,
            ship_outputs=ship_outputs,
            after=after,
        )

    return make
