"""The kohya_ss guide's run on stand-in images: regularisation, buckets, epoch and step saves with
states, samples, the loss log, kohya's metadata, and a bit-identical resume."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nodegraph import train_config
from nodegraph.cli import main
from nodegraph.folders import Folders
from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.train.request import from_values
from nodes.train.run import TrainHooks, train_lora
from nodes.train.samples import SamplePrompt, read_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

# Every key kohya's train_network.py (sd-scripts 48d368f) writes for an SD1.x DreamBooth-folder
# run without --network_args/--vae/--dataset_config (lines 1003-1065, 1181-1213, 1301-1303, and
# sai_model_spec.build_metadata): 83 ss_ keys, 8 modelspec keys.
KOHYA_KEYS = {
    "ss_session_id",
    "ss_training_started_at",
    "ss_output_name",
    "ss_learning_rate",
    "ss_text_encoder_lr",
    "ss_unet_lr",
    "ss_num_train_images",
    "ss_num_validation_images",
    "ss_num_reg_images",
    "ss_num_batches_per_epoch",
    "ss_num_epochs",
    "ss_gradient_checkpointing",
    "ss_gradient_accumulation_steps",
    "ss_max_train_steps",
    "ss_lr_warmup_steps",
    "ss_lr_scheduler",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_dropout",
    "ss_mixed_precision",
    "ss_full_fp16",
    "ss_v2",
    "ss_base_model_version",
    "ss_clip_skip",
    "ss_max_token_length",
    "ss_cache_latents",
    "ss_seed",
    "ss_lowram",
    "ss_noise_offset",
    "ss_multires_noise_iterations",
    "ss_multires_noise_discount",
    "ss_adaptive_noise_scale",
    "ss_zero_terminal_snr",
    "ss_training_comment",
    "ss_sd_scripts_commit_hash",
    "ss_optimizer",
    "ss_max_grad_norm",
    "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs",
    "ss_caption_tag_dropout_rate",
    "ss_face_crop_aug_range",
    "ss_prior_loss_weight",
    "ss_min_snr_gamma",
    "ss_scale_weight_norms",
    "ss_ip_noise_gamma",
    "ss_debiased_estimation",
    "ss_noise_offset_random_strength",
    "ss_ip_noise_gamma_random_strength",
    "ss_loss_type",
    "ss_huber_schedule",
    "ss_huber_scale",
    "ss_huber_c",
    "ss_fp8_base",
    "ss_fp8_base_unet",
    "ss_validation_seed",
    "ss_validation_split",
    "ss_max_validation_steps",
    "ss_validate_every_n_epochs",
    "ss_validate_every_n_steps",
    "ss_resize_interpolation",
    "ss_batch_size_per_device",
    "ss_total_batch_size",
    "ss_resolution",
    "ss_color_aug",
    "ss_flip_aug",
    "ss_random_crop",
    "ss_shuffle_caption",
    "ss_enable_bucket",
    "ss_bucket_no_upscale",
    "ss_min_bucket_reso",
    "ss_max_bucket_reso",
    "ss_keep_tokens",
    "ss_dataset_dirs",
    "ss_reg_dataset_dirs",
    "ss_tag_frequency",
    "ss_bucket_info",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
    "ss_sd_model_name",
    "ss_training_finished_at",
    "ss_steps",
    "ss_epoch",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.date",
    "modelspec.implementation_version",
    "modelspec.prediction_type",
}


def _picture(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Path:
    """`img/6_lisabp woman/` (3 images, two captioned, two aspect ratios), `reg/1_woman/` (2 images)."""
    root = tmp_path_factory.mktemp("guide")
    folder = root / "img" / "6_lisabp woman"
    for i, size in enumerate([(96, 80), (64, 128), (64, 64)]):
        _picture(folder / f"{i}.png", size, i)
    (folder / "0.txt").write_text("lisabp woman, red dress", encoding="utf-8")
    (folder / "1.txt").write_text("lisabp woman, smiling", encoding="utf-8")
    _picture(root / "reg" / "1_woman" / "r0.png", (64, 64), 10)
    _picture(root / "reg" / "1_woman" / "r1.png", (48, 96), 11)
    (root / "prompts.txt").write_text("# sample\nlisabp woman --n blurry --w 64 --h 64 --d 1 --l 7.5 --s 2\n")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "loras").mkdir(parents=True)
    (root / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    return root


def _values(guide: Path, **extra: object) -> dict[str, object]:
    given = {
        "pretrained_model_name_or_path": "mini.safetensors", "train_data_dir": guide / "img",
        "reg_data_dir": guide / "reg", "output_name": "lisa", "max_train_epochs": 2, "network_dim": 2,
        "network_alpha": 1, "learning_rate": 1e-3, "train_batch_size": 8, "resolution": "64,64",
        "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
        "network_train_unet_only": True,
        "lr_scheduler": "cosine", "lr_warmup_steps": 2, "save_every_n_epochs": 1, "save_every_n_steps": 3,
        "save_last_n_steps": 3, "save_state": True, "sample_prompts": guide / "prompts.txt",
        "sample_every_n_epochs": 1, "seed": 4,
    } | extra  # fmt: skip
    values, _ = train_config.resolve(given)
    return values


@pytest.fixture(scope="module")
def run_a(guide: Path, models: LoadedCheckpoint) -> tuple[list[Path], list[list[Path]]]:
    samples: list[list[Path]] = []
    request = from_values(_values(guide), device="cpu")
    written = train_lora(Folders.at(guide), request, models=models, hooks=TrainHooks(sampled=samples.append))
    return written, samples


def test_the_guide_run_saves_and_counts_as_kohya(
    guide: Path, run_a: tuple[list[Path], list[list[Path]]]
) -> None:
    written, samples = run_a
    # 3 images x 6 = 18, reg balanced to 18; buckets (64,64): 6+6+9 = 21, (32,96): 6+9 = 15;
    # batch 8 -> 3 + 2 = 5 steps per epoch (without reg: 2 + 1 = 3), 2 epochs = 10 steps
    assert [p.name for p in written] == [
        "lisa-000001.safetensors",
        "lisa-step00000006.safetensors",
        "lisa-step00000009.safetensors",
        "lisa.safetensors",
    ]
    loras = guide / "models" / "loras"
    assert sorted(p.name for p in loras.iterdir()) == [
        "lisa-000001.safetensors",
        "lisa-step00000006.safetensors",
        "lisa-step00000009.safetensors",
        "lisa.safetensors",
    ]  # step 3's save was removed by --save_last_n_steps 3 at step 9, as kohya's get_remove_step_no
    out = guide / "output" / "lisa"
    assert sorted(p.name for p in out.iterdir() if p.name.endswith("-state")) == [
        "lisa-000001-state",
        "lisa-state",
        "lisa-step00000006-state",
        "lisa-step00000009-state",
    ]
    with safe_open(str(loras / "lisa.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == KOHYA_KEYS
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_num_batches_per_epoch"]) == (
        "18",
        "2",
        "5",
    )
    assert (meta["ss_max_train_steps"], meta["ss_steps"], meta["ss_epoch"], meta["ss_num_epochs"]) == (
        "10",
        "10",
        "2",
        "2",
    )
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_woman": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_bucket_info"])["buckets"] == {
        "0": {"resolution": [32, 96], "count": 15},
        "1": {"resolution": [64, 64], "count": 21},
    }
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert (
        meta["ss_network_alpha"] == "1.0"
        and meta["ss_unet_lr"] == "None"
        and meta["ss_lr_scheduler"] == "cosine"
    )
    assert meta["ss_text_encoder_lr"] == "None" and meta["ss_max_grad_norm"] == "1.0"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.prediction_type"] == "epsilon"
    assert len(meta["ss_new_sd_model_hash"]) == 64 and len(meta["ss_sd_model_hash"]) == 8
    with safe_open(str(loras / "lisa-000001.safetensors"), framework="pt") as f:
        first = f.metadata()
    assert (first["ss_epoch"], first["ss_steps"]) == ("1", "5") and first["ss_session_id"] == meta[
        "ss_session_id"
    ]
    # samples every epoch, at the prompt's size, named as kohya names them
    assert len(samples) == 2 and all(len(s) == 1 for s in samples)
    assert samples[0][0].parent == out / "samples" and samples[0][0].name.startswith("lisa_e000001_00_")
    assert samples[1][0].name.endswith("_1.png") and Image.open(samples[1][0]).size == (64, 64)


def test_the_loss_is_logged_as_csv_tensorboard_and_a_plot(guide: Path, run_a: object) -> None:
    out = guide / "output" / "lisa"
    with (out / "loss.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    lrs = [float(r["lr_unet"]) for r in rows]
    assert (
        lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] < lrs[2]
    )  # warmup 2, cosine
    (events,) = (out / "tensorboard").iterdir()
    data, tags = events.read_bytes(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        tags.append(data[12 : 12 + length])
        data = data[16 + length :]
    assert len(tags) == 11 and b"brain.Event:2" in tags[0] and all(b"loss/average" in t for t in tags[1:])
    assert Image.open(out / "loss.png").size == (640, 360)


def test_resuming_from_a_mid_epoch_state_continues_bit_identically(
    guide: Path, models: LoadedCheckpoint, run_a: object
) -> None:
    loras = guide / "models" / "loras"
    with safe_open(str(loras / "lisa.safetensors"), framework="pt") as f:
        expected = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state = guide / "output" / "lisa" / "lisa-step00000006-state"  # epoch 2, one batch in
    values = _values(
        guide,
        output_name="again",
        resume=state,
        save_every_n_steps=None,
        sample_every_n_epochs=None,
        sample_prompts=None,
        save_state=False,
        save_every_n_epochs=None,
    )
    (path,) = train_lora(Folders.at(guide), from_values(values, device="cpu"), models=models)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "10"
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_cli_runs_from_a_kohya_config_file_with_flags_over_it(
    guide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = guide / "lisa.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "mini.safetensors"\ntrain_data_dir = "{guide / "img"}"\n'
        'output_name = "fromtoml"\nresolution = "64,64"\nnetwork_dim = 2\nnetwork_alpha = 2\n'
        "max_train_steps = 1\nnetwork_train_unet_only = true\ncache_latents_to_disk = true\n"
        'mixed_precision = "bf16"\nnetwork_args = ["conv_dim=2", "conv_alpha=1"]\nsdpa = true\n',
        encoding="utf-8",
    )
    argv = [
        "train-lora",
        "--base-directory",
        str(guide),
        "--config_file",
        str(config),
        "--cpu",
        "--optimizer-type",
        "Lion",
        "--learning_rate",
        "1e-5",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    path = guide / "models" / "loras" / "fromtoml.safetensors"
    assert str(path) in out and "not used by nodegraph: sdpa" in err
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())  # noqa: SIM118
    assert meta["ss_optimizer"] == "lion_pytorch.lion_pytorch.Lion" and meta["ss_learning_rate"] == "1e-05"
    assert meta["ss_mixed_precision"] == "bf16" and meta["ss_cache_latents"] == "True"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # LoCon: 3x3 convs adapted
    assert sorted(p.name for p in (guide / "img" / "6_lisabp woman").glob("*.nodegraph.npz")) == [
        "0.nodegraph.npz",
        "1.nodegraph.npz",
        "2.nodegraph.npz",
    ]
    assert main([*argv, "--overwrite"]) == 0
    assert "read from their disk cache" in capsys.readouterr().err


# The kohya_ss guide's sample prompt line, as it gives it.
GUIDE_PROMPT = (
    "masterpiece, best quality, lisabp woman, looking at viewer --n low quality, worst quality, "
    "bad anatomy --w 512 --h 512 --d 1 --l 7.5 --s 20"
)


def test_the_guides_sample_prompt_line_reads_as_kohya_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "prompt.txt"
    path.write_text(f"# the guide's line\n{GUIDE_PROMPT}\n", encoding="utf-8")
    assert read_prompts(path) == [
        SamplePrompt(
            "masterpiece, best quality, lisabp woman, looking at viewer",
            "low quality, worst quality, bad anatomy",
            width=512, height=512, seed=1, scale=7.5, steps=20,
        )
    ]  # fmt: skip


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Path:
    """The guide's example: `img/6_lisabp woman/` (a captioned image), `reg/1_woman/` (one image),
    and its sample line scaled to the mini model (64x64, 1 step; same options otherwise)."""
    root = tmp_path_factory.mktemp("example")
    folder = root / "img" / "6_lisabp woman"
    _picture(folder / "0.png", (64, 64), 20)
    (folder / "0.txt").write_text("lisabp woman, photo 0\n", encoding="utf-8")
    _picture(root / "reg" / "1_woman" / "r0.png", (64, 64), 30)
    scaled = GUIDE_PROMPT.replace("--w 512 --h 512", "--w 64 --h 64").replace("--s 20", "--s 1")
    (root / "prompt.txt").write_text(scaled + "\n", encoding="utf-8")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "loras").mkdir(parents=True)
    (root / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    return root


def _check_example_run(root: Path, name: str, out: str) -> dict[str, torch.Tensor]:
    """10 epochs of 2 steps (an image x 6 repeats, the regularisation image stretched to 6: 12 per
    epoch, batch 6; 1 step without it), a file per epoch, a sample per epoch; returns the final
    file's tensors."""
    loras = root / "models" / "loras"
    names = [f"{name}-{e:06d}.safetensors" for e in range(1, 10)] + [f"{name}.safetensors"]
    assert out.split() == [str(loras / n) for n in names]
    sessions = set()
    for epoch, file_name in enumerate(names, 1):
        with safe_open(str(loras / file_name), framework="pt") as f:
            meta = f.metadata()
        assert set(meta) == KOHYA_KEYS
        assert (meta["ss_epoch"], meta["ss_steps"]) == (str(epoch), str(2 * epoch))
        sessions.add(meta["ss_session_id"])
    assert len(sessions) == 1  # kohya's session id groups the files of one run
    counts = ("ss_max_train_steps", "ss_num_epochs", "ss_num_batches_per_epoch", "ss_num_train_images")
    assert [meta[k] for k in counts] == ["20", "10", "2", "6"]  # kohya: 6 = 1 image x 6 repeats
    assert (meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("1", "1.0")
    assert json.loads(meta["ss_dataset_dirs"]) == {"6_lisabp woman": {"n_repeats": 6, "img_count": 1}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_woman": {"n_repeats": 1, "img_count": 1}}
    assert [meta[k] for k in ("ss_network_dim", "ss_network_alpha", "ss_lr_scheduler")] == [
        "8",
        "1.0",
        "cosine",
    ]
    assert json.loads(meta["ss_tag_frequency"]) == {  # the regularisation folder counted too, as kohya
        "6_lisabp woman": {"lisabp woman": 1, "photo 0": 1},
        "1_woman": {"woman": 1},
    }
    folder = root / "output" / name
    samples = sorted(p.name for p in (folder / "samples").iterdir())
    assert [s[: len(name) + 8] for s in samples] == [f"{name}_e{e:06d}" for e in range(1, 11)]
    assert all(s.endswith("_1.png") for s in samples)  # --d 1: the seed, in kohya's file name
    assert all(Image.open(folder / "samples" / s).size == (64, 64) for s in samples)
    with (folder / "loss.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert [int(r["epoch"]) for r in rows] == [e for e in range(1, 11) for _ in range(2)]
    assert (
        Image.open(folder / "loss.png").size == (640, 360)
        and len(list((folder / "tensorboard").iterdir())) == 1
    )
    with safe_open(str(loras / f"{name}.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_the_guides_example_runs_from_the_command_line_and_from_a_config_file(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's command (kohya's flags) and the same run as the kohya_ss GUI writes its TOML
    (`max_train_steps` worked out from `epoch`, the text encoder rate as a list, keys nodegraph does
    not use) make the same LoRA, with kohya's step counts, saves, samples, loss log and metadata."""
    flags = [
        "--pretrained_model_name_or_path", "mini.safetensors", "--train_data_dir", str(example / "img"),
        "--reg_data_dir", str(example / "reg"), "--output_name", "lisa", "--max_train_epochs", "10",
        "--save_every_n_epochs", "1", "--network_dim", "8", "--network_alpha", "1", "--learning_rate", "1e-4",
        "--lr_scheduler", "cosine", "--cache_latents", "--sample_prompts", str(example / "prompt.txt"),
        "--sample_every_n_epochs", "1", "--train_batch_size", "6", "--resolution", "64,64",
        "--min_bucket_reso", "64", "--network_train_unet_only", "--seed", "1234",
    ]  # fmt: skip
    common = ["train-lora", "--base-directory", str(example), "--cpu"]
    assert main([*common, *flags]) == 0
    from_flags = _check_example_run(example, "lisa", capsys.readouterr().out)
    config = example / "config_lora.toml"
    config.write_text(
        f'bucket_reso_steps = 64\ncache_latents = true\ncaption_extension = ".txt"\nenable_bucket = true\n'
        f'epoch = 10\nlearning_rate = 0.0001\nlr_scheduler = "cosine"\nmax_bucket_reso = 1024\n'
        f"max_data_loader_n_workers = 0\nmax_grad_norm = 1\nmax_train_steps = 20\nmin_bucket_reso = 64\n"
        f'mixed_precision = "no"\nnetwork_alpha = 1\nnetwork_dim = 8\nnetwork_module = "networks.lora"\n'
        f'network_train_unet_only = true\noutput_name = "lisa_gui"\n'
        f'pretrained_model_name_or_path = "mini.safetensors"\nprior_loss_weight = 1\n'
        f'reg_data_dir = "{example / "reg"}"\nresolution = "64,64"\nsample_every_n_epochs = 1\n'
        f'sample_prompts = "{example / "prompt.txt"}"\nsample_sampler = "euler_a"\nsave_every_n_epochs = 1\n'
        f'save_model_as = "safetensors"\nsave_precision = "fp16"\nsdpa = true\nseed = 1234\n'
        f'text_encoder_lr = [ 5e-5, 5e-5,]\ntrain_batch_size = 6\ntrain_data_dir = "{example / "img"}"\n',
        encoding="utf-8",
    )
    assert main([*common, "--config_file", str(config), "--sample_sampler", "ddim"]) == 0
    out, err = capsys.readouterr()
    from_config = _check_example_run(example, "lisa_gui", out)
    assert "not used by nodegraph: epoch, max_data_loader_n_workers, save_model_as, sdpa" in err
    assert "text_encoder_lr" not in err  # the GUI's [TE, TE]: nothing unused to report
    assert from_config.keys() == from_flags.keys()
    assert all(torch.equal(from_config[k], from_flags[k]) for k in from_flags)
    with safe_open(str(example / "models" / "loras" / "lisa_gui.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_text_encoder_lr"] == "5e-05"
