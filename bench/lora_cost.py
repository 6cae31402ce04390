"""LoRA training cost: steps/s and peak memory of `gen lora` next to diffusers'
examples/text_to_image/train_text_to_image_lora.py, on the same tiny SD-architecture UNet, data, rank and steps.

    python bench/lora_cost.py [--steps 20] [--warmup 4] [--batch 16] [--rank 8] [--repeats 3] [--device cpu]

Both loops come from bench/train_throughput.py, on its base (random small CLIP text tower, factor-4 VAE and the
"small" UNet preset) and its 64 px shapes-world data, tokenized per step / encoded by the VAE and text encoder
per step on both sides:
  - gen: the real `train.loop.train` with `train.lora.LoraTask` (what `gen lora` runs): lora.targets=attn
    (to_q/to_k/to_v/to_out.0 of every attention), rank = alpha = --rank, AdamW weight decay 1e-2, grad clip 1.0,
    no EMA; images/s from the loop's own log after the warmup window.
  - peer: train_throughput.diffusers_images_per_s(lora_rank=...), the inner loop of train_text_to_image_lora.py
    in its peft form (diffusers >= 0.25): unet.requires_grad_(False), unet.add_adapter(LoraConfig(r=rank,
    lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])),
    cast_training_params(unet, torch.float32), AdamW over the LoRA parameters (the script's defaults: lr 1e-4,
    weight decay 1e-2, constant schedule), then per step vae.encode(...).latent_dist.sample() * scaling_factor,
    randn_like noise, randint timesteps, add_noise, text_encoder(input_ids), unet(...), F.mse_loss,
    accelerator.gather(loss.repeat(bs)).mean().item(), backward, clip_grad_norm_(LoRA params, 1.0),
    optimizer/lr_scheduler step, zero_grad. The copies of the script in our reference index (commits 000280f5 and
    04a375b7 of huggingface/diffusers) predate peft and use LoRAAttnProcessor; the inner loop is the same in both
    forms, the adapter set-up above is the peft form's. (Recent versions of the script clip over a `filter` the
    optimizer has already consumed, i.e. over nothing; here the LoRA parameters are clipped, as intended.)
Each run is a fresh subprocess (so peak memory is its own); runs alternate gen, peer, peer, gen, ... and the
median of --repeats is reported. Memory: on CPU the process's peak RSS (ru_maxrss) and its growth over the
peak reached once imports, models and data are built (just before step 1); on CUDA torch.cuda.max_memory_allocated.
Figures: bench/results/lora_cost_cpu.txt.

    python bench/lora_cost.py --optimizers adamw,adamw8bit,prodigy,adafactor,lion,sgd [--out ...]

runs gen alone once per optimizer (optim.name, at each one's defaults; the runs of a repeat in rotated order) and
reports steps/s and peak RSS next to AdamW's: what choosing another optimizer costs or saves. Figures:
bench/results/lora_cost_optimizers_cpu.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import RES, cpu_name, diffusers_images_per_s, gen_images_per_s, make_base  # noqa: E402

LOOPS = {"gen": "gen lora (train/lora.py through train/loop.py)",
         "peer": "diffusers train_text_to_image_lora loop"}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Memory:
    """The peak memory (MiB) when the loop starts, and at the end."""

    def __init__(self, device: str):
        self.cuda, self.start = device.startswith("cuda"), None

    def mark(self) -> None:
        if self.start is None:
            self.start = _rss_mib()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                self.start_cuda = torch.cuda.memory_allocated() / 2 ** 20

    def report(self) -> dict:
        out = {"peak_rss_mib": _rss_mib(), "baseline_rss_mib": self.start}
        if self.cuda:
            out |= {"cuda_peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20, "cuda_baseline_mib": self.start_cuda}
        return out


def child(a) -> None:
    """One timed run in this (fresh) process; prints a JSON line."""
    import logging

    from gen.cli import _quiet_libraries

    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    mem = Memory(a.device)
    base, tmp = Path(a.base), Path(tempfile.mkdtemp(prefix="gen-lora-cost-"))
    if a.child == "gen":
        from train.lora import LoraTask

        class Probe(LoraTask):  # marks the baseline at the first loss call: everything is built by then
            def loss(self, model, batch, g):
                mem.mark()
                return super().loss(model, batch, g)

        extra = {"lora.rank": a.rank, "lora.alpha": a.rank, "lora.targets": "attn", "lora.save_dtype": "fp32",
                 "train.ema_decay": 0.0, "optim.name": a.optim}
        ips = gen_images_per_s(base, "unet", a.batch, a.steps, a.warmup, tmp, extra=extra, task_class=Probe)
    else:
        ips = diffusers_images_per_s(base, a.batch, a.steps, a.warmup, a.device, lora_rank=a.rank,
                                     on_start=mem.mark)
    print(json.dumps({"images_per_s": ips, **mem.report()}), flush=True)


def run_child(kind: str, base: Path, a) -> dict:
    args = [sys.executable, __file__, "--child", kind, "--base", str(base), "--steps", str(a.steps),
            "--warmup", str(a.warmup), "--batch", str(a.batch), "--rank", str(a.rank), "--device", a.device,
            "--optim", a.optim]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lora_params(base: Path, rank: int) -> dict:
    """Trainable LoRA parameters on each side (the same layers must be adapted)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from gen import families
    from gen import lora as lora_lib

    def count(config):
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        inject_adapter_in_model(config, unet)
        return sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)
    return {"gen": count(lora_lib.lora_config(families.get("sd1").lora_targets, rank, rank, "attn")),
            "peer": count(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (after the warmup)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="also write the table here (bench/results/lora_cost_cpu.txt)")
    ap.add_argument("--optimizers", default="", help="comma-separated optim.name values: gen alone, per optimizer")
    ap.add_argument("--optim", default="adamw", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=list(LOOPS), help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps % a.warmup:
        ap.error("--steps must be a multiple of --warmup (gen's loop logs every --warmup steps)")
    if a.child:
        return child(a)
    base = make_base(Path(tempfile.mkdtemp(prefix="gen-lora-cost-")) / "base")
    if a.optimizers:
        return per_optimizer(base, a, [n.strip() for n in a.optimizers.split(",") if n.strip()])
    params = lora_params(base, a.rank)
    lines = header(a, f"LoRA training cost, {RES}x{RES} shapes world, tiny SD-architecture UNet ('small' preset), "
                      f"rank {a.rank} = alpha on to_q/to_k/to_v/to_out.0 ({params['gen']} trainable parameters in "
                      f"gen, {params['peer']} in the peer), batch {a.batch}, fp32, {a.steps} timed steps after "
                      f"{a.warmup} warmup, VAE + text encoder per step on both sides; median of {a.repeats} "
                      "alternating runs, each a fresh process")
    results = {k: [] for k in LOOPS}
    for r in range(a.repeats):
        for kind in (list(LOOPS) if r % 2 == 0 else list(LOOPS)[::-1]):
            res = run_child(kind, base, a)
            results[kind].append(res)
            grew = res["peak_rss_mib"] - res["baseline_rss_mib"]
            lines.append(f"#   run {r + 1}: {LOOPS[kind]}: {res['images_per_s']:.2f} images/s, peak RSS "
                         f"{res['peak_rss_mib']:.0f} MiB (+{grew:.0f} in the loop)")
            print(lines[-1], flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0] if v[0][m] is not None} for k, v in results.items()}
    cuda = "cuda_peak_mib" in med["gen"]
    head = f"{'loop':<48}{'images/s':>9}{'steps/s':>9}{'vs peer':>9}{'peak RSS':>10}{'in loop':>9}"
    lines += ["", head + (f"{'CUDA peak':>11}" if cuda else "")]
    for kind, name in LOOPS.items():
        m = med[kind]
        grow = statistics.median(r["peak_rss_mib"] - r["baseline_rss_mib"] for r in results[kind])
        row = (f"{name:<48}{m['images_per_s']:>9.2f}{m['images_per_s'] / a.batch:>9.2f}"
               f"{m['images_per_s'] / med['peer']['images_per_s']:>8.2f}x{m['peak_rss_mib']:>6.0f} MiB"
               f"{grow:>5.0f} MiB")
        lines.append(row + (f"{m['cuda_peak_mib']:>7.0f} MiB" if cuda else ""))
    lines.append(f"# peak RSS: ru_maxrss of the run's process; in loop: its growth over the peak before step 1. "
                 f"Load average at end {os.getloadavg()[0]:.1f}")
    print("\n".join(lines[-4:]))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


