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


def calculate_shift(seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent timestep shift (Flux; SD3.5 with use_dynamic_shifting): linear in the image's
    token count, base_shift at base_seq tokens and max_shift at max_seq (diffusers' calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * m + base_shift - m * base_seq


def scheduler_mu(config, seq_len: int, max_shift: float = 1.15) -> float:
    """calculate_shift with a FlowMatch scheduler config's settings (`max_shift`: the pipeline's default where the
    config has none: FluxPipeline's 1.15, StableDiffusion3Pipeline's 1.16)."""
    return calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", max_shift))
