"""Load time and peak memory of the same model from a diffusers folder and from a single file (original layout).

    python bench/single_file_load.py [--repeats 3] [--size small|tiny]

Builds one random SD-1.x-architecture model (diffusers/transformers classes; "small": UNet 128-256-512-512 with
512-wide cross-attention, a 6-layer 512-wide CLIP text tower, VAE 64-128-256-256, about 175M parameters, 665 MiB in fp32),
saves it as a diffusers folder with diffusers' own save_pretrained and as a single file with
gen's save_pretrained(single_file=True). Each load is `gen.Pipeline.from_pretrained(PATH)` on the CPU in a fresh
subprocess (so its peak RSS, ru_maxrss, is its own), runs alternate folder, file, file, folder, ...; the median of
--repeats is reported. Memory: the growth of peak RSS over the RSS once torch, diffusers and gen are imported,
after every weight has been read once (tensors may be memory-mapped and paged in on first use), next to the
weights' bytes: a load that held two copies of the weights would grow by about twice them.
Figures: bench/results/single_file_load_cpu.txt.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "small": dict(unet=(128, 256, 512, 512), cross=512, text=(512, 6, 2048), vae=(64, 128, 256, 256)),
    "tiny": dict(unet=(32, 64), cross=32, text=(32, 2, 37), vae=(32, 64)),
}


def build(size: str, folder: Path, file: Path) -> int:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from gen.models.text import byte_level_tokenizer
    from gen.pipeline import Pipeline

    s = SIZES[size]
    torch.manual_seed(0)
    n = len(s["unet"])
    unet = UNet2DConditionModel(block_out_channels=s["unet"], layers_per_block=2, cross_attention_dim=s["cross"],
                                down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), sample_size=32)
    vae = AutoencoderKL(block_out_channels=s["vae"], down_block_types=("DownEncoderBlock2D",) * len(s["vae"]),
                        up_block_types=("UpDecoderBlock2D",) * len(s["vae"]), latent_channels=4)
    tok = byte_level_tokenizer()
    width, layers, ff = s["text"]
    text = CLIPTextModel(CLIPTextConfig(hidden_size=width, num_hidden_layers=layers, intermediate_size=ff,
                                        num_attention_heads=8 if width >= 64 else 4, vocab_size=len(tok),
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    Pipeline.from_pretrained(folder).save_pretrained(file, single_file=True)
    return sum(p.numel() * p.element_size() for m in (unet, vae, text) for p in m.parameters())


def child(path: str) -> None:
    """One load in this process: prints seconds and peak-RSS growth (bytes) as JSON."""
    import torch  # noqa: F401  - imported before the baseline, as gen imports them anyway
    import diffusers  # noqa: F401

    from gen.pipeline import Pipeline

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(path, device="cpu")
    seconds = time.perf_counter() - t
    # safetensors may hand out memory-mapped tensors whose pages are read on first use: read every weight once, so
    # the peak counts all of them (a second copy anywhere would show as twice the weights)
    for m in pipe.models:
        for p in m.parameters():
            p.sum()
    touched = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "touched": touched, "growth": peak - base}))


def run(path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.build:
        return print(build(args.size, Path(args.build) / "model", Path(args.build) / "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        folder, file = Path(tmp) / "model", Path(tmp) / "model.safetensors"
        # built in a subprocess too: a child's ru_maxrss starts at its parent's (Linux keeps it over fork/exec)
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--build", tmp], capture_output=True,
                             text=True, check=True)
        weights = int(out.stdout.strip().splitlines()[-1])
        results = {"folder": [], "file": []}
        for i in range(args.repeats):
            for kind in (("folder", "file") if i % 2 == 0 else ("file", "folder")):
                results[kind].append(run(folder if kind == "folder" else file))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "touched", "growth")}
           for k, v in results.items()}
    mb = 1 / 2 ** 20
    print(f"model: {args.size}, weights {weights * mb:.0f} MiB (fp32), {args.repeats} loads each, median")
    for k in ("folder", "file"):
        print(f"  {k:6s}: {med[k]['seconds']:.2f} s ({med[k]['touched']:.2f} s with every weight read once), "
              f"peak RSS growth {med[k]['growth'] * mb:.0f} MiB "
              f"({med[k]['growth'] / weights:.2f}x the weights)")
    print(f"  single file / folder load time: {med['file']['seconds'] / med['folder']['seconds']:.2f}x "
          f"({med['file']['touched'] / med['folder']['touched']:.2f}x with every weight read)")


if __name__ == "__main__":
    main()
