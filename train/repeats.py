"""Warnings that repeat per item (a caption cut at the text encoder's length, ...) print once, with a count.

A warning logged with `extra={"repeat": WHAT}` (WHAT: e.g. "captions were cut to 77 tokens") is held while a
run is on; when the run ends (or pauses) one line says how many there were and shows the first, and the full
list goes to the run folder's warnings.log. Outside a run (sampling) such a warning prints each time."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("gen")


class Repeats(logging.Filter):
    def __init__(self, run_dir: Path, main: bool = True):
        super().__init__()
        self.path, self.main, self.held = Path(run_dir) / "warnings.log", main, {}

    def filter(self, record: logging.LogRecord) -> bool:
        what = getattr(record, "repeat", None)
        if what is None:
            return True
        self.held.setdefault(what, []).append(record.getMessage())
        return False

    def __enter__(self) -> Repeats:
        log.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        log.removeFilter(self)
        if not self.held or not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for what, messages in self.held.items():
                f.writelines(f"{m}\n" for m in messages)
        for what, messages in self.held.items():
            log.warning("%d %s; first: %s (all in %s)", len(messages), what, messages[0], self.path)
        self.held = {}
