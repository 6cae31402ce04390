"""The from-scratch chain on handwritten digits: configs/default-model.yaml (clip -> vae -> denoiser) trained on
scikit-learn's digits (1,797 8x8 scans, drawn at 32 px, captions "a handwritten seven"), once with gen's DiT and
once with a real family's architecture (`model.family=sd3`: an SD3 MMDiT of about the DiT's size), the two sharing
the clip and vae stages. Each is scored on samples of every digit:

- accuracy: the share of samples a 1-nearest-neighbour judge (8x8 pixels, fitted on the training digits; its own
  accuracy on the held-out digits is printed) reads as the prompted digit;
- diversity ratio and nearest-neighbour distances (train/diversity.py): mean pairwise distance of each digit's
  samples over that of its training images; each sample's distance to its nearest training image against the
  held-out digits' (20%, never trained on).

    python bench/digits_chain.py [--archs dit,sd3] [--n 20] [--guidance 1.5] [--out runs/digits] [--results DIR]

The step counts default to half the bundled model's recipe (clip 400, vae 500, denoiser 1600); the denoiser stage
saves guidance 1.5 as the model's default (`denoiser:sampling.guidance=1.5`). `--data glyphs`
draws digits from PIL's built-in font at random offsets instead (no scikit-learn needed: the suite's stand-in,
tests/test_bench_scripts.py, runs it at --size tiny with one step per stage).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RES = 32
# the digits models' default guidance, chosen on accuracy and diversity together (bench/results/digits_chain_cpu.txt:
# at the recipe's 7, 100% right but 0.60 / 0.52 of the real digits' diversity; at 1.5, 99.0 / 98.5% and 0.85 / 0.83)
GUIDANCE = 1.5
# denoiser stage per architecture: (full size, --size tiny); the SD3 MMDiT at about the DiT's width and depth
ARCHS = {"dit": ({}, {"model.preset": "DiT-T/2", "model.options": {}}),
         "sd3": ({"model.family": "sd3", "model.preset": "tiny",
                  "model.options": {"num_layers": 6, "attention_head_dim": 64, "num_attention_heads": 3,
                                    "caption_projection_dim": 192}},
                 {"model.family": "sd3", "model.preset": "tiny", "model.options": {}})}


def caption(digit: int) -> str:
    return f"a handwritten {WORDS[digit]}"


def load_digits(source: str, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """((N, 8, 8) ink in [0, 16], (N,) labels): scikit-learn's scans, or PIL font glyphs at random offsets."""
    if source == "sklearn":
        try:
            from sklearn.datasets import load_digits as sk_digits
        except ImportError:
            raise SystemExit("bench/digits_chain.py: scikit-learn is not installed (pip install scikit-learn), or "
                             "pass --data glyphs") from None
        d = sk_digits()
        images, labels = d.images, d.target
        return (images[:n], labels[:n]) if n else (images, labels)
    from PIL import Image, ImageDraw, ImageFont

    rng, font = np.random.default_rng(seed), ImageFont.load_default()
    images, labels = [], []
    for i in range(n or 500):
        canvas = Image.new("L", (16, 16), 0)
        ImageDraw.Draw(canvas).text((int(rng.integers(2, 7)), int(rng.integers(0, 4))), str(i % 10), fill=255,
                                    font=font)
        images.append(np.asarray(canvas.resize((8, 8), Image.BOX), np.float64) * 16 / 255)
        labels.append(i % 10)
    return np.stack(images), np.array(labels)


def to_pixels(ink: np.ndarray) -> np.ndarray:
    """(N, 8, 8) ink in [0, 16] -> (N, 32, 32, 3) uint8, dark ink on white, bicubic."""
    from PIL import Image

    gray = (255 - ink * 255 / 16).clip(0, 255).astype(np.uint8)
    big = [np.asarray(Image.fromarray(g).resize((RES, RES), Image.BICUBIC)) for g in gray]
    return np.repeat(np.stack(big)[..., None], 3, axis=-1)


