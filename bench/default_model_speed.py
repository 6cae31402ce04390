"""The bundled default model's sampling speed against its targets: one image in-process at the default settings
(issue 30: 0.25 s) and `gen sample PROMPT` end to end from a cold start (issue 7: 10 s).

    python bench/default_model_speed.py [--images 10] [--cold 3]

In-process: Pipeline.from_pretrained() (the bundled model), one warm-up image, then --images images of
"a red circle left of a blue square" at the model's defaults, seeds 0..N-1; the median is reported, beside the
same calls with guidance over the whole run (the defaults before the guidance interval), interleaved. Cold
start: a fresh `gen sample` process (imports, model load, sampling, PNG write), --cold times; the median
wall time is reported. Prints measured / target ratios (below 1 meets the target) and writes them to
bench/results/default_model_cpu.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import cpu_name  # noqa: E402

PROMPT = "a red circle left of a blue square"
TARGETS = {"in-process": 0.25, "cold": 10.0}  # seconds, from issues 30 and 7


def in_process(n: int) -> tuple[float, float]:
    """Medians: at the defaults, and with guidance over the whole run."""
    import torch

    from gen import Pipeline

    pipe = Pipeline.from_pretrained()
    pipe.progress = False
    settings = [{}, {"guidance_interval": (0.0, 1.0)}]
    times = [[], []]
    with torch.inference_mode():
        pipe(PROMPT, seed=0)
        for seed in range(n):
            for kw, out in zip(settings, times):
                t = time.perf_counter()
                pipe(PROMPT, seed=seed, **kw)
                out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def cold(n: int) -> float:
    gen = Path(sys.executable).with_name("gen")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            t = time.perf_counter()
            subprocess.run([str(gen), "sample", PROMPT, "--seed", str(i), "--no-progress", "--out",
                            f"{tmp}/{i}.png"], check=True, capture_output=True)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    default, whole = in_process(a.images)
    measured = {"in-process": default, "cold": cold(a.cold)}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# bundled default model, {cpu_name()}, {os.cpu_count()} cores, {when}",
             f"# python bench/default_model_speed.py --images {a.images} --cold {a.cold}; load average at end "
             f"{os.getloadavg()[0]:.1f}",
             f"one image in-process, median of {a.images}: {measured['in-process']:.3f} s "
             f"({measured['in-process'] / TARGETS['in-process']:.2f}x the {TARGETS['in-process']} s target); with "
             f"guidance over the whole run: {whole:.3f} s (defaults / that: {default / whole:.2f})",
             f"`gen sample` from a cold start, median of {a.cold}: {measured['cold']:.2f} s "
             f"({measured['cold'] / TARGETS['cold']:.2f}x the {TARGETS['cold']:.0f} s target)"]
    print("\n".join(lines))
    Path(a.results).mkdir(parents=True, exist_ok=True)
    (Path(a.results) / "default_model_cpu.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
