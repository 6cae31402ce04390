"""AutoencoderKL and the latent scaling that maps its posterior to unit-variance model space."""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL

log = logging.getLogger("gen")

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
    z = from_latents(vae, latents)
    x = vae.decode(z.to(vae.dtype)).sample
    if vae.dtype != torch.float32 and not bool(torch.isfinite(x).all()):  # one sync per decode, fp16/bf16 only
        # fp16 activations overflow in some VAEs (SDXL's): NaN would clamp to black images; redo in fp32
        log.warning("VAE decode overflowed in %s (NaN/inf); decoding again in float32", str(vae.dtype).split(".")[-1])
        dtype = vae.dtype  # nn.Module.to: diffusers' own .to() warns about this cast, which is deliberate here
        try:
            x = torch.nn.Module.to(vae, torch.float32).decode(z.float()).sample
        finally:
            torch.nn.Module.to(vae, dtype)
    return (x.float() / 2 + 0.5).clamp(0, 1)