def to_ink(pixels: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 -> (N, 64) ink in [0, 16] at 8x8 (4x4 means), the judge's features."""
    ink = (255 - pixels.astype(np.float64).mean(-1)) * 16 / 255
    return ink.reshape(len(ink), 8, RES // 8, 8, RES // 8).mean((2, 4)).reshape(len(ink), -1)


def judge(train_ink: np.ndarray, train_labels: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """1-nearest-neighbour labels of (N, 64) ink vectors."""
    from train.diversity import distances

    return train_labels[distances(ink, train_ink).argmin(1)]


def write_folder(folder: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for k, (img, d) in enumerate(zip(pixels, labels)):
            Image.fromarray(img).save(folder / f"{k:05d}.png")
            f.write(json.dumps({"file_name": f"{k:05d}.png", "text": caption(int(d))}) + "\n")


def train_chain(arch: str, a, data: Path, n_train: int, out: Path) -> tuple[Path, float]:
    """configs/default-model.yaml on the digits folder, the denoiser stage as `arch`; the clip and vae stages of the
    first architecture are reused by the others (the chain skips a stage whose output is there)."""
    from train.chain import run_chain

    run = out / arch
    first = out / a.archs[0]
    for stage in ("clip", "vae"):
        if run != first and not (run / stage).exists():
            run.mkdir(parents=True, exist_ok=True)
            (run / stage).symlink_to((first / stage).resolve(), target_is_directory=True)
    common = {"data.source": "folder", "data.path": str(data), "data.resolution": RES, "log.tracker": "none",
              "log.progress": False, "log.every": 50, "train.checkpoint_every": 0}
    if a.batch:
        common["train.batch_size"] = a.batch
    stages = {"clip": {"train.max_steps": a.clip_steps, "clip.eval_images": min(256, n_train // 4),
                       "clip.negative_words": [WORDS], "validation.every": 0},
              "vae": {"train.max_steps": a.vae_steps, "vae.eval_images": min(128, n_train // 4),
                      "validation.every": 0},
              "denoiser": {"train.max_steps": a.steps, "validation.prompts": [], "validation.every": 0,
                           "sampling.guidance": GUIDANCE, **ARCHS[arch][a.size == "tiny"]}}
    overrides = [f"{k}={json.dumps(v)}" for k, v in common.items()]
    overrides += [f"{s}:{k}={json.dumps(v)}" for s, kv in stages.items() for k, v in kv.items()]
    t = time.perf_counter()
    model = run_chain(ROOT / "configs" / "default-model.yaml", overrides + [f"output_dir={run}"])
    return model, time.perf_counter() - t


def score(model: Path, a, train_px, train_lab, held_px, judge_ink) -> dict:
    """Samples `a.n` images of each digit and scores them (accuracy, diversity, copying)."""
    import torch

    from gen.pipeline import Pipeline
    from train.diversity import report

    pipe = Pipeline.from_pretrained(model)
    pipe.progress = False
    kwargs = {k: v for k, v in dict(guidance_scale=a.guidance, num_inference_steps=a.sample_steps).items()
              if v is not None}
    samples, t = {}, time.perf_counter()
    with torch.inference_mode():
        for d in range(10):
            out = pipe(caption(d), num_images_per_prompt=a.n, seed=1000 * d, output_type="np", **kwargs)
            samples[caption(d)] = (out.images * 255).round().astype(np.uint8)
    secs = time.perf_counter() - t
    right = sum(int((judge(*judge_ink, to_ink(imgs)) == d).sum()) for d, imgs in enumerate(samples.values()))
    train = {caption(d): train_px[train_lab == d] for d in range(10)}
    out = report(samples, train, held_px)
    return {"accuracy": round(100.0 * right / (10 * a.n), 1), "samples": 10 * a.n, "sampling_s": round(secs, 1),
            **out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["sklearn", "glyphs"], default="sklearn")
    ap.add_argument("--images", type=int, default=None, help="use only the first N digits (default: all)")
    ap.add_argument("--archs", default="dit,sd3", help="comma-separated: " + ", ".join(ARCHS))
    ap.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: the smallest denoisers")
    ap.add_argument("--clip-steps", type=int, default=400)
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--steps", type=int, default=1600, help="denoiser steps")
    ap.add_argument("--batch", type=int, default=None, help="every stage's batch size (default: the recipe's)")
    ap.add_argument("--n", type=int, default=20, help="samples per digit")
    ap.add_argument("--guidance", type=float, default=None, help=f"default: the model's ({GUIDANCE})")
    ap.add_argument("--sample-steps", type=int, default=None, help="default: the recipe's (20)")
    ap.add_argument("--out", default="runs/digits")
    ap.add_argument("--results", default=None, help="also write digits_chain.json here (bench/results)")
    a = ap.parse_args(argv)
    a.archs = a.archs.split(",")
    if set(a.archs) - set(ARCHS) or a.n < 2:
        ap.error(f"--archs takes {', '.join(ARCHS)}; --n must be >= 2")
    import logging

    from gen.cli import _quiet_libraries
    from train.diversity import format_lines

    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    out = Path(a.out)
    ink, labels = load_digits(a.data, a.images, 0)
    order = np.random.default_rng(0).permutation(len(labels))
    held, kept = order[:len(order) // 5], order[len(order) // 5:]
    pixels = to_pixels(ink)
    write_folder(out / "data", pixels[kept], labels[kept])
    judge_ink = (ink[kept].reshape(len(kept), -1), labels[kept])
    judge_acc = float((judge(*judge_ink, to_ink(pixels[held])) == labels[held]).mean())
    result = {"data": a.data, "train_images": len(kept), "heldout_images": len(held), "size": a.size,
              "steps": {"clip": a.clip_steps, "vae": a.vae_steps, "denoiser": a.steps},
              "judge_heldout_accuracy": round(100 * judge_acc, 1), "archs": {}}
    print(f"digits: {len(kept)} training, {len(held)} held out; judge on held-out digits: {100 * judge_acc:.1f}%",
          flush=True)
    for arch in a.archs:
        model, secs = train_chain(arch, a, out / "data", len(kept), out)
        row = score(model, a, pixels[kept], labels[kept], pixels[held], judge_ink) | {"train_s": round(secs)}
        result["archs"][arch] = row
        print(f"{arch}: accuracy {row['accuracy']}% of {row['samples']} samples; " + "; ".join(format_lines(row))
              + f"; trained in {secs:.0f} s", flush=True)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    if a.results:
        Path(a.results).mkdir(parents=True, exist_ok=True)
        (Path(a.results) / "digits_chain.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
