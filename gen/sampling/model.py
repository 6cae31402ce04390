"""One model wrapper for every formulation: k-diffusion's denoiser D(x, sigma), and the noise the samplers add.

Time conventions (the formulations own them; here only as k-diffusion needs them):
- DDPM (epsilon or v): sigma = sqrt((1 - abar) / abar) and the sampler's x = x_t / sqrt(abar) = x_0 + sigma eps, so
  the model sees x / sqrt(sigma^2 + 1) at its interpolated timestep (Karras et al. 2022, table 1, "VP").
- Flow: the sampler's x is the model's x_sigma = (1 - sigma) x_0 + sigma noise, sigma in [0, 1], timestep
  sigma * T; the velocity v gives D = x - sigma v, so dx/dsigma = (x - D) / sigma holds as for VE models and
  every ODE sampler runs unchanged (ComfyUI's CONST model sampling); ancestral steps renoise as RF needs.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from gen.errors import GenError
from gen.formulations import Formulation


class Denoiser:
    """D(x, sigma) -> the denoised estimate, from `predict(x_in, t) -> model output` (guidance included)."""

    def __init__(self, predict, formulation: Formulation):
        self.predict, self.kind, self.formulation = predict, formulation.kind, formulation
        T = formulation.num_train_timesteps
        self.T = T
        if self.kind == "ddpm":
            self.prediction = formulation.prediction_type
            # diffusers' Euler schedulers keep zero terminal SNR's last step finite the same way. Sigmas in float32
            # from the float32 alphas_cumprod, as k-diffusion's DiscreteSchedule (A1111) computes them: a Brownian tree
            # sampled at sigma moves by ~sqrt(the sigma's change), so a few ulps show in the SDE samplers' images
            abar = formulation.alphas_cumprod.float().clamp(min=2 ** -24)
            self.sigmas = ((1 - abar) / abar).sqrt().double()
            self.log_sigmas = self.sigmas.log()
        else:
            self.prediction = "flow"
            self.set_shift(formulation.shift)

    def set_shift(self, shift: float) -> None:
        """A flow model's table for timestep shift `shift` (SD3 eq. 23; Flux's exp(mu) for its image size)."""
        self.shift = dataclasses.replace(self.formulation, shift=shift).shift_sigma
        self.sigmas = self.shift(torch.arange(1, self.T + 1, dtype=torch.float64) / self.T)
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's timestep for sigma: log-sigma interpolation in the DDPM table (k-diffusion's and diffusers'
        sigma_to_t), sigma * T for flow."""
        if self.kind == "flow":
            return sigma * self.T
        log_sigma = sigma.double().clamp(min=1e-10).log().cpu()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(0).argmax(0).clamp(max=len(self.sigmas) - 2)
        low_l, high_l = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((low_l - log_sigma) / (low_l - high_l)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape).float().to(sigma.device)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The sigma at (float) timestep t: log-linear interpolation of the table (k-diffusion's t_to_sigma)."""
        if self.kind == "flow":
            return self.shift(t.double() / self.T)
        t = t.double().clamp(0, len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        t = self.t(sigma.reshape(-1)[:1]).reshape(())  # one timestep for the batch, as diffusers passes it
        s = sigma.to(x.dtype)
        scale = 1.0 if self.kind == "flow" else (s ** 2 + 1).rsqrt()
        self.uncond = None
        denoised = self.denoised(x, s, scale, self.predict(x * scale, t))
        # the unconditional half of CFG's batch, where guidance kept it (gen.guidance's keep_uncond): the CFG++
        # samplers step along it; the guided estimate where none was run
        self.uncond_denoised = denoised if self.uncond is None else self.denoised(x, s, scale, self.uncond)
        return denoised

    def keep_uncond(self, uncond: torch.Tensor) -> None:
        self.uncond = uncond

    def denoised(self, x, s, scale, out):
        """D from the model's output `out` for x at sigma s (the model saw x * scale)."""
        if self.kind == "flow" or self.prediction == "epsilon":
            return x - s * out
        return x * scale ** 2 - out * s * scale  # v: c_skip x + c_out v (Salimans & Ho 2022)

    def alpha(self, sigma):
        """The data's factor in the sampler's x = alpha x_0 + sigma noise: 1 - sigma for flow, 1 for DDPM (VE x)."""
        return 1 - sigma if self.kind == "flow" else sigma * 0 + 1

    def noise_of(self, x, denoised, sigma):
        """The noise estimate (x - alpha D) / sigma."""
        return (x - self.alpha(sigma) * denoised) / sigma

    def renoise_up(self, x, noise, sigma, sigma_to):
        """x at sigma moved up to sigma_to >= sigma with fresh noise: the data part rescaled to alpha(sigma_to), the
        noise topped up to sigma_to (VE: x + sqrt(sigma_to^2 - sigma^2) noise)."""
        scale = self.alpha(sigma_to) / self.alpha(sigma)
        return scale * x + (sigma_to ** 2 - (scale * sigma) ** 2).clamp(min=0).sqrt() * noise

    def ancestral(self, sigma, sigma_next, eta: float = 1.0):
        """(sigma_down, sigma_up, scale) for an ancestral step: go to sigma_down deterministically, then
        x = scale x + sigma_up noise. VE: k-diffusion's get_ancestral_step; flow: the RF step ComfyUI takes
        (rescale the data part back to 1 - sigma_next, then top the noise up to sigma_next)."""
        if not eta or sigma_next == 0:
            return sigma_next, sigma_next * 0, 1.0
        if self.kind == "flow":
            down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            scale = (1 - sigma_next) / (1 - down)
            return down, (sigma_next ** 2 - down ** 2 * scale ** 2).clamp(min=0) ** 0.5, scale
        up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        return (sigma_next ** 2 - up ** 2) ** 0.5, up, 1.0

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """The sampler's x at sigma for data x0 and this noise (ComfyUI's noise_scaling)."""
        return sigma * noise + self.alpha(sigma) * x0

    def noise_scale(self, sigma_max: float, spacing: str | None) -> float:
        """What the initial N(0, 1) noise is multiplied by: sigma_max for the named schedules (k-diffusion's and
        A1111's `x = noise * sigmas[0]`), diffusers' init_noise_sigma on its own spacings (sigma_max for linspace and
        trailing, sqrt(sigma_max^2 + 1) otherwise); 1 for flow, whose x at sigma 1 is the noise."""
        if self.kind == "flow":
            return 1.0
        return sigma_max if spacing in ("named", "linspace", "trailing") else (sigma_max ** 2 + 1) ** 0.5


class GeneratorNoise:
    """Ancestral noise drawn from each image's own generator (as diffusers' schedulers draw it), so that image k of a
    batch gets the noise it gets alone."""

    def __init__(self, x: torch.Tensor, generators):
        self.x, self.generators = x, generators if isinstance(generators, list) else [generators] * x.shape[0]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        one = (1,) + tuple(self.x.shape[1:])
        noise = [torch.randn(one, generator=g, device=g.device if g is not None else "cpu", dtype=self.x.dtype)
                 for g in self.generators]
        return torch.cat(noise).to(self.x.device)


class BrownianNoise:
    """Brownian-tree noise for SDE samplers (k-diffusion's BrownianTreeNoiseSampler), one tree per image seeded with
    that image's seed: the increments between two sigmas do not depend on the steps taken, nor on the batch."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: list[int]):
        try:
            import torchsde
        except ImportError:
            raise GenError("the SDE samplers (dpm++sde, dpm++2m-sde, dpm++3m-sde) need torchsde: "
                           "pip install gen[sde]") from None
        self.t0, self.t1 = float(sigma_min), float(sigma_max)
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(torch.as_tensor(self.t0), w0, torch.as_tensor(self.t1), entropy=s)
                      for s in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = sorted((float(sigma), float(sigma_next)))
        sign = 1 if float(sigma) < float(sigma_next) else -1
        with warnings.catch_warnings():  # torchsde warns where float32 ends round past the tree's own ends
            warnings.filterwarnings("ignore", "Should have t", UserWarning)
            # the times as Python floats: torchsde reads them so, and a float32 tensor would round float64 sigmas
            w = torch.stack([tree(a, b) for tree in self.trees]) * sign
        return w / abs(b - a) ** 0.5
