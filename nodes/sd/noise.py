"""Random noise exactly as ComfyUI draws it: the initial latent noise and the per-step samplers' noise.

Sources: comfy/sample.py `prepare_noise`; comfy/k_diffusion/sampling.py `default_noise_sampler`,
`BatchedBrownianTree`, `BrownianTreeNoiseSampler`. The same seed must give the same bits, so the
order of draws, the generator and its device are part of the contract.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torchsde

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """Initial noise: `torch.manual_seed(seed)` then `randn` on CPU, float32, one draw per batch.

    With `batch_index` (from LatentFromBatch and friends) each latent gets the draw of its index in
    the original batch: draws are made one item at a time up to the largest index.
    """
    generator = torch.manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator)
    wanted = sorted(set(batch_index))
    draws: dict[int, torch.Tensor] = {}
    for i in range(wanted[-1] + 1):
        noise = torch.randn([1] + list(latent.size())[1:], dtype=latent.dtype, generator=generator)
        if i in wanted:
            draws[i] = noise
    return torch.cat([draws[i] for i in batch_index], dim=0)


def default_noise_sampler(x: torch.Tensor, seed: int | None) -> NoiseSampler:
    """Ancestral samplers' noise: a generator on x's device seeded with the KSampler seed."""
    generator: torch.Generator | None = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)

    def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


class BrownianTreeNoiseSampler:
    """SDE samplers' noise: one `torchsde.BrownianTree` on CPU over [sigma_min, sigma_max].

    Calling it with (sigma, sigma_next) returns the normalised Brownian increment
    (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|, with k-diffusion's sign convention.
    """

    def __init__(
        self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seed: int | None
    ) -> None:
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        t0, t1, self.sign = self._sort(t0, t1)
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()).item())
        w0 = torch.zeros_like(x).detach().cpu()
        self.tree = torchsde.BrownianTree(t0.detach().cpu(), w0, t1.detach().cpu(), entropy=seed)

    @staticmethod
    def _sort(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = self._sort(t0, t1)
        device, dtype = lo.device, lo.dtype
        with warnings.catch_warnings():
            # torchsde warns when a query equals t1 up to float32 rounding (sigma_max itself); harmless
            warnings.filterwarnings("ignore", message="Should have tb<=t1")
            w: torch.Tensor = self.tree(lo.detach().cpu().float(), hi.detach().cpu().float())
        w = w.to(device=device, dtype=dtype) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


def brownian_noise_sampler(
    x: torch.Tensor, sigmas: torch.Tensor, seed: int | None
) -> BrownianTreeNoiseSampler:
    """The tree k-diffusion's SDE samplers build: from the smallest positive sigma to the largest."""
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed)
