"""Attention forward TFLOP/s: gen's Triton flash-attention kernel vs torch SDPA (flash backend) and xformers.

    .venv/bin/python bench/attention_kernels.py [--dtype fp16] [--batch-heads 16] [--seqs 256 1024 4096 16384]

Self-attention (N queries x N keys) and cross-attention (N queries x 77 keys) at head dims 40, 64 and 128,
counting 4 * N * M * D flops per batch-head (the two matmuls), timed with CUDA events. Needs a CUDA GPU;
elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def timed_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    laps = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        laps.append(start.elapsed_time(end))
    return statistics.median(laps)


def backends() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gen.kernels.flash_attention import flash_attention

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    out = {"triton (gen)": flash_attention, "sdpa-flash": sdpa_flash}
    try:
        import xformers.ops as xops

        out["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    except (ImportError, OSError, RuntimeError):
        print("xformers: not installed (pip install xformers)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--batch-heads", type=int, default=16, help="batch x heads (default 16: 2 x 8, SD1.5 with CFG)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[40, 64, 128])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/attention_kernels.py needs a CUDA GPU (none here); nothing measured.")
        return 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    fns = backends()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, batch x heads {args.batch_heads}")
    print(f"{'kind':<6} {'N':>6} {'M':>6} {'D':>4}  " + "  ".join(f"{n:>14}" for n in fns) + "   TFLOP/s; x = vs sdpa-flash")
    for kind in ("self", "cross"):
        for d in args.head_dims:
            for n in args.seqs:
                m = n if kind == "self" else 77
                q = torch.randn(2, args.batch_heads // 2, n, d, device="cuda", dtype=dtype)
                k, v = (torch.randn(2, args.batch_heads // 2, m, d, device="cuda", dtype=dtype) for _ in range(2))
                ref = F.scaled_dot_product_attention(q, k, v)
                flops = 4 * args.batch_heads * n * m * d
                cells, tflops = [], {}
                for name, fn in fns.items():
                    try:
                        err = (fn(q, k, v).float() - ref.float()).abs().max().item()
                        tflops[name] = flops / timed_ms(lambda: fn(q, k, v)) / 1e9
                        cells.append(f"{tflops[name]:8.1f}" + (" (!)" if err > 2e-2 else "    "))
                    except RuntimeError as e:  # e.g. sdpa-flash has no kernel for this head dim on this GPU
                        cells.append(f"{'n/a':>8}    ")
                        print(f"  {name} {n}x{m}x{d}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                base = tflops.get("sdpa-flash")
                ratio = f"  triton {tflops['triton (gen)'] / base:.2f}x" if base and "triton (gen)" in tflops else ""
                print(f"{kind:<6} {n:>6} {m:>6} {d:>4}  " + "  ".join(f"{c:>14}" for c in cells) + ratio, flush=True)
    print("(!) = max abs diff from SDPA above 2e-2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
