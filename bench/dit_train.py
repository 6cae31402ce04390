"""Training throughput, model FLOP utilisation and peak memory of a DiT denoiser step (default DiT-XL/2 on
256 px images, i.e. 32x32x4 latents, bf16 autocast, AdamW), next to the memory formula of bench/train_memory.py.

    .venv/bin/python bench/dit_train.py [--preset DiT-XL/2] [--batch 32] [--steps 20] [--checkpointing]
    .venv/bin/python bench/dit_train.py --device cpu --preset DiT-T/2 --latent 8 --batch 2 --steps 1   # plumbing

A step is gen's own rectified-flow loss (train/task.py's DenoiserTask._denoising_loss: logit-normal times,
velocity target) on random latents and 77-token text states, backward, AdamW. FLOPs are counted once by
torch's FlopCounterMode (forward + backward matmuls and convolutions); MFU = those FLOPs per second over
the GPU's dense bf16 peak. Peak memory is torch.cuda.max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import torch  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s), from NVIDIA's data sheets (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
TEXT_TOKENS, TEXT_WIDTH = 77, 768


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def make_step(preset: str, latent: int, batch: int, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    """(model, step()) where step() runs one optimizer step of gen's flow loss and returns the loss."""
    from gen import families
    from gen.models.dit import build_dit
    from train.config import ObjectiveConfig
    from train.task import DenoiserTask, build_formulation

    torch.manual_seed(0)
    model = build_dit(preset, sample_size=latent, cross_attention_dim=TEXT_WIDTH,
                      pooled_projection_dim=TEXT_WIDTH).to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # as train/loop.py makes it (foreach on CUDA)
    # gen's defaults: logit-normal times; no guidance input
    cfg = SimpleNamespace(objective=ObjectiveConfig(type="flow"), train=SimpleNamespace(guidance=None))
    task = SimpleNamespace(cfg=cfg, formulation=build_formulation(cfg), family=families.get("dit"),
                           model=model)  # what _denoising_loss reads
    task.predict = functools.partial(DenoiserTask.predict, task)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    cond = {"hidden": torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH, generator=g).to(device),
            "pooled": torch.randn(batch, TEXT_WIDTH, generator=g).to(device)}  # the DiT family's conditioning

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = DenoiserTask._denoising_loss(task, model, x0, g, cond=cond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="DiT-XL/2")
    ap.add_argument("--latent", type=int, default=32, help="latent side (256 px images / 8)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="autocast dtype (default: bf16 on CUDA)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every DiT block")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/dit_train.py: --device cuda but no CUDA GPU here; nothing measured.")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, step = make_step(a.preset, a.latent, a.batch, device, dtype, a.checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()  # forward + backward, one step
    for _ in range(max(0, a.warmup - 1)):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()
    sync()
    seconds = (time.perf_counter() - t) / a.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    hw = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {a.preset} ({n_params / 1e6:.0f}M params), {a.latent}x{a.latent}x4 latents ({8 * a.latent} px), "
          f"batch {a.batch}, {str(dtype)[6:]} autocast, AdamW, checkpointing {'on' if a.checkpointing else 'off'}; "
          f"{name}, torch {torch.__version__}")
    print(f"step time          {1e3 * seconds:9.1f} ms (mean of {a.steps} after {a.warmup} warm-up)")
    print(f"throughput         {a.batch / seconds:9.1f} images/s")
    print(f"model FLOPs        {flops / a.batch / 1e9:9.1f} GFLOP per image (forward + backward)")
    print(f"achieved           {flops / seconds / 1e12:9.1f} TFLOP/s")
    print(f"MFU                {f'{100 * flops / seconds / hw:9.1f} %' if hw else '      n/a (no peak known here)'}")
    from bench.train_memory import dit_step_estimate

    est = dit_step_estimate(a.preset, a.latent, a.batch, dtype, a.checkpointing, device.type)
    if peak:
        measured = (f"{peak / 2**30:9.2f} GiB measured (torch.cuda.max_memory_allocated); "
                    f"formula {est / 2**30:.2f} GiB ({100 * (est / peak - 1):+.0f}%)")
    else:
        measured = f"{est / 2**30:9.2f} GiB by the formula (not measured here)"
    print(f"peak memory        {measured}")
    print(f"final loss         {loss.item():9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
