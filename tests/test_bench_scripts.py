"""Every bench/*.py runs at its smallest setting, so none rots when a signature changes (data_throughput.py and
lora_cost.py did). The GPU scripts' CPU dry runs are bench/gpu.py's (tests/test_bench_gpu.py); each other script
runs here in a subprocess, writing into a temporary folder, never into bench/results (about 5 minutes in all on a
loaded 2-core CPU, the bundled model's adherence evaluation in lora_learns.py the longest)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import gpu  # noqa: E402

# script -> its smallest setting ({tmp}: the test's temporary folder)
SMALLEST = {
    "controlnet_learns.py": ["--base-steps", "1", "--steps", "1", "--scenes", "1", "--size", "32", "--batch", "2",
                             "--images", "2", "--sample-steps", "1", "--out", "{tmp}/run"],
    "controlnet_cost.py": ["--size", "32", "--steps", "1", "--repeats", "1"],
    "data_throughput.py": ["--quick"],
    "digits_chain.py": ["--data", "glyphs", "--images", "60", "--size", "tiny", "--clip-steps", "1", "--vae-steps", "1",
                        "--steps", "1", "--batch", "4", "--n", "2", "--sample-steps", "1", "--out", "{tmp}/run"],
    "default_model_speed.py": ["--images", "1", "--cold", "1", "--results", "{tmp}"],
    "img2img_grid.py": ["--out", "{tmp}/grid.png"],
    "lora_cost.py": ["--steps", "1", "--warmup", "1", "--batch", "2", "--repeats", "1"],
    "lora_learns.py": ["--images", "2", "--prior", "2", "--steps", "1", "--batch", "2", "--rank", "2", "--seeds", "1",
                       "--n-eval", "2", "--out", "{tmp}/run", "--results", "{tmp}"],
    "memory.py": ["--presets", "sd15"],  # the planner's table for the smallest preset (all five: minutes)
    "sampler_quality.py": ["--prompts", "singles", "--steps", "2", "--samplers", "heun", "--margin", "100",
                           "--results", "{tmp}"],  # runs; the full check (exit 1 below the margin) in its results
    "serve_load.py": ["--clients", "2", "--requests", "2", "--steps", "1", "--cold", "0", "--results", "{tmp}"],
    "single_file_load.py": ["--repeats", "1", "--size", "tiny"],
    "train_learns.py": ["--steps", "1", "--vae-steps", "1", "--resolution", "16", "--batch", "2", "--seeds", "1",
                        "--sample-steps", "1", "--out", "{tmp}/run", "--only", "dit"],  # unet on a DiT base: issue 34 item 11
    "train_memory.py": ["--no-check"],
    "train_throughput.py": ["--steps", "1", "--warmup", "1", "--batch", "2", "--repeats", "1"],
    "weight_storage.py": ["--size", "tiny", "--steps", "1", "--repeats", "1", "--results", "{tmp}"],
}
# what bench/gpu.py --dry-run runs
DRY_RUN = {Path(arg).name for step in gpu.STEPS for arg in step.dry if str(arg).startswith("bench/")}


def test_every_bench_script_is_run_somewhere():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")}
    assert scripts == set(SMALLEST) | DRY_RUN, scripts ^ (set(SMALLEST) | DRY_RUN)


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_bench_script_runs_at_its_smallest_setting(script, tmp_path):
    args = [a.format(tmp=tmp_path) for a in SMALLEST[script]]
    t = time.perf_counter()
    r = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"bench/{script} {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    print(f"bench/{script}: {time.perf_counter() - t:.1f} s")
