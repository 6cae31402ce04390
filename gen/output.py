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
    def of(images: torch.Tensor, output_type: str, seeds: list[int]) -> "PipelineOutput":
        """Decoded images, (B, 3, H, W) in [0, 1], as `output_type` asks: "pt" as they are, "np" (B, H, W, 3),
        "pil" a list of 8-bit PIL images."""
        if output_type == "pt":
            return PipelineOutput(images, seeds)
        array = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return PipelineOutput(array, seeds)
        from PIL import Image
        return PipelineOutput([Image.fromarray(a) for a in (array * 255).round().astype("uint8")], seeds)

    @staticmethod
    def concat(outputs: list["PipelineOutput"], seeds: list[int]) -> "PipelineOutput":
        """The images of several calls, in order, as one output of their type."""
        images = [o.images for o in outputs]
        if isinstance(images[0], list):
            return PipelineOutput([im for part in images for im in part], seeds)
        return PipelineOutput((torch.cat if isinstance(images[0], torch.Tensor) else np.concatenate)(images), seeds)
