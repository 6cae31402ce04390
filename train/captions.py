"""Caption augmentation (`data.caption.*`), as kohya's sd-scripts and OneTrainer do it for tagged captions.

A caption is read as comma-separated tags. Per sample: one of the caption's variants (its non-empty lines, or
the list a metadata.jsonl `text` holds) is chosen, the tags after the first `keep_tokens` are shuffled and each
dropped with probability `tag_dropout`, and `prefix` / `suffix` are put around what is left. All draws come
from a generator seeded by (train.seed, stream position), so a resumed run sees the captions an uninterrupted
one would: the same property the crop and flip have (train/data/__init__.py).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from train.config import CaptionConfig


def variants(text: str) -> list[str]:
    """The caption's variants: its non-empty lines (one caption when it has a single line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines or [text.strip()]


def active(c: CaptionConfig) -> bool:
    """Whether any option changes captions (a default config leaves them exactly as read)."""
    return c != CaptionConfig()


def augment(text: str, c: CaptionConfig, rng: np.random.Generator) -> str:
    """One sample's caption from the text a source gave (see the module docstring)."""
    if c.variants:
        options = variants(text)
        text = options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
    if c.shuffle or c.tag_dropout > 0:
        tags = [t.strip() for t in text.split(",") if t.strip()]
        fixed, rest = tags[:c.keep_tokens], tags[c.keep_tokens:]
        if c.shuffle:
            rest = [rest[k] for k in rng.permutation(len(rest))]
        if c.tag_dropout > 0:
            keep = rng.random(len(rest)) >= c.tag_dropout  # one draw per tag, whatever the rate
            rest = [t for t, k in zip(rest, keep) if k]
        text = ", ".join(fixed + rest)
    return f"{c.prefix}{text}{c.suffix}"


def fingerprint(c: CaptionConfig) -> dict:
    """The caption options a resume must keep (empty for the defaults, so older checkpoints still resume)."""
    return {"caption": asdict(c)} if active(c) else {}
