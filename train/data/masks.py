"""Loss masks (data.masked_loss): where in an image the loss counts, as kohya's `--masked_loss` reads them.

An image's mask is `NAME.mask.png` beside `NAME.EXT` (any mode, read as grey), else the image's own alpha
channel; white (or opaque) trains fully, black not at all, grey in between. The mask is cropped and flipped
with its image, then averaged down to the latent grid, and multiplies the squared error there (the per-sample
mean is over the whole grid, as kohya's). Images without a mask weigh 1 everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from train.data import exif

SUFFIX = ".mask.png"


def mask_file(image: Path) -> Path:
    """Where an image's mask file would be: `a.jpg` -> `a.mask.png`."""
    return image.with_name(image.stem + SUFFIX)


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIX)


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def read(image: Path, im: Image.Image) -> Image.Image | None:
    """The mask ('L', the image's size) of the image `im` opened from `image`; None when it has none."""
    path = mask_file(image)
    if path.is_file():
        with Image.open(path) as m:
            m = exif.upright(m).convert("L")
            return m if m.size == im.size else m.resize(im.size, Image.Resampling.BILINEAR)
    if has_alpha(im):
        return im.convert("RGBA").getchannel("A")
    return None


def to_latent(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) pixel masks in [0, 1] -> (N, 1, h, w) on the latent grid, each cell its pixels' mean."""
    return F.adaptive_avg_pool2d(mask.float(), size)
