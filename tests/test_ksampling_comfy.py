"""gen.sampling.k's ComfyUI-only samplers and the CFG++ ones against their reference formulas.

ComfyUI's comfy/k_diffusion/sampling.py (GPL, so not vendored) is the reference; each function below restates, in
this file's own loop, the update ComfyUI's function of the same name takes (cited per function), and gen's sampler
must equal it to 1e-5 in float64 on the same denoiser and noise: a nonlinear model with a separate unconditional
prediction (U != D), for a DDPM (epsilon) model and a shifted flow model. DDIM CFG++ is checked against diffusers'
DDIMScheduler: it differs from DDIM by the renoising term alone.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from gen.formulations import DDPM, Flow
from gen.sampling import k, names, schedules
from gen.sampling.model import Denoiser, GeneratorNoise
from tests.vendor.k_diffusion import sampling as kd

TOL = 1e-5
GUIDANCE = 2.0


def model(formulation, cfg=True) -> Denoiser:
    """gen's wrapper over a nonlinear model output (epsilon or velocity) with CFG: the guided output, the
    unconditional one kept for the CFG++ samplers as the pipeline keeps it (cfg False: the conditional alone)."""
    ms = Denoiser(None, formulation)

    def predict(x_in, t):
        cond = 0.9 * x_in - 0.3 + 0.2 * torch.sin(3 * x_in) * (0.5 + t / ms.T)
        if not cfg:
            return cond
        uncond = 0.8 * x_in + 0.1 * torch.cos(2 * x_in)
        ms.keep_uncond(uncond)
        return uncond + GUIDANCE * (cond - uncond)

    ms.predict = predict
    return ms


def setup(formulation, n=8):
    ms = model(formulation)
    sigmas = (schedules.karras(ms, n) if ms.kind == "ddpm" else schedules.simple(ms, n)).double()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return ms, sigmas, x * sigmas[0] if ms.kind == "ddpm" else x


def both(ms, x, sigma):
    """(D, U): the guided and the unconditional denoised estimates, as ComfyUI's post-CFG hook hands them over."""
    denoised = ms(x, sigma)
    return denoised, ms.uncond_denoised


def alpha(ms, sigma):  # ComfyUI's sigma * exp(half_log_snr): 1 for eps/v models, 1 - sigma for CONST (flow)
    return 1 - sigma if ms.kind == "flow" else torch.ones_like(sigma)


def ref_ipndm(ms, x, sigmas, noise):
    """ComfyUI's sample_ipndm (from zju-pi/diff-sampler): Adams-Bashforth on d with the fixed 1-4 step weights,
    order min(4, i + 1), x = D on the step to sigma 0."""
    weights = [(1,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24)]
    ds = []
    for i in range(len(sigmas) - 1):
        denoised, _ = both(ms, x, sigmas[i])
        ds.insert(0, (x - denoised) / sigmas[i])
        w = weights[min(4, i + 1) - 1]
        x = denoised if sigmas[i + 1] == 0 else x + (sigmas[i + 1] - sigmas[i]) * sum(a * d for a, d in zip(w, ds))
        ds = ds[:3]
    return x


def ref_heunpp2(ms, x, sigmas, noise):
    """ComfyUI's sample_heunpp2 (from Carzit's sd-webui-samplers-scheduler): Euler into the last sigma; Heun
    weighted w2 = sigma_i+1 / 2 sigma_0 into the one before; else three derivatives, w_k = sigma_k / 3 sigma_0."""
    def d_at(y, s):
        return (y - both(ms, y, s)[0]) / s

    last = sigmas[-1]
    for i in range(len(sigmas) - 1):
        s0, s1 = sigmas[i], sigmas[i + 1]
        d1 = d_at(x, s0)
        if s1 == last:
            x = x + d1 * (s1 - s0)
            continue
        d2 = d_at(x + d1 * (s1 - s0), s1)
        if sigmas[i + 2] == last:
            w2 = s1 / (2 * sigmas[0])
            x = x + ((1 - w2) * d1 + w2 * d2) * (s1 - s0)
            continue
        d3 = d_at(x + d1 * (s1 - s0) + d2 * (sigmas[i + 2] - s1), sigmas[i + 2])
        w2, w3 = s1 / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
        x = x + ((1 - w2 - w3) * d1 + w2 * d2 + w3 * d3) * (s1 - s0)
    return x


