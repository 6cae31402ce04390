"""What a pipeline call returns: the images and the seeds used (gen/pipeline.py, gen/hires.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PipelineOutput:
    images: list | np.ndarray | torch.Tensor
    seeds: list[int] = field(default_factory=list)

    @staticmethod
    def concat(outputs: list["PipelineOutput"], seeds: list[int]) -> "PipelineOutput":
        """The images of several calls, in order, as one output of their type."""
        images = [o.images for o in outputs]
        if isinstance(images[0], list):
            return PipelineOutput([im for part in images for im in part], seeds)
        return PipelineOutput((torch.cat if isinstance(images[0], torch.Tensor) else np.concatenate)(images), seeds)
