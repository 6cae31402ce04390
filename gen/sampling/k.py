"""Samplers over sigmas, in the shape of k-diffusion's sampling.py (Crowson) and ComfyUI's copy of it.

Each is `sampler(model, x, sigmas, noise) -> x`: `model` a gen.sampling.model.Denoiser (D(x, sigma) plus the
formulation's ancestral step and renoising), `x` the starting latents already scaled to sigmas[0], `sigmas`
descending and ending in 0, `noise(sigma, sigma_next)` an N(0, I) sampler (per-image generators, or a Brownian
tree for the SDE samplers). `callback(i, x)` is called after each step.
"""

from __future__ import annotations

import numpy as np
import torch

from gen.sampling import schedules
from gen.sampling.dpm_solver import dpm_adaptive, dpm_fast  # in NOISE below: each sampler function is k's


def to_d(x, sigma, denoised):
    """The Karras ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def _t(sigma):  # DPM-Solver's time: t = -log sigma
    return -sigma.log()


def euler(model, x, sigmas, noise, callback=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        x = x + to_d(x, sigmas[i], model(x, sigmas[i])) * (sigmas[i + 1] - sigmas[i])
        callback and callback(i, x)
    return x


def euler_ancestral(model, x, sigmas, noise, callback=None, eta=1.0):
    """Ancestral sampling with Euler steps (k-diffusion's sample_euler_ancestral; RF renoising for flow)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up, scale = model.ancestral(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * up
        callback and callback(i, x)
    return x


def _heun_step(model, x, sigma, sigma_next):
    d = to_d(x, sigma, model(x, sigma))
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    return x + (d + to_d(x_2, sigma_next, model(x_2, sigma_next))) / 2 * dt


def heun(model, x, sigmas, noise, callback=None):
    """Heun's second-order steps (Karras et al. 2022, Algorithm 1); Euler on the last step to sigma 0."""
    for i in range(len(sigmas) - 1):
        x = _heun_step(model, x, sigmas[i], sigmas[i + 1])
        callback and callback(i, x)
    return x


def heunpp2(model, x, sigmas, noise, callback=None):
    """Heun++: up to three derivatives weighted by sigma (Carzit's sd-webui-samplers-scheduler, as ComfyUI)."""
    end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == end:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            if sigmas[i + 2] == end:
                w2 = sigmas[i + 1] / (2 * sigmas[0])
                x = x + (d * (1 - w2) + d_2 * w2) * dt
            else:
                x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
                d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2]))
                w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
                x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
        callback and callback(i, x)
    return x


def _dpm2_step(model, x, sigma, sigma_to, denoised):
    """DPM-Solver-2's midpoint step from sigma to sigma_to (Lu et al. 2022), Euler where sigma_to is 0."""
    d = to_d(x, sigma, denoised)
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    return x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_to - sigma)


def dpm_2(model, x, sigmas, noise, callback=None):
    """DPM-Solver-2 steps in Karras' sigma parametrisation (k-diffusion's sample_dpm_2)."""
    for i in range(len(sigmas) - 1):
        x = _dpm2_step(model, x, sigmas[i], sigmas[i + 1], model(x, sigmas[i]))
        callback and callback(i, x)
    return x


def dpm_2_ancestral(model, x, sigmas, noise, callback=None, eta=1.0):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion's sample_dpm_2_ancestral)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up, scale = model.ancestral(sigmas[i], sigmas[i + 1], eta)
        x = _dpm2_step(model, x, sigmas[i], down, denoised)
        if down > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * up
        callback and callback(i, x)
    return x


def _lagrange(nodes, j: int) -> np.polynomial.Polynomial:
    """The Lagrange basis polynomial of nodes[j] over `nodes`."""
    others = [o for k, o in enumerate(nodes) if k != j]
    poly = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
    return poly / np.prod([nodes[j] - o for o in others])


def lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """The integral over [t_i, t_i+1] of the Lagrange basis polynomial of point i - j (exact, by numpy)."""
    antiderivative = _lagrange([t[i - k] for k in range(order)], j).integ()
    return float(antiderivative(t[i + 1]) - antiderivative(t[i]))


