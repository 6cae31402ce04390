"""Attention forward TFLOP/s: gen's Triton flash-attention kernel vs torch SDPA (flash backend) and xformers.

    .venv/bin/python bench/attention_kernels.py [--dtype fp16] [--batch-heads 16] [--seqs 256 1024 4096 16384]

Self-attention (N queries x N keys) and cross-attention (N queries x 77 keys) at head dims 40, 64 and 128,
counting 4 * N * M * D flops per batch-head (the two matmuls), timed with CUDA events. Needs a CUDA GPU;
elsewhere it says so and exits 0.

    .venv/bin/python bench/attention_kernels.py --check          # correctness vs SDPA; exit 1 on a mismatch

--check compares the kernel with SDPA (fp32 maths on the same inputs) in fp16 and bf16 at odd lengths,
head dims 40/64/80/128 and cross-attention to 77 keys. `--device cpu` runs the kernel under the triton
interpreter at the sizes given (bench/gpu.py --dry-run uses it to check the plumbing; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def timed_ms(fn, reps: int = 20) -> float:
    if not torch.cuda.is_available():  # the CPU plumbing check: one call, wall clock
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
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


# (queries, keys, head dim): odd lengths over several tiles, a tail shorter than a tile, 77-key cross-attention.
CHECK_SHAPES = [(1000, 1000, 64), (4099, 4099, 64), (333, 77, 40), (4096, 77, 80), (1531, 997, 128), (7, 5, 64)]
CHECK_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}  # vs the fp32 maths on the same rounded inputs


def check(device: str, scale_down: int = 1) -> int:
    """gen's kernel vs SDPA, fp16 and bf16: prints one line per case, returns the number of failures."""
    from gen.kernels.flash_attention import flash_attention

    failures = 0
    for n, m, d in CHECK_SHAPES:
        n, m = max(1, n // scale_down), (m if m == 77 else max(1, m // scale_down))
        for dtype in CHECK_TOL:
            g = torch.Generator().manual_seed(n * m + d)
            q, k, v = (torch.randn(2, 4, length, d, generator=g).to(device, dtype) for length in (n, m, m))
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            err = (flash_attention(q, k, v).float() - ref).abs().max().item()
            ok = err <= CHECK_TOL[dtype]
            failures += not ok
            print(f"check {str(dtype)[6:]:<8} N={n:<5} M={m:<5} D={d:<4} max|diff| vs SDPA {err:.1e}  "
                  f"{'ok' if ok else 'FAIL (tolerance %.0e)' % CHECK_TOL[dtype]}", flush=True)
    return failures


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
    ap.add_argument("--check", action="store_true", help="correctness vs SDPA only; exit 1 on a mismatch")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: the triton interpreter, for checking this script's plumbing (no meaningful timings)")
    ap.add_argument("--check-scale-down", type=int, default=1, help="divide the --check lengths (CPU plumbing)")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before gen.kernels.flash_attention is imported
    elif not torch.cuda.is_available():
        print("bench/attention_kernels.py needs a CUDA GPU (none here); nothing measured.")
        return 0
    if args.check:
        failures = check(args.device, args.check_scale_down)
        print(f"{failures} failures" if failures else "all cases match SDPA")
        return 1 if failures else 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    fns = backends()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (triton interpreter: timings mean nothing)"
    print(f"{name}, torch {torch.__version__}, {args.dtype}, batch x heads {args.batch_heads}")
    print(f"{'kind':<6} {'N':>6} {'M':>6} {'D':>4}  " + "  ".join(f"{n:>14}" for n in fns) + "   TFLOP/s; x = vs sdpa-flash")
    for kind in ("self", "cross"):
        for d in args.head_dims:
            for n in args.seqs:
                m = n if kind == "self" else 77
                q = torch.randn(2, args.batch_heads // 2, n, d, device=args.device, dtype=dtype)
                k, v = (torch.randn(2, args.batch_heads // 2, m, d, device=args.device, dtype=dtype) for _ in range(2))
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
