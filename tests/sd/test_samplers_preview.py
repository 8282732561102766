"""Latent previews: ComfyUI's SD1.5 Latent2RGB factors, first batch item, JPEG at latent size."""

from __future__ import annotations

import io

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
