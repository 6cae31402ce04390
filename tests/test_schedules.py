"""gen.sampling.schedules by ComfyUI's and A1111's names against their references, for a DDPM model's sigma table
and a shifted flow model's: k-diffusion's get_sigmas_* (tests/vendor/k_diffusion, the PyPI file) where it has the
schedule, else the formula of ComfyUI's comfy/samplers.py (A1111's modules/sd_schedulers.py has the same ones),
restated here from those functions, on the same model table (ComfyUI's model_sampling: sigmas, sigma_min,
sigma_max, timestep(sigma), sigma(timestep)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from gen.formulations import DDPM, Flow
from gen.sampling import names, schedules
from gen.sampling.model import Denoiser
from tests.vendor.k_diffusion import sampling as kd

FORMULATIONS = [DDPM(), DDPM(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), Flow(shift=3.0)]
IDS = ["sd", "ddpm-linear", "flow-shift3"]
STEPS = [1, 4, 7, 10, 30]


@pytest.fixture(params=FORMULATIONS, ids=IDS)
def ms(request):
    return Denoiser(None, request.param)


def close(ours, ref):
    ref = torch.as_tensor(ref, dtype=torch.float64)
    assert ours.shape == ref.shape, (ours, ref)
    assert torch.allclose(ours.double(), ref, rtol=2e-6, atol=1e-7), (ours, ref)


def ends_in_zero(values):
    return torch.tensor([*map(float, values), 0.0], dtype=torch.float64)


@pytest.mark.parametrize("n", STEPS)
def test_karras_exponential_polyexponential_equal_k_diffusion(ms, n):
    lo, hi = ms.sigma_min, ms.sigma_max
    close(schedules.karras(ms, n), kd.get_sigmas_karras(n, lo, hi, rho=7.0))
    close(schedules.exponential(ms, n), kd.get_sigmas_exponential(n, lo, hi))
    close(schedules.polyexponential(ms, n), kd.get_sigmas_polyexponential(n, lo, hi, rho=1.0))
    close(schedules.polyexponential(ms, n, rho=2.0), kd.get_sigmas_polyexponential(n, lo, hi, rho=2.0))


def comfy_normal(ms, n, sgm=False):
    """comfy/samplers.py normal_scheduler: timesteps evenly from timestep(sigma_max) to timestep(sigma_min), n + 1 of
    them with the last dropped for sgm_uniform; their sigmas, then 0 (the zero-terminal case aside)."""
    start, end = float(ms.t(torch.tensor(ms.sigma_max))), float(ms.t(torch.tensor(ms.sigma_min)))
    ts = np.linspace(start, end, n + 1)[:-1] if sgm else np.linspace(start, end, n)
    return ends_in_zero(ms.sigma(torch.tensor(t, dtype=torch.float64)) for t in ts)


def comfy_simple(ms, n):
    """simple_scheduler: sigmas[-(1 + int(i * T / n))] for i < n, then 0."""
    return ends_in_zero(ms.sigmas[-(1 + int(i * len(ms.sigmas) / n))] for i in range(n))


def comfy_ddim_uniform(ms, n):
    """ddim_scheduler: sigmas[1], sigmas[1 + T // n], ... up the table, reversed, after a 0."""
    out, i = [], 1
    while i < len(ms.sigmas):
        out.append(float(ms.sigmas[i]))
        i += max(len(ms.sigmas) // n, 1)
    return ends_in_zero(out[::-1])


def comfy_beta(ms, n, a=0.6, b=0.6):
    """beta_scheduler (Lee et al. 2024): timesteps rint(Beta(0.6, 0.6).ppf(1 - i / n) * (T - 1)), repeats dropped."""
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), a, b) * (len(ms.sigmas) - 1))
    kept = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return ends_in_zero(ms.sigmas[int(t)] for t in kept)


def comfy_linear_quadratic(ms, n, threshold=0.025):
    """linear_quadratic_schedule (Genmo's Mochi): 1 - [linear to `threshold` over n // 2 steps, then the quadratic
    through (n // 2, threshold) and (n, 1) with matching slope], times sigma_max."""
    if n == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float64) * ms.sigma_max
    lin = n // 2
    quad = n - lin
    qc = (lin - threshold * n) / (lin * quad ** 2)
    lc = threshold / lin - 2 * (lin - threshold * n) / quad ** 2
    fractions = [i * threshold / lin for i in range(lin)] + [qc * i * i + lc * i + qc * lin ** 2 for i in range(lin, n)]
    return torch.tensor([1 - f for f in fractions + [1.0]], dtype=torch.float64) * ms.sigma_max


