"""DDPM (Ho et al. 2020) with epsilon or v prediction (Salimans & Ho 2022), SD's scaled_linear
betas, optional zero terminal SNR (Lin et al. 2023) and min-SNR-gamma weighting (Hang et al. 2023).

Time convention: integer timesteps t in [0, T); x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gen.errors import GenError


@dataclass
class DDPM:
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)

    kind = "ddpm"

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise GenError(f"prediction_type must be 'epsilon' or 'v_prediction', not {self.prediction_type!r}")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise GenError("zero_terminal_snr needs prediction_type 'v_prediction' (epsilon is undefined at SNR 0)")
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float64) ** 2
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        else:
            raise GenError(f"beta_schedule must be 'scaled_linear' or 'linear', not {self.beta_schedule!r}")
        abar = torch.cumprod(1 - betas, 0)
        if self.zero_terminal_snr:
            # Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that it ends at exactly 0.
            s = abar.sqrt()
            s0, sT = s[0].clone(), s[-1].clone()
            s = (s - sT) * s0 / (s0 - sT)
            abar = s ** 2
        self.alphas_cumprod = abar.float()

    def _coefs(self, t: torch.Tensor, like: torch.Tensor):
        abar = self.alphas_cumprod.to(like.device)[t].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model predicts: noise (epsilon) or v = sqrt(abar) noise - sqrt(1 - abar) x0."""
        if self.prediction_type == "epsilon":
            return noise
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    def loss_weight(self, t: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
        """Per-sample loss weight: 1, or min-SNR-gamma (min(SNR, g)/SNR for eps, /(SNR+1) for v)."""
        if not min_snr_gamma:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr.clamp(min=1e-8)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform integer timesteps, (n,)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(device)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The value passed to the denoiser (diffusers' convention: the integer timestep)."""
        return t

    def scheduler_config(self) -> dict:
        """The maths of this formulation in diffusers scheduler settings (every DDPM-family sampler)."""
        return dict(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end, beta_schedule=self.beta_schedule,
                    prediction_type=self.prediction_type, rescale_betas_zero_snr=self.zero_terminal_snr)