def deis_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """The integral over sigma in [t_i, t_i+1] of the Lagrange basis polynomial of point i - j in log sigma
    (DEIS's "log-rho" multistep, Zhang & Chen 2023, as diffusers' DEISMultistepScheduler): with u = log sigma,
    the integral of p(u) e^u, whose antiderivative is e^u (p - p' + p'' - ...), exactly."""
    if order == 1:
        return float(t[i + 1] - t[i])
    poly = _lagrange([np.log(t[i - k]) for k in range(order)], j)
    q = sum((-1) ** m * poly.deriv(m) for m in range(order))
    return float(t[i + 1] * q(np.log(t[i + 1])) - t[i] * q(np.log(t[i])))


def _adams(model, x, sigmas, callback, order, coefficient, lower_final=False):
    """Adams-Bashforth steps on d = dx/dsigma with `coefficient(order, sigmas, i, j)`; `lower_final`: the last
    steps at lower orders (one at the last, two before it), as diffusers' and ComfyUI's multistep solvers."""
    ts, ds, n = sigmas.double().cpu().numpy(), [], len(sigmas) - 1
    for i in range(n):
        ds = (ds + [to_d(x, sigmas[i], model(x, sigmas[i]))])[-order:]
        cur = min(i + 1, order, n - i) if lower_final else min(i + 1, order)
        x = x + sum(coefficient(cur, ts, i, j) * d for j, d in enumerate(ds[::-1][:cur]))
        callback and callback(i, x)
    return x


def lms(model, x, sigmas, noise, callback=None, order=4):
    """Linear multistep (Adams-Bashforth over sigma, order 4; k-diffusion's sample_lms)."""
    return _adams(model, x, sigmas, callback, order, lms_coefficient)


def deis(model, x, sigmas, noise, callback=None, order=3):
    """DEIS multistep, order 3 (Zhang & Chen 2023; diffusers' DEISMultistepScheduler, lower orders at the end)."""
    return _adams(model, x, sigmas, callback, order, deis_coefficient, lower_final=True)


def dpmpp_2s_ancestral(model, x, sigmas, noise, callback=None, eta=1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b; k-diffusion's sample_dpmpp_2s_ancestral)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up, scale = model.ancestral(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(down)
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h / 2).expm1() * denoised
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * model(x_2, (-s).exp())
        if sigmas[i + 1] > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * up
        callback and callback(i, x)
    return x


def dpmpp_sde(model, x, sigmas, noise, callback=None, eta=1.0, r=0.5):
    """DPM-Solver++ (stochastic, two stages per step; k-diffusion's sample_dpmpp_sde, A1111's "DPM++ SDE")."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            down, up, _ = model.ancestral((-t).exp(), (-s).exp(), eta)
            s_ = _t(down)
            x_2 = ((-s_).exp() / (-t).exp()) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise((-t).exp(), (-s).exp()) * up
            denoised_2 = model(x_2, (-s).exp())
            down, up, _ = model.ancestral((-t).exp(), (-t_next).exp(), eta)
            t_next_ = _t(down)
            denoised_d = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
            x = ((-t_next_).exp() / (-t).exp()) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise((-t).exp(), (-t_next).exp()) * up
        callback and callback(i, x)
    return x


def dpmpp_2m(model, x, sigmas, noise, callback=None, cfg_pp=False):
    """DPM-Solver++(2M) (Lu et al. 2022b; k-diffusion's sample_dpmpp_2m); `cfg_pp`: its CFG++ form (ComfyUI's
    dpmpp_2m_cfg_pp), renoised along the unconditional prediction (with none, or without cfg_pp, that is the guided
    one and the update is DPM-Solver++(2M)'s: x' = e^-h x + (1 - e^-h) (D + (D - D_prev) / 2r))."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        along = model.uncond_denoised if cfg_pp else denoised
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            mix = -(-h).exp() * along
            if old is not None:
                r = (_t(sigmas[i]) - _t(sigmas[i - 1])) / h
                mix = mix - (-h).expm1() / (2 * r) * (denoised - old)
            x = denoised + mix + (-h).exp() * x
        old = along
        callback and callback(i, x)
    return x


