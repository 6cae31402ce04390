"""bench/gpu.py, the one GPU script: its dry run on CPU runs every step end to end at toy sizes, and a step
that hangs is killed and reported, never waited on."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import gpu  # noqa: E402


def test_dry_run_runs_every_step(tmp_path):
    run = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (tmp_path / "gpu-summary.txt").read_text()
    assert f"{len(gpu.STEPS)} of {len(gpu.STEPS)} steps ok" in summary
    outputs = {s.name: (tmp_path / f"gpu-{s.name}.txt").read_text() for s in gpu.STEPS}
    assert all(text.rstrip().endswith(f"[{name}: ok]") for name, text in outputs.items())
    assert "1 of 1 builds ok" in outputs["aot"]  # a real sm_90 build, not a skip
    assert "all cases match SDPA" in outputs["kernel"]
    assert "gen fast3" in outputs["sd15"] and "gen fast3" in outputs["sdxl"]
    assert "images/s" in outputs["dit"] and "GiB" in outputs["dit"]  # the memory formula's figure
    assert "tests collected" in outputs["tests"]
    assert "bitwise identical" in outputs["fsdp"]
    assert outputs["offload"].count("max|diff| vs resident 0.0e+00") == 5  # resident, model, group, group4, sequential
    assert "--weights nf4 (folder)" in outputs["weights"] and "GGUF Q4_0" in outputs["weights"]
    assert outputs["swap"].count("grad max abs diff 0.00e+00") == 4  # resident, swap N/2, N - 1, + offload


def test_a_hung_step_is_killed_and_reported(tmp_path):
    hang = gpu.Step("hang", [], [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 60)
    status, seconds = gpu.run_step(hang, True, tmp_path, timeout=2)
    assert status.startswith("TIMEOUT") and seconds < 30
    assert "started" in (tmp_path / "gpu-hang.txt").read_text()


def test_without_a_gpu_the_real_run_refuses(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # a GPU machine runs the real thing: bench/gpu.sh
    run = subprocess.run([sys.executable, "bench/gpu.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "--dry-run" in run.stdout
