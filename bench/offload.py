"""Offload overhead: gen's pipeline with all weights resident on the GPU vs each --offload mode (model: components
whole; group: blocks with stream prefetch; groupN: N blocks per group, synchronous; sequential: layers), on the same
random weights (bench/sample_vs_diffusers.py's folders): seconds per image, the ratio to resident, the peak of the
torch allocator, and the images' max abs diff to resident (0 expected).

    .venv/bin/python bench/offload.py --device cuda --preset sd15 flux-small   # bench/gpu.py's offload step
    .venv/bin/python bench/offload.py                                         # CPU plumbing: tiny @ 64 px, 2 steps
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.sample_vs_diffusers import NEGATIVE, PRESETS, PROMPT, SETTINGS, build_folder  # noqa: E402
from gen.pipeline import Pipeline  # noqa: E402

MODES = ["resident", "model", "group", "group4", "sequential"]


def load(folder: Path, mode: str, device: str, dtype: str) -> Pipeline:
    if mode == "resident":
        return Pipeline.from_pretrained(folder, device=device, dtype=dtype)
    blocks = int(mode[5:]) if mode.startswith("group") and mode[5:] else 1
    return Pipeline.from_pretrained(folder, device=device, dtype=dtype, offload=mode.rstrip("0123456789"),
                                    offload_blocks=blocks)


def bench(preset: str, folder: Path, size: int, steps: int, dtype: str, device: str, repeats: int) -> None:
    cuda = device.startswith("cuda")
    family = next((f for f in ("sdxl", "sd3", "flux") if preset.startswith(f)), "sd")
    guidance, sampler = SETTINGS.get(family, SETTINGS["sd"])
    settings = dict(prompt=PROMPT, negative_prompt=NEGATIVE if family != "flux" else None, seed=0,
                    num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type="np")
    print(f"\n{preset}: {size} px, {steps} steps, {sampler}, {dtype}, {device}, min of {repeats}")
    ref = base = None
    for mode in MODES:
        pipe = load(folder, mode, device, dtype)
        pipe.progress = False
        pipe(**settings)  # warm-up (and the first call installs the streamed hooks)
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            t = time.perf_counter()
            out = pipe(**settings).images
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = f"peak {torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB" if cuda else "peak n/a on CPU"
        ref = out if ref is None else ref
        base = min(times) if base is None else base
        print(f"  {mode:<11} {min(times):8.3f} s/img  {min(times) / base:5.2f}x resident  {peak}  "
              f"max|diff| vs resident {np.abs(out - ref).max():.1e}", flush=True)
        del pipe
        if cuda:
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["tiny"], choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the preset's; 64 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20; 2 on CPU)")
    ap.add_argument("--dtype", default=None, help="default: fp32 on CPU, fp16 on CUDA")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per mode (default: 3; 1 on CPU)")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'CPU'}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.preset:
            size = a.size or (PRESETS[preset][3] if cuda else 64)
            folder = Path(tmp) / preset
            build_folder(preset, size, folder)
            bench(preset, folder, size, a.steps or (20 if cuda else 2), a.dtype or ("fp16" if cuda else "fp32"),
                  a.device, a.repeats or (3 if cuda else 1))


if __name__ == "__main__":
    main()
