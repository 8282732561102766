"""The sampler names KSampler offers, in ComfyUI's order (comfy/samplers.py SAMPLER_NAMES).

Only implemented samplers are listed; the relative order is ComfyUI's so the canvas shows the
familiar list. The `_gpu` SDE variants differ from their plain twins only in where the Brownian
tree lives; on a CPU-only engine they are the same computation.
"""

from __future__ import annotations

from nodes.sd.samplers import cfg_pp as pp
from nodes.sd.samplers import deis, dpm, sde, uni_pc
from nodes.sd.samplers import er_sde as er
from nodes.sd.samplers import k_diffusion as k
from nodes.sd.samplers import res_multistep as res
from nodes.sd.samplers import sa_solver as sa
from nodes.sd.samplers.k_diffusion import Sampler

SAMPLERS: dict[str, Sampler] = {
    "euler": k.sample_euler,
    "euler_cfg_pp": pp.sample_euler_cfg_pp,
    "euler_ancestral": k.sample_euler_ancestral,
    "euler_ancestral_cfg_pp": pp.sample_euler_ancestral_cfg_pp,
    "heun": k.sample_heun,
    "heunpp2": k.sample_heunpp2,
    "dpm_2": k.sample_dpm_2,
    "dpm_2_ancestral": k.sample_dpm_2_ancestral,
    "lms": k.sample_lms,
    "dpm_fast": dpm.sample_dpm_fast,
    "dpm_adaptive": dpm.sample_dpm_adaptive,
    "dpmpp_2s_ancestral": k.sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": pp.sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": sde.sample_dpmpp_sde,
    "dpmpp_sde_gpu": sde.sample_dpmpp_sde,
    "dpmpp_2m": k.sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": pp.sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": sde.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sde.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sde.sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": sde.sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sde.sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sde.sample_dpmpp_3m_sde,
    "ddpm": k.sample_ddpm,
    "lcm": k.sample_lcm,
    "ipndm": k.sample_ipndm,
    "ipndm_v": k.sample_ipndm_v,
    "deis": deis.sample_deis,
    "res_multistep": res.sample_res_multistep,
    "res_multistep_cfg_pp": res.sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": res.sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": res.sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": res.sample_gradient_estimation,
    "gradient_estimation_cfg_pp": res.sample_gradient_estimation_cfg_pp,
    "er_sde": er.sample_er_sde,
    "seeds_2": er.sample_seeds_2,
    "seeds_3": er.sample_seeds_3,
    "sa_solver": sa.sample_sa_solver,
    "sa_solver_pece": sa.sample_sa_solver_pece,
    "ddim": k.sample_euler,  # ComfyUI's "ddim" is k-diffusion euler (oracle pitfall 9)
    "uni_pc": uni_pc.sample_uni_pc,
    "uni_pc_bh2": uni_pc.sample_uni_pc_bh2,
}

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)

CFG_PP = pp.CFG_PP  # samplers that need the uncond prediction even at cfg 1

# comfy/samplers.py KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
