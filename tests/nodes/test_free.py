"""`/free` with `unload_models` gives the memory of a loaded checkpoint and its LoRAs back.

Measured in a child process, so the RSS figures are those of one engine and not of the whole test
session: load the oracle's mini SD1.5 checkpoint through CheckpointLoaderSimple (the executor's way:
the model store keeps it), then `Engine.free`, which the server's worker calls for `POST /free`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, sys
from pathlib import Path

from nodegraph.engine import Settings, build_engine
from nodegraph.testing import RecordingContext
from nodes import all_nodes
from nodes.loaders import CheckpointLoaderSimple, model_store
from nodes.lora import LoraLoader
from nodes.sd.lora import loader as lora_loader

def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

base = Path(sys.argv[1])
engine = build_engine(Settings(base_directory=base), nodes=all_nodes())
start = rss()
ctx = RecordingContext(engine.env)
model, clip, _ = CheckpointLoaderSimple().run(ctx, "mini.safetensors")
_, with_lora = LoraLoader().run(ctx, model, clip, "mini_lora_a.safetensors", 1.0, 1.0)
lora_loader.read_lora(with_lora.loras[0].path)  # what a consumer reads first: the LoRA file cache
weights = sum(p.numel() * p.element_size() for p in model.unet.parameters())
weights += sum(p.numel() * p.element_size() for p in clip.text_encoder.parameters())
del model, clip, _, with_lora
store = model_store(engine.env)
engine.free(unload_models=False, free_memory=False)
kept = (rss(), store.loaded(), len(lora_loader._FILES))
engine.free(unload_models=True, free_memory=False)
print(json.dumps({"start": start, "loaded": kept[0], "kept": kept[1], "loras_kept": kept[2],
                  "after": rss(), "left": store.loaded(), "loras_left": len(lora_loader._FILES),
                  "weights": weights}))
"""


def test_unload_models_releases_the_checkpoint(
    tmp_path: Path, mini_checkpoint: Path, mini_loras: Path
) -> None:
    for folder, name, target in (
        ("checkpoints", "mini.safetensors", mini_checkpoint),
        ("loras", "mini_lora_a.safetensors", mini_loras / "mini_lora_a.safetensors"),
    ):
        (tmp_path / "models" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / folder / name).symlink_to(target)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    # without unload_models nothing is dropped; with it, the checkpoint and the read LoRA go
    assert len(m["kept"]) == 1 and m["loras_kept"] == 1
    assert m["left"] == [] and m["loras_left"] == 0
    # The loaded weights made the process grow; unloading gives most of that back to the system.
    assert m["loaded"] - m["start"] >= 0.8 * m["weights"]
    assert m["loaded"] - m["after"] >= 0.8 * m["weights"], m


def test_the_node_layer_registers_its_services(tmp_path: Path) -> None:
    from nodegraph.cli import worker_engine
    from nodegraph.engine import Settings
    from nodegraph.services import CheckpointCatalog, DeviceInfo, LoraCatalog

    engine = worker_engine(Settings(base_directory=tmp_path, device="cpu"))  # the CLI's composition
    catalog, device = engine.env.services[LoraCatalog], engine.env.services[DeviceInfo]
    assert isinstance(catalog, LoraCatalog) and catalog.list() == []
    checkpoints = engine.env.services[CheckpointCatalog]
    assert isinstance(checkpoints, CheckpointCatalog) and checkpoints.kind("missing.safetensors") == "other"
    assert isinstance(device, DeviceInfo) and device.describe()["type"] == "cpu"
