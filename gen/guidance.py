"""Classifier-free guidance (Ho & Salimans 2022), guidance rescale (Lin et al. 2023) and the
guidance interval (Kynkaanniemi et al. 2024)."""

from __future__ import annotations

import math

import torch

from gen.errors import GenError


def check_guidance(scale: float, rescale: float, interval: tuple[float, float]) -> None:
    if not math.isfinite(scale) or scale < 0:
        raise GenError(f"guidance scale must be >= 0 and finite, not {scale}")
    if not 0 <= rescale <= 1:
        raise GenError(f"guidance rescale must be in [0, 1], not {rescale}")
    lo, hi = interval
    if not 0 <= lo <= hi <= 1:
        raise GenError(f"guidance interval must be 0 <= start <= end <= 1, not {interval}")


def uses_cfg(scale: float) -> bool:
    """Guidance <= 1 needs no unconditional pass (at 1 the guided prediction is the conditional one)."""
    return scale > 1


def in_interval(step: int, num_steps: int, interval: tuple[float, float]) -> bool:
    """Whether step `step` of `num_steps` falls in the guidance interval, given as fractions of the run."""
    frac = step / max(num_steps, 1)
    return interval[0] <= frac < interval[1] or (interval[1] == 1 and frac >= 1)


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """uncond + scale (cond - uncond), optionally rescaled toward the conditional std (Lin et al. eq. 15-16)."""
    out = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        out = rescale * rescaled + (1 - rescale) * out
    return out
