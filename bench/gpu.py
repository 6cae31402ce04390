"""Every GPU check in one unattended run (under 8 minutes on one H100/H200), results in bench/results/gpu-*.txt.

    make setup && bench/gpu.sh              # = .venv/bin/python bench/gpu.py
    bench/gpu.sh --dry-run                  # CPU: every step at toy sizes, checking the plumbing (no timings;
                                            # no torch.compile variants, minutes on a CPU)
    bench/gpu.sh --only attention sd15      # some steps

Each step is a subprocess with its own timeout, cut to what is left of --budget (470 s by default): a hung
step is killed and marked TIMEOUT, and the run goes on;
its output goes to bench/results/gpu-<step>.txt (--out elsewhere) and the summary to gpu-summary.txt. The exit
status is 1 when any step failed or timed out, so nothing fails quietly. Steps, in order:

    env        GPU, driver, torch / triton / diffusers versions
    aot        every autotune config compiled for sm_80 / sm_90 (python -m gen.kernels.aot)
    kernel     the Triton kernel vs SDPA: fp16, bf16, odd lengths, 77-key cross-attention
    attention  forward TFLOP/s, kernel vs SDPA-flash, 1k / 4k / 16k tokens, head dims 64 and 128
    dit        DiT-XL/2 training on 256 px latents: images/s, MFU, peak memory vs the formula
    sd15       SD-1.5-architecture pipeline, 512 px, fp16, 30 steps: gen vs diffusers, exact / compile / fast mode
    sdxl       SDXL-architecture pipeline, 1024 px, the same
    tests      the kernel, attention and fast-path tests on this machine
    fsdp       train.distributed=fsdp over NCCL in bf16, one process per GPU: bitwise exact resume (2 CPU
               processes over gloo in a dry run, as tests/train/test_fsdp.py)
    offload    SD-1.5-architecture at 512 px and a small Flux, fp16: --offload model / group / group4 / sequential vs
               all-resident: s/img, ratio, allocator peak, max abs diff to resident (bench/offload.py)
    weights    a small Flux, bf16: full vs --weights fp8 / nf4 / fp4 / int8 and fp8 / GGUF files: transformer bytes,
               s/img, PSNR vs full (bench/weight_storage.py)
    swap       a Flux-architecture LoRA training step, bf16: train.blocks_to_swap N / + activation offload vs
               all-resident: s/step, ratio, allocator peak vs the formula's resident weights, gradient diff
               (bench/block_swap.py)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SAMPLE = [PY, "bench/sample_vs_diffusers.py"]
GPU_TESTS = ["tests/test_kernels.py", "tests/test_kernels_aot.py", "tests/test_attention.py"]


@dataclasses.dataclass
class Step:
    name: str
    gpu: list  # the command on a GPU
    dry: list  # the same script at toy sizes on CPU
    timeout: int  # seconds at most (cut to what is left of --budget)


STEPS = [
    Step("env", [PY, "bench/gpu.py", "--env"], [PY, "bench/gpu.py", "--env"], 60),
    Step("aot", [PY, "-m", "gen.kernels.aot"], [PY, "-m", "gen.kernels.aot", "--arch", "sm_90", "--limit", "1"], 150),
    Step("kernel", [PY, "bench/attention_kernels.py", "--check"],
         [PY, "bench/attention_kernels.py", "--check", "--device", "cpu", "--check-scale-down", "64"], 120),
    Step("attention", [PY, "bench/attention_kernels.py", "--seqs", "1024", "4096", "16384", "--head-dims", "64", "128"],
         [PY, "bench/attention_kernels.py", "--device", "cpu", "--seqs", "32", "--head-dims", "64",
          "--batch-heads", "2"], 150),
    Step("dit", [PY, "bench/dit_train.py", "--preset", "DiT-XL/2", "--batch", "32", "--steps", "20"],
         [PY, "bench/dit_train.py", "--device", "cpu", "--preset", "DiT-T/2", "--latent", "8", "--batch", "2",
          "--steps", "1", "--warmup", "1"], 150),
    Step("sd15", SAMPLE + ["--device", "cuda", "--preset", "sd15", "--size", "512", "--steps", "30", "--dtype", "fp16",
                           "--repeats", "1", "--variants", "default", "compile", "fast3"],
         SAMPLE + ["--preset", "tiny", "--size", "64", "--steps", "2", "--repeats", "1", "--variants", "default",
                   "fast3"], 240),
    Step("sdxl", SAMPLE + ["--device", "cuda", "--preset", "sdxl", "--size", "1024", "--steps", "30", "--dtype", "fp16",
                           "--repeats", "1", "--variants", "default", "compile", "fast3"],
         SAMPLE + ["--preset", "sdxl-tiny", "--size", "64", "--steps", "2", "--repeats", "1", "--variants", "default",
                   "fast3"], 300),
    Step("tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS],
         [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *GPU_TESTS], 300),
    Step("fsdp", [PY, "bench/fsdp_resume.py"], [PY, "bench/fsdp_resume.py", "--device", "cpu"], 180),
    Step("offload", [PY, "bench/offload.py", "--device", "cuda", "--preset", "sd15", "flux-small", "--repeats", "2"],
         [PY, "bench/offload.py", "--preset", "tiny"], 240),
    Step("weights", [PY, "bench/weight_storage.py", "--device", "cuda", "--repeats", "3"],
         [PY, "bench/weight_storage.py", "--size", "tiny", "--steps", "1", "--repeats", "1", "--results",
          tempfile.gettempdir()], 180),  # the dry run's CPU figures are not the recorded ones
    Step("swap", [PY, "bench/block_swap.py", "--device", "cuda", "--size", "small", "--repeats", "3"],
         [PY, "bench/block_swap.py"], 150),
]


def env_report() -> None:
    """What the figures were measured on."""
    import platform

    import diffusers
    import torch

    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"diffusers {diffusers.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
              f"{p.multi_processor_count} SMs")
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    print(smi.stdout if smi else "nvidia-smi: not here (no GPU)")


def run_step(step: Step, dry: bool, out: Path, timeout: float) -> tuple[str, float]:
    """Runs one step into out/gpu-<name>.txt; returns ("ok" | "FAILED (rc N)" | "TIMEOUT ...", seconds)."""
    cmd = step.dry if dry else step.gpu
    path = out / f"gpu-{step.name}.txt"
    t = time.perf_counter()
    with path.open("w") as f:
        f.write(f"$ {' '.join(cmd[1:])}\n")
        f.flush()
        try:
            # never TRITON_INTERPRET from the caller: the checks are of compiled kernels (the dry run's kernel
            # steps ask for the interpreter themselves, with --device cpu)
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONUNBUFFERED": "1"}
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
            status = "ok" if rc == 0 else f"FAILED (rc {rc})"
        except subprocess.TimeoutExpired:  # subprocess.run has killed the child
            status = f"TIMEOUT after {timeout:.0f} s"
        f.write(f"\n[{step.name}: {status}]\n")
    return status, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the plumbing, measures nothing")
    ap.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where gpu-*.txt go")
    ap.add_argument("--budget", type=float, default=470, help="seconds for the whole run: no step may run past it "
                    "(a step's timeout is the smaller of its own and what is left)")
    ap.add_argument("--jobs", type=int, default=None, help="steps at once (default: 1 on a GPU, where timings must "
                    "not overlap; all cores in a dry run)")
    ap.add_argument("--env", action="store_true", help=argparse.SUPPRESS)  # the env step
    a = ap.parse_args(argv)
    if a.env:
        env_report()
        return 0
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA GPU here (torch", torch.__version__, "); --dry-run checks the plumbing on CPU")
            return 2
    a.out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if not a.only or s.name in a.only]
    deadline = time.perf_counter() + a.budget

    def one(step: Step) -> tuple[str, float]:
        left = deadline - time.perf_counter()
        if left < 5:
            return f"NOT RUN (budget of {a.budget:.0f} s spent)", 0.0
        print(f"[{step.name}] ...", flush=True)
        status, seconds = run_step(step, a.dry_run, a.out, min(step.timeout, left))
        print(f"[{step.name}] {status} in {seconds:.0f} s", flush=True)
        if status != "ok":  # fail loudly: the tail of the step's output, here
            print("".join((a.out / f"gpu-{step.name}.txt").read_text().splitlines(True)[-15:]), file=sys.stderr)
        return status, seconds

    jobs = a.jobs or (os.cpu_count() if a.dry_run else 1)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, steps))
    lines = [f"# bench/gpu.py{' --dry-run (CPU plumbing check: no figures)' if a.dry_run else ''}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    lines += [f"{s.name:<10} {status:<32} {sec:6.0f} s   gpu-{s.name}.txt" for s, (status, sec) in zip(steps, results)]
    failed = sum(status != "ok" for status, _ in results)
    lines.append(f"{len(steps) - failed} of {len(steps)} steps ok")
    (a.out / "gpu-summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
