"""Learning works: on the shapes world, a tiny DiT with rectified flow and a tiny UNet with DDPM end with a
clearly lower loss than they start with, and sample images whose colors follow the prompt.

    python bench/train_learns.py [--steps 3000] [--resolution 32] [--base PATH|none] [--out runs/learns]

Everything goes through `gen train` (train.loop.train). Each denoiser trains from scratch, with a frozen text
encoder and VAE from --base: by default the bundled model's (gen/assets/default, trained on this world);
with --base none, a random tiny CLIP tower and a VAE that the `vae` stage trains here first (a random VAE's
decoder would not show colors). The color check: for every color, "a COLOR SHAPE" is sampled with several
seeds; an image's color is the palette color nearest to most of its non-white pixels; chance is 1/6.
Figures: bench/results/train_learns_cpu.txt, with the sampled grids next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data.shapes import COLORS, SHAPES, phrase  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1] / "gen" / "assets" / "default"
PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
NAMES = list(COLORS)


def dominant_color(image: np.ndarray, min_fraction: float = 0.02) -> str | None:
    """The palette color nearest to most non-white pixels of an (H, W, 3) uint8 image; None if too few."""
    px = image.reshape(-1, 3).astype(np.float32)
    px = px[np.linalg.norm(px - 255.0, axis=1) > 60]  # not background
    if len(px) < min_fraction * image.shape[0] * image.shape[1]:
        return None
    nearest = np.linalg.norm(px[:, None] - PALETTE[None], axis=2).argmin(axis=1)
    return NAMES[np.bincount(nearest, minlength=len(NAMES)).argmax()]


def run(name: str, cfg_extra: dict, out: Path) -> tuple[Path, list[float], float]:
    from train.config import load_config
    from train.loop import train

    t = time.perf_counter()
    model = train(load_config(None, extra={**cfg_extra, "train.output_dir": str(out / name)}))
    rows = [json.loads(r) for r in (out / name / "metrics.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in rows if "loss" in r]
    return model, curve, time.perf_counter() - t


def color_check(model: Path, seeds: int, guidance: float, steps: int) -> dict:
    from PIL import Image

    from gen.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model)
    pipe.progress = False
    rows, right, confusion = [], 0, {}
    for i, color in enumerate(NAMES):
        prompt = phrase(color, SHAPES[i % len(SHAPES)])
        images = pipe(prompt, num_images_per_prompt=seeds, seed=1000 * i, guidance_scale=guidance,
                      num_inference_steps=steps, output_type="np").images
        images = (images * 255).round().astype(np.uint8)
        got = [dominant_color(im) for im in images]
        right += sum(g == color for g in got)
        confusion[prompt] = got
        rows.append(np.concatenate(list(images), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(model.parent / "color_check.png")
    return {"accuracy": right / (len(NAMES) * seeds), "right": right, "total": len(NAMES) * seeds,
            "per_prompt": confusion, "grid": str(model.parent / "color_check.png")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="denoiser optimizer steps")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=4, help="images per color")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--base", default=str(DEFAULT) if (DEFAULT / "model_index.json").is_file() else "none",
                    help="model folder whose text encoder and VAE to use (default: the bundled model's); 'none': "
                         "a random tiny CLIP and a VAE trained here by the vae stage")
    ap.add_argument("--dit-options", default='{"depth": 4, "hidden_size": 128, "num_heads": 4}',
                    help="DiT-T/2 overrides (JSON)")
    ap.add_argument("--only", choices=["dit", "unet"], default=None)
    ap.add_argument("--out", default="runs/learns")
    ap.add_argument("--results", default=None, help="also copy the color-check grids here (bench/results)")
    a = ap.parse_args(argv)
    import logging

    from gen.cli import _quiet_libraries

    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    world = {"data.source": "shapes", "data.resolution": a.resolution, "data.num_images": 20000,
             "log.every": 10, "log.tracker": "none", "log.progress": False, "train.batch_size": a.batch,
             "train.checkpoint_every": 0, "validation.every": 0}
    report: dict = {"resolution": a.resolution, "batch": a.batch, "steps": a.steps, "base": a.base}
    if a.base != "none":
        base, vae = Path(a.base), {}
    else:
        from gen.models.tiny import tiny_pipeline

        base = out / "base"
        if not (base / "model_index.json").is_file():
            tiny_pipeline("dit", sample_size=a.resolution // 2).save_pretrained(base)  # random tiny CLIP
        vae_model, vae_curve, secs = run("vae", {**world, "stage": "vae", "vae.preset": "tiny",
                                                 "vae.eval_images": 64, "train.max_steps": a.vae_steps,
                                                 "train.ema_decay": 0.0, "optim.lr": 2e-3,
                                                 "optim.warmup_steps": 20, "validation.seeds": [0]}, out)
        psnr = json.loads((vae_model / "stage.json").read_text())["metrics"]["psnr"]
        report["vae"] = {"steps": a.vae_steps, "psnr_db": round(psnr, 2), "seconds": round(secs)}
        print(f"vae stage: {a.vae_steps} steps, held-out PSNR {psnr:.1f} dB ({secs:.0f} s)", flush=True)
        vae = {"model.vae": str(vae_model)}
    denoisers = {"dit": {"model.denoiser": "dit", "model.preset": "DiT-T/2", "model.options": json.loads(a.dit_options),
                         "objective.type": "flow"},
                 "unet": {"model.denoiser": "unet", "model.preset": "tiny", "objective.type": "ddpm"}}
    for name, extra in denoisers.items():
        if a.only and name != a.only:
            continue
        cfg = {**world, **vae, **extra, "model.base": str(base), "train.max_steps": a.steps, "optim.lr": 1e-3,
               "optim.warmup_steps": 20, "train.ema_decay": 0.99, "validation.prompts": ["a red circle"],
               "validation.seeds": [0], "sampling.steps": a.sample_steps, "sampling.guidance": a.guidance}
        model, curve, secs = run(name, cfg, out)
        check = color_check(model, a.seeds, a.guidance, a.sample_steps)
        report[name] = {"loss_start": round(curve[0], 4), "loss_end": round(curve[-1], 4),
                        "loss_min": round(min(curve), 4), "seconds": round(secs), "color": check}
        print(f"{name}: loss {curve[0]:.3f} (steps 1-10) -> {curve[-1]:.3f} (last 10 of {a.steps}), "
              f"colors right {check['right']}/{check['total']} ({100 * check['accuracy']:.0f}%, chance 17%), "
              f"{secs:.0f} s", flush=True)
    if a.results:
        import shutil

        results = Path(a.results)
        results.mkdir(parents=True, exist_ok=True)
        for name in denoisers:
            if (out / name / "color_check.png").is_file():
                shutil.copy(out / name / "color_check.png", results / f"train_learns_{name}.png")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
