"""Aspect-ratio buckets (NovelAI 2022, SDXL): every image trains at the bucket size nearest its aspect ratio.

Buckets hold about resolution^2 pixels, their sides are multiples of `step` (the VAE factor times the
DiT patch size, or more), and no side is more than `max_aspect` times the other. An image goes to the
bucket whose aspect ratio is nearest in log space, so a bucket only holds images within half the gap
to its neighbours; images more extreme than max_aspect go to the end buckets (and are cropped more).
"""

from __future__ import annotations

import logging
import math

import torch
from torch.utils.data import Sampler

from gen.errors import GenError

log = logging.getLogger("gen")


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(width, height) sizes with w*h <= resolution^2, sides multiples of step, sorted from tallest to widest."""
    if step < 1 or resolution % step:
        raise GenError(f"config key 'data.bucket_step': {step} must divide data.resolution ({resolution})")
    if max_aspect < 1:
        raise GenError(f"config key 'data.max_aspect': {max_aspect} must be >= 1")
    area, sizes = resolution * resolution, set()
    for w in range(step, int(resolution * max_aspect) + 1, step):
        h = area // w // step * step  # the tallest side that keeps the pixel budget
        if h >= step and max(w, h) <= max_aspect * min(w, h):
            sizes |= {(w, h), (h, w)}
    sizes = sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))
    # several sizes can share an aspect ratio: keep the largest (the most pixels under the budget)
    best: dict[float, tuple[int, int]] = {}
    for w, h in sizes:
        r = round(w / h, 6)
        if r not in best or w * h > best[r][0] * best[r][1]:
            best[r] = (w, h)
    return sorted(best.values(), key=lambda s: s[0] / s[1])


class Buckets:
    def __init__(self, resolution: int, step: int, max_aspect: float):
        self.sizes = make_buckets(resolution, step, max_aspect)
        self.log_ratios = torch.tensor([math.log(w / h) for w, h in self.sizes], dtype=torch.float64)

    def assign(self, width: int, height: int) -> int:
        """Index of the bucket nearest the image's aspect ratio."""
        return int((self.log_ratios - math.log(width / height)).abs().argmin())

    def bounds(self, b: int) -> tuple[float, float]:
        """The aspect ratios (w/h) bucket b takes: from halfway to its left neighbour to halfway to its right
        one (in log space); unbounded at the ends."""
        r = self.log_ratios
        lo = math.exp((r[b - 1] + r[b]) / 2) if b > 0 else 0.0
        hi = math.exp((r[b] + r[b + 1]) / 2) if b + 1 < len(r) else math.inf
        return lo, hi

    def assign_all(self, sizes: list[tuple[int, int]], max_aspect: float) -> list[int]:
        extreme = sum(max(w, h) > max_aspect * min(w, h) for w, h in sizes)
        if extreme:
            log.warning("%d image(s) have an aspect ratio beyond data.max_aspect=%g; they are cropped to the "
                        "end buckets", extreme, max_aspect)
        return [self.assign(w, h) for w, h in sizes]

    def report(self, assignment: list[int], batch_size: int) -> str:
        counts = torch.bincount(torch.tensor(assignment), minlength=len(self.sizes)).tolist()
        rows = [f"  {w}x{h} (aspect {w / h:.2f}): {c} images, {-(-c // batch_size)} batches"
                + (f" (the last of {c % batch_size})" if c % batch_size else "")
                for (w, h), c in zip(self.sizes, counts) if c]
        return f"aspect-ratio buckets ({sum(c > 0 for c in counts)} used of {len(self.sizes)}):\n" + "\n".join(rows)


class BucketSampler(Sampler):
    """Endless batches of (item, position), each batch from one bucket; a function of (seed, position).

    Epoch e shuffles each bucket's items (seed + e), cuts them into batches of B (a bucket's last batch is
    smaller when B does not divide its size: every image trains every epoch, as in kohya's sd-scripts), and
    shuffles the batches. Global batch q is the
    epoch's batch q mod n; process r of W takes batches start/B + k*W + r, as OrderSampler does."""

    def __init__(self, assignment: list[int], seed: int, batch_size: int, start: int = 0, world: int = 1,
                 rank: int = 0):
        self.seed, self.bs, self.world, self.rank = seed, batch_size, world, rank
        if start % batch_size:
            raise GenError(f"cannot resume bucketed data at position {start}: not a multiple of train.batch_size")
        self.first = start // batch_size
        buckets: dict[int, list[int]] = {}
        for i, b in enumerate(assignment):
            buckets.setdefault(b, []).append(i)
        self.buckets = [torch.tensor(v) for _, v in sorted(buckets.items())]
        self.per_epoch = sum(-(-len(v) // batch_size) for v in self.buckets)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            batches = []
            for items in self.buckets:
                items = items[torch.randperm(len(items), generator=g)]
                batches += [items[s:s + self.bs].tolist() for s in range(0, len(items), self.bs)]
            order = torch.randperm(len(batches), generator=g).tolist()
            self._epoch = (epoch, [batches[i] for i in order])
        return self._epoch[1]

    def batch(self, k: int) -> list[tuple[int, int]]:
        q = self.first + k * self.world + self.rank
        items = self.epoch_batches(q // self.per_epoch)[q % self.per_epoch]
        return [(i, q * self.bs + j) for j, i in enumerate(items)]

    def __iter__(self):
        k = 0
        while True:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:
        return 2 ** 62
