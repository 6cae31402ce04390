"""LoRA learning works: `gen lora` with the trigger-word preset teaches the bundled model a shape it has never
seen, and prompts without the trigger word stay nearly unchanged.

    python bench/lora_learns.py [--base gen/assets/default] [--images 12] [--prior 12] [--steps 1200]
                                [--out runs/lora-learns]

The concept: "sks", a plus sign (a new shape; the world has circles, squares and triangles) in the palette's
colors. Why a shape and not a new color: the bundled VAE, trained on six colors, cannot draw any other (it
decodes a pink (255, 105, 180) square as yellow (228, 209, 59)), and a LoRA on the denoiser cannot change that;
it reconstructs a plus with IoU 0.97 at 26 px. The folder: --images pictures placed by train/data/shapes.py
(place_scene) and drawn in its style (aliased, one pure palette color on white), colors in turn, captioned
"a red sks", "a blue sks", ... (metadata.jsonl). With --prior N, N pictures of the world with their own captions
join them (DreamBooth's prior preservation, Ruiz et al. 2022). `gen lora configs/lora-subject.yaml` trains on it
in a subprocess (the preset's rank, alpha, targets and frozen text encoder; 64 px, fp32 and this script's steps,
LR and batch as overrides; lora.instance_prompt is off so that the captions name the color). Then the base, and
the base with the LoRA loaded, sample the same prompts at the same seeds with the base's sampling defaults, and:

  (a) trigger prompts ("a COLOR sks", --seeds each): an image's object is its largest non-white region; its
      shape is the one among plus, circle, square and triangle whose ideal drawing in the region's bounding box
      overlaps it best (IoU); reported: how many objects are plus signs, their mean IoU with the plus, and
      whether the color is right (train/evaluate.py's scorer);
  (b) prompts without the trigger: the fixed prompt set of `gen eval adherence` (train/evaluate.py: every color x
      shape alone, and pairs with relations), scored by its pixel-statistic scorer before and after, and the mean
      absolute pixel difference (0-255) between the base's and the LoRA's image at each seed, next to what the
      base itself changes between two seeds of one prompt.

Figures: bench/results/lora_learns_cpu.txt and a side-by-side grid bench/results/lora_learns.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.data.shapes import (BACKGROUND, COLORS, SHAPES, SIZE, Obj, ShapesWorld, draw, phrase,  # noqa: E402
                               place_scene)

CONCEPT = "plus"


def draw_shape(d: ImageDraw.ImageDraw, shape: str, box: tuple, color: str) -> None:
    """The world's draw(), plus the concept: a plus sign with arms a third of the box wide."""
    if shape != CONCEPT:
        return draw(d, Obj(shape, color, box))
    x0, y0, x1, y1 = box
    tx, ty, fill = (x1 - x0) / 3, (y1 - y0) / 3, COLORS[color]
    d.rectangle((x0 + tx, y0, max(x0 + tx, x1 - tx - 1), y1 - 1), fill=fill)
    d.rectangle((x0, y0 + ty, x1 - 1, max(y0 + ty, y1 - ty - 1)), fill=fill)


def base_id(base: Path) -> dict:
    """Which base model: its path, a hash of its denoiser weights and how many steps it was trained."""
    weights = next((w for part in ("transformer", "unet")
                    if (w := base / part / "diffusion_pytorch_model.safetensors").is_file()), None)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights else "?"
    steps = None
    if (base / "gen_config.json").is_file():
        steps = json.loads((base / "gen_config.json").read_text()).get("recipe", {}).get("trained_steps")
    return {"path": str(base), "denoiser_sha256": digest, "trained_steps": steps}


def concept_folder(out: Path, n: int, trigger: str, prior: int = 0, seed: int = 0) -> Path:
    """n pictures of the concept, colors in turn, captioned 'a COLOR TRIGGER'; then `prior` world pictures."""
    out.mkdir(parents=True, exist_ok=True)
    colors = list(COLORS)
    rows = []
    for i in range(n):
        color = colors[i % len(colors)]
        box = place_scene([(color, "square")], None, np.random.default_rng([seed, i])).objects[0].box
        img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
        draw_shape(ImageDraw.Draw(img), CONCEPT, box, color)
        rows.append((img, phrase(color, trigger)))
    world = ShapesWorld(prior, seed=seed + 1)
    rows += [world[i] for i in range(prior)]
    with open(out / "metadata.jsonl", "w") as f:
        for i, (img, text) in enumerate(rows):
            img.save(out / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": text}) + "\n")
    return out


def train_lora(base: Path, data: Path, out: Path, a) -> tuple[Path, float, list[float]]:
    """`gen lora configs/lora-subject.yaml` in a subprocess; returns the LoRA file, seconds and the loss curve."""
    overrides = [f"model.base={base}", f"data.path={data}", "data.resolution=64",
                 "lora.instance_prompt=", f"lora.rank={a.rank}", f"lora.targets={a.targets}",
                 f"lora.text_encoder={str(a.text_encoder).lower()}", f"lora.alpha={a.rank}", "lora.save_dtype=fp32",
                 f"optim.lr={a.lr}", f"train.batch_size={a.batch}", f"train.max_steps={a.steps}",
                 "train.mixed_precision='no'", "train.checkpoint_every=0", f"train.output_dir={out}",
                 "train.resume=none", "validation.every=0", "validation.prompts=[]", "log.every=10",
                 "log.tracker=none", "log.progress=false", *a.set]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gen", "lora", str(ROOT / "configs" / "lora-subject.yaml"),
                           *overrides], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"gen lora failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return out / "lora.safetensors", time.perf_counter() - t, [r["loss"] for r in rows if "loss" in r]


