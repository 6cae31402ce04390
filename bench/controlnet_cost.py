"""The cost of one ControlNet per sampling step, relative to plain sampling: gen vs diffusers, measured in one run.

    .venv/bin/python bench/controlnet_cost.py                                   # CPU: "tiny" SD-1 UNet @ 128 px
    .venv/bin/python bench/controlnet_cost.py --device cuda --preset sd15 --size 512 --dtype fp16

One random SD-1-architecture model (bench/sample_vs_diffusers.py's build_folder: CLIP tower, 8x VAE, a
gen.models.unet preset) and a ControlNet made from its UNet by diffusers' ControlNetModel.from_unet, its
zero-initialised output layers drawn at random (tests/test_controlnet.py's `randomized`) so it changes the image.
Four runs of --steps steps each, guidance 7.5 with a negative prompt, latents out (no VAE decode), in rotated order
per repeat so that a change in machine load hits all alike; the minimum over --repeats:
  - diffusers: StableDiffusionPipeline, and StableDiffusionControlNetPipeline on the same modules plus the ControlNet;
  - gen: gen.Pipeline on the same folder, without and with control=[Control(net, hint)].
Per-step time is the call's time over --steps (the prompt encoding, once per call, included on every side). Printed:
each side's ratio with/without the ControlNet, and gen's ratio over diffusers' (the target: <= 1.0), in wall time and
(on CPU) in the process's CPU time, steadier where other jobs share the CPU; and the max abs difference of the
ControlNet latents (gen vs diffusers, a check that both ran the same thing).
Figures: bench/results/controlnet_cost_cpu.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from sample_vs_diffusers import DTYPES, NEGATIVE, PROMPT, build_folder  # noqa: E402

from gen.cli import _quiet_libraries  # noqa: E402
from gen.control import Control  # noqa: E402
from gen.pipeline import Pipeline  # noqa: E402
from tests.test_controlnet import randomized  # noqa: E402

SD_PRESETS = ("tiny", "base", "sd15")
RUNS = ("diffusers", "diffusers + ControlNet", "gen", "gen + ControlNet")


def build(preset: str, size: int, folder: Path, device: str, dtype: str):
    """The four callables of RUNS (each returns latents) and the ControlNet's parameter count."""
    build_folder(preset, size, folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=DTYPES[dtype])
    net = randomized(ControlNetModel.from_unet(theirs.unet), seed=1).to(DTYPES[dtype])
    theirs_cn = StableDiffusionControlNetPipeline(**theirs.components, controlnet=net).to(device)
    theirs.to(device)
    for p in (theirs, theirs_cn):
        p.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(folder, device=device, dtype=dtype)
    ours.progress = False
    hint = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8"))
    settings = dict(guidance_scale=7.5, height=size, width=size, output_type="latent")

    def diffusers_run(pipe, **kw):
        return lambda steps: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, **settings, **kw,
                                  generator=[torch.Generator("cpu").manual_seed(0)]).images

    def gen_run(**kw):
        return lambda steps: ours(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, seed=0, **settings,
                                  **kw).images
    runs = dict(zip(RUNS, (diffusers_run(theirs), diffusers_run(theirs_cn, image=hint), gen_run(),
                           gen_run(control=[Control(net, hint)]))))
    return runs, sum(p.numel() for p in net.parameters()) / 1e6, sum(p.numel() for p in theirs.unet.parameters()) / 1e6


def measure(runs: dict, steps: int, repeats: int, device: str) -> tuple[dict, dict, dict]:
    """(wall seconds per step, process CPU seconds per step, each the min over repeats; the last latents) of each
    run. On a CPU shared with other jobs the CPU time is the steadier figure."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    outs = {name: run(steps) for name, run in runs.items()}  # warm-up
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t, c = time.perf_counter(), time.process_time()
            outs[name] = runs[name](steps)
            sync()
            wall[name].append((time.perf_counter() - t) / steps)
            cpu[name].append((time.process_time() - c) / steps)
    return {name: min(ts) for name, ts in wall.items()}, {name: min(ts) for name, ts in cpu.items()}, outs


def ratios(per_step: dict, what: str) -> list[str]:
    """The table of one measure (ms per step) and its ratios."""
    ratio = {side: per_step[f"{side} + ControlNet"] / per_step[side] for side in ("gen", "diffusers")}
    return [f"{what}:"] + [f"  {name:<24}{per_step[name] * 1e3:9.1f} ms/step" for name in RUNS] + [
        f"  with/without ControlNet: gen {ratio['gen']:.2f}x, diffusers {ratio['diffusers']:.2f}x; gen's ratio over "
        f"diffusers' {ratio['gen'] / ratio['diffusers']:.2f} (target <= 1.0); gen + ControlNet at "
        f"{per_step['diffusers + ControlNet'] / per_step['gen + ControlNet']:.2f}x diffusers + ControlNet's speed"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, choices=SD_PRESETS, help="UNet preset (default: tiny on CPU, sd15 on CUDA)")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: 128 on CPU, 512 on CUDA)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps per timed call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, fp16 on CUDA")
    ap.add_argument("--out", default=None, help="also write the figures here (bench/results/controlnet_cost_cpu.txt)")
    a = ap.parse_args(argv)
    _quiet_libraries()
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    if a.steps < 1 or a.repeats < 1:
        raise SystemExit("--steps and --repeats must be at least 1")
    preset, size, dtype = a.preset or ("sd15" if cuda else "tiny"), a.size or (512 if cuda else 128), \
        a.dtype or ("fp16" if cuda else "fp32")
    if size % 8:
        raise SystemExit(f"--size must be a multiple of 8 (the VAE's factor), not {size}")
    with tempfile.TemporaryDirectory() as tmp:
        runs, cn_params, unet_params = build(preset, size, Path(tmp) / preset, a.device, dtype)
        wall, cpu, outs = measure(runs, a.steps, a.repeats, a.device)
    diff = (outs["gen + ControlNet"].float().cpu() - outs["diffusers + ControlNet"].float().cpu()).abs().max().item()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    lines = [f"# ControlNet cost per step: SD-1 '{preset}' UNet ({unet_params:.0f}M params) + ControlNet "
             f"({cn_params:.0f}M), {size} px, {a.steps} steps, guidance 7.5 (batch 2), {dtype}, {device}, "
             f"torch {torch.__version__}; min of {a.repeats}, load average {os.getloadavg()[0]:.1f}"]
    lines += ratios(wall, "wall time") + ([] if cuda else ratios(cpu, "process CPU time (steadier on a shared CPU)"))
    lines.append(f"latents with the ControlNet, gen vs diffusers: max abs diff {diff:.1e}")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
