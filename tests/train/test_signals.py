"""Runs that survive the cluster, with real signals sent to real `gen train` processes (one, and two under
`accelerate launch`): SIGTERM mid-run saves a checkpoint and exits 143, and resume=auto then ends bitwise where
an uninterrupted run ends; SIGUSR1 saves and goes on; a second Ctrl-C quits at once and loses nothing; a second
run on a busy train.output_dir exits 2 in one line, and a dead run's lock is taken over. Also the wall-time
budget (train.time_limit, $SLURM_JOB_END_TIME) and time-based checkpoints (train.checkpoint_minutes).

Each process is frozen (SIGSTOP) once it has logged a step, signalled, then let go (SIGCONT): the signal lands
mid-run, never after the last step, however loaded the machine. Every run uses one CPU thread, in-process ones
too: CPU kernels may split sums by the thread count, and the comparisons are bitwise."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.train.conftest import checkpoint_tensors, fast_config, losses
from train.checkpoint import PAUSE_ENV, Checkpointer
from train.config import load_config
from train.lock import NAME as LOCK
from train.loop import train

STEPS = 8
SETTINGS = dict(train__max_steps=STEPS, train__checkpoint_every=0, train__keep_checkpoints=10)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Proc:
    """A running command whose stderr is collected as it comes."""

    def __init__(self, argv: list[str], **env):
        self.proc = subprocess.Popen(argv, env={**ENV, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid, self.chunks = self.proc.pid, []
        self.reader = threading.Thread(target=lambda: self.chunks.extend(iter(lambda: self.proc.stderr.read1(4096),
                                                                                b"")), daemon=True)
        self.reader.start()

    @property
    def err(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def until(self, ready, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"never {what} (exit {self.proc.poll()}):\n{self.err[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = 240) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(5)
        return code


def gen_train(config, *overrides) -> list[str]:
    return [sys.executable, "-m", "gen", "train", str(config), *overrides]


def launch(config, *overrides) -> list[str]:
    """`accelerate launch` of 2 CPU processes over gloo (as tests/train/test_distributed.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), "-m", "gen", "train", str(config), *overrides]


