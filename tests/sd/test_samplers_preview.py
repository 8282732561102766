"""Latent previews: ComfyUI's SD1.5 Latent2RGB factors, first batch item, JPEG at latent size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nodes.sd.preview import latent_to_rgb, preview_jpeg


def test_each_channel_maps_through_its_factor_row() -> None:
    x0 = torch.zeros(2, 4, 2, 3)
    x0[0, 3] = 1.0  # channel 3 -> (-0.2120, -0.2616, -0.7177)
    x0[1] = 5.0  # the second batch item must not show
    pixels = np.asarray(latent_to_rgb(x0))
    expected = [int((v + 1) / 2 * 255) for v in (-0.2120, -0.2616, -0.7177)]
    assert pixels.shape == (2, 3, 3)
    assert (pixels == np.array(expected, dtype=np.uint8)).all()


def test_values_clamp_and_jpeg_decodes() -> None:
    x0 = torch.full((1, 4, 64, 64), 10.0)
    x0[:, 3] = -10.0
    image = latent_to_rgb(x0)
    assert (np.asarray(image) == 255).all()
    decoded = Image.open(io.BytesIO(preview_jpeg(torch.randn(1, 4, 80, 96))))
    assert decoded.format == "JPEG" and decoded.size == (96, 80)
    assert Image.open(io.BytesIO(preview_jpeg(torch.randn(1, 4, 128, 1024)))).size == (512, 64)


def test_sdxl_previews_use_sdxls_factors_and_bias() -> None:
    x0 = torch.zeros(1, 4, 2, 2)
    x0[0, 0] = 1.0  # channel 0 -> (0.3651, 0.4232, 0.4341) + bias (0.1084, -0.0175, -0.0011)
    pixels = np.asarray(latent_to_rgb(x0, sdxl=True))
    rgb = [0.3651 + 0.1084, 0.4232 - 0.0175, 0.4341 - 0.0011]
    assert (pixels == np.array([int((v + 1) / 2 * 255) for v in rgb], dtype=np.uint8)).all()
    assert not (np.asarray(latent_to_rgb(x0)) == pixels).all()  # SD1.5's factors differ


def test_the_sampler_previews_an_sdxl_model_in_sdxl_colours(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from nodegraph.env import Environment
    from nodegraph.folders import Folders
    from nodegraph.testing import RecordingContext
    from nodes.sampling import progress

    shown: list[bytes] = []
    ctx = RecordingContext(Environment(Folders.at(tmp_path)))
    ctx.preview_method = "latent2rgb"  # type: ignore[attr-defined]
    ctx.progress = lambda _i, _n, preview=None: shown.append(preview.data)  # type: ignore[method-assign]
    unet = SimpleNamespace(
        config=SimpleNamespace(addition_embed_type="text_time", projection_class_embeddings_input_dim=2816)
    )
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    progress(ctx, SimpleNamespace(unet=unet))(0, 1, x0)
    progress(ctx, None)(0, 1, x0)
    assert shown == [preview_jpeg(x0, sdxl=True), preview_jpeg(x0)]


def test_a_playground_model_previews_in_its_own_colours(tmp_path: Path) -> None:
    """SDXL_Playground_2_5.latent_rgb_factors: SDXL's earlier factors, no bias."""
    from types import SimpleNamespace

    from nodegraph.env import Environment
    from nodegraph.folders import Folders
    from nodegraph.testing import RecordingContext
    from nodes.sampling import progress
    from nodes.sd.model_sampling import PLAYGROUND_2_5, ModelSampling

    x0 = torch.zeros(1, 4, 2, 2)
    x0[0, 3] = 1.0  # channel 3 -> (-0.3112, -0.2359, -0.2076)
    pixels = np.asarray(latent_to_rgb(x0, sdxl=True, playground=True))
    assert (pixels == np.array([int((v + 1) / 2 * 255) for v in (-0.3112, -0.2359, -0.2076)], np.uint8)).all()
    shown: list[bytes] = []
    ctx = RecordingContext(Environment(Folders.at(tmp_path)))
    ctx.preview_method = "latent2rgb"  # type: ignore[attr-defined]
    ctx.progress = lambda _i, _n, preview=None: shown.append(preview.data)  # type: ignore[method-assign]
    unet = SimpleNamespace(
        config=SimpleNamespace(addition_embed_type="text_time", projection_class_embeddings_input_dim=2816)
    )
    sampling = ModelSampling("edm", False, (0.002, 80.0), 0.5, PLAYGROUND_2_5)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    progress(ctx, SimpleNamespace(unet=unet, sampling=sampling))(0, 1, x0)
    assert shown == [preview_jpeg(x0, sdxl=True, playground=True)]
    assert shown[0] != preview_jpeg(x0, sdxl=True)
