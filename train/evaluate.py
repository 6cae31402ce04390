"""Prompt adherence on the shapes world, scored by pixel statistics (no downloaded evaluator).

A fixed, seeded prompt set: every color x shape alone, and pairs of objects with each relation, drawn
from the pairs the shapes world never puts in one scene (HELDOUT_PAIRS), so they are held-out prompts.
Each image is scored by finding, for every object the prompt names, the connected region of pixels
close to its color; its shape is read off the region's fill ratio and how its width grows from top to
bottom; the relation off the regions' centroids.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.data.shapes import COLORS, HELDOUT_PAIRS, KINDS, RELATIONS, phrase, place_scene, render

COLOR_TOLERANCE = 70.0  # max RGB distance from a palette color, at 64 px
MIN_AREA = 40  # pixels (at 64 px) for an object to count as present; the smallest circle has ~200
# shape prototypes in (fill ratio of the bounding box, top-quarter width / bottom-quarter width)
PROTOTYPES = {"square": (1.0, 1.0), "circle": (np.pi / 4, 1.0), "triangle": (0.5, 0.15)}


@dataclass(frozen=True)
class PromptSpec:
    kinds: tuple[tuple[str, str], ...]  # ((color, shape), ...)
    relation: str | None

    @property
    def prompt(self) -> str:
        parts = [phrase(c, s) for c, s in self.kinds]
        return parts[0] if len(parts) == 1 else f"{parts[0]} {self.relation or 'and'} {parts[1]}"


def prompt_set(pairs_per_relation: int = 6, seed: int = 0) -> list[PromptSpec]:
    """Every color x shape alone, then for each relation `pairs_per_relation` seeded held-out pairs, each in a
    seeded order."""
    singles = [PromptSpec((kind,), None) for kind in KINDS]
    rng = np.random.default_rng(seed)
    heldout = sorted(tuple(sorted(p)) for p in HELDOUT_PAIRS)
    pairs = []
    for rel in RELATIONS:
        for i in rng.choice(len(heldout), size=pairs_per_relation, replace=False):
            a, b = heldout[i]
            pairs.append(PromptSpec((a, b) if rng.integers(2) else (b, a), rel))
    return singles + pairs


# the README's grid of the bundled model (gen/assets/samples.png, seed 0 each; `make default-model` draws it)
SHOWCASE = ["a red circle", "a blue square", "a green triangle", "an orange circle", "a purple square",
            "a yellow triangle", "a red circle left of a blue square", "a green square above a yellow circle",
            "an orange triangle right of a purple circle", "a blue triangle below a red square",
            "a yellow square and a green circle", "a purple triangle left of an orange square"]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, largest first, as (N, 2) arrays of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q, pts = deque([(y0, x0)]), []
        while q:
            y, x = q.popleft()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        comps.append(np.array(pts))
    return sorted(comps, key=len, reverse=True)


def classify_shape(pts: np.ndarray) -> str:
    """The nearest shape prototype for a region's (fill ratio, top/bottom width ratio)."""
    ys, xs = pts[:, 0], pts[:, 1]
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(pts) / (h * w)
    rows = np.bincount(ys - ys.min(), minlength=h)
    q = max(h // 4, 1)
    taper = rows[:q].mean() / max(rows[-q:].mean(), 1e-6)
    return min(PROTOTYPES, key=lambda s: (fill - PROTOTYPES[s][0]) ** 2 + 0.5 * (taper - PROTOTYPES[s][1]) ** 2)


def find_objects(image: np.ndarray, kinds: tuple[tuple[str, str], ...]) -> list[dict | None]:
    """For each (color, shape) named, the region found for it: its shape and centroid, or None."""
    img = image.astype(np.float32)
    scale = (img.shape[0] / 64) ** 2
    found: list[dict | None] = []
    used: dict[str, int] = {}
    for color, _ in kinds:
        mask = np.linalg.norm(img - np.array(COLORS[color], np.float32), axis=-1) < COLOR_TOLERANCE
        comps = [c for c in _components(mask) if len(c) >= MIN_AREA * scale]
        k = used.get(color, 0)  # two objects of one color take its two largest regions
        used[color] = k + 1
        if k >= len(comps):
            found.append(None)
            continue
        pts = comps[k]
        found.append({"shape": classify_shape(pts), "cy": float(pts[:, 0].mean()), "cx": float(pts[:, 1].mean())})
    if len(kinds) == 2 and kinds[0][0] == kinds[1][0] and found[0] and found[1]:
        # same color: match regions to the named shapes if that fits better
        if found[0]["shape"] != kinds[0][1] and found[1]["shape"] == kinds[0][1]:
            found.reverse()
    return found


def relation_holds(a: dict, b: dict, relation: str) -> bool:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    return {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[relation]


def score_image(image: np.ndarray, spec: PromptSpec) -> dict:
    """Scores one (H, W, 3) uint8 image against its prompt."""
    found = find_objects(image, spec.kinds)
    colors = [f is not None for f in found]
    shapes = [f is not None and f["shape"] == s for f, (_, s) in zip(found, spec.kinds)]
    out = {"prompt": spec.prompt, "color_right": all(colors), "shape_right": all(shapes),
           "objects_right": all(c and s for c, s in zip(colors, shapes))}
    if spec.relation in RELATIONS:
        out["relation_right"] = bool(all(colors) and relation_holds(found[0], found[1], spec.relation))
    return out


def summarize(scores: list[dict]) -> dict:
    singles = [s for s in scores if " and " not in s["prompt"] and "relation_right" not in s]
    pairs = [s for s in scores if "relation_right" in s]

    def pct(rows, key):
        return round(100.0 * sum(r[key] for r in rows) / max(len(rows), 1), 1)
    return {"single": {"n": len(singles), "color_right": pct(singles, "color_right"),
                       "shape_right": pct(singles, "shape_right")},
            "relation": {"n": len(pairs), "both_objects_right": pct(pairs, "objects_right"),
                         "relation_right": pct(pairs, "relation_right")}}


def reference_images(specs: list[PromptSpec], n: int, kind: str, seed: int = 0, size: int = 64) -> list:
    """Ground-truth renders of each prompt (`kind="ground-truth"`) or uniform noise (`"noise"`)."""
    images = []
    for i, spec in enumerate(specs):
        for j in range(n):
            rng = np.random.default_rng([seed, i, j])
            if kind == "noise":
                images.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            else:
                images.append(np.asarray(render(place_scene(list(spec.kinds), spec.relation, rng, size))))
    return images


DIVERSITY_REFS = 16  # world renders per prompt standing in for its training images, and as many held out


def evaluate_adherence(pipe=None, n: int = 1, seed: int = 0, reference: str | None = None,
                       save_images: str | Path | None = None, diversity: bool = False, **sample_kwargs) -> dict:
    """Samples (or renders, for a reference) `n` images per prompt of the fixed set and scores them; with
    `diversity` (n >= 2) also their diversity and nearest-neighbour distances against the world's own renders of
    each prompt (train/diversity.py)."""
    from tqdm.auto import tqdm

    specs = prompt_set()
    if reference is not None:
        images = reference_images(specs, n, reference, seed)
    else:
        images = []
        for i, spec in enumerate(tqdm(specs, desc="adherence", disable=not getattr(pipe, "progress", False))):
            out = pipe(spec.prompt, num_images_per_prompt=n, seed=seed + i * n, output_type="np", **sample_kwargs)
            images += list((out.images * 255).round().astype(np.uint8))
    scores = [score_image(img, spec) for img, spec in zip(images, [s for s in specs for _ in range(n)])]
    if save_images:
        from PIL import Image

        Path(save_images).mkdir(parents=True, exist_ok=True)
        for k, (img, row) in enumerate(zip(images, scores)):
            Image.fromarray(img).save(Path(save_images) / f"{k:04d}-{row['prompt'].replace(' ', '_')}.png")
    out = {"summary": summarize(scores), "images_per_prompt": n, "seed": seed, "scores": scores}
    if diversity:
        out |= diversity_against_world(specs, images, n, seed)
    return out


def diversity_against_world(specs: list[PromptSpec], images: list, n: int, seed: int) -> dict:
    """train.diversity.report for `n` images per spec, the world's renders (other seeds) as training and held-out
    images of each prompt, rendered at the samples' size."""
    from train.diversity import report

    size = images[0].shape[0]
    train = reference_images(specs, DIVERSITY_REFS, "ground-truth", seed + 1_000_003, size)
    heldout = reference_images(specs, DIVERSITY_REFS, "ground-truth", seed + 2_000_003, size)
    k = DIVERSITY_REFS
    return report({s.prompt: np.stack(images[i * n:(i + 1) * n]) for i, s in enumerate(specs)},
                  {s.prompt: np.stack(train[i * k:(i + 1) * k]) for i, s in enumerate(specs)}, np.stack(heldout))


def format_table(result: dict) -> str:
    s = result["summary"]
    return "\n".join([
        f"{'prompts':<28}{'images':>8}  {'metric':<20}{'%':>7}",
        f"{'single object':<28}{s['single']['n']:>8}  {'color right':<20}{s['single']['color_right']:>7.1f}",
        f"{'':<28}{'':>8}  {'shape right':<20}{s['single']['shape_right']:>7.1f}",
        f"{'two objects + relation':<28}{s['relation']['n']:>8}  {'both objects right':<20}"
        f"{s['relation']['both_objects_right']:>7.1f}",
        f"{'':<28}{'':>8}  {'relation right':<20}{s['relation']['relation_right']:>7.1f}",
    ])


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def main(args) -> int:
    """`gen eval adherence`: scores a model (or a reference) and prints the table; optionally JSON/images."""
    import torch

    from gen.errors import GenError

    if args.n < 1:
        raise GenError(f"--n must be >= 1, not {args.n}")
    if args.diversity and args.n < 2:
        raise GenError(f"--diversity compares images of one prompt: it needs --n 2 or more, not {args.n}")
    pipe = None
    kwargs = {}
    if args.reference is None:
        from gen.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(args.model, device=args.device)
        pipe.progress = not args.no_progress
        kwargs = {k: v for k, v in dict(num_inference_steps=args.steps, guidance_scale=args.guidance,
                                         sampler=args.sampler).items() if v is not None}
    with torch.inference_mode():
        result = evaluate_adherence(pipe, n=args.n, seed=args.seed, reference=args.reference,
                                    save_images=args.save_images, diversity=args.diversity, **kwargs)
    result["model"] = args.reference or (str(args.model) if args.model else "gen-default")
    print(format_table(result))
    if args.diversity:
        from train.diversity import format_lines

        print("\n".join(format_lines(result)))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
