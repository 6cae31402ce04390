"""The synthetic shapes world: colored circles, squares and triangles on white, with true captions.

64x64 RGB on white; one or two objects 16-32 px across that never overlap; captions like
"a red circle", "a red circle and a blue square", "an orange triangle above a green circle".
Everything is a pure function of (seed, index), so the world is the same on every machine.
The color table, drawing and caption grammar are importable for prompt-adherence scoring.
A seeded fifth of the (object, object) pairs never share a scene (HELDOUT_PAIRS): `gen eval adherence`
asks for those pairs, so a model trained on the world is scored on pair prompts it never saw.

    python -m train.data.shapes OUT --num-images 1000 --seed 0   # writes an image folder
    python -m train.data.shapes OUT --control                     # + each scene's mask, a ControlNet's hint
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gen.errors import GenError

SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
MIN_SIDE, MAX_SIDE = 16, 32  # object size at 64 px
BACKGROUND = (255, 255, 255)
KINDS = tuple((c, s) for c in COLORS for s in SHAPES)  # the 18 objects


def _heldout_pairs(seed: int = 30) -> frozenset[frozenset]:
    """A seeded fifth (30 of 153) of the unordered pairs of distinct objects."""
    pairs = [frozenset((a, b)) for i, a in enumerate(KINDS) for b in KINDS[i + 1:]]
    pick = np.random.default_rng(seed).choice(len(pairs), size=len(pairs) // 5, replace=False)
    return frozenset(pairs[i] for i in pick)


HELDOUT_PAIRS = _heldout_pairs()  # never in one scene of the world, in any relation or with "and"


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    relation: str | None  # how objects[0] relates to objects[1]; None for "and" or one object
    caption: str
    size: int = SIZE


def phrase(color: str, shape: str) -> str:
    """'a red circle', 'an orange square'."""
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def caption(objects: tuple[Obj, ...], relation: str | None) -> str:
    parts = [phrase(o.color, o.shape) for o in objects]
    if len(parts) == 1:
        return parts[0]
    return f"{parts[0]} {relation or 'and'} {parts[1]}"


def relation_of(a: Obj, b: Obj) -> str | None:
    """The relation of a to b if one is unambiguous: separated along the dominant axis of their offset."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = bx - ax, by - ay
    if abs(dx) > abs(dy):
        if a.box[2] <= b.box[0]:
            return "left of"
        if b.box[2] <= a.box[0]:
            return "right of"
    elif abs(dy) > abs(dx):
        if a.box[3] <= b.box[1]:
            return "above"
        if b.box[3] <= a.box[1]:
            return "below"
    return None


