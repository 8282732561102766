"""How a discrete-time UNet's output becomes a denoised latent: eps, v-prediction, LCM or x0, with or
without zero-terminal-SNR (ComfyUI's `ModelSamplingDiscrete` node and the checkpoint markers).

ComfyUI (comfy/model_sampling.py, comfy_extras/nodes_model_advanced.py) keeps a `model_sampling`
object on the model: the sigma table (SD1.x/SDXL's scaled-linear betas, optionally rescaled to zero
terminal SNR in float64 before the float32 cast) and `calculate_denoised`. LCM also swaps the table for
the 50 sigmas of its distillation schedule (`ModelSamplingDiscreteDistilled`), so its timesteps are
`index·20 + 19`. The input is always scaled by `1/√(σ²+1)`; only the output formula differs:

* eps: `x − σ·out`;  x0: `out`;
* v_prediction (σ_data 1): `x/(σ²+1) − σ·out/√(σ²+1)`;
* lcm: `c_out·(x − σ·out) + c_skip·x`, `c_skip = ¼/(τ²+¼)`, `c_out = τ/√(τ²+¼)`, τ = 10·timestep.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from nodes.sd.schedules import DiscreteSchedule, sd15_schedule

PREDICTIONS = ("eps", "v_prediction", "lcm", "x0")
_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08  # ComfyUI's value for the last ᾱ after the rescale
_LCM_STEPS = 50  # ModelSamplingDiscreteDistilled.original_timesteps


@dataclass(frozen=True)
class DistilledSchedule(DiscreteSchedule):
    """The 50-entry table of an LCM-distilled model; a table index stands for timestep `i·skip + skip−1`."""

    skip: int = 1000 // _LCM_STEPS

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return super().timestep(sigma) * self.skip + (self.skip - 1)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return super().sigma((timestep.float() - (self.skip - 1)) / self.skip)


def _scaled_linear_sigmas() -> torch.Tensor:
    """SD1.x/SDXL's training sigmas in float64 (make_beta_schedule "linear": squared linspace of √β)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's `rescale_zero_terminal_snr_sigmas`: shift √ᾱ so the last is 0, keep the first, floor ᾱ_T."""
    alphas_bar_sqrt = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = _TERMINAL_ALPHA_BAR
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


def _table(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s32 = sigmas.float()
    return s32, sigmas.log().float(), (1 / (sigmas * sigmas + 1)).float()


@lru_cache(maxsize=8)
def discrete_schedule(prediction: str = "eps", zsnr: bool = False) -> DiscreteSchedule:
    """The sigma table a `ModelSampling` samples over (cached: every value is a pure function of the two)."""
    if not zsnr and prediction != "lcm":
        return sd15_schedule()  # the very table every eps run has used
    sigmas = _scaled_linear_sigmas()
    if zsnr:
        sigmas = rescale_zero_terminal_snr(sigmas)
    if prediction != "lcm":
        return DiscreteSchedule(*_table(sigmas))
    full = sigmas.float()  # ComfyUI picks the distilled entries from the float32 table
    skip = len(full) // _LCM_STEPS
    picked = torch.stack([full[len(full) - 1 - x * skip] for x in range(_LCM_STEPS)]).flip(0)
    return DistilledSchedule(picked, picked.log(), 1 / (picked * picked + 1), skip)


@dataclass(frozen=True)
class ModelSampling:
    """What the sampler needs to know about a model's parameterisation (a MODEL handle carries it)."""

    prediction: str = "eps"
    zsnr: bool = False

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            choices = ", ".join(PREDICTIONS)
            raise ValueError(f"unknown sampling {self.prediction!r}; expected one of {choices}")

    @property
    def schedule(self) -> DiscreteSchedule:
        return discrete_schedule(self.prediction, self.zsnr)

    def denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`calculate_denoised`: the x0 estimate from the UNet output at `sigma` (one per batch item)."""
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))
        if self.prediction == "x0":
            return output
        if self.prediction == "v_prediction":
            return x * 1.0 / (s**2 + 1.0) - output * s * 1.0 / (s**2 + 1.0) ** 0.5
        x0 = x - output * s
        if self.prediction == "eps":
            return x0
        scaled = self.schedule.timestep(sigma).reshape(s.shape) * 10.0  # LCM's timestep_scaling
        c_skip = 0.5**2 / (scaled**2 + 0.5**2)
        c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
        return c_out * x0 + c_skip * x


EPS = ModelSampling()


def from_checkpoint_keys(keys: Collection[str]) -> ModelSampling:
    """What an SDXL-family checkpoint declares by marker keys (ComfyUI supported_models.SDXL.model_type).

    `v_pred` (with `ztsnr`: zero terminal SNR) is v-prediction on the discrete schedule, as NoobAI-XL
    v-pred and other anime checkpoints ship. `edm_vpred.sigma_max` (v-prediction on a continuous EDM
    schedule, Playground/CosXL style) and `edm_mean`+`edm_std` (Playground v2.5's EDM) are refused by
    the caller with `unsupported_marker`: sampling them as discrete would silently give wrong images.
    """
    if "v_pred" in keys:
        return ModelSampling("v_prediction", zsnr="ztsnr" in keys)
    return EPS


def unsupported_marker(keys: Collection[str]) -> str | None:
    """The continuous-schedule marker of a checkpoint this engine cannot sample, if any."""
    if "edm_mean" in keys and "edm_std" in keys:
        return "an EDM (Playground v2.5-style) checkpoint (edm_mean/edm_std keys)"
    if "edm_vpred.sigma_max" in keys:
        return "a continuous-EDM v-prediction checkpoint (edm_vpred.sigma_max key)"
    return None


def checkpoint_sampling(path: Path) -> ModelSampling:
    """The sampling a checkpoint file declares by its marker keys (read from the safetensors header).

    Raises ValueError, naming the file, for a continuous-schedule (EDM) checkpoint. Diffusers folders
    and pickled checkpoints declare nothing here (ComfyUI reads no marker from them): eps.
    """
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".sft"):
        return EPS
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    problem = unsupported_marker(keys)
    if problem is not None:
        raise ValueError(
            f"'{path.name}' is {problem}; nodegraph samples discrete-schedule models only "
            "(eps or v-prediction, optionally zero terminal SNR)"
        )
    return from_checkpoint_keys(keys)
