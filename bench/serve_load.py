"""`gen serve` under load, on this machine: N concurrent clients, every request answered in the order it was
sent, none lost, the server's memory flat; and a warm request's latency against a cold `gen sample`.

    python bench/serve_load.py [--clients 8] [--requests 4] [--cold 1] [--results bench/results]

Starts `gen serve` (the bundled model at its defaults: 20 steps, 64 px) on a free port; a warm-up round
(--clients requests at once); then --clients threads, started 20 ms apart, each sending --requests txt2img requests in turn (seeds
distinct). A request's turn is when the server finished it: the server runs one at a time first come first
served, so of two requests sent 50 ms apart or more, the earlier must finish first. The server's RSS
(psutil) sampled every 0.5 s over the run; the median latency of warm single requests; the median wall time
of --cold fresh `gen sample` processes (imports, load, sampling, PNG). Writes bench/results/serve_cpu.txt.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle left of a blue square"
GAP = 0.05  # seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "gen", "serve", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=5)
            return proc
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("gen serve did not start")


def txt2img(url: str, seed: int, steps: int | None) -> dict:
    r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": seed, "steps": steps}, timeout=600)
    r.raise_for_status()
    return r.json()


def load(url: str, clients: int, per_client: int, steps: int | None, seed: int = 1000) -> list:
    """Each client sends its requests one after another; returns the (send time, finish time) of each request."""
    times, lock = [], threading.Lock()

    def client(c: int):
        for i in range(per_client):
            t = time.perf_counter()
            out = txt2img(url, seed * (c + 1) + i, steps)
            assert len(out["images"]) == 1
            with lock:
                times.append((t, time.perf_counter()))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    return times


def cold(n: int) -> float | None:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gen", "sample", PROMPT, "--seed", str(i), "--out", tmp,
                            "--no-progress"], cwd=ROOT, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
    return statistics.median(times) if times else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--cold", type=int, default=1, help="cold `gen sample` runs (0: none)")
    ap.add_argument("--steps", type=int, default=None, help="steps a request (default: the model's, 20)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port)
    try:
        server = psutil.Process(proc.pid)
        load(url, args.clients, 1, args.steps, seed=10 ** 6)  # warm-up: as many requests in flight as in the run
        warm = []
        for seed in range(1, 4):
            t = time.perf_counter()
            txt2img(url, seed, args.steps)
            warm.append(time.perf_counter() - t)
        rss, done = [server.memory_info().rss / 2 ** 20], threading.Event()
        sampler = threading.Thread(target=lambda: [rss.append(server.memory_info().rss / 2 ** 20)
                                                   for _ in iter(lambda: done.wait(0.5), True)])
        sampler.start()
        t = time.perf_counter()
        times = load(url, args.clients, args.requests, args.steps)
        took = time.perf_counter() - t
        done.set()
        sampler.join()
        rss.append(server.memory_info().rss / 2 ** 20)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    total = args.clients * args.requests
    # first come first served: of two requests sent GAP apart or more, the earlier finishes first (closer sends may
    # reach the server in either order)
    pairs = [(a, b) for a in times for b in times if b[0] - a[0] >= GAP]
    swapped = sum(b[1] < a[1] for a, b in pairs)
    cold_s = cold(args.cold)
    lines = [f"gen serve under load ({os.cpu_count()} CPUs), bundled model at 64 px, {args.steps or 20} steps",
             f"requests: {total} from {args.clients} concurrent clients, answered {len(times)}, lost "
             f"{total - len(times)}, server alive after: {alive}",
             f"pairs sent >= {GAP * 1000:.0f} ms apart that finished out of order: {swapped} of {len(pairs)}; "
             f"{took:.2f} s in all, {took / total:.3f} s a request",
             f"server RSS over the run (after a warm-up round as concurrent): {rss[0]:.1f} -> {rss[-1]:.1f} MiB "
             f"({rss[-1] - rss[0]:+.1f} MiB; max {max(rss):.1f}; at each quarter of the run: "
             f"{', '.join(f'{rss[len(rss) * q // 4 - (q == 4)]:.1f}' for q in range(5))})",
             f"warm request latency (median of {len(warm)}): {statistics.median(warm):.3f} s"]
    if cold_s is not None:
        lines.append(f"cold `gen sample` (median of {args.cold}): {cold_s:.2f} s -> warm / cold = "
                     f"{statistics.median(warm) / cold_s:.3f}")
    text = "\n".join(lines)
    print(text)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "serve_cpu.txt").write_text(text + "\n")
    if len(times) != total or not alive or swapped:
        raise SystemExit("requests were lost or out of order, or the server died")


if __name__ == "__main__":
    main()
