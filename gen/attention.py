"""Attention backend dispatch; the project's DiT calls `attention` directly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gen.errors import GenError

BACKENDS = ("sdpa", "math")
_backend = "sdpa"


def set_backend(name: str | None) -> None:
    """Selects the attention backend used by `attention` (None or "auto" = the default)."""
    global _backend
    name = name or "auto"
    if name == "auto":
        name = "sdpa"
    if name not in BACKENDS:
        raise GenError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS + ('auto',))}")
    _backend = name


def get_backend() -> str:
    return _backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(d)) v, computed in fp32."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention. q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D)."""
    if _backend == "math":
        return math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
