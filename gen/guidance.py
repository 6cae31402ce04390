"""Classifier-free guidance (Ho & Salimans 2022), guidance rescale (Lin et al. 2023), the guidance interval
(Kynkaanniemi et al. 2024) and skip-layer guidance (Stability AI's SD3.5, after Spatiotemporal Skip Guidance)."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def guided_prediction(predict, x: torch.Tensor, t, i: int, n: int, cond: dict, uncond_cond: dict | None,
                      scale: float, rescale: float, interval: tuple[float, float], skip_layers=None,
                      scale_input=None, keep_uncond=None) -> torch.Tensor:
    """Step i of n's prediction for x at t: `predict(x, t, cond)` with CFG in one batched forward where `uncond_cond`
    (the negative and positive conditioning, concatenated) is given and the step is in the guidance interval, and
    skip-layer guidance on the steps it covers (a third, conditional pass with `predict(..., skip_layers=...)`).
    `scale_input(x, t)`: a diffusers scheduler's input scaling, where it has one; `keep_uncond(uncond)` receives the
    unconditional prediction where one was made (the CFG++ samplers step along it)."""
    if hasattr(predict, "at_step"):  # gen.control.Controlled: which ControlNets act at this step
        predict.at_step(i, n)
    guided = uncond_cond is not None and in_interval(i, n, interval)
    x_in = torch.cat([x] * 2) if guided else x
    if scale_input is not None:
        x_in = scale_input(x_in, t)
    pred = predict(x_in, t, uncond_cond if guided else cond)
    if guided:
        uncond, c = pred.chunk(2)
        keep_uncond and keep_uncond(uncond)
        pred = guide(uncond, c, scale, rescale)
        if skip_layers is not None and skip_layers.applies(i):
            pred = skip_layers.guide(pred, c, predict(x, t, cond, skip_layers=skip_layers.layers))
    return pred


@dataclass
class SkipLayers:
    """Skip-layer guidance: on steps i with steps * start < i < steps * stop, the guided prediction moves by
    scale * (cond - cond without these layers), as StableDiffusion3Pipeline's skip_guidance_layers does (i counts the
    scheduler's timesteps, `steps` is the number asked for)."""
    layers: list[int]
    scale: float
    start: float
    stop: float
    steps: int

    def check(self, num_layers: int) -> None:
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if not self.layers or bad:
            raise GenError(f"skip-layer guidance layers must be in 0..{num_layers - 1} for this model, "
                           f"not {bad or self.layers}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise GenError(f"skip-layer guidance scale must be >= 0 and finite, not {self.scale}")
        if not 0 <= self.start <= self.stop <= 1:
            raise GenError(f"skip-layer guidance start and stop must be 0 <= start <= stop <= 1, not "
                           f"{self.start}, {self.stop}")

    def applies(self, step: int) -> bool:
        return self.steps * self.start < step < self.steps * self.stop

    def guide(self, guided: torch.Tensor, cond: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
        return guided + (cond - skipped) * self.scale
