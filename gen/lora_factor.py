"""One adapted layer's LoRA factors, the unit every LoRA layout is read into and written from (gen/lora_formats.py)
and that the families' key maps split and fuse (gen/families/mmdit_keys.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factor:
    """One adapted layer: down (A) is (rank, in[, kh, kw]), up (B) is (out, rank[, 1, 1])."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None  # None: alpha = rank (the diffusers/peft convention when nothing is stored)
    magnitude: torch.Tensor | None = None  # DoRA: one magnitude per output channel (a kohya file's dora_scale)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank
