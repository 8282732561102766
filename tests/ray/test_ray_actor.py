"""The worker actor as plain Python (no Ray): what it reports about itself."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from nodegraph.engine import Engine, Settings
from nodegraph.server.ray_actor import EngineActor, WorkerInfo
from tests.server.stubs import make_engine


class CountsReads:
    """A service that read model files (as `nodes.sd.model_store.ModelStore` counts them)."""

    def __init__(self, loads: int) -> None:
        self.loads = loads


class ReadsNothing:
    """A service with no model files."""


def test_a_worker_reports_itself_and_the_model_files_its_services_read(tmp_path: Path) -> None:
    def build(settings: Settings) -> Engine:
        engine = make_engine(tmp_path)
        engine.env.services[CountsReads] = CountsReads(3)
        engine.env.services[ReadsNothing] = ReadsNothing()
        return engine

    actor = EngineActor("worker-1", Settings(base_directory=tmp_path), build, ship_outputs=False)
    info = actor.info()
    device = actor.engine.settings.device
    assert info == WorkerInfo("worker-1", os.getpid(), socket.gethostname(), device, loads=3)
    assert info.as_json() == {
        "name": "worker-1", "pid": os.getpid(), "host": socket.gethostname(), "device": device, "loads": 3
    }  # fmt: skip
