"""AutoencoderKL and the latent scaling that maps its posterior to unit-variance model space."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

VAE_PRESETS = {
    # 2 levels -> downsampling factor 2; for tests.
    "tiny": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                 norm_num_groups=8),
    # 3 levels -> factor 4: 64x64 images -> 16x16 latents.
    "small": dict(block_out_channels=(32, 64, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                  norm_num_groups=32),
}


def build_vae(preset: str = "tiny", **overrides) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL from a named preset."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose from {sorted(VAE_PRESETS)}")
    return AutoencoderKL(**{**VAE_PRESETS[preset], **overrides})


def scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _scaling(vae: AutoencoderKL) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.config.scaling_factor, shift


def to_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """VAE posterior sample -> model space: (z - shift) * scale."""
    scale, shift = _scaling(vae)
    return (z - shift) * scale


def from_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Model space -> VAE latent: latents / scale + shift."""
    scale, shift = _scaling(vae)
    return latents / scale + shift


def encode(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> model-space latents (B, C, H/f, W/f)."""
    z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    return to_latents(vae, z)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images in [0, 1] (B, 3, H, W), float32."""
    x = vae.decode(from_latents(vae, latents).to(vae.dtype)).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)