def comfy_kl_optimal(ms, n):
    """kl_optimal_scheduler (A1111 PR 15608): tan of arctan(sigma_max) to arctan(sigma_min) evenly, then 0."""
    w = np.arange(n) / max(n - 1, 1)
    return ends_in_zero(np.tan(w * math.atan(ms.sigma_min) + (1 - w) * math.atan(ms.sigma_max)))


COMFY = {"normal": comfy_normal, "sgm_uniform": lambda ms, n: comfy_normal(ms, n, sgm=True), "simple": comfy_simple,
         "ddim_uniform": comfy_ddim_uniform, "beta": comfy_beta, "linear_quadratic": comfy_linear_quadratic,
         "kl_optimal": comfy_kl_optimal}


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", sorted(COMFY))
def test_comfyui_schedulers_equal_comfyuis_formulas(ms, name, n):
    """Each of ComfyUI's SCHEDULER_NAMES but karras and exponential (above), by its ComfyUI name."""
    ours = schedules.SCHEDULES[names.schedule(name)](ms, n)
    close(ours, COMFY[name](ms, n))
    assert ours[-1] == 0 and bool((ours[:-1] > 0).all()) and bool((ours[:-1].diff() < 0).all())


def a1111_uniform(ms, n):
    """A1111's Uniform: k-diffusion's DiscreteSchedule.get_sigmas, timesteps linspace(T - 1, 0, n) through the
    log-linear t_to_sigma, then 0 (flow models: the same over their sigma(timestep))."""
    return ends_in_zero(ms.sigma(torch.tensor(t, dtype=torch.float64)) for t in np.linspace(ms.T - 1, 0, n))


def a1111_align_your_steps(n, levels):
    """A1111's get_align_your_steps_sigmas: the 11 published sigmas as they are where n is 11, else log-linearly
    interpolated (over their index) to n, then 0."""
    if n == len(levels):
        return ends_in_zero(levels)
    xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
    return ends_in_zero(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1])


def comfy_align_your_steps(n, levels):
    """ComfyUI's AlignYourStepsScheduler: n + 1 levels (the published 11 at n = 10, else interpolated so), the last
    one set to 0."""
    if n + 1 != len(levels):
        xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
        levels = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, ys))[::-1]
    return torch.tensor([*levels[:-1], 0.0], dtype=torch.float64)


@pytest.mark.parametrize("n", STEPS)
def test_a1111_uniform_and_align_your_steps(n):
    ms = Denoiser(None, DDPM())
    close(schedules.SCHEDULES[names.schedule("Uniform")](ms, n), a1111_uniform(ms, n))
    for model, levels in schedules.AYS.items():
        close(schedules.align_your_steps(ms, n, model), a1111_align_your_steps(n, np.asarray(levels)))
        close(schedules.align_your_steps_comfyui(ms, n, model), comfy_align_your_steps(n, np.asarray(levels)))
    assert names.schedule("Align Your Steps") == "align_your_steps"


def test_every_a1111_and_comfyui_schedule_name_resolves_for_both_families():
    a1111 = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
             "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
    comfy = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic",
             "kl_optimal"]
    flow = [Denoiser(None, Flow(shift=3.0)), Denoiser(None, Flow(shift=1.0))]
    euler = names.BY_NAME["euler"]
    for label in a1111 + comfy:
        sched = names.schedule(label)
        if sched == "automatic":
            continue
        kinds = ["ddpm"] + (["flow"] if sched not in schedules.VP_ONLY else [])
        for kind in kinds:
            names.check(euler, sched, kind)
        for ms in flow if "flow" in kinds else []:
            sig = schedules.SCHEDULES[sched](ms, 9)
            assert len(sig) == 10 and float(sig[0]) <= 1 + 1e-6 and sig[-1] == 0 and bool((sig[:-1].diff() < 0).all())
