"""Atomic checkpoints and exact resume.

A checkpoint is a folder `step-NNNNNNNN/` written as `.tmp-step-NNNNNNNN/`, every file fsynced, the
folder renamed into place (atomic), its parent fsynced, and only then the `latest` marker replaced
(atomic) and old checkpoints pruned. A crash at any point leaves the previous checkpoint intact;
`.tmp-*` folders are partial by construction and never read. Resume (train.resume=auto) takes the newest complete
checkpoint, which is the one `latest` names unless a save stopped between its rename and the marker's move; a folder
holds one run's checkpoints only (train.resume=none sets an earlier run's aside), so step order is the run's order.
`latest` is for people and tools (e.g. `cat runs/x/checkpoints/latest`).

Tensors go to safetensors; everything else (step, schedules, RNG states, config) to JSON; nothing is
pickled. Nested state (an optimizer's state_dict, numpy's RNG state) is split into a JSON skeleton
whose leaves point into the safetensors file.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save as to_bytes
from safetensors.torch import save_file

from gen.errors import GenError
from gen.io import load_state_dict, read_json

LATEST = "latest"
STATE = "state.json"
_NAME = re.compile(r"^step-(\d{8})$")
# Fault-injection hook for tests: GEN_TEST_PAUSE_IN_SAVE=PHASE[@STEP] makes a process that reaches save
# phase PHASE (of the step-STEP checkpoint, or of any) print PAUSE_ENV's name, the phase and the step to stderr
# and wait, so a test can SIGKILL (or signal) it at a known point of a save. Phases, in order: see `Checkpointer.save`.
PAUSE_ENV = "GEN_TEST_PAUSE_IN_SAVE"


def pause_point(phase: str, step: int) -> None:
    """Sleeps here when PAUSE_ENV names this phase (and step); a no-op otherwise."""
    want = os.environ.get(PAUSE_ENV)
    if not want:
        return
    name, _, at = want.partition("@")
    if name == phase and (not at or int(at) == step):
        print(f"{PAUSE_ENV}: paused at {phase} of step {step} (pid {os.getpid()})", file=sys.stderr, flush=True)
        while True:  # until killed, or a signal handler raises (a second Ctrl-C); handled signals resume the wait
            signal.pause()


# ---- nested state <-> (JSON skeleton, flat tensors) -----------------------------------------------
def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iu" else obj)
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path!r}")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__items__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): copy the repeats."""
    seen, out = set(), {}
    for k, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes) if t.numel() else None
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(folder: Path, name: str, obj: Any, step: int = -1) -> None:
    """`name.json` (skeleton) and, when it holds tensors, `name.safetensors`; both fsynced."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(obj, tensors)
    if tensors:
        path = folder / f"{name}.safetensors"
        if os.environ.get(PAUSE_ENV, "").partition("@")[0] == f"mid-{name}":  # test hook: pause half-way through
            data = to_bytes(_unshare(tensors))
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                pause_point(f"mid-{name}", step)
                f.write(data[len(data) // 2:])
        else:
            save_file(_unshare(tensors), str(path))
        _fsync(path)
    with open(folder / f"{name}.json", "w") as f:
        json.dump(skeleton, f)
        f.flush()
        os.fsync(f.fileno())


def read_state(folder: Path, name: str) -> Any:
    tensors_path = folder / f"{name}.safetensors"
    tensors = load_state_dict(tensors_path) if tensors_path.is_file() else {}  # validated; never unpickled
    return unflatten(read_json(folder / f"{name}.json"), tensors)


def nonfinite(obj: Any, path: str = "") -> list[str]:
    """Paths of the floating-point tensors in nested state that hold a NaN or an inf."""
    if isinstance(obj, torch.Tensor):
        return [path] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite(v, f"{path}.{i}")]
    return []


# ---- RNG --------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_HINTS = {errno.ENOSPC: "the disk is full: free space, then resume",
          errno.EDQUOT: "over the disk quota: free space, then resume",
          errno.EFBIG: "over a file size limit (ulimit -f) or the file system's: raise it, then resume",
          errno.ENOENT: "a folder was removed or moved while saving: check what deletes files there, then resume",
          errno.EACCES: "this user may not write there: fix the folder's permissions, then resume",
          errno.EPERM: "this user may not write there: fix the folder's permissions, then resume",
          errno.EROFS: "the file system is read-only: resume into a writable train.output_dir"}


def write_error(e: Exception) -> str:
    """What went wrong in a failed write, and what to do: from the errno of an OSError, or of the OS error a
    SafetensorError quotes ("... (os error 2) ..."); the message itself otherwise."""
    code = getattr(e, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)|code: (\d+)", str(e))
        code = int(found.group(1) or found.group(2)) if found else None
    if code is None:
        return str(e)
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{os.strerror(code)}{where}: {_HINTS.get(code, 'fix that, then resume')}"


# ---- the checkpoint folder --------------------------------------------------------------------
class Checkpointer:
    """Saves and finds checkpoints under `root`; `barrier` syncs processes (accelerate's wait_for_everyone)."""

    def __init__(self, root: str | Path, keep: int = 2, rank: int = 0, barrier=lambda: None):
        self.root, self.keep, self.rank, self.barrier = Path(root), keep, rank, barrier

    def committed(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def find(self, resume: str) -> Path | None:
        """resume: 'none', 'auto' (the newest complete checkpoint, if any) or a checkpoint folder."""
        if resume == "none":
            return None
        if resume == "auto":
            done = self.committed()
            return done[-1] if done else None
        path = Path(resume)
        if not (path / STATE).is_file():
            raise GenError(f"config key 'train.resume': {path} is not a complete checkpoint folder "
                           f"(no {STATE}); use 'auto', 'none' or a step-NNNNNNNN folder")
        return path

    def save(self, step: int, shared: dict[str, Any], local: dict[str, Any], state: dict) -> Path:
        """Writes `shared` parts and `state` from process 0, `local` parts from every process, atomically.
        A write that fails (disk full, a file size limit) removes its partial folder and raises a GenError:
        the previous checkpoints stay as they were, none pruned."""
        try:
            return self._save(step, shared, local, state)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(self.root / f".tmp-step-{step:08d}", ignore_errors=True)
            raise GenError(f"could not write the step-{step} checkpoint in {self.root}: {write_error(e)}; the "
                           "previous checkpoint is kept and nothing was pruned") from None

    def _save(self, step: int, shared: dict[str, Any], local: dict[str, Any], state: dict) -> Path:
        """The save itself.

        Save phases (the names `pause_point` takes): `begin` (temporary folder made), `local` (this
        process's parts written), `mid-NAME` (half of NAME.safetensors written), `part-NAME` (shared part NAME
        written), `state` (state.json written,
        not yet renamed), `renamed` (the checkpoint is in place, `latest` not yet moved), `latest`
        (marker moved, old checkpoints not yet pruned), `done`."""
        bad = nonfinite(shared)
        if bad:  # every process holds the same shared parts, so all of them stop here together
            raise GenError(f"refusing to save the step-{step} checkpoint: {len(bad)} tensors hold NaN or inf "
                           f"(e.g. {bad[0]}); the previous checkpoint is kept. Lower optim.lr or check the data")
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial folder left by an earlier crash
            tmp.mkdir(parents=True)
        self.barrier()
        pause_point("begin", step)
        files = []
        for name, obj in local.items():
            write_state(tmp, f"{name}-{self.rank}", obj)
        pause_point("local", step)
        if self.rank == 0:
            for name, obj in shared.items():
                write_state(tmp, name, obj, step)
                files.append(name)
                pause_point(f"part-{name}", step)
        self.barrier()
        if self.rank == 0:
            write_state(tmp, STATE[:-5], {**state, "step": step, "parts": files, "local_parts": list(local)})
            _fsync(tmp)
            pause_point("state", step)
            if final.exists():  # the same step saved again (e.g. a re-run): replace it
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(self.root)
            pause_point("renamed", step)
            marker = self.root / f".{LATEST}.tmp"
            marker.write_text(final.name + "\n")
            _fsync(marker)
            os.replace(marker, self.root / LATEST)
            _fsync(self.root)
            pause_point("latest", step)
            for old in self.committed()[:-self.keep]:
                shutil.rmtree(old)
        self.barrier()
        pause_point("done", step)
        return final

    def load(self, path: Path) -> tuple[dict, dict, dict]:
        """(shared parts, this process's local parts, state) of a checkpoint."""
        state = read_state(path, STATE[:-5])
        missing = [p for p in state["parts"] if not (path / f"{p}.json").is_file()]
        if missing:
            raise GenError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); remove it or "
                           "resume from another")
        shared = {name: read_state(path, name) for name in state["parts"]}
        local = {name: read_state(path, f"{name}-{self.rank}") for name in state["local_parts"]
                 if (path / f"{name}-{self.rank}.json").is_file()}  # absent when the run has more processes now
        return shared, local, state
