"""Exponential moving average of a model's weights (the weights sampled from by default)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema = d * ema + (1 - d) * w after every optimizer step; with warmup, d = min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        # the copy shares the frozen parameters (a LoRA's base, a frozen text encoder): they never move, and a
        # copy of them would double the memory of the largest part for nothing
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._pairs is None:  # only what trains moves; frozen weights stay equal to the model's
            ema = dict(self.model.named_parameters())
            self._pairs = [(ema[k], p) for k, p in model.named_parameters() if p.requires_grad]
        d = self.current_decay()
        self.num_updates += 1
        torch._foreach_lerp_([t for t, _ in self._pairs], [s.detach().to(t.dtype) for t, s in self._pairs], 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state)
        self.num_updates = num_updates
