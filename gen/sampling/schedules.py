"""Sigma schedules: `schedule(ms, n) -> sigmas` (n + 1 values, descending, ending in 0) for a model's sampling
table `ms` (gen.sampling.model.Denoiser: sigmas, sigma_min, sigma_max, t(sigma), sigma(t)), as k-diffusion and
ComfyUI's comfy/samplers.py define them; the spacings of diffusers' schedulers (leading, trailing, linspace) and
the model's own ("automatic") come from diffusers in gen.sampling.run.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gen.errors import GenError


def _done(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64) if not torch.is_tensor(sigmas) else sigmas)
    return torch.cat([sigmas.double(), sigmas.new_zeros(1, dtype=torch.float64)]).float()


def karras(ms, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_max^(1/rho) to sigma_min^(1/rho), linearly, to the power rho."""
    return karras_sigmas(n, ms.sigma_min, ms.sigma_max, rho)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras' n sigmas from sigma_max to sigma_min, then 0 (k-diffusion's get_sigmas_karras)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _done((hi + ramp * (lo - hi)) ** rho)


def exponential(ms, n: int) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return _done(torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), n, dtype=torch.float64).exp())


def polyexponential(ms, n: int, rho: float = 1.0) -> torch.Tensor:
    """A polynomial (degree rho) in log sigma; rho 1 is exponential (k-diffusion's get_sigmas_polyexponential)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    lo, hi = math.log(ms.sigma_min), math.log(ms.sigma_max)
    return _done((ramp * (hi - lo) + lo).exp())


def normal(ms, n: int, sgm: bool = False) -> torch.Tensor:
    """Evenly spaced timesteps from the model's first to last (ComfyUI's normal; A1111's Uniform, k-diffusion's
    get_sigmas, and its Normal); sgm: n + 1 points
    with the last dropped (SGM Uniform, as Stability's generative-models spaces them)."""
    start, end = float(ms.t(torch.tensor(ms.sigma_max))), float(ms.t(torch.tensor(ms.sigma_min)))
    ts = torch.linspace(start, end, n + 1 if sgm else n, dtype=torch.float64)
    return _done(ms.sigma(ts[:-1] if sgm else ts))


def sgm_uniform(ms, n: int) -> torch.Tensor:
    return normal(ms, n, sgm=True)


def simple(ms, n: int) -> torch.Tensor:
    """Every (T / n)-th sigma of the model's table from the top (ComfyUI's simple)."""
    step = len(ms.sigmas) / n
    return _done(torch.stack([ms.sigmas[-(1 + int(i * step))] for i in range(n)]))


def ddim_uniform(ms, n: int) -> torch.Tensor:
    """DDIM's uniform timesteps 1, 1 + T/n, ... (ComfyUI's ddim_uniform; A1111's DDIM schedule)."""
    step = max(len(ms.sigmas) // n, 1)
    return _done(ms.sigmas[1::step].flip(0))


def beta(ms, n: int, alpha: float = 0.6, b: float = 0.6) -> torch.Tensor:
    """Timesteps at the Beta(0.6, 0.6) quantiles (Lee et al. 2024, "Beta sampling is all you need")."""
    try:
        from scipy import stats
    except ImportError:
        raise GenError("the beta schedule needs scipy: pip install scipy") from None
    last = len(ms.sigmas) - 1
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, b) * last)
    picked = [int(t) for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    return _done(ms.sigmas[picked])


def linear_quadratic(ms, n: int, threshold: float = 0.025) -> torch.Tensor:
    """Linear for the first half of the steps up to `threshold`, then quadratic to 1 (Genmo's Mochi; ComfyUI)."""
    if n == 1:
        return torch.tensor([ms.sigma_max, 0.0])
    lin = n // 2
    quad = n - lin
    diff = lin - threshold * n
    a = diff / (lin * quad ** 2)
    b = threshold / lin - 2 * diff / quad ** 2
    c = a * lin ** 2
    fractions = [i * threshold / lin for i in range(lin)] + [a * i ** 2 + b * i + c for i in range(lin, n)] + [1.0]
    return (torch.tensor([1.0 - f for f in fractions], dtype=torch.float64) * ms.sigma_max).float()


def kl_optimal(ms, n: int) -> torch.Tensor:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024, "Align your steps", the KL-optimal schedule)."""
    w = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return _done((w * math.atan(ms.sigma_min) + (1 - w) * math.atan(ms.sigma_max)).tan())


def lcm(ms, n: int, original_steps: int = 50) -> torch.Tensor:
    """LCM's timesteps (Luo et al. 2023, as diffusers' LCMScheduler): n evenly spaced indices into the distillation's
    `original_steps` DDIM timesteps (T / original_steps apart, from the top)."""
    if n > original_steps:
        raise GenError(f"the lcm schedule takes at most {original_steps} steps (its distillation's), not {n}")
    k = len(ms.sigmas) // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    picked = origin[np.floor(np.linspace(0, original_steps, n, endpoint=False)).astype(np.int64)]
    return _done(ms.sigmas[torch.as_tensor(picked.copy())])


# Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step sigmas, per model
AYS = {"sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
       "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]}


def align_your_steps(ms, n: int, model: str = "sd1", comfyui: bool = False) -> torch.Tensor:
    """A1111's Align Your Steps (modules/sd_schedulers.py): the published list log-linearly interpolated (over its
    index) to n sigmas, as published where n is 11, then 0 (the last step ends at sigma 0.029, then 0). `comfyui`:
    ComfyUI's AlignYourStepsScheduler node, n + 1 levels (the published ones at n = 10), the last one set to 0."""
    levels = np.asarray(AYS[model])
    count = n + 1 if comfyui else n
    if count != len(levels):
        xs, new = np.linspace(0, 1, len(levels)), np.linspace(0, 1, count)
        levels = np.exp(np.interp(new, xs, np.log(levels[::-1])))[::-1].copy()
    out = torch.tensor(levels, dtype=torch.float64)
    return out.float().index_fill(0, torch.tensor([n]), 0.0) if comfyui else _done(out)


def align_your_steps_comfyui(ms, n: int, model: str = "sd1") -> torch.Tensor:
    return align_your_steps(ms, n, model, comfyui=True)


SCHEDULES = {"normal": normal, "uniform": normal, "karras": karras, "exponential": exponential,
             "polyexponential": polyexponential,
             "sgm_uniform": sgm_uniform, "simple": simple, "ddim_uniform": ddim_uniform, "beta": beta,
             "linear_quadratic": linear_quadratic, "kl_optimal": kl_optimal, "align_your_steps": align_your_steps,
             "align_your_steps_comfyui": align_your_steps_comfyui, "lcm": lcm}
# schedules whose sigmas exceed 1 by construction, which a flow model's sigma in [0, 1] cannot take
VP_ONLY = {"align_your_steps", "align_your_steps_comfyui", "lcm"}