def header(a, what: str) -> list[str]:
    """The table's first lines (what is measured, on which machine), printed now."""
    lines = [f"# {what}", f"# {cpu_name()}; {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), device {a.device}; load average at start {os.getloadavg()[0]:.1f}"]
    print("\n".join(lines), flush=True)
    return lines


def per_optimizer(base: Path, a, names: list[str]) -> None:
    """gen's LoRA loop once per optimizer, `a.repeats` times in rotated order; medians against the first."""
    lines = header(a, f"LoRA training cost per optimizer (optim.name at its defaults): {RES}x{RES} shapes world, "
                      f"tiny SD-architecture UNet ('small' preset), rank {a.rank} on attention, batch {a.batch}, "
                      f"fp32, {a.steps} timed steps after {a.warmup} warmup; median of {a.repeats} runs, each a "
                      "fresh process")
    results = {n: [] for n in names}
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(run_child("gen", base, argparse.Namespace(**{**vars(a), "optim": name})))
            res = results[name][-1]
            lines.append(f"#   run {r + 1}: {name}: {res['images_per_s'] / a.batch:.3f} steps/s, peak RSS "
                         f"{res['peak_rss_mib']:.0f} MiB")
            print(lines[-1], flush=True)
    med = {n: {m: statistics.median(r[m] for r in v) for m in ("images_per_s", "peak_rss_mib")}
           for n, v in results.items()}
    grow = {n: statistics.median(r["peak_rss_mib"] - r["baseline_rss_mib"] for r in v) for n, v in results.items()}
    lines += ["", f"{'optimizer':<12}{'steps/s':>9}{'vs ' + names[0]:>12}{'peak RSS':>11}{'in loop':>10}"]
    for n in names:
        sps = med[n]["images_per_s"] / a.batch
        lines.append(f"{n:<12}{sps:>9.3f}{med[n]['images_per_s'] / med[names[0]]['images_per_s']:>11.2f}x"
                     f"{med[n]['peak_rss_mib']:>7.0f} MiB{grow[n]:>6.0f} MiB")
    lines.append(f"# load average at end {os.getloadavg()[0]:.1f}")
    print("\n".join(lines[-len(names) - 2:]))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
