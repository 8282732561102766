"""UniPC (bh1 / bh2), restated from ComfyUI's comfy/extra_samplers/uni_pc.py (`sample_unipc`).

UniPC works in variance-preserving coordinates: x_vp = x / sqrt(1 + sigma^2), with
alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma/sqrt(1+sigma^2) and lambda = ln(alpha) - ln(sigma_vp).
The model is asked for eps (converted from the denoised prediction) and turned back into x0,
data-prediction multistep with a corrector on every step but the last, lower order at the end.
"""

from __future__ import annotations

import torch

from nodes.sd.samplers.k_diffusion import Callback, Model


def _log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _alpha(sigma: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_alpha(sigma))


def _std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _log_alpha(sigma)))


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    log_alpha = _log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v[(...,) + (None,) * (like.dim() - 1)]


class _UniPC:
    def __init__(self, model: Model, variant: str) -> None:
        self.model = model
        self.variant = variant

    def data_prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from eps: the model sees the variance-exploding x (predict_eps_sigma)."""
        sigma = _bcast(t, x)
        x_ve = x * ((sigma**2 + 1.0) ** 0.5)
        eps = (x_ve - self.model(x_ve, t)) / sigma
        return (x - _bcast(_std(t), x) * eps) / _bcast(_alpha(t), x)

    def update(
        self,
        x: torch.Tensor,
        models: list[torch.Tensor],
        ts: list[torch.Tensor],
        t: torch.Tensor,
        order: int,
        use_corrector: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """multistep_uni_pc_bh_update with predict_x0 = True."""
        t_prev_0, model_prev_0 = ts[-1], models[-1]
        lambda_prev_0, lambda_t = _lambda(t_prev_0), _lambda(t)
        sigma_prev_0, sigma_t = _std(t_prev_0), _std(t)
        alpha_t = torch.exp(_log_alpha(t))
        h = lambda_t - lambda_prev_0
        rks_list: list[torch.Tensor | float] = []
        d1s_list: list[torch.Tensor] = []
        for i in range(1, order):
            rk = ((_lambda(ts[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks_list.append(rk)
            d1s_list.append((models[-(i + 1)] - model_prev_0) / rk)
        rks_list.append(1.0)
        rks = torch.tensor(rks_list, device=x.device)
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rows, b_list, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(torch.pow(rks, i - 1))
            b_list.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_mat, b = torch.stack(rows), torch.tensor(b_list, device=x.device)
        d1s = torch.stack(d1s_list, dim=1) if d1s_list else None
        x_t_ = _bcast(sigma_t / sigma_prev_0, x) * x - _bcast(alpha_t * h_phi_1, x) * model_prev_0
        pred_res: torch.Tensor | float = 0
        if d1s is not None:
            rhos_p = (
                torch.tensor([0.5], device=x.device)
                if order == 2
                else torch.linalg.solve(r_mat[:-1, :-1], b[:-1])
            )
            pred_res = torch.einsum("k,bkchw->bchw", rhos_p, d1s)
        x_t = x_t_ - _bcast(alpha_t * b_h, x) * pred_res
        if not use_corrector:
            return x_t, None
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_mat, b)
        model_t = self.data_prediction(x_t, t)
        corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1s) if d1s is not None else 0
        x_t = x_t_ - _bcast(alpha_t * b_h, x) * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
        return x_t, model_t

    def sample(
        self, x: torch.Tensor, timesteps: torch.Tensor, order: int, callback: Callback
    ) -> torch.Tensor:
        """UniPC.sample, method multistep, lower_order_final."""
        steps = len(timesteps) - 1
        batch = x.shape[0]
        models: list[torch.Tensor] = []
        ts: list[torch.Tensor] = []
        for step_index in range(steps):
            if step_index == 0:
                vec_t = timesteps[0].expand(batch)
                models, ts = [self.data_prediction(x, vec_t)], [vec_t]
            elif step_index < order:
                vec_t = timesteps[step_index].expand(batch)
                x, model_x = self.update(x, models, ts, vec_t, step_index, use_corrector=True)
                models.append(model_x if model_x is not None else self.data_prediction(x, vec_t))
                ts.append(vec_t)
            else:
                last = step_index + (2 if step_index == steps - 1 else 1)
                for step in range(step_index, last):
                    vec_t = timesteps[step].expand(batch)
                    step_order = min(order, steps + 1 - step)
                    x, model_x = self.update(x, models, ts, vec_t, step_order, use_corrector=step != steps)
                    models, ts = models[1:] + models[-1:], ts[1:] + [vec_t]
                    if step < steps:
                        models[-1] = model_x if model_x is not None else self.data_prediction(x, vec_t)
            if callback is not None:
                callback(step_index, models[-1], x)
        return x


def _sample_unipc(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, variant: str
) -> torch.Tensor:
    timesteps = sigmas.clone()
    if sigmas[-1] == 0:
        timesteps[-1] = 0.001  # lambda is infinite at sigma 0
    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    order = min(3, len(timesteps) - 2)
    x = _UniPC(model, variant).sample(x, timesteps, order, callback)
    return x / _alpha(timesteps[-1])


def sample_uni_pc(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """uni_pc: UniPC with B(h) = h."""
    return _sample_unipc(model, x, sigmas, callback, "bh1")


def sample_uni_pc_bh2(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """uni_pc_bh2: UniPC with B(h) = expm1(h)."""
    return _sample_unipc(model, x, sigmas, callback, "bh2")