def shape_ious(image: np.ndarray) -> dict[str, float] | None:
    """IoU of the image's largest non-white region with each shape drawn ideally in its bounding box."""
    from train.evaluate import MIN_AREA, _components

    mask = np.linalg.norm(image.astype(np.float32) - 255.0, axis=-1) > 60
    comps = _components(mask)
    if not comps or len(comps[0]) < MIN_AREA:
        return None
    region = np.zeros_like(mask)
    region[comps[0][:, 0], comps[0][:, 1]] = True
    ys, xs = comps[0][:, 0], comps[0][:, 1]
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    out = {}
    for shape in (CONCEPT, *SHAPES):
        ideal = Image.new("RGB", image.shape[1::-1], BACKGROUND)
        draw_shape(ImageDraw.Draw(ideal), shape, box, "red")
        ideal = (np.asarray(ideal) != BACKGROUND).any(-1)
        out[shape] = float((region & ideal).sum() / (region | ideal).sum())
    return out


def concept_scores(images: list[np.ndarray], colors: list[str]) -> dict:
    """(a): how many objects are the concept's shape, their mean IoU with it, and how many have the right color."""
    from train.evaluate import find_objects

    ious = [shape_ious(img) for img in images]
    is_concept = [bool(i) and max(i, key=i.get) == CONCEPT for i in ious]
    color_ok = [find_objects(img, ((c, CONCEPT),))[0] is not None for img, c in zip(images, colors)]
    return {"n": len(images), "concept": int(sum(is_concept)), "concept_pct": round(100 * np.mean(is_concept), 1),
            "iou": round(float(np.mean([i[CONCEPT] if i else 0.0 for i in ious])), 3),
            "color_pct": round(100 * np.mean(color_ok), 1)}