def rows(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def steps(run) -> list[int]:
    return [int(p.name[5:]) for p in Checkpointer(run / "checkpoints").committed()]


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's child processes (their RANK environment variable)."""
    out = {}
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
            if entry.isdigit() and int(stat.rpartition(")")[2].split()[1]) == launcher:
                env = dict(kv.split("=", 1) for kv in open(f"/proc/{entry}/environ").read().split("\0") if "=" in kv)
                out[int(env["RANK"])] = int(entry)
        except (OSError, KeyError, ValueError):
            continue
    return out


@contextlib.contextmanager
def frozen(pids):
    """The processes stopped for the block: a signal sent inside lands mid-run, then they go on."""
    pids = list(pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def write_config(base, run, path, **kw):
    path.write_text(fast_config(base, run, **{**SETTINGS, **kw}).to_yaml())
    return path


def same_end(a, b, steps: int = STEPS) -> None:
    """Both runs' last checkpoints hold bitwise the same weights, EMA and optimizer state, after the same losses."""
    x, y = checkpoint_tensors(a, steps), checkpoint_tensors(b, steps)
    for part in x:
        assert x[part].keys() == y[part].keys() and all(torch.equal(x[part][k], y[part][k]) for k in x[part]), part
    assert losses(a) == losses(b) and len(losses(a)) == steps


@pytest.fixture(scope="module")
def reference(base_dit, tmp_path_factory):
    """The uninterrupted run: a `gen train` that gets SIGUSR1 mid-run, saves a checkpoint and goes on."""
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    proc = Proc(gen_train(write_config(base_dit, run, tmp / "config.yaml")))
    proc.until(lambda: rows(run) >= 2, "logged step 2")
    with frozen([proc.pid]):
        os.kill(proc.pid, signal.SIGUSR1)
    assert proc.finish() == 0, proc.err[-3000:]
    return run, proc.err


def test_sigusr1_saves_and_goes_on(reference):
    run, err = reference
    assert "gen: SIGUSR1: a checkpoint after this step, then training goes on" in err
    extra, last = steps(run)  # checkpoint_every=0: the SIGUSR1 checkpoint and the final one
    assert 2 <= extra < STEPS and last == STEPS
    assert (run / "model" / "model_index.json").is_file() and not (run / LOCK).exists()


def test_sigterm_mid_run_saves_exits_143_and_resumes_bitwise(reference, base_dit, tmp_path):
    run = tmp_path / "run"
    config = write_config(base_dit, run, tmp_path / "config.yaml")
    proc = Proc(gen_train(config))
    proc.until(lambda: rows(run) >= 2, "logged step 2")
    with frozen([proc.pid]):
        os.kill(proc.pid, signal.SIGTERM)
    assert proc.finish() == 143, proc.err[-3000:]
    last = proc.err.strip().splitlines()[-1]
    found = re.fullmatch(r"gen: stopped at step (\d+) of 8 \(SIGTERM\): checkpoint (\S+); run the same command "
                         r"again to resume \(train.resume=auto\)", last)
    assert found, last
    k = int(found[1])
    assert 2 <= k < STEPS and steps(run) == [k] and found[2] == str(run / "checkpoints" / f"step-{k:08d}")
    assert rows(run) == k and not (run / "model").exists() and not (run / LOCK).exists()

    out = train(load_config(config))  # resume=auto
    assert (out / "model_index.json").is_file()
    same_end(reference[0], run)


def test_a_busy_folder_refuses_a_second_run_and_a_second_ctrl_c_loses_nothing(reference, base_dit, tmp_path):
    run = tmp_path / "run"
    config = write_config(base_dit, run, tmp_path / "config.yaml", train__checkpoint_every=2)
    first = Proc(gen_train(config), **{PAUSE_ENV: "part-model@4"})  # waits inside the step-4 save
    first.until(lambda: f"{PAUSE_ENV}: paused" in first.err, "paused in the step-4 save")

    # a second run on the same folder: one line naming the holder, exit 2, nothing touched
    before = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    second = subprocess.run(gen_train(config), env=ENV, capture_output=True, text=True, timeout=240)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
    assert lines[0].startswith(f"gen: error: train.output_dir {run} is in use by another run: process {first.pid} "
                               f"on {socket.gethostname()}, started ")
    assert ((run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()) == before

    # Ctrl-C: the save goes on; Ctrl-C again: out at once, the cut-off save never read, the step-2 one intact
    os.kill(first.pid, signal.SIGINT)
    first.until(lambda: "(Ctrl-C again to quit at once)" in first.err, "acknowledged the first Ctrl-C")
    os.kill(first.pid, signal.SIGINT)
    assert first.finish(60) == 130, first.err[-3000:]
    assert first.err.strip().splitlines()[-1] == "gen: interrupted"
    assert steps(run) == [2] and (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert (run / "checkpoints" / ".tmp-step-00000004").is_dir() and not (run / LOCK).exists()

    train(load_config(config))  # resume=auto: from step 2, to the reference's end
    assert not (run / "checkpoints" / ".tmp-step-00000004").exists()
    same_end(reference[0], run)


def test_the_lock_of_a_dead_run_is_taken_over(base_dit, tmp_path, caplog):
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; from train.lock import "
                           "acquire; acquire(Path(sys.argv[1]), 'x'); print(os.getpid()); os.kill(os.getpid(), 9)",
                           str(run)], capture_output=True, text=True, timeout=60)  # killed holding the lock
    assert dead.returncode == -signal.SIGKILL and (run / LOCK).is_file()
    with caplog.at_level("WARNING", logger="gen"):
        out = train(fast_config(base_dit, run, train__max_steps=2))
    assert f"taking over the stale lock of process {dead.stdout.strip()}" in caplog.text
    assert (out / "model_index.json").is_file() and not (run / LOCK).exists()


def test_two_processes_stop_together_and_resume_bitwise(base_dit, tmp_path):
    # more steps than the one-process runs, so that a SIGUSR1 answered a poll later still falls before the last one
    n = 5 * STEPS
    config = write_config(base_dit, tmp_path / "unused", tmp_path / "config.yaml", train__max_steps=n)

    # SIGUSR1 to process 1 alone: process 0 saves at the same step (else one would wait for the other forever)
    ref = tmp_path / "reference"
    proc = Proc(launch(config, f"train.output_dir={ref}"))
    proc.until(lambda: len(workers(proc.pid)) == 2, "started two processes")
    ranks = workers(proc.pid)
    assert sorted(ranks) == [0, 1]
    proc.until(lambda: rows(ref) >= 2, "logged step 2")
    with frozen(ranks.values()):
        os.kill(ranks[1], signal.SIGUSR1)
    assert proc.finish() == 0, proc.err[-3000:]
    extra, last = steps(ref)
    assert 2 <= extra < n and last == n
    saved = {p.name for p in (ref / "checkpoints" / f"step-{extra:08d}").iterdir()}
    assert {"rng-0.json", "rng-1.json", "model.json"} <= saved  # both processes wrote their parts

    # SIGTERM to the launcher: it passes it on, both processes finish the step and save one checkpoint
    run = tmp_path / "run"
    proc = Proc(launch(config, f"train.output_dir={run}"))
    proc.until(lambda: len(workers(proc.pid)) == 2, "started two processes")
    pids = workers(proc.pid).values()
    proc.until(lambda: rows(run) >= 2, "logged step 2")
    with frozen(pids):
        os.kill(proc.pid, signal.SIGTERM)
    assert proc.finish() != 0
    stopped = [line for line in proc.err.splitlines() if line.startswith("gen: stopped at step")]
    assert len(stopped) == 1 and "(SIGTERM)" in stopped[0], proc.err[-3000:]  # said once, by process 0
    k = int(stopped[0].split()[4])
    assert 2 <= k < n and steps(run) == [k]
    assert {"rng-0.json", "rng-1.json"} <= {p.name for p in (run / "checkpoints" / f"step-{k:08d}").iterdir()}
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / LOCK).exists()

    proc = Proc(launch(config, f"train.output_dir={run}"))  # resume=auto under 2 processes
    assert proc.finish() == 0, proc.err[-3000:]
    same_end(ref, run, n)


@pytest.mark.parametrize("budget", ["train.time_limit", "SLURM_JOB_END_TIME"])
def test_a_time_budget_stops_with_a_checkpoint_before_it_runs_out(budget, base_dit, tmp_path, monkeypatch, caplog):
    end = time.time() + 3
    if budget == "SLURM_JOB_END_TIME":
        end = int(end) + 1  # whole seconds, as $SLURM_JOB_END_TIME holds them
        monkeypatch.setenv(budget, str(end))
    extra = {"train__time_limit": 0.05} if budget == "train.time_limit" else {}  # 3 s
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="gen"):
        out = train(fast_config(base_dit, run, train__max_steps=100_000, train__checkpoint_every=0, **extra))
    assert time.time() < end + 0.5  # stopped before the budget ran out (the checkpoint written)
    k = steps(run)[-1]
    assert out == run / "checkpoints" / f"step-{k:08d}" and 1 <= k < 100_000 and not (run / "model").exists()
    assert f"stopped at step {k} of 100000 (" in caplog.text and budget in caplog.text and " is near)" in caplog.text


def test_before_a_save_is_measured_the_guard_counts_the_expected_one():
    """A run whose first save would come at the deadline stops while the save's estimate (weights and Adam state at
    100 MB/s, plus 0.5 s) still fits; once a save is measured, that time counts instead."""
    from train.signals import Guard

    guard = Guard(None, 1.0, time.time() - 60 + 3, torch.device("cpu"), 1, True)  # 3 s left
    assert not guard.poll().stop  # a save guessed at 0 s fits
    guard.expect_save(100_000_000)  # 1.5 s, twice: 3 s
    assert guard.poll().stop and "train.time_limit is near" in guard.reason
    guard = Guard(None, 1.0, time.time() - 60 + 3, torch.device("cpu"), 1, True)
    guard.expect_save(100_000_000)
    guard.saved(0.1)  # measured: 0.2 s of the 3 fit
    assert not guard.poll().stop


def test_checkpoint_minutes_saves_by_the_clock(base_dit, tmp_path):
    run = tmp_path / "run"
    train(fast_config(base_dit, run, train__max_steps=3, train__checkpoint_every=0, train__keep_checkpoints=10,
                      train__checkpoint_minutes=1e-6))  # due at every step boundary
    assert steps(run) == [1, 2, 3]
