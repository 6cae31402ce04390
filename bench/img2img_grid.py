"""docs/sampling.md's picture of img2img, inpainting and the hires fix, made by the bundled default model.

    python bench/img2img_grid.py [--out bench/results/img2img_grid.png]

Each tile is made by the `gen sample` command printed beside it (the same calls, from Python): a source from
text, img2img of it to another color, inpainting of the empty left half with another shape, the same with mask
blur and the masked-area crop; shown 6x larger, nearest-neighbour. The hires fix is not shown: the bundled DiT was
trained at 64 px only and breaks down at 128 px (its patch positions), whatever the pass before it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gen.pipeline import Pipeline

ZOOM = 3
TRIANGLE = "a green triangle left of a red circle"
SQUARE = "a blue square left of a red circle"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/img2img_grid.png")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(None, device="cpu")
    pipe.progress = False
    size = pipe.defaults["width"]
    source = pipe("a red circle", seed=1).images[0]
    m = np.zeros((size, size), np.uint8)
    m[:, :size // 2] = 255  # the left half
    mask = Image.fromarray(m)
    tiles = [
        ("source", 'gen sample "a red circle" --seed 1', source),
        ("mask", "white = repaint", mask.convert("RGB")),
        ("img2img 0.6", 'gen sample "a blue circle" --init-image src.png --strength 0.6 --seed 2',
         pipe("a blue circle", image=source, strength=0.6, seed=2).images[0]),
        ("inpaint", f'gen sample "{TRIANGLE}" --init-image src.png --mask mask.png --seed 3',
         pipe(TRIANGLE, image=source, mask_image=mask, seed=3).images[0]),
        ("inpaint, blur 4, only masked", "... --mask-blur 4 --inpaint-full-res --inpaint-padding 8",
         pipe(TRIANGLE, image=source, mask_image=mask, mask_blur=4, padding_mask_crop=8, seed=3).images[0]),
        ("inpaint", f'gen sample "{SQUARE}" --init-image src.png --mask mask.png --seed 3',
         pipe(SQUARE, image=source, mask_image=mask, seed=3).images[0]),
    ]
    cell = size * 2 * ZOOM
    grid = Image.new("RGB", (cell * len(tiles) + 4 * (len(tiles) - 1), cell + 28), "gray")
    draw = ImageDraw.Draw(grid)
    for i, (title, command, image) in enumerate(tiles):
        zoom = cell // image.width
        x = i * (cell + 4)
        grid.paste(image.resize((image.width * zoom, image.height * zoom), Image.NEAREST), (x, 28))
        draw.text((x + 4, 8), title, fill="white")
        print(f"{title:30s} {command}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