def sample_all(pipe, prompts: list[str], seeds: int, n_eval: int, save: Path) -> tuple[list, dict, list]:
    """Trigger-prompt images, then the adherence prompt set (its images are written to `save` and read back)."""
    import torch

    from train.evaluate import evaluate_adherence

    with torch.inference_mode():
        trig = []
        for i, prompt in enumerate(prompts):
            out = pipe(prompt, num_images_per_prompt=seeds, seed=1000 * i, output_type="np")
            trig += list((out.images * 255).round().astype(np.uint8))
        adherence = evaluate_adherence(pipe, n=n_eval, seed=0, save_images=save)
    plain = [np.asarray(Image.open(p)) for p in sorted(save.glob("*.png"))]
    return trig, adherence, plain


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(ROOT / "gen" / "assets" / "default"), help="model folder to adapt")
    ap.add_argument("--trigger", default="sks")
    ap.add_argument("--images", type=int, default=12, help="pictures of the concept")
    ap.add_argument("--prior", type=int, default=12, help="pictures of the world with their captions, added")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="attn+ff", help="lora.targets (the preset's: attn+ff)")
    ap.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=True,
                    help="lora.text_encoder: also adapt CLIP")
    ap.add_argument("--seeds", type=int, default=4, help="images per trigger prompt")
    ap.add_argument("--n-eval", type=int, default=2, help="images per prompt of the adherence set (>= 2)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further `gen lora` overrides")
    ap.add_argument("--out", default="runs/lora-learns")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    base, out, results = Path(a.base).resolve(), Path(a.out).resolve(), Path(a.results)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    data = concept_folder(out / "data", a.images, a.trigger, a.prior)
    lora, train_s, curve = train_lora(base, data, out / "run", a)
    print(f"gen lora: {a.steps} steps in {train_s:.0f} s, loss {curve[0]:.3f} -> {np.mean(curve[-3:]):.3f}", flush=True)

    import logging

    from gen.cli import _quiet_libraries
    from gen.pipeline import Pipeline
    from train.evaluate import prompt_set
    from train.loop import grid

    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    pipe = Pipeline.from_pretrained(base)
    pipe.progress = False
    prompts = [phrase(c, a.trigger) for c in COLORS]
    before = sample_all(pipe, prompts, a.seeds, a.n_eval, out / "base")
    pipe.load_lora(lora)
    after = sample_all(pipe, prompts, a.seeds, a.n_eval, out / "lora")
    colors = [c for c in COLORS for _ in range(a.seeds)]
    conc = {"base": concept_scores(before[0], colors), "lora": concept_scores(after[0], colors)}
    adh = {"base": before[1]["summary"], "lora": after[1]["summary"]}
    b, l = (np.stack(x[2]).astype(np.float32) for x in (before, after))
    diff = np.abs(b - l).mean(axis=(1, 2, 3))  # per image pair, 0-255
    specs = prompt_set()
    singles = np.array([s.relation is None and len(s.kinds) == 1 for s in specs]).repeat(a.n_eval)
    per_prompt = b.reshape(len(specs), a.n_eval, *b.shape[1:])
    seed_to_seed = float(np.abs(per_prompt[:, 0] - per_prompt[:, 1]).mean())

    # grid: two rows per block, the base's images over base+LoRA's; trigger prompts first, then plain ones
    cols = 2 * a.seeds
    tiles = []
    for i in range(0, len(prompts), 2):
        for imgs in (before[0], after[0]):
            tiles += imgs[i * a.seeds:(i + 2) * a.seeds]
    plain = [k * a.n_eval for k in np.linspace(0, len(specs) - 1, cols).round().astype(int)]
    for imgs in (before[2], after[2]):
        tiles += [imgs[k] for k in plain]
    results.mkdir(parents=True, exist_ok=True)
    grid([Image.fromarray(im) for im in tiles], cols).save(results / "lora_learns.png")

    total_s = time.perf_counter() - t0
    name = {"base": "base", "lora": "base+LoRA"}
    lines = [
        f"# LoRA learning check: a new shape ('{a.trigger}' = a plus sign) taught to the bundled model by "
        "`gen lora configs/lora-subject.yaml`",
        f"# base: {json.dumps(base_id(base))}",
        f"# data: {a.images} pictures at 64 px, colors in turn, captions 'a COLOR {a.trigger}'"
        + (f", plus {a.prior} pictures of the world with their captions" if a.prior else "")
        + f"; rank {a.rank}, alpha {a.rank}, targets {a.targets}"
        + (" on the denoiser and the text encoder" if a.text_encoder else "") + f", lr {a.lr}, batch {a.batch}, "
        f"{a.steps} steps, fp32",
        f"# {os.cpu_count()} cores; training {train_s:.0f} s (loss {curve[0]:.3f} over steps 1-10 -> "
        f"{np.mean(curve[-3:]):.3f} over the last 30), whole run {total_s:.0f} s; load average at end "
        f"{os.getloadavg()[0]:.1f}",
        "# sampling: the base's defaults (its gen_config.json), the same seeds with and without the LoRA",
        "",
        f"(a) trigger prompts 'a COLOR {a.trigger}' (6 colors x {a.seeds} seeds = {conc['base']['n']} images): "
        "the object's shape by best IoU with an ideal plus / circle / square / triangle in its bounding box",
        f"{'':<11}{'object is a plus':>20}{'mean IoU with a plus':>23}{'color right':>13}",
        *(f"{name[k]:<11}{c['concept']:>10}/{c['n']} = {c['concept_pct']:>3.0f}%{c['iou']:>23.2f}"
          f"{c['color_pct']:>12.0f}%" for k, c in conc.items()),
        "",
        f"(b) prompts without the trigger: the `gen eval adherence` set ({len(specs)} prompts x {a.n_eval} seeds), "
        "train/evaluate.py's scorer",
        f"{'':<11}{'single: color right':>21}{'shape right':>13}{'pairs: both objects':>21}{'relation':>10}",
        *(f"{name[k]:<11}{r['single']['color_right']:>20.1f}%{r['single']['shape_right']:>12.1f}%"
          f"{r['relation']['both_objects_right']:>20.1f}%{r['relation']['relation_right']:>9.1f}%"
          for k, r in adh.items()),
        f"mean |base - base+LoRA| per pixel (0-255), same seed: {diff.mean():.2f} (single objects "
        f"{diff[singles].mean():.2f}, pairs {diff[~singles].mean():.2f}; largest for one image {diff.max():.2f})",
        f"for scale, the base between two seeds of one prompt: {seed_to_seed:.2f}",
        "",
        f"grid lora_learns.png: per pair of rows, the base's images over base+LoRA's at the same seeds; first the "
        f"trigger prompts ({a.seeds} seeds of 'a red sks' and 'a green sks', ...), last the plain prompts",
    ]
    text = "\n".join(lines)
    print(text)
    (results / "lora_learns_cpu.txt").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps({"base": base_id(base), "concept": conc, "adherence": adh,
                                                 "pixel_diff": float(diff.mean()), "seed_to_seed": seed_to_seed,
                                                 "train_s": train_s, "loss": curve}, indent=1))


if __name__ == "__main__":
    main()
