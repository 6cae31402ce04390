"""Held-out loss (`validation.loss_path`): the training loss on a fixed set of (image, timestep, noise) triples.

The images are the first `validation.loss_images` of a folder the run does not train on, center-cropped and
unflipped; the timesteps, noise and caption dropout come from one generator with a fixed seed, so every
evaluation scores the same triples and the numbers of two steps (or two runs) compare. It is logged with the
train loss every `log.every` steps as `heldout_loss`, and draws nothing from the run's own random streams, so
exact resume is unaffected.
"""

from __future__ import annotations

import dataclasses

import torch

from train.config import Config
from train.data import TrainData, collate

SEED = 0


class HeldOut:
    """The held-out batch of a run, or nothing to do (no validation.loss_path)."""

    def __init__(self, cfg: Config, task):
        self.task, self.batches = task, []
        v = cfg.validation
        if not v.loss_path or not hasattr(task, "loss"):
            return
        data_cfg = dataclasses.replace(cfg.data, source="folder", path=v.loss_path, crop="center", flip=False,
                                       buckets=False, cache=False, caption=type(cfg.data.caption)())
        data = TrainData(data_cfg, SEED, control=cfg.stage == "controlnet")
        n = min(v.loss_images, len(data))
        rows = [data[i, i] for i in range(n)]
        bs = cfg.train.batch_size
        self.batches = [collate(rows[k:k + bs]) for k in range(0, n, bs)]

    @torch.no_grad()
    def __call__(self, model) -> dict:
        """{"heldout_loss": mean over the set} ({} when there is none)."""
        if not self.batches:
            return {}
        g = torch.Generator().manual_seed(SEED)
        total, count, was = 0.0, 0, model.training
        model.eval()  # no dropout: the same triples give the same loss, and no global random draws
        try:
            for batch in self.batches:
                n = len(batch["text"])
                total += float(self.task.loss(model, batch, g)) * n
                count += n
        finally:
            model.train(was)
        return {"heldout_loss": total / count}
