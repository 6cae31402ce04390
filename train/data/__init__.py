"""Training data: sources (image folders, the shapes world), augmentation, and a resumable order.

A sample is addressed by its *position* in the run's stream of samples. The order and every random
augmentation are pure functions of (seed, position), so resuming at a position replays exactly the
samples an uninterrupted run would have seen, with no loader state to save.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from train.config import DataConfig
from train.data.folder import ImageFolder
from train.data.shapes import ShapesWorld


def build_source(cfg: DataConfig) -> ImageFolder | ShapesWorld:
    if cfg.source == "shapes":
        return ShapesWorld(cfg.num_images, cfg.seed)
    return ImageFolder(cfg.path)


def transform(img: Image.Image, resolution: int, crop: str, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square (center or random), maybe flip -> (3, R, R) in [-1, 1]."""
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    if crop == "random":
        x, y = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    else:
        x, y = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((x, y, x + resolution, y + resolution))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return a.float() / 127.5 - 1


class TrainData(torch.utils.data.Dataset):
    """Indexed by (item, position): the augmentation draws from a generator seeded by the position."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.source = build_source(cfg)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, pos = key
        img, text = self.source[i]
        rng = np.random.default_rng([self.seed, pos])
        pixels = transform(img, self.cfg.resolution, self.cfg.crop, self.cfg.flip, rng)
        return {"pixel_values": pixels, "text": text, "index": i}

    def fingerprint(self) -> dict:
        return {**self.source.fingerprint(), "resolution": self.cfg.resolution}


class OrderSampler(Sampler):
    """Endless batches of (item, position) for one process; epoch e is a permutation seeded by seed + e.

    From stream position `start`, batch k of process r takes positions start + (k*W + r)*B ... + B, so
    W processes with batch B together see what 1 process with batch W*B sees, and the position to
    resume at is just the number of samples consumed."""

    def __init__(self, n: int, seed: int, batch_size: int, start: int = 0, world: int = 1, rank: int = 0):
        self.n, self.seed, self.bs, self.start, self.world, self.rank = n, seed, batch_size, start, world, rank
        self._perm: tuple[int, torch.Tensor] | None = None

    def item(self, pos: int) -> int:
        epoch = pos // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return int(self._perm[1][pos % self.n])

    def batch(self, k: int) -> list[tuple[int, int]]:
        first = self.start + (k * self.world + self.rank) * self.bs
        return [(self.item(p), p) for p in range(first, first + self.bs)]

    def __iter__(self):
        k = 0
        while True:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for its own length
        return 2 ** 62


def collate(rows: list[dict]) -> dict:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]), "text": [r["text"] for r in rows],
            "index": torch.tensor([r["index"] for r in rows])}


def loader(data: TrainData, batch_size: int, position: int, world: int, rank: int,
           num_workers: int = 0) -> DataLoader:
    """Batches from stream position `position` (samples consumed by all processes) on, for process `rank`."""
    sampler = OrderSampler(len(data), data.seed, batch_size, position, world, rank)
    return DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0)
