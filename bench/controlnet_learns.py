"""A ControlNet trained by gen learns the control: on the shapes world, the generated objects sit where the hint says.

    python bench/controlnet_learns.py [--base-steps 1500] [--steps 1500] [--scenes 16] [--size 64] [--batch 16]
                                      [--images 256] [--sample-steps 20] [--out runs/controlnet-learns]

The world: train/data/shapes.py at 64 px, each scene's hint its objects' mask (write_folder(control=True)). The base:
an SD-1.x-style model (a tiny UNet, DDPM eps) that `gen train` trains from scratch with the bundled model's CLIP and
VAE (gen/assets/default), so that it draws the world's objects somewhere; then `gen train configs/controlnet-sd.yaml`
trains a ControlNet from that UNet (base frozen). Both run in subprocesses, on one image folder. Measured on
--scenes held-out scenes (another seed), their captions as prompts and their masks as hints, the same seeds with and
without the ControlNet: an image's object pixels are those far from the white background (any channel below 200),
and the IoU of that region with the hint's is averaged over the scenes. Without the ControlNet the base puts its
objects anywhere; with it, on the hint.

Figures: bench/results/controlnet_learns_cpu.txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 64
DEFAULT = ROOT / "gen" / "assets" / "default"


def iou(image, hint) -> float:
    """IoU of an image's object pixels (any channel below 200: not the white background) with the hint's white."""
    a = np.asarray(image.convert("RGB")).min(axis=-1) < 200
    b = np.asarray(hint.convert("L")) > 127
    return float((a & b).sum() / max(1, (a | b).sum()))


def gen_train(config: str, **keys) -> float:
    """`gen train CONFIG key=value ...` in a subprocess; its wall time."""
    began = time.perf_counter()
    args = [sys.executable, "-m", "gen", "train", config, *(f"{k.replace('__', '.')}={json.dumps(v)}"
                                                           for k, v in keys.items())]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"gen train {config} failed: {r.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - began


def train_both(out: Path, base_steps: int, steps: int, images: int = 256, batch: int = 16, lr: float = 1e-3,
               size: int = SIZE) -> dict:
    """The image folder, the base (a UNet from scratch) and the ControlNet; their folders and wall times."""
    from train.data.shapes import write_folder

    data = write_folder(out / "data", images, seed=0, size=size, control=True)
    common = dict(data__path=str(data), data__resolution=size, data__crop="center", train__batch_size=batch,
                  train__mixed_precision="no", train__ema_decay=0.0,
                  train__checkpoint_every=0, validation__prompts=[], log__tracker="none", log__progress=False,
                  optim__lr=lr, optim__warmup_steps=0)
    t_base = gen_train("configs/unet-folder.yaml", model__text_encoder=str(DEFAULT), model__vae=str(DEFAULT),
                       model__preset="tiny", train__max_steps=base_steps, train__output_dir=str(out / "base"),
                       sampling__steps=20, sampling__sampler="ddim", **common)
    t_cn = gen_train("configs/controlnet-sd.yaml", model__base=str(out / "base" / "model"), train__max_steps=steps,
                     train__output_dir=str(out / "controlnet"), train__cond_dropout=0.1, **common)
    return dict(data=data, base=out / "base" / "model", controlnet=out / "controlnet" / "controlnet",
                base_seconds=t_base, controlnet_seconds=t_cn)


def measure(base: Path, controlnet: Path, scenes: int, size: int = SIZE, steps: int = 20) -> dict:
    """Mean IoU of the objects with the hint over held-out scenes, without and with the ControlNet."""
    from gen.control import Control
    from gen.pipeline import Pipeline
    from train.data.shapes import mask, render, scene

    pipe = Pipeline.from_pretrained(base)
    pipe.progress = False
    without, with_, oracle = [], [], []
    for i in range(scenes):
        s = scene(1, i, size)  # held out: the training folder is seed 0
        hint = mask(s)
        run = dict(seed=i, num_inference_steps=steps, height=size, width=size)
        without.append(iou(pipe(s.caption, **run).images[0], hint))
        with_.append(iou(pipe(s.caption, control=[Control(str(controlnet), hint)], **run).images[0], hint))
        oracle.append(iou(render(s), hint))
    return dict(iou_without=float(np.mean(without)), iou_with=float(np.mean(with_)), iou_true=float(np.mean(oracle)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--size", type=int, default=SIZE, help="the world's side in pixels (objects scale with it)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=256, help="training scenes")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--out", default="runs/controlnet-learns")
    a = ap.parse_args(argv)
    out = ROOT / a.out
    trained = train_both(out, a.base_steps, a.steps, a.images, a.batch, size=a.size)
    r = measure(trained["base"], trained["controlnet"], a.scenes, a.size, a.sample_steps)
    lines = [f"shapes world {a.size} px, batch {a.batch}; base: tiny UNet from scratch, {a.base_steps} steps "
             f"({trained['base_seconds']:.0f} s); ControlNet: {a.steps} steps ({trained['controlnet_seconds']:.0f} s)",
             f"IoU of the objects with the hint over {a.scenes} held-out scenes: without ControlNet "
             f"{r['iou_without']:.3f}, with {r['iou_with']:.3f} (the scenes' own images: {r['iou_true']:.3f})"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
