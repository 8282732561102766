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

`ModelSamplingContinuousEDM` (ComfyUI's node and `ModelSamplingContinuousEDM` class) replaces the
table with 1000 log-spaced sigmas between sigma_min and sigma_max, gives the UNet `0.25·ln σ` as its
timestep and brings in σ_data (0.5 for "edm", else 1): the input is scaled by `1/√(σ²+σ_data²)` and

* eps: `x − σ·out`;  v_prediction: `x·σd²/(σ²+σd²) − out·σ·σd/√(σ²+σd²)`;
* edm: `x·σd²/(σ²+σd²) + out·σ·σd/√(σ²+σd²)`.

Playground v2.5 (`edm_playground_v2.5`, or a checkpoint with `edm_mean`/`edm_std` keys) is edm with
σ_data 0.5 in its own latent space (ComfyUI's `SDXL_Playground_2_5` latent format): the sampler
takes a VAE latent in as `(x − mean)·0.5 / std` per channel and gives `x·std / 0.5 + mean` back,
where SD1.x and SDXL only scale (`x·0.18215`, `x·0.13025`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from nodes.sd.schedules import DiscreteSchedule, sd15_schedule

PREDICTIONS = ("eps", "v_prediction", "lcm", "x0")  # ModelSamplingDiscrete's choices
CONTINUOUS_PREDICTIONS = ("eps", "v_prediction", "edm")  # on a continuous EDM schedule
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
class ContinuousSchedule(DiscreteSchedule):
    """comfy ModelSamplingContinuousEDM: 1000 log-spaced sigmas; the timestep is `0.25·ln σ`."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep / 0.25).exp()

    def from_percent(self, percent: float) -> float:
        log_min = math.log(float(self.sigma_min))
        return math.exp((math.log(float(self.sigma_max)) - log_min) * (1.0 - percent) + log_min)


@lru_cache(maxsize=8)
def continuous_schedule(sigma_min: float, sigma_max: float) -> ContinuousSchedule:
    """set_parameters: `linspace(ln σ_min, ln σ_max, 1000).exp()` in float32, as ComfyUI computes it."""
    sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp()
    return ContinuousSchedule(sigmas, torch.log(sigmas), (1 / (sigmas * sigmas + 1)).float())


@dataclass(frozen=True)
class LatentFormat:
    """comfy/latent_formats.py: a VAE latent in the model's space (`process_in`) and back out."""

    scale: float
    mean: tuple[float, ...] | None = None  # per channel, with `std`: Playground v2.5's normalisation
    std: tuple[float, ...] | None = None

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.tensor(self.std).view(1, -1, 1, 1).to(x.device, x.dtype)
        return mean, std

    def process_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x * self.scale
        mean, std = self._stats(x)
        return (x - mean) * self.scale / std

    def process_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x / self.scale
        mean, std = self._stats(x)
        return x * std / self.scale + mean


# comfy.latent_formats.SDXL_Playground_2_5
PLAYGROUND_2_5 = LatentFormat(0.5, (-1.6574, 1.886, -1.383, 2.5155), (8.4927, 5.9022, 6.5498, 5.2299))
PLAYGROUND_SIGMAS = (0.002, 80.0)  # supported_models.SDXL.model_type for edm_mean/edm_std files


@dataclass(frozen=True)
class ModelSampling:
    """What the sampler needs to know about a model's parameterisation (a MODEL handle carries it).

    `sigma_range` None: the discrete training table (ModelSamplingDiscrete); (σ_min, σ_max): a
    continuous EDM schedule (ModelSamplingContinuousEDM), with `sigma_data`. `latent_format` None:
    the UNet's own (SD1.x's or SDXL's scale); ComfyUI keeps it as a separate patch, so the
    ModelSampling* nodes carry it over unless they set one.
    """

    prediction: str = "eps"
    zsnr: bool = False
    sigma_range: tuple[float, float] | None = None
    sigma_data: float = 1.0
    latent_format: LatentFormat | None = None

    def __post_init__(self) -> None:
        allowed = PREDICTIONS if self.sigma_range is None else CONTINUOUS_PREDICTIONS
        if self.prediction not in allowed:
            choices = ", ".join(allowed)
            raise ValueError(f"unknown sampling {self.prediction!r}; expected one of {choices}")
        if self.sigma_range is not None and not 0 < self.sigma_range[0] < self.sigma_range[1]:
            low, high = self.sigma_range
            raise ValueError(f"sigma_min {low} and sigma_max {high}: need 0 < sigma_min < sigma_max")

    @property
    def schedule(self) -> DiscreteSchedule:
        if self.sigma_range is not None:
            return continuous_schedule(*self.sigma_range)
        return discrete_schedule(self.prediction, self.zsnr)

    def scale_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`calculate_input`: the UNet's input, `x / √(σ² + σ_data²)`."""
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))
        return x / (s**2 + self.sigma_data**2) ** 0.5

    def denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`calculate_denoised`: the x0 estimate from the UNet output at `sigma` (one per batch item)."""
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))
        sd = self.sigma_data
        if self.prediction == "x0":
            return output
        if self.prediction == "v_prediction":
            return x * sd**2 / (s**2 + sd**2) - output * s * sd / (s**2 + sd**2) ** 0.5
        if self.prediction == "edm":
            return x * sd**2 / (s**2 + sd**2) + output * s * sd / (s**2 + sd**2) ** 0.5
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
    v-pred and other anime checkpoints ship. `edm_vpred.sigma_max` (CosXL: v-prediction on a
    continuous EDM schedule) needs the key's value and is read by `checkpoint_sampling`; `edm_mean`
    + `edm_std` (checked first, as ComfyUI does) is Playground v2.5: edm, σ_data 0.5, sigmas
    0.002..80 and its own latent format (the keys' values are not read: the format's are fixed).
    """
    if "edm_mean" in keys and "edm_std" in keys:
        return ModelSampling("edm", False, PLAYGROUND_SIGMAS, 0.5, PLAYGROUND_2_5)
    if "v_pred" in keys:
        return ModelSampling("v_prediction", zsnr="ztsnr" in keys)
    return EPS


DEFAULT_EDM_SIGMA_MIN = 0.002  # ModelSamplingContinuousEDM's default sigma_min


def checkpoint_sampling(path: Path) -> ModelSampling:
    """The sampling a checkpoint file declares by its marker keys (read from the safetensors file).

    `edm_vpred.sigma_max` (and `edm_vpred.sigma_min`, else 0.002) is v-prediction on that continuous
    EDM schedule (ComfyUI's V_PREDICTION_EDM, CosXL); the other markers as `from_checkpoint_keys`
    (Playground v2.5's first). Diffusers folders and pickled checkpoints declare nothing here
    (ComfyUI reads no marker from them): eps.
    """
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".sft"):
        return EPS
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if "edm_vpred.sigma_max" in keys and not ("edm_mean" in keys and "edm_std" in keys):
            sigma_max = float(f.get_tensor("edm_vpred.sigma_max").item())
            has_min = "edm_vpred.sigma_min" in keys
            sigma_min = (
                float(f.get_tensor("edm_vpred.sigma_min").item()) if has_min else DEFAULT_EDM_SIGMA_MIN
            )
            try:
                return ModelSampling("v_prediction", False, (sigma_min, sigma_max))
            except ValueError as exc:
                raise ValueError(f"'{path.name}': its edm_vpred markers are unusable ({exc})") from exc
    return from_checkpoint_keys(keys)
