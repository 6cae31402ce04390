"""Data throughput: building the latent/text cache with 1 and 2 processes, and the share of a tiny-DiT
training step spent waiting for the next batch.

    python bench/data_throughput.py [--images 2048] [--repeats 3] [--batch 32] [--steps 40] [--window 10]

(a) Cache building (train/data/cache.py, what `gen data cache` runs): the shapes world at 64 px encoded
with the bundled default model's VAE and CLIP text encoder (gen/assets/default, copied aside first),
encoding batches of 64. Each run is a fresh cache folder; the figure is images / seconds of `build()`
alone, from a barrier before it to its end (the index merge included; model loading and imports are
not: the command's whole wall time is given beside it). 1 process runs with 2 torch threads (and, for
reference, 1); 2 processes run under torchrun (ACCELERATE_USE_CPU=1, accelerate's MULTI_CPU over gloo,
as tests/train/test_cache.py does) with 1 thread each, so both use the machine's 2 cores. Runs alternate
(1, 2, 1t, 2, 1, 1t, ...) so all see the same machine load; medians are reported. Images per CPU-second
(user + sys time of all processes' threads during build()) is the work's cost, which other jobs on the
machine change far less than they change wall time.

(b) Data wait: `gen train` (train.loop.train) of the default model's DiT (DiT-S/2, depth 6, hidden 192,
trained from scratch, flow objective) with its frozen VAE and text encoder, batch --batch at 64 px, on
the shapes world (rendered on the fly), on an image folder of PNGs on disk (written here), each with
and without data.cache, and with data.num_workers 0 and 2. The loop logs `data_wait` to metrics.jsonl:
the fraction of a log window's wall time spent blocked in fetching the next batch (the VAE and text
encoder, when they run per step, count as step time, not as waiting). The first window (start-up,
worker spawn) is left out. A last table times the loader alone (no model), the rate above which the
data pipeline would be the bottleneck on a faster device.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT = ROOT / "gen" / "assets" / "default"
RES = 64
DIT = ("DiT-S/2", {"depth": 6, "hidden_size": 192, "num_heads": 3})  # the default model's denoiser


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def cache_settings(base: Path, images: int, cache_dir: Path) -> dict:
    return {"model.base": str(base), "data.source": "shapes", "data.resolution": RES, "data.num_images": images,
            "data.cache": True, "data.cache_dir": str(cache_dir), "train.batch_size": 64,
            "train.output_dir": str(cache_dir / "run"), "log.progress": False, "log.tracker": "none"}


def cache_worker(config: str, out: str) -> None:
    """One process of a cache build (also under torchrun): times build() between two barriers."""
    import torch
    from accelerate import Accelerator

    from gen.cli import _quiet_libraries
    from train.config import load_config
    from train.data import TrainData
    from train.data.cache import build
    from train.loop import WEIGHT_DTYPES
    from train.task import DenoiserTask

    _quiet_libraries()
    cfg = load_config(config)
    acc = Accelerator(cpu=True)
    data = TrainData(cfg.data, cfg.train.seed)
    task = DenoiserTask(cfg, acc.device, WEIGHT_DTYPES[cfg.train.mixed_precision])
    acc.wait_for_everyone()
    t, cpu = time.perf_counter(), time.process_time()
    folder, built = build(cfg, data, task, acc.process_index, acc.num_processes, acc.wait_for_everyone,
                          progress=False)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu  # cpu: this process's threads, user + sys
    assert built
    n = sum(len(rows) for rows in json.loads((folder / "index.json").read_text())["files"].values())
    Path(f"{out}.{acc.process_index}").write_text(json.dumps(
        {"seconds": seconds, "cpu": cpu, "images": n, "threads": torch.get_num_threads(),
         "processes": acc.num_processes}))


def cache_run(base: Path, images: int, procs: int, threads: int, tmp: Path, k: int) -> dict:
    from train.config import load_config

    folder = tmp / f"cache-{procs}p{threads}t-{k}"
    cfg = folder / "config.yaml"
    folder.mkdir(parents=True)
    cfg.write_text(load_config(None, extra=cache_settings(base, images, folder)).to_yaml())
    out = folder / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    me = [str(Path(__file__).resolve()), "--cache-worker", str(cfg), str(out)]
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(port), *me]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"cache build failed ({procs} processes):\n{r.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(procs)]
    shutil.rmtree(folder)
    res = ranks[0]
    return {**res, "wall": wall, "rate": res["images"] / res["seconds"],
            "per_cpu_s": res["images"] / sum(x["cpu"] for x in ranks)}


def train_settings(base: Path, source: dict, cache: bool, workers: int, batch: int, steps: int, window: int,
                   out: Path, cache_dir: Path) -> dict:
    return {"model.base": str(base), "model.denoiser": "dit", "model.preset": DIT[0], "model.options": DIT[1],
            "objective.type": "flow", "data.resolution": RES, **source, "data.cache": cache,
            "data.cache_dir": str(cache_dir), "data.num_workers": workers, "train.output_dir": str(out),
            "train.batch_size": batch, "train.max_steps": window + steps, "train.checkpoint_every": 0,
            "validation.prompts": [], "validation.every": 0, "log.every": window, "log.tracker": "none",
            "log.progress": False}


def wait_run(settings: dict) -> dict:
    """One training run; data_wait and images/s over the logged windows after the first."""
    from train.config import load_config
    from train.loop import train

    cfg = load_config(None, extra=settings)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # the resolved config that train() prints
            if cfg.data.cache:  # build the cache outside the timed run (a first train() call builds it)
                train(load_config(None, extra={**settings, "train.max_steps": 1, "log.every": 1,
                                               "train.output_dir": settings["train.output_dir"] + "-build"}))
            train(cfg)
    except BaseException:
        print(err.getvalue()[-3000:], file=sys.stderr)
        raise
    rows = [json.loads(r) for r in (Path(settings["train.output_dir"]) / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = [cfg.log.every * cfg.train.batch_size / r["images_per_s"] for r in rows]
    return {"data_wait": sum(r["data_wait"] * s for r, s in zip(rows, seconds)) / sum(seconds),
            "max_window": max(r["data_wait"] for r in rows),
            "images_per_s": len(rows) * cfg.log.every * cfg.train.batch_size / sum(seconds)}


def loader_rate(settings: dict, batches: int) -> float:
    """Images/s of the data loader alone (no model): what the data path can deliver."""
    from train.config import load_config
    from train.data import TrainData, loader

    cfg = load_config(None, extra=settings)
    data = TrainData(cfg.data, cfg.train.seed)
    if cfg.data.cache:
        from train.data.cache import CachedData, cache_folder, key_parts
        from train.task import DenoiserTask

        task = DenoiserTask(cfg, "cpu")
        data = CachedData(cache_folder(cfg, key_parts(data, task)), data)
    it = iter(loader(data, cfg.train.batch_size, 0, 1, 0, cfg.data.num_workers))
    next(it)  # workers started, first batch out
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.train.batch_size / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048, help="images per cache build")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="training batch (data wait runs)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per training run, after a first window")
    ap.add_argument("--window", type=int, default=10, help="log.every (steps per data_wait window)")
    ap.add_argument("--folder-images", type=int, default=2048, help="PNG folder size")
    ap.add_argument("--only", choices=["cache", "wait"], default=None)
    ap.add_argument("--sources", default="shapes,folder", help="data wait runs: shapes, folder or both")
    ap.add_argument("--quick", action="store_true", help="the smallest setting, a check that it runs (tests): "
                    "16 images, one build with 1 process, one data-wait run (shapes, no cache, no workers)")
    ap.add_argument("--cache-worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.repeats, a.batch, a.steps, a.window, a.folder_images, a.sources = 16, 1, 2, 1, 1, 4, "shapes"
    if a.cache_worker:
        return cache_worker(*a.cache_worker)
    import logging

    import torch

    from gen.cli import _quiet_libraries

    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    if not (DEFAULT / "model_index.json").is_file():
        sys.exit(f"needs the bundled default model in {DEFAULT}")
    tmp = Path(tempfile.mkdtemp(prefix="gen-data-bench-"))
    base = tmp / "default"
    shutil.copytree(DEFAULT, base)  # a snapshot: `make default-model` may replace the bundled one meanwhile
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import cpu_name

    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu}; {os.cpu_count()} cores, {mem:.0f} GiB; torch "
          f"{torch.__version__}, {platform.python_version()}; load average (1/5/15 min) at start {load()}")
    print("# no GPU was lent for this run: CPU figures only", flush=True)

    if a.only != "wait":
        print(f"\n## (a) cache building: {a.images} shapes-world images at {RES} px, the default model's VAE "
              f"(factor 4) + CLIP text encoder, fp32, encoding batch 64, median of {a.repeats}")
        kinds = [(1, 2)] if a.quick else [(1, 2), (2, 1), (1, 1)]
        runs: dict = {k: [] for k in kinds}
        for r in range(a.repeats):
            for procs, threads in (kinds if r % 2 == 0 else kinds[::-1]):
                res = cache_run(base, a.images, procs, threads, tmp, r)
                runs[(procs, threads)].append(res)
                print(f"#   run {r + 1}: {procs} process(es) x {res['threads']} thread(s): {res['rate']:.1f} images/s "
                      f"(build {res['seconds']:.1f} s, {res['per_cpu_s']:.1f} images per CPU-second, command "
                      f"{res['wall']:.1f} s; load {load()})", flush=True)
        med = {k: statistics.median(x["rate"] for x in v) for k, v in runs.items()}
        per_cpu = {k: statistics.median(x["per_cpu_s"] for x in v) for k, v in runs.items()}
        wall = {k: statistics.median(x["wall"] for x in v) for k, v in runs.items()}
        print(f"{'processes x threads':<24}{'images/s':>10}{'vs 1 x 2':>10}{'img/CPU-s':>11}{'command s':>11}")
        for k in kinds:
            print(f"{f'{k[0]} x {k[1]}':<24}{med[k]:>10.1f}{med[k] / med[(1, 2)]:>9.2f}x{per_cpu[k]:>11.1f}"
                  f"{wall[k]:>11.1f}")
        if (2, 1) in med:
            print(f"# 2 processes (1 thread each) vs 1 process (2 threads): {med[(2, 1)] / med[(1, 2)]:.2f}x; "
                  f"load average now {load()}", flush=True)

    if a.only != "cache":
        from train.data.shapes import write_folder

        folder = write_folder(tmp / "pngs", a.folder_images, seed=0)
        sources = {"shapes (rendered)": {"data.source": "shapes", "data.num_images": a.folder_images},
                   "PNG folder": {"data.source": "folder", "data.path": str(folder)}}
        print(f"\n## (b) data wait: default-model DiT ({DIT[0]} depth 6, hidden 192) from scratch, flow, batch "
              f"{a.batch}, {RES} px, fp32, {torch.get_num_threads()} threads; {a.steps} steps in windows of "
              f"{a.window} after a first window; {a.folder_images} images")
        print(f"{'data':<20}{'cache':>6}{'workers':>8}{'data_wait':>11}{'worst window':>14}{'images/s':>10}"
              f"{'loader alone img/s':>20}")
        for name, src in sources.items():
            if src["data.source"] not in a.sources.split(","):
                continue
            for cache in (False,) if a.quick else (False, True):
                for workers in (0,) if a.quick else (0, 2):
                    out = tmp / f"run-{len(list(tmp.glob('run-*')))}"
                    s = train_settings(base, src, cache, workers, a.batch, a.steps, a.window, out, tmp / "cache")
                    res = wait_run(s)
                    rate = loader_rate(s, 2 if a.quick else max(20, 4096 // a.batch))
                    print(f"{name:<20}{'yes' if cache else 'no':>6}{workers:>8}{res['data_wait']:>10.1%}"
                          f"{res['max_window']:>13.1%}{res['images_per_s']:>10.1f}{rate:>20.0f}", flush=True)
        print(f"# load average at end {load()}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
