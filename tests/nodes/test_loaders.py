"""CheckpointLoaderSimple and VAELoader: ComfyUI's declarations, the model store, fingerprints, errors."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from nodegraph.env import Environment
from nodegraph.folders import Folders, ModelNotFoundError
from nodegraph.testing import RecordingContext
from nodes.loaders import CheckpointLoaderSimple, VAELoader, model_store
from nodes.sd.checkpoint import CheckpointError, PixelSpaceVae
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.sd.model_store import ModelStore


def test_checkpoint_loader_lists_the_checkpoints(models_env: Environment) -> None:
    info = CheckpointLoaderSimple.info(models_env)  # the rest of its declaration: test_object_info.py
    assert info["input"]["required"]["ckpt_name"][0] == ["mini.safetensors"]


def test_vae_loader_lists_vae_files_and_pixel_space(models_env: Environment) -> None:
    info = VAELoader.info(models_env)
    assert info["input"]["required"]["vae_name"][0] == ["pixel_space"]
    assert info["output"] == ["VAE"] and info["display_name"] == "Load VAE"


def test_two_loads_of_one_file_share_one_copy(models_env: Environment) -> None:
    ctx = RecordingContext(models_env)
    model, clip, vae = CheckpointLoaderSimple().run(ctx, "mini.safetensors")
    again = CheckpointLoaderSimple().run(RecordingContext(models_env, "2"), "mini.safetensors")
    assert isinstance(model, ModelHandle) and isinstance(clip, ClipHandle) and isinstance(vae, VaeHandle)
    assert again[0].unet is model.unet and again[1].text_encoder is clip.text_encoder
    assert model.family == "sd15" and model.loras == () and clip.layer_idx is None
    assert clip.embedding_dirs == tuple(models_env.folders.paths("embeddings"))
    assert vae.scaling_factor == pytest.approx(0.18215)


def test_fingerprint_follows_the_files_mtime_and_size(tmp_path: Path) -> None:
    env = Environment(_folders_with(tmp_path, "checkpoints", "a.safetensors", b"x" * 10))
    first = CheckpointLoaderSimple.input("ckpt_name").fingerprint(env, "a.safetensors")
    path = tmp_path / "models" / "checkpoints" / "a.safetensors"
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert CheckpointLoaderSimple.input("ckpt_name").fingerprint(env, "a.safetensors") != first
    assert CheckpointLoaderSimple.input("ckpt_name").fingerprint(env, "missing.safetensors") is None


def _folders_with(base: Path, folder: str, name: str, data: bytes) -> Any:

    (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    (base / "models" / folder / name).write_bytes(data)
    return Folders.at(base)


def test_missing_checkpoint_names_the_file(env: Environment, ctx: RecordingContext) -> None:
    with pytest.raises(ModelNotFoundError, match="gone.safetensors"):
        CheckpointLoaderSimple().run(ctx, "gone.safetensors")


def test_a_broken_checkpoint_is_an_error_naming_it(tmp_path: Path) -> None:
    env = Environment(_folders_with(tmp_path, "checkpoints", "broken.safetensors", b"not a model"))
    with pytest.raises(CheckpointError, match="'broken.safetensors'"):
        CheckpointLoaderSimple().run(RecordingContext(env), "broken.safetensors")


def test_a_checkpoint_reached_through_a_symlink_is_named_as_the_workflow_names_it(tmp_path: Path) -> None:
    # A models folder that links into a cache of blobs (no extension, a hash for a name).
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "ab12cd").write_bytes(b"not a model")
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "my_model.safetensors").symlink_to(blobs / "ab12cd")
    env = Environment(Folders.at(tmp_path))
    assert CheckpointLoaderSimple.info(env)["input"]["required"]["ckpt_name"][0] == ["my_model.safetensors"]
    with pytest.raises(CheckpointError) as caught:
        CheckpointLoaderSimple().run(RecordingContext(env), "my_model.safetensors")
    # read as the .safetensors file it is named, not refused as an extensionless pickle
    assert "'my_model.safetensors' is not a readable .safetensors file" in str(caught.value)
    assert "ab12cd" not in str(caught.value)


def test_store_shares_one_load_between_a_symlink_and_its_target_and_reads_the_given_name(
    tmp_path: Path,
) -> None:
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"1")
    link = tmp_path / "linked.safetensors"
    link.symlink_to(target)
    calls: list[Path] = []
    store = _fake_store(calls)
    assert store.checkpoint(link) is store.checkpoint(target)
    assert calls == [link]


def test_vae_loader_reads_a_vae_file_and_pixel_space(tmp_path: Path, mini_checkpoint: Path) -> None:
    prefix = "first_stage_model."
    with safe_open(str(mini_checkpoint), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    (tmp_path / "models" / "vae").mkdir(parents=True)
    save_file(tensors, str(tmp_path / "models" / "vae" / "sd_vae.safetensors"))

    env = Environment(Folders.at(tmp_path))
    assert VAELoader.info(env)["input"]["required"]["vae_name"][0] == ["sd_vae.safetensors", "pixel_space"]
    (vae,) = VAELoader().run(RecordingContext(env), "sd_vae.safetensors")
    assert vae.vae.config.latent_channels == 4 and vae.source == "sd_vae.safetensors"
    (pixel,) = VAELoader().run(RecordingContext(env), "pixel_space")
    assert isinstance(pixel.vae, PixelSpaceVae)
    assert VAELoader.input("vae_name").fingerprint(env, "sd_vae.safetensors") is not None

    # Loaded through the model store: a second workflow gets the very same weights, /free drops them
    store = model_store(env)
    assert store.kinds() == ["vae"] and store.loads == 1
    (again,) = VAELoader().run(RecordingContext(env, "2"), "sd_vae.safetensors")
    assert again.vae is vae.vae and store.loads == 1
    store.free(unload_models=True, free_memory=False)
    assert store.kinds() == []
    (fresh,) = VAELoader().run(RecordingContext(env, "3"), "sd_vae.safetensors")
    assert fresh.vae is not vae.vae and store.loads == 2


# ---- the store itself, with a stand-in loader (no weights needed to test its bookkeeping)


def _fake_store(calls: list[Path], capacity: int = 2, delay: float = 0.0) -> ModelStore:
    def loader(path: Path) -> Any:
        time.sleep(delay)
        calls.append(path)
        return object()

    return ModelStore(capacity=capacity, loader=loader)


def test_store_reloads_a_changed_file_and_keeps_at_most_capacity(tmp_path: Path) -> None:
    files = [tmp_path / f"{n}.safetensors" for n in "abc"]
    for f in files:
        f.write_bytes(b"1")
    calls: list[Path] = []
    store = _fake_store(calls)
    a1 = store.checkpoint(files[0])
    assert store.checkpoint(files[0]) is a1 and len(calls) == 1
    files[0].write_bytes(b"22")  # new size: a different file
    assert store.checkpoint(files[0]) is not a1 and len(calls) == 2
    assert store.loaded() == [str(files[0].resolve())]  # the old version is forgotten
    store.checkpoint(files[1])
    store.checkpoint(files[2])
    assert len(store.loaded()) == 2 and str(files[0].resolve()) not in store.loaded()


def test_store_loads_a_file_once_when_asked_from_two_threads(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"1")
    calls: list[Path] = []
    store = _fake_store(calls, delay=0.2)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(store.checkpoint(path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] is results[1] is results[2]


def test_a_failed_load_leaves_no_lock_behind_and_a_later_load_works(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"1")
    attempts: list[Path] = []

    def loader(p: Path) -> Any:
        attempts.append(p)
        if len(attempts) == 1:
            raise CheckpointError("broken on the first read")
        return object()

    store = ModelStore(loader=loader)
    with pytest.raises(CheckpointError, match="first read"):
        store.checkpoint(path)
    assert store._key_locks == {} and store.loaded() == [] and store.loads == 0
    loaded = store.checkpoint(path)
    assert store.checkpoint(path) is loaded and len(attempts) == 2 and store._key_locks == {}


def test_store_keeps_one_entry_per_kind_and_files_and_drops_every_kind_of_a_changed_file(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"1")
    b.write_bytes(b"1")
    store = ModelStore(capacity=4)
    made: list[str] = []

    def make(label: str) -> Any:
        made.append(label)
        return object()

    plain = store.load("unet:default", (a,), lambda: make("plain"))
    assert store.load("unet:default", (a,), lambda: make("again")) is plain
    fp8 = store.load("unet:fp8_e4m3fn", (a,), lambda: make("fp8"))
    store.load("clip:sdxl", (a, b), lambda: make("pair"))
    assert fp8 is not plain and made == ["plain", "fp8", "pair"] and store.loads == 3
    assert store.kinds() == ["unet:default", "unet:fp8_e4m3fn", "clip:sdxl"]
    a.write_bytes(b"22")  # a new version of a: every entry made from the old one goes
    store.load("unet:default", (a,), lambda: make("new"))
    assert store.kinds() == ["unet:default"] and made[-1] == "new"


def test_model_store_is_one_service_per_environment(env: Environment) -> None:
    assert model_store(env) is model_store(env)
    assert isinstance(model_store(env), ModelStore)


def test_diffusers_loader_lists_pipeline_folders_and_explains_a_broken_one(env: Environment) -> None:
    from nodes.loaders import DiffusersLoader

    pipe = env.folders.paths("diffusers")[0] / "vendor" / "my_sd15"
    pipe.mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    assert DiffusersLoader.info(env)["input"]["required"]["model_path"][0] == ["vendor/my_sd15"]
    with pytest.raises(CheckpointError, match="'my_sd15' is not a diffusers folder: unet/config.json"):
        DiffusersLoader().run(RecordingContext(env), "vendor/my_sd15")