def _overlap(a: tuple, b: tuple, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def color_probabilities(color_weights: dict | None) -> np.ndarray | None:
    """COLORS' draw probabilities from relative weights (1 for a color not named); None (equally likely, the uniform
    world's own draws and fingerprint) for no weights."""
    if not color_weights:
        return None
    unknown = set(color_weights) - set(COLORS)
    p = np.array([color_weights.get(c, 1.0) for c in COLORS], float)
    if unknown or (p < 0).any() or p.sum() <= 0:
        raise GenError(f"data.color_weights: {sorted(unknown) or color_weights} is not a map of the world's colors "
                       f"({', '.join(COLORS)}) to weights >= 0, not all 0")
    return p / p.sum()


def sample_scene(rng: np.random.Generator, size: int = SIZE, color_p: np.ndarray | None = None) -> Scene:
    """A random scene: 1-2 objects of distinct (color, shape), never a held-out pair, and a relation that is
    true when stated. Colors are equally likely, or drawn with probabilities `color_p` (color_probabilities)."""
    n = int(rng.integers(1, 3))
    colors, shapes = list(COLORS), list(SHAPES)
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        c = rng.integers(len(colors)) if color_p is None else rng.choice(len(colors), p=color_p)
        kind = (colors[c], shapes[rng.integers(len(shapes))])
        if kind not in kinds and not (kinds and frozenset((kinds[0], kind)) in HELDOUT_PAIRS):
            kinds.append(kind)
    want = None if n == 1 else [None, *RELATIONS][rng.integers(len(RELATIONS) + 1)]
    return place_scene(kinds, want, rng, size)


def place_scene(kinds: list[tuple[str, str]], want: str | None, rng: np.random.Generator,
                size: int = SIZE) -> Scene:
    """Places objects of the given (color, shape) kinds so that they do not overlap and `want`
    (how the first relates to the second, or None) is true."""
    k = size / SIZE
    while True:  # rejection sampling; a placement fits within a few tries
        objs = []
        for color, shape in kinds:
            side = int(round(rng.integers(MIN_SIDE, MAX_SIDE + 1) * k))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            objs.append(Obj(shape, color, (x0, y0, x0 + side, y0 + side)))
        if len(objs) == 2 and _overlap(objs[0].box, objs[1].box, gap=max(1, round(2 * k))):
            continue
        if want is not None and relation_of(objs[0], objs[1]) != want:
            continue
        objs = tuple(objs)
        return Scene(objs, want, caption(objs, want), size)


def scene(seed: int, index: int, size: int = SIZE, color_p: np.ndarray | None = None) -> Scene:
    """Scene `index` of the world with `seed` (and color probabilities `color_p`, see sample_scene)."""
    return sample_scene(np.random.default_rng([seed, index]), size, color_p)


def draw(d: ImageDraw.ImageDraw, obj: Obj, colors: dict | None = None) -> None:
    """Draws one object, aliased, in its pure color (so pixel statistics recover it exactly)."""
    x0, y0, x1, y1 = obj.box
    fill = (colors or COLORS)[obj.color]
    if obj.shape == "circle":
        d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":  # isosceles, apex up
        d.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; shapes are {SHAPES}")


def render(s: Scene, colors: dict | None = None, background: tuple = BACKGROUND) -> Image.Image:
    """The scene; with `colors` (color name -> RGB) and `background`, drawn in those instead."""
    img = Image.new("RGB", (s.size, s.size), background)
    d = ImageDraw.Draw(img)
    for o in s.objects:
        draw(d, o, colors)
    return img


def mask(s: Scene) -> Image.Image:
    """The scene's objects white on black: a ControlNet's hint of where they are and what shape."""
    return render(s, dict.fromkeys(COLORS, (255, 255, 255)), (0, 0, 0))


class ShapesWorld:
    """`num_images` scenes of the world with `seed`, as (PIL image, caption) items plus their layout."""

    def __init__(self, num_images: int, seed: int = 0, size: int = SIZE, color_weights: dict | None = None):
        self.color_p = color_probabilities(color_weights)  # checked and normalized once, not per scene
        self.num_images, self.seed, self.size, self.color_weights = num_images, seed, size, color_weights

    def __len__(self) -> int:
        return self.num_images

    def scene(self, i: int) -> Scene:
        return scene(self.seed, i, self.size, self.color_p)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        s = self.scene(i)
        return render(s), s.caption

    def fingerprint(self) -> dict:
        return {"source": "shapes", "num_images": self.num_images, "seed": self.seed, "size": self.size,
                "heldout_pairs": len(HELDOUT_PAIRS)} | ({"color_weights": self.color_weights} if self.color_weights else {})


def write_folder(out: str | Path, num_images: int, seed: int = 0, size: int = SIZE, control: bool = False) -> Path:
    """Writes PNGs and a metadata.jsonl (`file_name`, `text`, and the objects with their boxes); with `control`,
    each scene's mask as NAME.control.png, named in the rows' `control` column (stage=controlnet's hint,
    train/data/controls.py)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(num_images, seed, size)
    with open(out / "metadata.jsonl", "w") as f:
        for i in range(num_images):
            s = world.scene(i)
            name = f"{i:06d}.png"
            render(s).save(out / name)
            row = {"file_name": name, "text": s.caption, "relation": s.relation,
                   "objects": [asdict(o) for o in s.objects]}
            if control:
                row["control"] = name.replace(".png", ".control.png")
                mask(s).save(out / row["control"])
            f.write(json.dumps(row) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write the synthetic shapes world as an image folder.")
    ap.add_argument("out")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=SIZE)
    ap.add_argument("--control", action="store_true", help="also each scene's mask as NAME.control.png")
    a = ap.parse_args(argv)
    write_folder(a.out, a.num_images, a.seed, a.size, a.control)
    print(f"wrote {a.num_images} images to {a.out}")


if __name__ == "__main__":
    main()
