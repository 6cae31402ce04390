"""One writer per folder: a lock file naming its holder (host, PID, start time, command).

Two runs on one train.output_dir would interleave their checkpoints, prune each other's and mix their
metrics.jsonl; two `gen data cache` builds of one cache folder would write the same files. The lock is
created atomically (a hard link of a complete file: never seen half-written), read by whoever finds it, and
removed by its holder when done. A lock whose holder is a dead process on this host is stale (a crash, a
SIGKILL) and taken over with a warning; one held from another host cannot be checked from here, so it is
refused like a live one, and the message says which file to delete if that run is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from gen.errors import GenError, Stopped

log = logging.getLogger("gen")

NAME = ".gen.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie (killed, not yet reaped by its parent) still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def acquire(folder: Path, what: str) -> Path:
    """Takes `folder`'s lock (making the folder) or raises a GenError naming the holder; returns the lock."""
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / NAME, {"host": socket.gethostname(), "pid": os.getpid(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    tmp = folder / f"{NAME}.{me['pid']}.tmp"
    tmp.write_text(json.dumps(me) + "\n")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # fails if the lock exists: create-if-absent, with its content
                return path
            except FileExistsError:
                pass
            holder = _read(path)
            if holder is None:
                raise GenError(f"{what} {folder} is locked by {path}, which is unreadable; if no other run uses "
                               "that folder, delete the lock and run again")
            mine = holder.get("host") == me["host"]
            if mine and (holder["pid"] == me["pid"] or not _alive(holder["pid"])):
                if holder["pid"] != me["pid"]:
                    log.warning("%s %s: taking over the stale lock of process %d (started %s), which is no longer "
                                "running", what, folder, holder["pid"], holder.get("started", "?"))
                path.unlink(missing_ok=True)
                continue
            raise GenError(f"{what} {folder} is in use by another run: process {holder['pid']} on "
                           f"{holder.get('host', '?')}, started {holder.get('started', '?')}; wait for it to "
                           f"finish or use another folder (if that run is gone, delete {path})")
        raise GenError(f"could not lock {what} {folder}: its lock {path} keeps changing; is another run starting?")
    finally:
        tmp.unlink(missing_ok=True)


def release(path: Path) -> None:
    """Removes the lock if this process still holds it."""
    holder = _read(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(folder: Path, what: str, acc=None):
    """`folder`'s lock for the block, taken by the main process. Under accelerate, the others learn the
    outcome (one broadcast) and leave quietly with exit code 2 when it failed, instead of waiting in a
    collective for a process that has gone."""
    main = acc is None or acc.is_main_process
    error, path = None, None
    if main:
        try:
            path = acquire(folder, what)
        except GenError as e:
            error = e
    if acc is not None and acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        failed = broadcast_object_list([error is not None])[0]
        if failed and not main:
            raise Stopped("", 2)
    if error is not None:
        raise error
    try:
        yield path
    finally:
        if path is not None:
            release(path)