def ref_res_multistep(ms, x, sigmas, noise, cfg_pp=False):
    """ComfyUI's res_multistep at eta 0 (arXiv 2308.02157's second-order multistep): in t = -log sigma, h = t' - t,
    c2 = (t_prev - t) / h, phi1 = (e^-h - 1) / -h, phi2 = (phi1 - 1) / -h, b1 = phi1 - phi2 / c2, b2 = phi2 / c2,
    x' = e^-h x + h (b1 D + b2 D_prev); Euler on the first step and into sigma 0. res_multistep_cfg_pp: the Euler
    step D + sigma' (x - U) / sigma, and x + D - U stepped on U and U_prev."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = both(ms, x, sigmas[i])
        if cfg_pp and (old is None or sigmas[i + 1] == 0):
            x = denoised + (x - uncond) / sigmas[i] * sigmas[i + 1]
        elif old is None or sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        elif cfg_pp:
            t, t_next, t_prev = -sigmas[i].log(), -sigmas[i + 1].log(), -sigmas[i - 1].log()
            h = t_next - t
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            x = torch.exp(-h) * (x + denoised - uncond) + h * ((phi1 - phi2 / ((t_prev - t) / h)) * uncond
                                                               + phi2 / ((t_prev - t) / h) * old)
        else:
            t, t_next, t_prev = -sigmas[i].log(), -sigmas[i + 1].log(), -sigmas[i - 1].log()
            h = t_next - t
            c2 = (t_prev - t) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            x = torch.exp(-h) * x + h * ((phi1 - phi2 / c2) * denoised + phi2 / c2 * old)
        old = uncond if cfg_pp else denoised
    return x


def ref_er_sde(ms, x, sigmas, noise):
    """ComfyUI's sample_er_sde (VP ER-SDE-Solver-3, arXiv 2309.06169): lambda = sigma / alpha, noise scaler
    lambda (e^(lambda^0.3) + 10), stage 2 and 3 integrals by 200-point sums; a flow model's first sigma 1 moved to
    the sigma of timestep fraction 1 - 1e-4 (offset_first_sigma_for_snr)."""
    def scaler(v):
        return v * ((v ** 0.3).exp() + 10)

    if ms.kind == "flow" and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = ms.shift(torch.tensor(1 - 1e-4, dtype=torch.float64))
    lam = sigmas / alpha(ms, sigmas)
    pts = torch.arange(200, dtype=torch.float64)
    old = old_d = None
    for i in range(len(sigmas) - 1):
        denoised, _ = both(ms, x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            a_s, a_t = sigmas[i] / lam[i], sigmas[i + 1] / lam[i + 1]
            r = scaler(lam[i + 1]) / scaler(lam[i])
            x = a_t / a_s * r * x + a_t * (1 - r) * denoised
            if i >= 1:
                dt = lam[i + 1] - lam[i]
                step = -dt / 200
                pos = lam[i + 1] + pts * step
                d = (denoised - old) / (lam[i] - lam[i - 1])
                x = x + a_t * (dt + (1 / scaler(pos)).sum() * step * scaler(lam[i + 1])) * d
                if i >= 2:
                    s_u = ((pos - lam[i]) / scaler(pos)).sum() * step
                    x = x + a_t * (dt ** 2 / 2 + s_u * scaler(lam[i + 1])) * (d - old_d) / ((lam[i] - lam[i - 2]) / 2)
                old_d = d
            x = x + a_t * noise(sigmas[i], sigmas[i + 1]) * (lam[i + 1] ** 2 - lam[i] ** 2 * r ** 2).sqrt().nan_to_num(0)
        old = denoised
    return x


def ref_euler_cfg_pp(ms, x, sigmas, noise, eta=0.0):
    """ComfyUI's sample_euler_ancestral_cfg_pp (sample_euler_cfg_pp: at eta 0): d = (x - alpha U) / sigma;
    get_ancestral_step(sigma / alpha, sigma' / alpha', eta) gives (down, up); x' = alpha' D + alpha' down d
    + alpha' up noise; x = D on the step to sigma 0."""
    for i in range(len(sigmas) - 1):
        denoised, uncond = both(ms, x, sigmas[i])
        a, a_next = alpha(ms, sigmas[i]), alpha(ms, sigmas[i + 1])
        d = (x - a * uncond) / sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        down, up = kd.get_ancestral_step(sigmas[i] / a, sigmas[i + 1] / a_next, eta=eta)
        x = a_next * denoised + a_next * down * d
        if eta:
            x = x + a_next * noise(sigmas[i], sigmas[i + 1]) * up
    return x


def ref_dpmpp_2m_cfg_pp(ms, x, sigmas, noise):
    """ComfyUI's sample_dpmpp_2m_cfg_pp: x' = D - e^-h U - expm1(-h) (D - U_prev) / 2r + e^-h x, the second-order
    term from the second step on and not into sigma 0 (r = h_last / h)."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = both(ms, x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            mix = -torch.exp(-h) * uncond
            if old is not None:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                mix = mix - torch.expm1(-h) / (2 * r) * (denoised - old)
            x = denoised + mix + torch.exp(-h) * x
        old = uncond
    return x


def ref_gradient_estimation(ms, x, sigmas, noise, cfg_pp=False):
    """ComfyUI's sample_gradient_estimation (ge_gamma 2; Permenter & Yuan 2024): an Euler step (CFG++: D + sigma' d
    with d from U), then + (gamma - 1)(d - d_prev) dt from the second step on; x = D into sigma 0."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = both(ms, x, sigmas[i])
        d = (x - (uncond if cfg_pp else denoised)) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            x = x if old is None else x + (2.0 - 1) * (d - old) * dt
        old = d
    return x


