"""Rectified flow (Liu et al. 2022; Esser et al. 2024) in the convention of diffusers' FlowMatch
schedulers and SD3: x_sigma = (1 - sigma) x_0 + sigma noise, sigma = 1 is pure noise, and the
model predicts the velocity noise - x_0. Timesteps passed to the model are sigma * T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gen.errors import GenError


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.to(like.device, like.dtype).view((-1,) + (1,) * (like.ndim - 1))


@dataclass
class Flow:
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000

    kind = "flow"

    def __post_init__(self):
        if self.shift <= 0:
            raise GenError(f"flow shift must be > 0, not {self.shift}")
        if self.logit_std <= 0:
            raise GenError(f"flow logit_std must be > 0, not {self.logit_std}")

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_sigma = (1 - sigma) x0 + sigma noise."""
        s = _bcast(sigma, x0)
        return (1 - s) * x0 + s * noise

    add_noise = interpolate

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity d x_sigma / d sigma = noise - x0."""
        return noise - x0

    def shift_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Timestep shift (SD3 eq. 23): shift * s / (1 + (shift - 1) s); shift > 1 spends more time near noise."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Logit-normal sigmas (SD3 sec. 3.1), shifted, (n,)."""
        u = torch.randn((n,), generator=generator) * self.logit_std + self.logit_mean
        return self.shift_sigma(torch.sigmoid(u)).to(device)

    def loss_weight(self, sigma: torch.Tensor, min_snr_gamma: float | None = None) -> torch.Tensor:
        return torch.ones(sigma.shape, device=sigma.device)

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The value passed to the denoiser: sigma * T, as diffusers' FlowMatch schedulers pass it."""
        return sigma * self.num_train_timesteps

    def scheduler_config(self) -> dict:
        return dict(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
