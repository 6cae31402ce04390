"""DPM-Solver-1/2/3 with fixed steps ("DPM fast") and with adaptive steps ("DPM adaptive": DPM-Solver-12 and -23
with a PID step-size controller), Lu et al. 2022 (arXiv 2206.00927), in the form of k-diffusion's DPMSolver
(sample_dpm_fast, sample_dpm_adaptive; A1111's samplers of those names).

They step in t = -log sigma on eps = (x - D(x, sigma)) / sigma from sigma_max to sigma_min and end there, not at
sigma 0: the samplers' sigmas give only those two ends (and, for dpm_fast, the number of model calls). eta 0 by
default, as k-diffusion's and ComfyUI's (A1111 passes its "Eta" setting, 1 unless set); the ancestral form (eta > 0)
is VE's, so a flow model samples them at eta 0. On a flow model dpm-fast's fixed steps fall evenly in its own log-SNR
(_times), not in -log sigma as k-diffusion's and ComfyUI's do, which leave the high-noise range two or three steps:
the bundled flow model's adherence at 100 steps 59.5% that way, Euler's 97.6% this way (bench/sampler_quality.py).
"""

from __future__ import annotations

import math

import torch


def _sigma(t):
    return t.neg().exp()


class _Solver:
    """The DPM-Solver steps over `model` (gen.sampling.model.Denoiser); `callback(i, x)` after each model call."""

    def __init__(self, model, callback):
        self.model, self.callback, self.calls = model, callback, 0

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            cache[key] = (x - self.model(x, _sigma(t))) / _sigma(t)
            self.callback and self.callback(self.calls, x)
            self.calls += 1
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        return x - _sigma(t_next) * (t_next - t).expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * h.expm1() * (eps + (eps_r1 - eps) / (2 * r1))

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - _sigma(s2) * (r2 * h).expm1() * eps
              - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def down(self, t, t_next, t_end, eta):
        """(where the deterministic step ends, the noise to add): k-diffusion's ancestral split of the step."""
        if not eta:
            return t_next, 0.0
        sd, _, _ = self.model.ancestral(_sigma(t), _sigma(t_next), eta)
        t_down = torch.minimum(t_end, -sd.log())
        return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2) ** 0.5


def _ends(model, sigmas, eta):
    nonzero = sigmas[sigmas > 0]
    t_start, t_end = -nonzero.max().log(), -nonzero.min().log()
    return t_start, t_end, (eta if model.kind != "flow" else 0.0)


FLOW_LAMBDA_START = -5.0  # a flow model's first log-SNR boundary: DPM-Solver's VP start (alpha_T 0.0064), sigma 0.9933


def _times(model, t_start, t_end, m: int, device) -> torch.Tensor:
    """dpm-fast's m + 1 step boundaries in t = -log sigma: even in t (k-diffusion's, float32), or for a flow model
    even in its half log-SNR lambda = log((1 - sigma) / sigma), DPM-Solver's spacing (-log sigma is no log-SNR there:
    even in it, a flow model's high-noise range, where it places objects, gets two or three steps), from
    FLOW_LAMBDA_START, the first step from sigma_max itself."""
    if model.kind != "flow":
        return torch.linspace(t_start, t_end, m + 1, device=device)  # float32 there, as k-diffusion's
    lam_end = math.log((1 - _sigma(t_end)) / _sigma(t_end))
    lam = torch.linspace(min(FLOW_LAMBDA_START, lam_end), lam_end, m + 1, dtype=torch.float64)
    return torch.cat([t_start.reshape(1).double().cpu(), torch.nn.functional.softplus(lam[1:])]).float().to(device)


def dpm_fast(model, x, sigmas, noise, callback=None, eta=0.0):
    """DPM-Solver-Fast (Lu et al. 2022, section 3.4; k-diffusion's sample_dpm_fast, A1111's "DPM fast"): len(sigmas)
    - 1 model calls in floor(n / 3) + 1 even steps in t, of order 3 and a last one or two of lower order."""
    n = len(sigmas) - 1
    t_start, t_end, eta = _ends(model, sigmas, eta)
    solver = _Solver(model, callback)
    m = math.floor(n / 3) + 1
    ts = _times(model, t_start, t_end, m, sigmas.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_down, up = solver.down(t, t_next, t_end, eta)
        x = (solver.step_1, solver.step_2, solver.step_3)[order - 1](x, t, t_down, {})
        if eta:
            x = x + up * noise(_sigma(t), _sigma(t_next))
    return x


class _PID:
    """k-diffusion's PIDStepSizeController: h scaled by 1 + atan(factor - 1) of the error history's PID factor."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety=0.81, eps=1e-8):
        self.h, self.accept_safety, self.eps, self.errs = h, accept_safety, eps, []
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)

    def propose_step(self, error) -> bool:
        inv = 1 / (float(error) + self.eps)
        self.errs = [inv] + (self.errs[1:] if self.errs else [inv, inv])
        factor = 1 + math.atan(math.prod(e ** b for e, b in zip(self.errs, self.b)) - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs = [self.errs[0], self.errs[0], self.errs[1]]
        self.h *= factor
        return accept


def dpm_adaptive(model, x, sigmas, noise, callback=None, eta=0.0, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                 pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81):
    """DPM-Solver-23 (order 3) or -12 with adaptive steps (Lu et al. 2022, section 3.4 and appendix; k-diffusion's
    sample_dpm_adaptive, A1111's "DPM adaptive"): the step count follows the error, not `sigmas`."""
    t_start, t_end, eta = _ends(model, sigmas, eta)
    solver = _Solver(model, callback)
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    s, x_prev = t_start, x
    pid = _PID(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    while s < t_end - 1e-5:
        cache = {}
        t = torch.minimum(t_end, s + pid.h)
        t_down, up = solver.down(s, t, t_end, eta)
        if order == 2:
            x_low, x_high = solver.step_1(x, s, t_down, cache), solver.step_2(x, s, t_down, cache)
        else:
            x_low, x_high = solver.step_2(x, s, t_down, cache, r1=1 / 3), solver.step_3(x, s, t_down, cache)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        if pid.propose_step(torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5):
            x_prev = x_low
            x = x_high + (up * noise(_sigma(s), _sigma(t)) if eta else 0)
            s = t
    return x