CASES = [(k.ipndm, ref_ipndm), (k.heunpp2, ref_heunpp2), (k.res_multistep, ref_res_multistep),
         (k.er_sde, ref_er_sde), (k.euler_cfg_pp, ref_euler_cfg_pp), (k.dpmpp_2m_cfg_pp, ref_dpmpp_2m_cfg_pp),
         (k.euler_ancestral_cfg_pp, lambda *a: ref_euler_cfg_pp(*a, eta=1.0)),
         (k.res_multistep_cfg_pp, lambda *a: ref_res_multistep(*a, cfg_pp=True)),
         (k.gradient_estimation, ref_gradient_estimation),
         (k.gradient_estimation_cfg_pp, lambda *a: ref_gradient_estimation(*a, cfg_pp=True))]


@pytest.mark.parametrize("formulation", [DDPM(), Flow(shift=3.0)], ids=["eps", "flow"])
@pytest.mark.parametrize("ours,ref", CASES, ids=[c[0].__name__ for c in CASES])
def test_sampler_equals_comfyuis_formula(ours, ref, formulation):
    ms, sigmas, x = setup(formulation)
    with torch.no_grad():
        want = ref(ms, x, sigmas, GeneratorNoise(x, torch.Generator().manual_seed(1)))
        got = ours(ms, x, sigmas, GeneratorNoise(x, torch.Generator().manual_seed(1)))
        euler = k.euler(ms, x, sigmas, None)
    diff = float((got - want).abs().max())
    print(f"comfy formula {ours.__name__} {ms.kind}: max abs diff {diff:.2e} "
          f"(vs euler {float((got - euler).abs().max()):.2e})")
    assert diff <= TOL < float((got - euler).abs().max()) and float(want.abs().max()) > 0.1


def test_ddim_cfg_pp_differs_from_diffusers_ddim_by_the_renoising_term_alone():
    """Each DDIM step of a 6-step run on DDIMScheduler's own timesteps (its last to alphas_cumprod[0]): DDIM CFG++
    from x_t is diffusers' DDIM step from x_t plus sqrt(1 - abar_prev) (eps_uncond - eps_guided), its x0 term the
    same; and without an unconditional pass the whole run is diffusers' DDIM run."""
    ms, alone = model(DDPM()), model(DDPM(), cfg=False)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(6)
    abar = sched.alphas_cumprod.double()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain, renoised = x.clone(), 0.0

    def step(ms, x, sigma, sigma_prev):  # gen's sampler on the VE x = x_t / sqrt(abar), back to the VP x_t-1
        out = k.ddim_cfg_pp(ms, x * (1 + sigma ** 2).sqrt(), torch.stack([sigma, sigma_prev]), None)
        return out / (1 + sigma_prev ** 2).sqrt()

    for j, t in enumerate(sched.timesteps):
        t_prev = int(t) - 1000 // 6 if j + 1 < len(sched.timesteps) else 0
        sigma, sigma_prev = ((1 - abar[[int(t), t_prev]]) / abar[[int(t), t_prev]]).sqrt()
        with torch.no_grad():
            eps_g = ms.predict(x, t.double())  # guided and unconditional eps at (x_t, t), as the DDIM step sees them
            eps_u = ms.uncond
            ddim = sched.step(eps_g, t, x).prev_sample
            ours = step(ms, x, sigma, sigma_prev)
            ref = sched.step(alone.predict(plain, t.double()), t, plain).prev_sample
            plain = step(alone, plain, sigma, sigma_prev)
        term = (1 - abar[t_prev]).sqrt() * (eps_u - eps_g)
        assert float((ours - ddim - term).abs().max()) <= TOL, j
        assert float((plain - ref).abs().max()) <= TOL, j  # no unconditional pass: DDIM CFG++ is DDIM
        renoised, x = max(renoised, float(term.abs().max())), ours
    print(f"ddim cfg++ vs DDIMScheduler: the renoising term alone, up to {renoised:.2e}")
    assert renoised > 1e-2


def test_cfg_pp_names():
    for name, fn in [("DDIM CFG++", k.ddim_cfg_pp), ("ddim-cfg++", k.ddim_cfg_pp),
                     ("gradient_estimation", k.gradient_estimation),
                     ("gradient_estimation_cfg_pp", k.gradient_estimation_cfg_pp),
                     ("res_multistep_cfg_pp", k.res_multistep_cfg_pp),
                     ("euler_ancestral_cfg_pp", k.euler_ancestral_cfg_pp)]:
        s, _ = names.sampler(name)
        assert s.fn is fn and s.kinds == ("ddpm", "flow"), name
    # A1111's DDIM CFG++ is a timestep sampler (sd_samplers_timesteps.py): the model's own schedule
    assert names.from_a1111("DDIM CFG++", "Karras", 0.0, "ddpm") == ("ddim-cfg++", "automatic")
