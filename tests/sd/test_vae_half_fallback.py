"""A half-precision VAE decode that overflows is redone in fp32, as ComfyUI does: never NaN pixels.

The half path is forced on the CPU: a small VAE in fp16 whose decoder input convolution is scaled
so that its activations exceed fp16's range (as SDXL's VAE does on a GPU), but not fp32's.
"""

from __future__ import annotations

import torch

from nodes.sd import vae as vae_math


def _vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    ).eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # fp16 tops out at 65504
    return vae


def test_half_decode_with_overflow_is_redone_in_fp32() -> None:
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    reference = vae_math.decode(_vae(), latent)  # fp32 throughout
    assert torch.isfinite(reference).all()
    half = _vae().half()
    with torch.inference_mode():
        raw = half.decoder(half.post_quant_conv(latent.half()))
    assert not torch.isfinite(raw).all()  # the half path really overflows
    image = vae_math.decode(half, latent)
    assert torch.isfinite(image).all()
    assert torch.allclose(image, reference, atol=1e-3)
    assert next(half.parameters()).dtype == torch.float32  # kept fp32 for later decodes
    half.half()  # placement moves it back: the next decode upcasts again without retrying
    assert torch.allclose(vae_math.decode(half, latent), reference, atol=1e-3)
