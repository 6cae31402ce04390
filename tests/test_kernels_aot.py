"""gen's Triton kernels compiled ahead of time for A100 (sm_80) and H100 (sm_90) with the triton wheel's ptxas,
no GPU needed: every autotune config compiles, fits shared memory, does not spill, and uses tensor cores.

Runs `python -m gen.kernels.aot` in a subprocess without TRITON_INTERPRET: the other kernel tests set it in
this process, and the interpreter never compiles anything.
"""

import json
import os
import subprocess
import sys

import pytest

from gen.kernels.aot import TARGETS, ptxas_unavailable

REASON = ptxas_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_python(code_or_args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=600)


def test_every_autotune_config_builds_for_a100_and_h100():
    run = run_python(["-m", "gen.kernels.aot", "--json"])
    builds = [json.loads(line) for line in run.stdout.splitlines()]
    bad = [f"{b['name']} {b['arch']}: {'; '.join(b['problems'])}" for b in builds if b["problems"]]
    assert run.returncode == 0 and not bad, "\n".join(bad) or run.stderr[-2000:]
    names = {b["name"] for b in builds}
    for d in (40, 64, 80, 128):
        for dtype in ("fp16", "bf16"):
            assert any(n.startswith(f"flash_fwd d{d} {dtype} ") for n in names), (d, dtype)
    assert {b["arch"] for b in builds} == set(TARGETS)
    for b in builds:
        limit = TARGETS[b["arch"]][1]
        assert 0 < b["shared_bytes"] <= limit and b["spill_bytes"] == 0 and 0 < b["registers"] <= 255
        assert b["tensor_core_ops"] > 0  # wgmma.mma_async on sm_90, mma.sync on sm_80


def test_a_broken_config_fails_the_check():
    """Key tiles of 8 cannot feed tl.dot (K >= 16): no sm_90 build. 128 queries x head dim 128 on 4 warps
    does not fit the register file: it spills."""
    code = """if True:
        import dataclasses, json, triton
        from gen.kernels.aot import build
        from gen.kernels.flash_attention import aot_specs
        bad = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 8}, num_warps=4, num_stages=2),
               triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
        for spec in aot_specs(90, head_dims=(128,), dtypes=("fp16",), configs=bad):
            print(json.dumps(dataclasses.asdict(build(spec, "sm_90"))))
    """
    run = run_python(["-c", code])
    assert run.returncode == 0, run.stderr[-2000:]
    no_compile, spills = (json.loads(line) for line in run.stdout.splitlines())
    assert any("does not compile" in p and "K >= 16" in p for p in no_compile["problems"]), no_compile
    assert no_compile["arch"] == "sm_90"
    assert spills["spill_bytes"] > 0 and any("spills" in p for p in spills["problems"]), spills
