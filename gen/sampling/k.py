"""Samplers over sigmas, in the shape of k-diffusion's sampling.py (Crowson) and ComfyUI's copy of it.

Each is `sampler(model, x, sigmas, noise) -> x`: `model` a gen.sampling.model.Denoiser (D(x, sigma) plus the
formulation's ancestral step and renoising), `x` the starting latents already scaled to sigmas[0], `sigmas`
descending and ending in 0, `noise(sigma, sigma_next)` an N(0, I) sampler (per-image generators, or a Brownian
tree for the SDE samplers). `callback(i, x)` is called after each step.
"""

from __future__ import annotations

import numpy as np
import torch


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


def heun(model, x, sigmas, noise, callback=None):
    """Heun's second-order steps (Karras et al. 2022, Algorithm 1); Euler on the last step to sigma 0."""
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x = x + (d + to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))) / 2 * dt
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


def lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """The integral over [t_i, t_i+1] of the Lagrange basis polynomial of point i - j (exact, by numpy)."""
    others = [t[i - k] for k in range(order) if k != j]
    poly = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
    poly = poly / np.prod([t[i - j] - o for o in others])
    antiderivative = poly.integ()
    return float(antiderivative(t[i + 1]) - antiderivative(t[i]))


def lms(model, x, sigmas, noise, callback=None, order=4):
    """Linear multistep (Adams-Bashforth over sigma, order 4; k-diffusion's sample_lms)."""
    ts, ds = sigmas.double().cpu().numpy(), []
    for i in range(len(sigmas) - 1):
        ds = (ds + [to_d(x, sigmas[i], model(x, sigmas[i]))])[-order:]
        cur = min(i + 1, order)
        x = x + sum(lms_coefficient(cur, ts, i, j) * d for j, d in enumerate(reversed(ds)))
        callback and callback(i, x)
    return x


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


def dpmpp_2m(model, x, sigmas, noise, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022b; k-diffusion's sample_dpmpp_2m)."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        d = denoised
        if old is not None and sigmas[i + 1] != 0:
            r = (t - _t(sigmas[i - 1])) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        old = denoised
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
         lcm: "ancestral", ddpm: "ancestral", dpmpp_sde: "sde", dpmpp_2m_sde: "sde", dpmpp_2m_sde_heun: "sde",
         dpmpp_3m_sde: "sde"}
# the VP-only samplers: their steps assume x = x_0 + sigma noise with unbounded sigma (no flow counterpart here)
VP_ONLY = {dpmpp_sde, dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde, ddpm}