def dpmpp_2m_sde(model, x, sigmas, noise, callback=None, eta=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE, midpoint or heun correction (k-diffusion's sample_dpmpp_2m_sde)."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            phi = (-h - eta_h).expm1().neg()
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + phi * denoised
            if old is not None:
                r = h_last / h
                c = phi / (-h - eta_h) + 1 if solver_type == "heun" else 0.5 * phi
                x = x + c * (1 / r) * (denoised - old)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
            h_last = h
        old = denoised
        callback and callback(i, x)
    return x


def dpmpp_2m_sde_heun(model, x, sigmas, noise, callback=None, eta=1.0):
    """DPM-Solver++(2M) SDE with the heun correction (A1111's "DPM++ 2M SDE Heun")."""
    return dpmpp_2m_sde(model, x, sigmas, noise, callback, eta, "heun")


def dpmpp_3m_sde(model, x, sigmas, noise, callback=None, eta=1.0):
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde)."""
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
        callback and callback(i, x)
    return x


def ddim_cfg_pp(model, x, sigmas, noise, callback=None, eta=0.0):
    """DDIM (Song et al. 2021) with CFG++'s renoising (Chung et al. 2024; A1111's "DDIM CFG++"): the guided D,
    renoised to the next sigma along the unconditional prediction U's noise, x' = alpha' D + sigma' (x - alpha U)
    / sigma, where DDIM's is x' = alpha' D + sigma' (x - alpha D) / sigma (the guidance scale is CFG++'s, 0 to 1:
    A1111 divides its CFG scale by 12.5). With no unconditional pass it is DDIM, which is Euler. `eta`: ComfyUI's
    euler_ancestral_cfg_pp, the ancestral split taken on sigma / alpha and fresh noise scaled by alpha'."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = model.noise_of(x, model.uncond_denoised, sigmas[i])
        if not eta or sigmas[i + 1] == 0:
            x = model.renoise(denoised, d, sigmas[i + 1])
        else:
            a, a_next = model.alpha(sigmas[i]), model.alpha(sigmas[i + 1])
            s, s_next = sigmas[i] / a, sigmas[i + 1] / a_next  # k-diffusion's get_ancestral_step, there
            up = torch.minimum(s_next, eta * s_next * (1 - (s_next / s) ** 2) ** 0.5)  # flow's s = inf at sigma 1
            x = a_next * (denoised + noise(sigmas[i], sigmas[i + 1]) * up) + a_next * (s_next ** 2 - up ** 2) ** 0.5 * d
        callback and callback(i, x)
    return x


def euler_cfg_pp(model, x, sigmas, noise, callback=None):
    """Euler CFG++ (ComfyUI's euler_cfg_pp, its ancestral CFG++ step at eta 0): DDIM CFG++'s step, Euler's ODE step
    being DDIM's; for flow models the data part is kept at alpha' = 1 - sigma' (ComfyUI's CONST branch)."""
    return ddim_cfg_pp(model, x, sigmas, noise, callback)


def euler_ancestral_cfg_pp(model, x, sigmas, noise, callback=None, eta=1.0):
    """Ancestral Euler CFG++ (ComfyUI's euler_ancestral_cfg_pp): DDIM CFG++ at eta 1."""
    return ddim_cfg_pp(model, x, sigmas, noise, callback, eta)


def gradient_estimation(model, x, sigmas, noise, callback=None, ge_gamma=2.0, cfg_pp=False):
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion models from an optimization
    perspective"; ComfyUI's gradient_estimation): Euler steps along d + (gamma - 1)(d - d_prev), the derivative
    extrapolated from the last step's; `cfg_pp`: d from the unconditional prediction, renoised as ddim_cfg_pp."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], model.uncond_denoised if cfg_pp else denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if old is not None:
                x = x + (ge_gamma - 1) * (d - old) * dt
        old = d
        callback and callback(i, x)
    return x


