"""Hint preprocessors that need no downloaded weights (sd-webui-controlnet's module names where it has them):
canny edges, invert, blur, tile (a coarse copy, for tile ControlNets), grayscale. Hints made elsewhere (depth maps,
poses) take "none": the image is the hint."""

from __future__ import annotations

import numpy as np


def canny(image, low: float = 100, high: float = 200):
    """Canny edges (Canny 1986) of the grayscale image: 3x3 Sobel gradients (L1 magnitude, as OpenCV's default),
    non-maximum suppression along the gradient, hysteresis between `low` and `high`; white edges on black."""
    from PIL import Image

    g = np.pad(np.asarray(image.convert("L"), dtype=np.float32), 1, mode="edge")
    # (H, W) Sobel responses from the padded (H + 2, W + 2) image
    s = lambda dy, dx: g[1 + dy:g.shape[0] - 1 + dy, 1 + dx:g.shape[1] - 1 + dx]  # noqa: E731
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    mag = np.abs(gx) + np.abs(gy)
    angle = (np.round(np.arctan2(gy, gx) / (np.pi / 4)) % 4).astype(int)  # 0: -, 1: /, 2: |, 3: \
    m = np.pad(mag, 1)
    h, w = mag.shape
    shifted = lambda dy, dx: m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    steps = [(0, 1), (1, 1), (1, 0), (1, -1)]
    keep = np.zeros_like(mag, dtype=bool)
    for k, (dy, dx) in enumerate(steps):
        keep |= (angle == k) & (mag >= shifted(dy, dx)) & (mag > shifted(-dy, -dx))
    mag = np.where(keep, mag, 0)
    weak, edges = mag >= low, mag >= high
    while True:  # hysteresis: weak pixels joined to strong ones, 8-connected
        e = np.pad(edges, 1)
        grown = weak & np.any([e[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
                              axis=0)
        if (grown == edges).all():
            break
        edges = grown
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def invert(image):
    from PIL import ImageOps

    return ImageOps.invert(image.convert("RGB"))


def blur(image, radius: float = 5):
    from PIL import ImageFilter

    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))


def tile(image, factor: int = 4):
    """A coarse copy: down by `factor` and back up (bicubic), the detail a tile ControlNet fills in."""
    from PIL import Image

    rgb = image.convert("RGB")
    small = rgb.resize((max(1, rgb.width // factor), max(1, rgb.height // factor)), Image.BICUBIC)
    return small.resize(rgb.size, Image.BICUBIC)


def grayscale(image):
    return image.convert("L").convert("RGB")


MODULES = {"none": None, "canny": canny, "invert": invert, "blur": blur, "tile": tile, "grayscale": grayscale}


def hint_image(value, module: str = "none"):
    """The hint as an RGB PIL image: `value` (a path, PIL image, array or tensor in [0, 1]) through `module`."""
    from gen.img2img import _pil

    image = _pil(value, "the ControlNet hint image").convert("RGB")
    fn = MODULES[module]
    return image if fn is None else fn(image)
