"""Crash safety: a real `gen train` process SIGKILLed in the middle of a checkpoint save leaves the previous
checkpoint loadable, and resume=auto continues from the newest complete one to the same result."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.train.conftest import checkpoint_tensors, fast_config, losses
from train.checkpoint import PAUSE_ENV, Checkpointer
from train.config import load_config
from train.loop import train

SETTINGS = dict(train__max_steps=6, train__checkpoint_every=3, validation__prompts=["a red circle"],
                validation__seeds=[0], validation__every=3, log__progress=True)


def run_until_paused(config, phase: str, timeout: float = 120.0, argv: list[str] | None = None) -> str:
    """Starts `gen train CONFIG` (or python `argv`) with the save hook set to `phase`, SIGKILLs it once it
    pauses there; returns its stderr."""
    env = {**os.environ, PAUSE_ENV: phase}
    argv = argv or ["-m", "gen", "train", str(config)]
    proc = subprocess.Popen([sys.executable, *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while f"{PAUSE_ENV}: paused".encode() not in b"".join(chunks):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"gen train did not pause at {phase} (exit {proc.poll()}):\n{b''.join(chunks).decode()[-3000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    reader.join(5)
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def straight(base_dit, tmp_path_factory):
    """The uninterrupted run to compare against."""
    run = tmp_path_factory.mktemp("straight")
    train(fast_config(base_dit, run, **SETTINGS))
    return run


@pytest.mark.parametrize("phase, resumes_from", [("part-ema@6", 3), ("renamed@6", 6)])
def test_sigkill_during_a_save(phase, resumes_from, base_dit, straight, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(fast_config(base_dit, run, **SETTINGS).to_yaml())
    err = run_until_paused(config, phase)

    # what `gen train` shows and keeps: the resolved config, a tqdm bar with loss and it/s, validation grids
    assert "# resolved config" in err and "max_steps: 6" in err and (run / "config.yaml").is_file()
    assert "it/s" in err and "loss=" in err
    assert (run / "samples" / "step-00000003.png").is_file()

    ckpt = Checkpointer(run / "checkpoints")
    assert [p.name for p in ckpt.committed()][-1] == f"step-{resumes_from:08d}"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000003"  # killed before the marker moved
    if resumes_from == 3:  # killed mid-save: a partial folder that is never read
        partial = run / "checkpoints" / ".tmp-step-00000006"
        assert (partial / "model.safetensors").is_file() and not (partial / "state.json").exists()
        assert not (run / "checkpoints" / "step-00000006").exists()
    shared, _, state = ckpt.load(ckpt.find("auto"))  # the newest complete checkpoint loads
    assert state["step"] == resumes_from and set(shared) >= {"model", "ema", "optimizer"}
    assert not (run / "model").exists()

    out = train(load_config(config))  # resume=auto, no hook: continues and finishes
    assert (out / "model_index.json").is_file()
    assert not (run / "checkpoints" / ".tmp-step-00000006").exists()
    a, b = checkpoint_tensors(straight, 6), checkpoint_tensors(run, 6)
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert losses(run) == losses(straight)


def test_a_torn_last_metrics_line_does_not_block_resume(base_dit, tmp_path):
    """A crash in the middle of a metrics.jsonl write leaves half a line: resume drops it."""
    train(fast_config(base_dit, tmp_path, train__max_steps=4, train__stop_at_step=2, train__checkpoint_every=0,
                      train__ema_decay=0.0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # torn
    train(fast_config(base_dit, tmp_path, train__max_steps=4, train__checkpoint_every=0, train__ema_decay=0.0))
    assert len(losses(tmp_path)) == 4