def gradient_estimation_cfg_pp(model, x, sigmas, noise, callback=None):
    """Gradient estimation with CFG++ (ComfyUI's gradient_estimation_cfg_pp)."""
    return gradient_estimation(model, x, sigmas, noise, callback, cfg_pp=True)


def dpmpp_2m_cfg_pp(model, x, sigmas, noise, callback=None):
    """DPM-Solver++(2M) CFG++ (as ComfyUI's dpmpp_2m_cfg_pp); with no unconditional pass it is dpm++2m."""
    return dpmpp_2m(model, x, sigmas, noise, callback, cfg_pp=True)


def res_multistep(model, x, sigmas, noise, callback=None, cfg_pp=False):
    """RES second-order multistep (Zhang et al. 2023, arXiv 2308.02157; ComfyUI's res_multistep): exponential
    integrator weights phi_1, phi_2 on this and the last denoised estimate; Euler first and last. `cfg_pp`: ComfyUI's
    res_multistep_cfg_pp, the estimates U unconditional and the guidance D - U added to x before the step."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        along = model.uncond_denoised if cfg_pp else denoised
        if old is None or sigmas[i + 1] == 0:
            x = denoised + to_d(x, sigmas[i], along) * sigmas[i + 1]
        else:
            t = _t(sigmas[i])
            h = _t(sigmas[i + 1]) - t
            c2 = (_t(sigmas[i - 1]) - t) / h
            phi1 = (-h).expm1() / -h
            b2 = (phi1 - 1) / -h / c2
            x = (-h).exp() * (x + denoised - along) + h * ((phi1 - b2) * along + b2 * old)
        old = along
        callback and callback(i, x)
    return x


def res_multistep_cfg_pp(model, x, sigmas, noise, callback=None):
    """RES multistep with CFG++ (ComfyUI's res_multistep_cfg_pp)."""
    return res_multistep(model, x, sigmas, noise, callback, cfg_pp=True)


def er_sde(model, x, sigmas, noise, callback=None, max_stage=3):
    """Extended reverse-time SDE solver, VE ER-SDE-Solver-3 (Cui et al. 2023, arXiv 2309.06169; ComfyUI's er_sde)
    in lambda = sigma / alpha, with its noise scaler lambda (e^(lambda^0.3) + 10) and 200-point integrals."""
    def scaler(lam):
        return lam * ((lam ** 0.3).exp() + 10.0)

    if model.kind == "flow" and sigmas[0] >= 1:  # lambda is infinite at sigma 1: start at timestep 1 - 1e-4's sigma
        sigmas = torch.cat([model.shift(torch.tensor([1 - 1e-4], dtype=torch.float64)).to(sigmas), sigmas[1:]])
    alphas = model.alpha(sigmas.double())  # the coefficients in float64, whatever the latents' dtype
    lams = sigmas.double() / alphas
    points = torch.arange(200, dtype=torch.float64, device=sigmas.device)
    old = old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            ls, lt, alpha_t = lams[i], lams[i + 1], alphas[i + 1]
            r = scaler(lt) / scaler(ls)
            x = alpha_t / alphas[i] * r * x + alpha_t * (1 - r) * denoised
            if i >= 1 and max_stage >= 2:
                dt = lt - ls
                step = -dt / len(points)
                pos = lt + points * step
                d = (denoised - old) / (ls - lams[i - 1])
                x = x + alpha_t * (dt + (1 / scaler(pos)).sum() * step * scaler(lt)) * d
                if i >= 2 and max_stage >= 3:
                    s_u = ((pos - ls) / scaler(pos)).sum() * step
                    x = x + alpha_t * (dt ** 2 / 2 + s_u * scaler(lt)) * (d - old_d) / ((ls - lams[i - 2]) / 2)
                old_d = d
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * (lt ** 2 - ls ** 2 * r ** 2).sqrt().nan_to_num(0.0)
        old = denoised
        callback and callback(i, x)
    return x


def _unipc_step(x, sigma, sigma_next, history, order, variant, denoised_next=None):
    """UniPC's predictor (UniP) from sigma to sigma_next, or with `denoised_next`, D at the predicted x, its
    corrector (UniC) of that prediction (Zhao et al. 2023, data prediction; diffusers' UniPCMultistepScheduler's
    multistep_uni_p/c_bh_update in VE variables). `history`: [(D, lambda)] up to sigma, newest last."""
    m0, l0 = history[-1]
    h = _t(sigma_next) - l0
    older = history[-order:-1][::-1]
    rks = [(lam - l0) / h for _, lam in older] + [torch.ones_like(h)]
    d1s = [(m - m0) / r for (m, _), r in zip(older, rks)]
    hh = -h
    h_phi_1 = hh.expm1()
    h_phi_k, b_h, factorial = h_phi_1 / hh - 1, hh if variant == "bh1" else hh.expm1(), 1
    rks, R, b = torch.stack(rks), [], []
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(R), torch.stack(b)
    x = sigma_next / sigma * x - h_phi_1 * m0
    if denoised_next is None:
        rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else b.new_full((1,), 0.5)
        return x - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = torch.linalg.solve(R, b) if order > 1 else b.new_full((1,), 0.5)
    return x - b_h * (sum(r * d for r, d in zip(rhos[:-1], d1s)) + rhos[-1] * (denoised_next - m0))


def unipc(model, x, sigmas, noise, callback=None, order=3, variant="bh2"):
    """UniPC multistep, order 3 (Zhao et al. 2023): each model call corrects the last step (UniC) and predicts the
    next (UniP); lower orders at the end; B(h) = e^h - 1 ("bh2") or h ("bh1")."""
    history, n, x_last, used = [], len(sigmas) - 1, None, 0
    s64 = sigmas.double()  # the coefficients in float64 (fp16 latents' sigmas: linalg.solve takes no half floats)
    for i in range(n):
        denoised = model(x, sigmas[i])
        if x_last is not None:
            x = _unipc_step(x_last, s64[i - 1], s64[i], history, used, variant, denoised)
        history = (history + [(denoised, _t(s64[i]))])[-order:]
        used, x_last = min(order, n - i, len(history)), x
        x = denoised if sigmas[i + 1] == 0 else _unipc_step(x, s64[i], s64[i + 1], history, used, variant)
        callback and callback(i, x)
    return x


def unipc_bh1(model, x, sigmas, noise, callback=None):
    """UniPC with B(h) = h (ComfyUI's uni_pc, A1111's default UniPC variant)."""
    return unipc(model, x, sigmas, noise, callback, variant="bh1")


def tcd(model, x, sigmas, noise, callback=None, eta=0.3):
    """Trajectory consistency distillation's sampler (Zheng et al. 2024; diffusers' TCDScheduler, ComfyUI's
    SamplerTCD): D(x), back along the estimated noise to sigma_s, the sigma of timestep floor((1 - eta) t_next),
    then fresh noise up to sigma_next (eta 0: deterministic). A DDPM model's last step ends at timestep 0's x, as
    both references end."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if model.kind == "flow":
            s = sigmas[i + 1] * (1 - eta)
        else:
            s = model.sigma(((1 - eta) * model.t(sigmas[i + 1]).round()).floor()).to(x)
        x = model.renoise(denoised, model.noise_of(x, denoised, sigmas[i]), s)
        if sigmas[i + 1] > 0 and eta:
            x = model.renoise_up(x, noise(sigmas[i], sigmas[i + 1]), s, sigmas[i + 1])
        elif sigmas[i + 1] == 0 and model.kind != "flow":
            x = x / (1 + s ** 2).sqrt()
        callback and callback(i, x)
    return x


def restart(model, x, sigmas, noise, callback=None, restart_list=None):
    """Restart sampling (Xu et al. 2023) as A1111's "Restart": Heun steps; from 20 steps on, fewer Karras sigmas
    and, once the run reaches sigma 0.1, a jump back up to sigma 2 with fresh noise and Heun steps down again (9
    steps once; from 36 steps on, steps // 4 steps twice). `restart_list`: {sigma: (steps, times, sigma_max)}.
    Sigmas compare as sigma / alpha, so flow models restart at the same noise levels."""
    n = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if n >= 20:
            steps, times = (n // 4, 2) if n >= 36 else (9, 1)
            sigmas = schedules.karras_sigmas(n - steps * times, float(sigmas[-2]), float(sigmas[0])).to(sigmas)
            restart_list = {0.1: (steps + 1, times, 2.0)}
    levels = sigmas / model.alpha(sigmas)

    def nearest(level):
        return int((levels - level).abs().argmin())

    at, pairs = {nearest(key): value for key, value in restart_list.items()}, []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            steps, times, top = at[i + 1]
            if nearest(top) < i + 1:
                again = schedules.karras_sigmas(steps, float(sigmas[i + 1]), float(sigmas[nearest(top)]))[:-1]
                pairs += list(zip(again[:-1].to(sigmas), again[1:].to(sigmas))) * times
    last = None
    for j, (sigma, sigma_next) in enumerate(pairs):
        if last is not None and last < sigma:
            x = model.renoise_up(x, noise(last, sigma), last, sigma)
        x = _heun_step(model, x, sigma, sigma_next)
        last = sigma_next
        callback and callback(j, x)
    return x


def ipndm(model, x, sigmas, noise, callback=None, max_order=4):
    """Improved pseudo numerical (Adams-Bashforth on d, fixed coefficients; Zhang & Chen 2023, as ComfyUI)."""
    coefs = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    history = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        c = coefs[min(max_order, i + 1)]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + (sigmas[i + 1] - sigmas[i]) * sum(k * v for k, v in zip(c, [d] + history[::-1]))
        history = (history + [d])[-(max_order - 1):]
        callback and callback(i, x)
    return x


def lcm(model, x, sigmas, noise, callback=None):
    """Latent consistency sampling (Luo et al. 2023): jump to D(x), renoise to the next sigma (ComfyUI's lcm)."""
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i])
        if sigmas[i + 1] > 0:
            x = model.renoise(x, noise(sigmas[i], sigmas[i + 1]), sigmas[i + 1])
        callback and callback(i, x)
    return x


def ddpm(model, x, sigmas, noise, callback=None):
    """DDPM's ancestral step (Ho et al. 2020, eq. 11) in VP variables, as ComfyUI's ddpm sampler takes it."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        eps = to_d(x, s, model(x, s))
        abar, abar_prev = 1 / (s * s + 1), 1 / (s_next * s_next + 1)
        alpha = abar / abar_prev
        x = (1 / alpha).sqrt() * (x / (1 + s ** 2).sqrt() - (1 - alpha) * eps / (1 - abar).sqrt())
        if s_next > 0:
            x = x + ((1 - alpha) * (1 - abar_prev) / (1 - abar)).sqrt() * noise(s, s_next)
            x = x * (1 + s_next ** 2).sqrt()
        callback and callback(i, x)
    return x


# which samplers need which noise: "sde" a Brownian tree, "ancestral" per-image generators, None none
NOISE = {euler_ancestral: "ancestral", dpm_2_ancestral: "ancestral", dpmpp_2s_ancestral: "ancestral",
         lcm: "ancestral", ddpm: "ancestral", tcd: "ancestral", restart: "ancestral", er_sde: "ancestral",
         dpmpp_sde: "sde", dpmpp_2m_sde: "sde", dpmpp_2m_sde_heun: "sde",
         dpmpp_3m_sde: "sde", dpm_fast: "ancestral", dpm_adaptive: "ancestral",
         euler_ancestral_cfg_pp: "ancestral"}
# the VP-only samplers: their steps assume x = x_0 + sigma noise with unbounded sigma (no flow counterpart here)
VP_ONLY = {dpmpp_sde, dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde, ddpm}
