"""Ahead-of-time builds of gen's Triton kernels for GPU targets, on a machine without a GPU.

The CPU interpreter runs a kernel's maths but never compiles it, so a kernel that fails to compile, spills
registers or asks for more shared memory than an A100/H100 has would pass every interpreter test. This
compiles every autotune config of every kernel (each kernel module's `aot_specs()`) for sm_80 and sm_90 with
the ptxas the triton wheel carries, and checks what the compiler reports:

    python -m gen.kernels.aot [--arch sm_80 sm_90] [--json]      # exit 1 if any build has a problem

Must run without TRITON_INTERPRET (the interpreter swaps in its own single config); the tests call it in a
subprocess with a clean environment.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_MODULES = ("gen.kernels.flash_attention",)
# arch -> (compute capability, largest dynamic shared memory one block may ask for, bytes): A100 163 KB
# (of its 164 KB per SM), H100/H200 227 KB (of 228 KB); CUDA programming guide, compute capabilities table.
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
REGISTERS_PER_SM = 65536


@dataclasses.dataclass
class Spec:
    """One kernel build: the JIT function, its argument types, its constexprs and the autotune config."""

    name: str
    fn: object  # triton JITFunction
    signature: dict  # argument name -> triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict
    num_warps: int
    num_stages: int
    attrs: dict = dataclasses.field(default_factory=dict)  # {(arg index,): [["tt.divisibility", 16]]}


@dataclasses.dataclass
class Build:
    """What the compiler made of one Spec on one target, and what is wrong with it (empty = fine)."""

    name: str
    arch: str
    shared_bytes: int = 0
    registers: int = 0
    spill_bytes: int = 0
    tensor_core_ops: int = 0
    problems: list = dataclasses.field(default_factory=list)


def tool(name: str) -> Path:
    """A CUDA tool the triton wheel carries, found without importing triton (the tests must not: importing it
    before they set TRITON_INTERPRET=1 leaves its own jitted helpers uninterpretable)."""
    spec = importlib.util.find_spec("triton")
    return Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name


def ptxas_unavailable() -> str | None:
    """Why the wheel's ptxas cannot run here (None when it can): the only reason to skip these checks."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    path = tool("ptxas")
    try:
        subprocess.run([str(path), "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"the triton wheel's ptxas ({path}) cannot run on this machine: {e}"
    return None


def ptxas_report(ptx: str, arch: str) -> tuple[int, int, str]:
    """(registers, spill bytes, log) from `ptxas -v` on the PTX triton produced (triton drops this log)."""
    gpu = f"sm_{TARGETS[arch][0]}" + ("a" if TARGETS[arch][0] >= 90 else "")  # as triton assembles it
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([str(tool("ptxas")), "-v", f"--gpu-name={gpu}", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return int(regs.group(1)) if regs else 0, sum(spills), log


def build(spec: Spec, arch: str) -> Build:
    """Compile `spec` for `arch` and check shared memory, registers, spills and tensor-core use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability, shared_limit = TARGETS[arch]
    out = Build(spec.name, arch)
    try:
        compiled = triton.compile(ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=spec.attrs),
                                  target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as e:  # noqa: BLE001 -- any compiler error is the finding
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        out.problems.append(f"does not compile: {type(e).__name__}: {lines[-1][:300]}")  # the reason is last
        return out
    ptx = compiled.asm["ptx"]
    out.shared_bytes = compiled.metadata.shared
    out.registers, out.spill_bytes, log = ptxas_report(ptx, arch)
    threads = 32 * spec.num_warps
    if out.shared_bytes > shared_limit:
        out.problems.append(f"needs {out.shared_bytes / 1024:.0f} KB shared memory, "
                            f"{arch} has {shared_limit // 1024} KB")
    if out.spill_bytes:
        out.problems.append(f"spills {out.spill_bytes} bytes of registers to local memory")
    if out.registers * threads > REGISTERS_PER_SM:
        out.problems.append(f"{out.registers} registers x {threads} threads exceed the SM's {REGISTERS_PER_SM}")
    # Tensor cores: Hopper's asynchronous warpgroup MMA on sm_90, mma.sync on sm_80; a matmul that falls
    # back to FMAs, or wgmma that ptxas serialises, runs several times slower.
    mma = "wgmma.mma_async" if capability >= 90 else "mma.sync"
    out.tensor_core_ops = ptx.count(mma)
    if not out.tensor_core_ops:
        out.problems.append(f"no {mma} in the PTX: the matmuls do not use tensor cores")
    if "serialized" in log:
        out.problems.append("ptxas serialises the wgmma instructions: " +
                            next(ln for ln in log.splitlines() if "serialized" in ln).strip()[:200])
    return out


@functools.cache
def all_specs(arch: str) -> tuple:
    """Every kernel module's builds for `arch` (its `aot_specs(capability)`)."""
    return tuple(spec for module in KERNEL_MODULES
                 for spec in importlib.import_module(module).aot_specs(TARGETS[arch][0]))


def _build_nth(arch: str, i: int) -> Build:  # a worker's job: Specs hold JIT functions, which do not pickle
    return build(all_specs(arch)[i], arch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--json", action="store_true", help="one JSON object per build on stdout")
    ap.add_argument("--limit", type=int, default=None, help="only the first N builds per arch (a quick check)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles (default: all cores)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("python -m gen.kernels.aot: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    reason = ptxas_unavailable()
    if reason:
        print(f"SKIP: {reason}")
        return 0
    jobs = [(arch, i) for arch in args.arch for i in range(len(all_specs(arch)))[:args.limit]]
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for b in pool.map(_build_nth, *zip(*jobs)):
            failed += bool(b.problems)
            if args.json:
                print(json.dumps(dataclasses.asdict(b)), flush=True)
            else:
                print(f"{b.name:<40} {b.arch}  smem {b.shared_bytes / 1024:6.1f} KB  regs {b.registers:3d}  "
                      f"spill {b.spill_bytes:4d} B  mma {b.tensor_core_ops:3d}  "
                      f"{'; '.join(b.problems) or 'ok'}", flush=True)
    print(f"{len(jobs) - failed} of {len(jobs)} builds ok", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
