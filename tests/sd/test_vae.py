"""VAE decode against ComfyUI's VAEDecode (oracle image_float.npy), and VAEEncode's conventions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nodes.sd import vae as vae_math
from nodes.sd.checkpoint import LoadedCheckpoint, PixelSpaceVae
from tests.conftest import ORACLE, assert_within_floor

REFS = sorted(p.parent for p in (ORACLE / "refs").glob("*/latent.npy"))


def test_the_oracle_has_latents() -> None:
    assert len(REFS) >= 9


@pytest.mark.parametrize("ref", REFS, ids=lambda p: p.name)
def test_decode_matches_comfyui(loaded_mini: LoadedCheckpoint, ref: Path) -> None:
    image = vae_math.decode(loaded_mini.vae, torch.from_numpy(np.load(ref / "latent.npy")))
    expected = np.load(ref / "image_float.npy")
    assert image.shape == expected.shape and image.dtype == torch.float32
    assert float(np.abs(image.numpy() - expected).max()) <= 3e-5


def test_encode_is_the_posterior_mean_of_diffusers_encode(loaded_mini: LoadedCheckpoint) -> None:
    pixels = torch.rand(1, 64, 48, 3, generator=torch.Generator().manual_seed(0))
    latent = vae_math.encode(loaded_mini.vae, pixels)
    with torch.inference_mode():
        expected = loaded_mini.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    assert latent.shape == (1, 4, 8, 6)
    assert torch.allclose(latent, expected, atol=1e-5)


def test_encode_centre_crops_to_multiples_of_8(loaded_mini: LoadedCheckpoint) -> None:
    pixels = torch.rand(1, 70, 67, 4, generator=torch.Generator().manual_seed(1))
    latent = vae_math.encode(loaded_mini.vae, pixels)
    cropped = vae_math.encode(loaded_mini.vae, pixels[:, 3:67, 1:65, :3])
    assert latent.shape == (1, 4, 8, 8)
    assert torch.equal(latent, cropped)


def test_decode_refuses_a_latent_of_the_wrong_shape_clearly(loaded_mini: LoadedCheckpoint) -> None:
    with pytest.raises(vae_math.VaeInputError, match=r"\[B, 4, h, w\]"):
        vae_math.decode(loaded_mini.vae, torch.zeros(1, 3, 8, 8))


def test_pixel_space_vae_is_the_identity_up_to_range() -> None:
    pixels = torch.rand(2, 9, 5, 3)
    latent = vae_math.encode(PixelSpaceVae(), pixels)
    assert latent.shape == (2, 3, 9, 5)
    assert torch.allclose(vae_math.decode(PixelSpaceVae(), latent), pixels, atol=1e-6)


def test_a_batch_decodes_and_encodes_like_its_images_one_by_one(loaded_mini: LoadedCheckpoint) -> None:
    latent = torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(2))[:, :, :12, :10]
    images = vae_math.decode(loaded_mini.vae, latent)
    assert images.shape == (3, 96, 80, 3)
    assert_within_floor(images[1:2], vae_math.decode(loaded_mini.vae, latent[1:2]))
    latents = vae_math.encode(loaded_mini.vae, images)
    assert torch.allclose(latents[2:], vae_math.encode(loaded_mini.vae, images[2:]), atol=1e-4)
