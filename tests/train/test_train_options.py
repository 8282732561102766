"""kohya's rules without a model: buckets, regularisation balancing, captions, options, schedules, files."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph import train_config
from nodegraph.folders import Folders
from nodes.sd.tokenizer import default_tokenizer
from nodes.train.buckets import Buckets, batches_per_epoch, bucket_info, bucket_resolutions
from nodes.train.captions import CaptionOptions, chunked_ids, join_chunks, process_caption
from nodes.train.dataset import DatasetError, load_dataset
from nodes.train.logs import LossRecorder, crc32c, event_bytes, record
from nodes.train.optim import OptimizerError, make_optimizer, make_scheduler, optimizer_name
from nodes.train.request import TrainRequest, from_values
from nodes.train.save import OutputError, lora_path, save_lora


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)


# (max_reso, min, max, steps, no_upscale, image size) -> (bucket, resized size), as kohya's
# BucketManager.select_bucket at sd-scripts 48d368f computes them (run on these inputs).
KOHYA_BUCKETS = [
    ((512, 512), 256, 1024, 64, False, (96, 80), (576, 448), (576, 480)),
    ((512, 512), 256, 1024, 64, False, (64, 128), (320, 704), (352, 704)),
    ((512, 512), 256, 1024, 64, False, (1024, 683), (640, 384), (640, 427)),
    ((512, 512), 256, 1024, 64, False, (300, 301), (512, 512), (512, 514)),
    ((512, 512), 256, 1024, 64, False, (77, 333), (256, 1024), (256, 1107)),
    ((128, 128), 64, 256, 32, False, (1920, 1080), (160, 96), (171, 96)),
    ((512, 512), 256, 1024, 64, True, (1024, 683), (576, 384), (576, 384)),
    ((512, 512), 256, 1024, 64, True, (300, 301), (256, 256), (300, 301)),
    ((768, 512), 320, 1024, 64, False, (640, 480), (704, 512), (704, 528)),
    ((768, 512), 320, 1024, 64, False, (2000, 500), (1024, 320), (1280, 320)),
]


@pytest.mark.parametrize("case", KOHYA_BUCKETS)
def test_buckets_put_each_image_where_kohya_does(case: tuple) -> None:  # type: ignore[type-arg]
    max_reso, lo, hi, steps, no_upscale, size, bucket, resized = case
    assert Buckets(max_reso, True, lo, hi, steps, no_upscale).select(*size)[:2] == (bucket, resized)


def test_bucket_resolutions_are_kohyas_list() -> None:
    resos = bucket_resolutions((512, 512), 256, 1024, 64)
    # kohya's make_bucket_resolutions((512, 512), 256, 1024, 64) at 48d368f: 17 sizes, sorted
    assert (
        resos[:4] == [(256, 832), (256, 896), (256, 960), (256, 1024)]
        and resos[-1] == (1024, 256)
        and len(resos) == 17
    )
    assert (512, 512) in resos and all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in resos)


def _guide(tmp_path: Path, reg_count: int) -> tuple[Path, Path]:
    for i in range(10):
        _image(tmp_path / "img" / "6_lisabp woman" / f"{i}.png", (64, 64))
    for i in range(reg_count):
        _image(tmp_path / "reg" / "1_woman" / f"r{i:03d}.png", (64, 64))
    return tmp_path / "img", tmp_path / "reg"


def test_regularisation_images_double_the_steps_as_in_kohya(tmp_path: Path) -> None:
    img, reg = _guide(tmp_path, 204)  # the guide's example: 204 reg images, only 60 used per epoch
    plain, with_reg = load_dataset(img), load_dataset(img, reg_root=reg)
    assert plain.num_train_images == with_reg.num_train_images == 60 and with_reg.num_reg_images == 204
    buckets = Buckets((512, 512))
    assert batches_per_epoch(plain.balanced_items(), buckets, 1) == 60
    assert batches_per_epoch(with_reg.balanced_items(), buckets, 1) == 120  # x2
    assert batches_per_epoch(with_reg.balanced_items(), buckets, 4) == 30
    assert len(with_reg.epoch_items()) == 120
    assert sum(1 for s in with_reg.epoch_items() if s.is_reg) == 60
    assert with_reg.dataset_dirs(reg=True) == {"1_woman": {"n_repeats": 1, "img_count": 204}}


def test_few_regularisation_images_are_repeated_round_robin(tmp_path: Path) -> None:
    img, reg = _guide(tmp_path, 7)  # 60 training images: 7 reg images grow to 9,9,9,9,8,8,8
    items = load_dataset(img, reg_root=reg).balanced_items()
    assert [r for s, r in items if s.is_reg] == [9, 9, 9, 9, 8, 8, 8]


def test_bucket_info_counts_repeats_like_kohya(tmp_path: Path) -> None:
    _image(tmp_path / "d" / "2_x" / "a.png", (96, 80))
    _image(tmp_path / "d" / "2_x" / "b.png", (64, 128))
    info = bucket_info(load_dataset(tmp_path / "d").balanced_items(), Buckets((512, 512)))
    assert info is not None and info["buckets"] == {
        0: {"resolution": (320, 704), "count": 2},
        1: {"resolution": (576, 448), "count": 2},
    }
    assert math.isclose(float(info["mean_img_ar_error"]), (abs(576 / 448 - 1.2) + abs(320 / 704 - 0.5)) / 2)


def test_dataset_mistakes_have_clear_messages(tmp_path: Path) -> None:
    _image(tmp_path / "img" / "5_zzkx cube" / "a.png", (64, 64))
    with pytest.raises(DatasetError, match="point --train_data_dir/--data at its parent"):
        load_dataset(tmp_path / "img" / "5_zzkx cube")
    _image(tmp_path / "zero" / "0_zzkx" / "a.png", (64, 64))
    with pytest.raises(DatasetError, match="'0_zzkx'.* has 0 repeats.*at least 1"):
        load_dataset(tmp_path / "zero")
    _image(tmp_path / "bare" / "5_" / "a.png", (64, 64))
    (tmp_path / "bare" / "sample_images").mkdir()  # no images: ignored, as kohya does
    bare = load_dataset(tmp_path / "bare")
    assert bare.samples[0].caption == "" and bare.missing_captions == [tmp_path / "bare" / "5_" / "a.png"]


def test_captions_lose_a_bom_and_an_empty_caption_file_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "d" / "1_cls"
    _image(folder / "a.png", (64, 64))
    (folder / "a.txt").write_bytes("\ufeffzzkx, red\nsecond line\n".encode())
    dataset = load_dataset(tmp_path / "d")
    assert dataset.samples[0].caption == "zzkx, red" and "zzkx" in dataset.tag_frequency()["1_cls"]
    (folder / "a.txt").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"a\.txt' is empty"):
        load_dataset(tmp_path / "d")


def test_a_corrupt_image_is_found_when_the_folder_is_read(tmp_path: Path) -> None:
    _image(tmp_path / "d" / "1_x" / "a.png", (64, 64))
    (tmp_path / "d" / "1_x" / "b.png").write_bytes((tmp_path / "d" / "1_x" / "a.png").read_bytes()[:120])
    with pytest.raises(DatasetError, match=r"b\.png' cannot be read"):
        load_dataset(tmp_path / "d")


def test_caption_shuffle_keeps_tokens_and_drops_as_asked() -> None:
    rng = __import__("random").Random(3)
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    seen = {process_caption("zzkx, a, b, c, d", opts, rng, 1) for _ in range(30)}
    assert len(seen) > 3 and all(
        s.startswith("zzkx, ") and sorted(s.split(", ")[1:]) == list("abcd") for s in seen
    )
    assert process_caption("zzkx, a", CaptionOptions(caption_dropout_every_n_epochs=2), rng, 2) == ""
    assert (
        process_caption("zzkx, a", CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1), rng, 1)
        == "zzkx"
    )


def test_long_captions_are_chunked_as_kohya_for_150_tokens() -> None:
    tok = default_tokenizer()
    chunks = chunked_ids("a " * 100, tok, 150)
    assert len(chunks) == 2 and all(len(c) == 77 and c[0] == tok.bos for c in chunks)
    hidden = torch.arange(2 * 77, dtype=torch.float32).view(2, 77, 1)
    joined = join_chunks(hidden, 2)
    # first BOS, 75 of each chunk, the last chunk's final position: 152 positions
    assert (
        joined.shape == (1, 152, 1)
        and joined[0, 0, 0] == 0
        and joined[0, 76, 0] == 78
        and joined[0, -1, 0] == 153
    )


def test_schedules_follow_warmup_and_cosine() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = make_scheduler("cosine", opt, 0.2, 10)  # a fraction: int(0.2 * 10) = 2 warmup steps
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert np.allclose(lrs, expected)
    with pytest.raises(OptimizerError, match="constant takes no warmup"):
        make_scheduler("constant", opt, 5, 10)


def test_options_come_from_flags_a_kohya_toml_and_defaults_in_that_order(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        '[model]\npretrained_model_name_or_path = "v1-5.safetensors"\n'
        '[dataset]\ntrain_data_dir = "img"\nreg_data_dir = "reg"\nresolution = "512,768"\n'
        '[training]\noutput_name = "lisa"\nlearning_rate = 0.0001\nlr_scheduler = "cosine"\n'
        'network_dim = 8\nnetwork_alpha = 1\nxformers = true\nnetwork_args = ["conv_dim=4"]\n',
        encoding="utf-8",
    )
    parser = __import__("argparse").ArgumentParser()
    train_config.add_arguments(parser)
    args = parser.parse_args(
        ["--config_file", str(config), "--learning-rate", "5e-4", "--unet-only", "--steps", "3"]
    )
    values, ignored = train_config.resolve(train_config.explicit(args), train_config.load_toml(config))
    assert ignored == ["xformers"]
    request = from_values(values)
    assert (request.checkpoint, request.output, request.steps) == ("v1-5.safetensors", "lisa", 3)
    o = request.options
    assert (o.learning_rate, o.lr_scheduler, o.rank, o.alpha, o.size) == (5e-4, "cosine", 8, 1.0, (512, 768))
    assert (o.train_text_encoder, o.enable_bucket, o.conv_dim, o.conv_alpha) == (False, True, 4, None)
    assert request.network_args == {"conv_dim": "4"} and request.reg_data == Path("reg")
    with pytest.raises(train_config.ConfigError, match="lr_scheduler.*'cosin'"):
        train_config.resolve({"lr_scheduler": "cosin"})


def test_text_encoder_lr_takes_one_or_more_values_and_uses_the_first_as_kohya(tmp_path: Path) -> None:
    """sd-scripts' `--text_encoder_lr` is `nargs="*"`; the kohya_ss GUI writes it as a TOML list
    (`[TE, TE]`). kohya's networks.lora (SD1.x and SDXL) has no per-encoder rates, so train_network.py
    passes the first value on, for both SDXL text encoders, and records it in ss_text_encoder_lr."""
    parser = __import__("argparse").ArgumentParser()
    train_config.add_arguments(parser)
    base = {"pretrained_model_name_or_path": "m", "train_data_dir": "img", "output_name": "x"}

    def request_of(**given: object) -> TrainRequest:
        values, _ = train_config.resolve(base | given)
        return from_values(values)

    args = parser.parse_args(["--text_encoder_lr", "5e-5", "1e-4"])
    assert train_config.explicit(args)["text_encoder_lr"] == [5e-5, 1e-4]
    request = request_of(text_encoder_lr=[5e-5, 1e-4])
    assert request.options.text_encoder_lr == 5e-5 and request.unused_text_encoder_lrs == [1e-4]
    assert request.values is not None and request.values["text_encoder_lr"] == 5e-5  # the metadata's
    config = tmp_path / "gui.toml"
    config.write_text("text_encoder_lr = [ 0.0001, 0.0001,]\nunet_lr = 0.0002\n", encoding="utf-8")
    values, _ = train_config.resolve(base, train_config.load_toml(config))
    assert values["text_encoder_lr"] == [1e-4, 1e-4]
    assert from_values(values).options.text_encoder_lr == 1e-4
    for given, expected in ((3e-5, 3e-5), ([], None), ("2e-5", 2e-5), ("1e-5 2e-5", 1e-5), (None, None)):
        assert request_of(text_encoder_lr=given).options.text_encoder_lr == expected
    assert request_of(text_encoder_lr=3e-5).unused_text_encoder_lrs == []
    assert train_config.explicit(parser.parse_args(["--text_encoder_lr"]))["text_encoder_lr"] == []
    for bad in ("fast", [1e-4, "x"], True):
        with pytest.raises(train_config.ConfigError, match="text_encoder_lr.*number or list of numbers"):
            train_config.resolve({"text_encoder_lr": bad})


def test_a_config_asking_for_what_nodegraph_does_not_train_is_refused_by_key() -> None:
    """A kohya_ss GUI config carries its defaults (`loss_type = "l2"`, `max_timestep = 1000`, empty
    lists), which change nothing; a key set otherwise would train something else than kohya, so the
    run is refused naming it rather than trained without it."""
    harmless = {
        "loss_type": "l2",
        "max_timestep": 1000,
        "lr_scheduler_args": [],
        "huber_c": 0.1,
        "xformers": True,
    }
    values, ignored = train_config.resolve({}, harmless)
    assert sorted(ignored) == sorted(harmless) and values["network_module"] == "networks.lora"
    for key, value in (
        ("loss_type", "huber"), ("v_parameterization", True), ("network_train_text_encoder_only", True),
        ("multires_noise_iterations", 6), ("vae", "sdxl_vae.safetensors"), ("random_crop", True),
    ):  # fmt: skip
        with pytest.raises(train_config.ConfigError, match=f"sets {key} = {value!r}: not supported"):
            train_config.resolve({}, harmless | {key: value})
    with pytest.raises(
        train_config.ConfigError, match="network_module: 'lycoris.kohya' is not one of networks.lora"
    ):
        train_config.resolve({}, {"network_module": "lycoris.kohya"})


def test_an_empty_or_odd_output_name_is_refused(tmp_path: Path) -> None:
    folders = Folders.at(tmp_path)
    for bad in ("", " ", ".", ".hidden", "x/", "a/b", "name.", "tab\there"):
        with pytest.raises(OutputError, match="--output"):
            lora_path(folders, bad)
    assert lora_path(folders, "lisa").name == "lisa.safetensors"


def test_saved_files_are_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_lora({"a.alpha": torch.ones(())}, {"k": "v"}, tmp_path / "x.safetensors", "fp16")
    finally:
        os.umask(old)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644


def test_event_records_are_framed_as_tensorboard_reads_them() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = record(event_bytes(1.5, 7, {"loss/current": 0.25}))
    (length,) = struct.unpack("<Q", data[:8])
    body = data[12 : 12 + length]
    assert struct.unpack("<d", body[1:9])[0] == 1.5 and body[9:11] == b"\x10\x07"
    assert b"loss/current" in body and struct.pack("<f", 0.25) in body and len(data) == 16 + length


def test_the_moving_average_is_kohyas() -> None:
    rec = LossRecorder()
    for step, loss in enumerate([1.0, 2.0, 3.0]):
        rec.add(0, step, loss)
    rec.add(1, 0, 4.0)  # the second epoch replaces its first step's loss
    assert rec.moving_average == pytest.approx(3.0)


def test_optimizer_args_are_read_as_kohya_reads_them() -> None:
    from nodes.train.optim import make_optimizer, optimizer_name
    from nodes.train_node import extra_flags

    given = ["weight_decay=0.1", "betas=(0.9,0.99)", "eps=1e-6"]
    values, _ = train_config.resolve({"optimizer_args": given})
    kwargs = train_config.optimizer_args(values)
    assert kwargs == {"weight_decay": 0.1, "betas": (0.9, 0.99), "eps": 1e-6}
    param = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer("AdamW", [{"params": [param], "lr": 1e-3}], 1e-3, torch.device("cpu"), kwargs)
    assert (opt.defaults["weight_decay"], opt.defaults["betas"], opt.defaults["eps"]) == (
        0.1,
        (0.9, 0.99),
        1e-6,
    )
    assert (
        optimizer_name(opt, kwargs) == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99),eps=1e-06)"
    )
    assert extra_flags("--optimizer_args weight_decay=0.1 'betas=(0.9,0.99)' --flip_aug")[
        "optimizer_args"
    ] == [
        "weight_decay=0.1",
        "betas=(0.9,0.99)",
    ]
    for bad, message in (("weight_decay", "must be key=value"), ("mode=fast", "not a Python literal")):
        with pytest.raises(train_config.ConfigError, match=message):
            train_config.optimizer_args({"optimizer_args": [bad]})
    with pytest.raises(OptimizerError, match="nope"):
        make_optimizer("AdamW", [{"params": [param]}], 1e-3, torch.device("cpu"), {"nope": 1})


def test_adafactor_follows_kohyas_defaults() -> None:
    from transformers.optimization import Adafactor, AdafactorSchedule

    from nodes.train.optim import make_optimizer, optimizer_name

    values, _ = train_config.resolve(
        {"pretrained_model_name_or_path": "m", "train_data_dir": "d", "output_name": "o",
         "optimizer_type": "Adafactor", "learning_rate": 2e-4, "unet_lr": 3e-4}
    )  # fmt: skip
    request = from_values(values)
    o = request.options
    # relative_step on by default: the rate is the schedule's initial value; kohya's metadata clears the rates
    assert o.optimizer_args == {"relative_step": True} and o.lr_scheduler == "adafactor:0.0002"
    assert (o.learning_rate, o.unet_lr) == (2e-4, 3e-4)
    assert request.values is not None
    assert [request.values[k] for k in ("learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler")] == [
        None, None, None, "adafactor:0.0002",
    ]  # fmt: skip
    param = torch.nn.Parameter(torch.ones(4, 4))
    opt = make_optimizer(
        "Adafactor", [{"params": [param], "lr": 3e-4}], 2e-4, torch.device("cpu"), o.optimizer_args
    )
    assert isinstance(opt, Adafactor) and opt.param_groups[0]["lr"] is None
    assert optimizer_name(opt, o.optimizer_args) == "transformers.optimization.Adafactor(relative_step=True)"
    sched = make_scheduler(o.lr_scheduler, opt, 0, 10)
    assert isinstance(sched, AdafactorSchedule) and sched.get_last_lr() == [2e-4]
    param.grad = torch.full((4, 4), 0.5)
    opt.step()
    sched.step()
    assert not torch.equal(param.detach(), torch.ones(4, 4))  # it moved, at a rate of its own choosing
    assert sched.get_last_lr()[0] != 2e-4
    with pytest.raises(OptimizerError, match="no warmup"):
        make_scheduler(o.lr_scheduler, opt, 2, 10)
    with pytest.raises(OptimizerError, match="needs optimizer_type Adafactor"):
        make_scheduler("adafactor", torch.optim.AdamW([param]), 0, 10)
    # warmup_init forces relative_step; relative_step=False keeps the rate and the schedule asked for
    assert train_config.adafactor_rules(values, {"relative_step": False, "warmup_init": True})[1][
        "relative_step"
    ]
    kept, kwargs = train_config.adafactor_rules(
        values | {"lr_scheduler": "constant_with_warmup"}, {"relative_step": False}
    )
    assert (kept["learning_rate"], kept["lr_scheduler"], kwargs) == (
        2e-4,
        "constant_with_warmup",
        {"relative_step": False},
    )


def test_optimizers_and_schedules_by_kohyas_names() -> None:
    """Prodigy and Lion from their packages (kohya's ss_optimizer names), AdamW8bit refused with what
    to do where bitsandbytes or CUDA is missing; linear, polynomial and cosine_with_restarts follow
    diffusers' formulas (the functions kohya calls)."""
    param = torch.nn.Parameter(torch.zeros(2))
    cpu = torch.device("cpu")
    for name, expected in (
        ("Prodigy", "prodigyopt.prodigy.Prodigy"),
        ("Lion", "lion_pytorch.lion_pytorch.Lion"),
    ):
        opt = make_optimizer(name, [{"params": [param], "lr": 1.0}], 1.0, cpu)
        assert optimizer_name(opt) == expected
    with pytest.raises(OptimizerError, match="AdamW8bit (needs the bitsandbytes package|runs on a CUDA GPU)"):
        make_optimizer("AdamW8bit", [{"params": [param]}], 1e-4, cpu)
    with pytest.raises(OptimizerError, match="'SGDNesterov' is not supported; use AdamW"):
        make_optimizer("SGDNesterov", [{"params": [param]}], 1e-4, cpu)

    def rates(name: str, **kw: Any) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(name, opt, 2, 10, **kw)
        out = []
        for _ in range(10):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert np.allclose(rates("linear"), [0, 0.5] + [(10 - s) / 8 for s in range(2, 10)])
    assert np.allclose(rates("polynomial", power=2.0), [0, 0.5] + [((10 - s) / 8) ** 2 for s in range(2, 10)])
    restarts = [0, 0.5] + [0.5 * (1 + math.cos(math.pi * ((2 * (s - 2) / 8) % 1))) for s in range(2, 10)]
    assert np.allclose(rates("cosine_with_restarts", cycles=2), restarts)


def test_network_dropout_drops_the_down_output_while_training_only() -> None:
    """kohya's `--network_dropout p` (`LoRAModule.forward`): dropout on `lora_down(x)` while
    training, `up(dropout(down(x))) * multiplier * alpha/rank`; none in eval (sampling)."""
    from nodes.train.network import LoRAModule

    torch.manual_seed(0)
    lora = LoRAModule("lora_unet_x", torch.nn.Linear(8, 8), rank=4, alpha=2, dropout=0.5)
    torch.nn.init.ones_(lora.lora_up.weight)
    x = torch.randn(16, 8)
    plain = lora.lora_up(lora.lora_down(x)) * 0.5
    lora.eval()
    assert torch.equal(lora.delta(x), plain)
    lora.train()
    torch.manual_seed(5)
    got = lora.delta(x)
    torch.manual_seed(5)
    expected = lora.lora_up(torch.nn.functional.dropout(lora.lora_down(x), p=0.5)) * 0.5
    assert torch.equal(got, expected) and not torch.allclose(got, plain)


def test_save_last_n_epochs_keeps_kohyas_files(tmp_path: Path) -> None:
    """kohya's `get_remove_epoch_no`: after saving epoch e, the save of epoch e - every * keep goes
    (with its state folder); `--save_last_n_epochs 2 --save_every_n_epochs 2` over 8 epochs keeps 6, 8."""
    from nodes.train.run import _Plan, _remove_old_epoch
    from nodes.train.save import epoch_path
    from nodes.train.trainer import TrainOptions

    final = tmp_path / "loras" / "lisa.safetensors"
    final.parent.mkdir()
    plan = _Plan(final, tmp_path / "out", per_epoch=1, max_steps=10, num_epochs=10)
    request = TrainRequest("m", tmp_path, "lisa", TrainOptions(), save_every_n_epochs=2, save_last_n_epochs=2)
    written: list[Path] = []
    for epoch in (2, 4, 6, 8):
        epoch_path(final, epoch).write_bytes(b"x")
        (tmp_path / "out" / f"lisa-{epoch:06d}-state").mkdir(parents=True)
        written.append(epoch_path(final, epoch))
        _remove_old_epoch(plan, request, epoch, written)
    assert sorted(p.name for p in final.parent.iterdir()) == [
        "lisa-000006.safetensors",
        "lisa-000008.safetensors",
    ]
    assert [p.name for p in written] == ["lisa-000006.safetensors", "lisa-000008.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lisa-000006-state", "lisa-000008-state"]
