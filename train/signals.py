"""Stopping a run cleanly: signals, a wall-time budget and time-based checkpoints, acted on at step boundaries.

SIGTERM (what SLURM, Kubernetes and most schedulers send before they stop a job), SIGINT (Ctrl-C) and SIGUSR1
only set a flag here; the loop asks `poll()` between optimizer steps, saves a checkpoint and stops (TERM, INT)
or goes on (USR1). With several processes, every one of them must save or stop at the same step, or one would
wait forever in a collective the others never reach: `poll()` all-reduces the flags (max), one tiny all-reduce
per step, so a signal that reached one process only still stops them all together. A second Ctrl-C raises
KeyboardInterrupt at once; the atomic commit (train/checkpoint.py) keeps the previous checkpoint as it was.
A repeated SIGTERM does not: a scheduler may signal the launcher and the workers, and the launcher passes its
signal on, so a worker can get two.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("gen")

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal number, as a shell reports it
END_TIME_ENV = "SLURM_JOB_END_TIME"  # the Unix time SLURM ends the job at; set in a job's environment


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader workers' init: the main process decides when to stop and then ends its workers. A Ctrl-C
    reaches the whole foreground process group, and SLURM signals every process of a job step; a worker that
    died of it would fail the main process's next batch, the very step it is finishing."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class Action:
    save: bool = False
    stop: bool = False


class Guard:
    """The loop's view of signals and clocks. `checkpoint_minutes`: a save at least that often; `time_limit`
    (minutes from `start`) and $SLURM_JOB_END_TIME: a stop with a checkpoint while twice the slowest step plus
    the slowest save so far (before the first save, `expect_save`'s estimate) still fit before the earlier of the
    two."""

    def __init__(self, checkpoint_minutes: float | None, time_limit: float | None, start: float, device,
                 world: int, main: bool):
        self.every = checkpoint_minutes * 60 if checkpoint_minutes else None
        ends = [(start + time_limit * 60, "train.time_limit")] if time_limit else []
        if os.environ.get(END_TIME_ENV, "").strip().isdigit():
            ends.append((float(os.environ[END_TIME_ENV]), f"the SLURM job's end time (${END_TIME_ENV})"))
        self.deadline, self.deadline_name = min(ends) if ends else (None, "")
        self.device, self.world, self.main = device, world, main
        self.signal: int | None = None  # the stopping signal received
        self.reason = ""  # why the run stopped early: a signal's or a deadline's name
        self.save_asks, self.asks_seen, self.old = 0, 0, {}  # SIGUSR1s received, and those a poll has answered
        self.last_save = self.last_poll = time.monotonic()
        self.slowest_step = self.slowest_save = 0.0
        self.save_guess = 0.0  # expect_save's, until a save is measured
        self.polls = 0

    def __enter__(self) -> Guard:
        """From here to the end of `train`: a signal that comes while the model loads counts at the first step."""
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        else:
            log.warning("training outside the main thread: SIGTERM, Ctrl-C and SIGUSR1 keep their default actions")
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.old = {}

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGUSR1:
            self.save_asks += 1
            what = "SIGUSR1: a checkpoint after this step, then training goes on"
        elif signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: now; the previous checkpoint stays intact
        else:
            self.signal = self.signal or signum
            what = (f"{signal.Signals(signum).name}: finishing this step, then a checkpoint and exit"
                    + (" (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""))
        if self.main:
            os.write(2, f"\ngen: {what}\n".encode())  # os.write: safe inside a handler, unlike print

    def expect_save(self, nbytes: int) -> None:
        """The first save's time, before one is measured: `nbytes` at a slow disk's 100 MB/s plus half a second (a
        CI run whose only save came at the deadline overran it by 0.7 s while the guess was 0)."""
        self.save_guess = 0.5 + nbytes / 100e6

    def saved(self, seconds: float) -> None:
        self.last_save, self.slowest_save = time.monotonic(), max(self.slowest_save, seconds)

    def poll(self) -> Action:
        """At a step boundary: what to do now, the same answer in every process."""
        now = time.monotonic()
        if self.polls:  # the clocks start at the first step, not while the model loads
            self.slowest_step = max(self.slowest_step, now - self.last_poll)
        else:
            self.last_save = now
        self.last_poll, self.polls = now, self.polls + 1
        due = self.every is not None and now - self.last_save >= self.every
        late = (self.deadline is not None
                and time.time() + 2 * (self.slowest_step + (self.slowest_save or self.save_guess)) >= self.deadline)
        # a count, not a flag cleared after the all-reduce: a SIGUSR1 whose handler runs while the all-reduce waits
        # (Python runs it when the call returns) is answered at the next poll instead of lost (a CI run lost one)
        asks = self.save_asks
        flags = [int(asks != self.asks_seen or due), int(self.signal or 0), int(late)]
        self.asks_seen = asks
        if self.world > 1:  # one tiny all-reduce: a flag raised in any process counts in all
            t = torch.tensor(flags, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flags = t.tolist()
        if flags[1] and not self.reason:
            self.signal = self.signal or flags[1]
            self.reason = signal.Signals(flags[1]).name
        elif flags[2] and not self.reason:
            self.reason = f"{self.deadline_name} is near"
        return Action(save=bool(flags[0] or flags[1] or flags[2]), stop=bool(flags[1] or flags[2]))
