"""Checkpoint faults in a real process: SIGKILL half-way through a file, between files and before the `latest`
marker; a file-size limit (disk full) during a save. The previous checkpoint always loads,
resume=auto never picks a partial one, and a failed save prunes nothing."""

import resource
import signal
import subprocess
import sys

import pytest
import torch

from gen.errors import GenError
from gen.io import load_state_dict
from tests.train.test_crash import run_until_paused
from train.checkpoint import Checkpointer

N = 50_000  # floats per tensor: 200 kB files
CHILD = """
import sys, torch
from gen.errors import GenError
from train.checkpoint import Checkpointer
step = int(sys.argv[2])
try:
    Checkpointer(sys.argv[1], keep=1).save(step, {"model": {"w": torch.full((%d,), float(step))},
        "optimizer": {"m": torch.full((%d,), -float(step))}}, {"rng": {"s": torch.tensor([step])}}, {"position": step})
except GenError as e:
    print(f"gen: error: {e}", file=sys.stderr)
    sys.exit(2)
""" % (N, N)


def save_in_process(root, step):
    ck = Checkpointer(root, keep=1)
    ck.save(step, {"model": {"w": torch.full((N,), float(step))}, "optimizer": {"m": torch.full((N,), -float(step))}},
            {"rng": {"s": torch.tensor([step])}}, {"position": step})
    return ck


def loaded_step(ck) -> int:
    shared, local, state = ck.load(ck.find("auto"))
    assert torch.equal(shared["model"]["w"], torch.full((N,), float(state["step"])))
    return state["step"]


@pytest.mark.parametrize("phase, auto_step", [("mid-model", 1), ("part-model", 1), ("renamed", 2)])
def test_sigkill_during_a_save(phase, auto_step, tmp_path):
    root = tmp_path / "ckpt"
    ck = save_in_process(root, 1)
    run_until_paused(None, f"{phase}@2", timeout=300, argv=["-c", CHILD, str(root), "2"])
    assert loaded_step(ck) == auto_step  # the newest complete checkpoint; a partial one is never picked
    assert ck.load(root / "step-00000001")[2]["step"] == 1  # the previous one loads whatever happened
    partial = root / ".tmp-step-00000002"
    if phase.startswith("mid-"):  # a half-written file in a folder that is never read
        name = phase[4:]
        assert (partial / f"{name}.safetensors").stat().st_size < 4 * N
        with pytest.raises(GenError, match="not a valid safetensors file"):
            load_state_dict(partial / f"{name}.safetensors")
    assert (root / "latest").read_text().strip() == "step-00000001"  # killed before the marker moved
    save_in_process(root, 2)  # the next save clears the partial folder and prunes as usual
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"] and loaded_step(ck) == 2


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_full_disk_is_a_clear_error_and_loses_nothing(tmp_path):
    root = tmp_path / "ckpt"
    ck = save_in_process(root, 1)
    before = {p.name: p.read_bytes() for p in (root / "step-00000001").iterdir()}
    r = subprocess.run([sys.executable, "-c", CHILD, str(root), "2"], preexec_fn=limit_file_size,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not write the step-2 checkpoint" in lines[0] and "too large" in lines[0], lines
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # no partial, nothing pruned
    assert {p.name: p.read_bytes() for p in (root / "step-00000001").iterdir()} == before
    assert loaded_step(ck) == 1


def test_a_folder_removed_while_saving_is_named_as_such(tmp_path):
    """Not "disk full?": the save says a folder went away under it, and keeps the previous checkpoint."""
    import shutil

    root = tmp_path / "ckpt"
    save_in_process(root, 1)
    partial = root / ".tmp-step-00000002"
    ck = Checkpointer(root, keep=1, barrier=lambda: shutil.rmtree(partial, ignore_errors=True))  # after its mkdir
    with pytest.raises(GenError) as e:
        ck.save(2, {"model": {"w": torch.zeros(N)}}, {"rng": {"s": torch.tensor([2])}}, {"position": 2})
    message = str(e.value)
    assert message.startswith(f"could not write the step-2 checkpoint in {root}: No such file or directory")
    assert "removed or moved while saving" in message and "disk" not in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"] and loaded_step(ck) == 1
