"""Training data: sources (image folders, WebDataset shards, the shapes world), augmentation, aspect-ratio
buckets and a resumable order.

A sample is addressed by its *position* in the run's stream of samples. The order and every random
augmentation are pure functions of (seed, position), so resuming at a position replays exactly the
samples an uninterrupted run would have seen, with no loader state to save.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from gen.errors import GenError
from train import captions
from train.config import DataConfig
from train.data import exif
from train.data.buckets import Buckets, BucketSampler
from train.data.folder import ImageFolder
from train.data.shapes import ShapesWorld
from train.data import controls, shards
from train.data.shards import Shards, ShardStream
from train.signals import ignore_stop_signals

log = logging.getLogger("gen")


def build_source(cfg: DataConfig, control: bool = False) -> ImageFolder | ShapesWorld | Shards:
    """The data.source; with `control` (stage=controlnet), an image folder or shards whose images carry control
    images."""
    if control and cfg.source == "shapes":
        raise GenError("stage=controlnet trains on images with control images (data.source=folder or shards), not "
                       "data.source=shapes (python -m train.data.shapes DIR --control writes such a folder)")
    if cfg.source == "shapes":
        return ShapesWorld(cfg.num_images, cfg.seed, color_weights=cfg.color_weights)
    if cfg.source == "shards":
        return Shards(cfg.path, control)
    return ImageFolder(cfg.path, control)


def first_hints(cfg: DataConfig, n: int) -> list:
    """The control images of the first `n` training samples (stage=controlnet's default validation hints): a
    folder's files in its order, shards' hints in list and tar order."""
    if cfg.source != "shards":
        return ImageFolder(cfg.path, control=True).controls[:n]
    source, out = Shards(cfg.path), []
    for j in range(len(source.urls)):
        for _, name, _, _, hint in source.read(j, hints=True):
            out.append(controls.read(hint, name=f"of the sample {name}"))
            if len(out) == n:
                return out
    return out


def transform(img: Image.Image, size: int | tuple[int, int], crop: str, flip: bool,
              rng: np.random.Generator) -> torch.Tensor:
    """Resize to cover `size` (a square side or (width, height)), crop it (center or random), maybe flip
    -> (3, H, W) in [-1, 1]."""
    return augment(img, size, crop, flip, rng)[0]


def augment(img: Image.Image, size: int | tuple[int, int], crop: str, flip: bool, rng: np.random.Generator,
            mask: Image.Image | None = None, hint: Image.Image | None = None) -> tuple:
    """`transform`, the (top, left) of the crop in the resized image, as the flipped image sees it (SDXL's
    crop conditioning: where the training view starts in the whole picture), `mask` (a loss mask of the
    image's size) given the same view, (1, H, W) in [0, 1], or None, and `hint` (a control image of the image's
    size) given the same view, (3, H, W) in [0, 1], or None."""
    w, h = img.size
    tw, th = (size, size) if isinstance(size, int) else size
    nw, nh = cover(w, h, tw, th)
    if crop == "random":
        x, y = int(rng.integers(0, nw - tw + 1)), int(rng.integers(0, nh - th + 1))
    else:
        x, y = (nw - tw) // 2, (nh - th) // 2
    flipped = flip and rng.random() < 0.5

    def view(im: Image.Image, resample) -> np.ndarray:
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample, reducing_gap=None)
        im = im.crop((x, y, x + tw, y + th))
        return np.asarray(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else im, dtype=np.uint8).copy()

    a = torch.from_numpy(view(img, Image.Resampling.BICUBIC)).permute(2, 0, 1)
    m = None if mask is None else torch.from_numpy(view(mask, Image.Resampling.BILINEAR)).float()[None] / 255
    c = None if hint is None else torch.from_numpy(view(hint, Image.Resampling.BICUBIC)).permute(2, 0, 1).float() / 255
    # the mirrored picture's crop starts nw - tw - x from its left edge
    return a.float() / 127.5 - 1, (y, nw - tw - x if flipped else x), m, c


def cover(w: int, h: int, tw: int, th: int) -> tuple[int, int]:
    """The (width, height) a w x h picture is resized to so that it covers tw x th, its aspect kept."""
    s = max(tw / w, th / h)
    return max(tw, round(w * s)), max(th, round(h * s))


def center_sizes(img: Image.Image, size: int | tuple[int, int]) -> dict[str, torch.Tensor]:
    """SDXL's size conditioning of a center crop, as `example` gives it, for the picture and its mirror image:
    original_size (height, width), crop_top_left (top, left) and flip.crop_top_left."""
    tw, th = (size, size) if isinstance(size, int) else size
    nw, nh = cover(*img.size, tw, th)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return {"original_size": torch.tensor([img.height, img.width]), "crop_top_left": torch.tensor([top, left]),
            "flip.crop_top_left": torch.tensor([top, nw - tw - left])}


def image_sizes(source) -> list[tuple[int, int]]:
    """(width, height) of every item, from image headers where the source has files."""
    if isinstance(source, ImageFolder):
        out = []
        for p, _ in source.items:
            with Image.open(p) as im:
                out.append(exif.size(im))
        return out
    return [source[i][0].size for i in range(len(source))]


def collate(rows: list[dict]) -> dict:
    """Tensors are stacked, ints become a tensor, anything else (captions) a list."""
    out = {}
    for k, v0 in rows[0].items():
        vs = [r[k] for r in rows]
        out[k] = torch.stack(vs) if isinstance(v0, torch.Tensor) else torch.tensor(vs) if isinstance(v0, int) else vs
    return out


class TrainData(torch.utils.data.Dataset):
    """Indexed by (item, position): the augmentation draws from a generator seeded by the position.

    With data.buckets, `assignment[i]` is item i's bucket in `buckets` (its training size)."""

    collate = staticmethod(collate)

    def __init__(self, cfg: DataConfig, seed: int, control: bool = False):
        self.cfg, self.seed, self.control = cfg, seed, control
        self.source = build_source(cfg, control)
        self.streaming = isinstance(self.source, Shards)
        self.buckets = Buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect) if cfg.buckets else None
        self.assignment = None
        if self.buckets and not self.streaming:
            self.assignment = self.buckets.assign_all(image_sizes(self.source), cfg.max_aspect)
        # loss masks (train/data/masks.py): only a folder with at least one adds them to its batches
        self.masked = cfg.masked_loss and getattr(self.source, "num_masked", 0) > 0
        if self.masked:
            log.info("data.masked_loss: %d of %d images carry a loss mask", self.source.num_masked, len(self.source))
        if cfg.cache and self.masked:
            raise GenError(f"config key 'data.cache': {self.source.num_masked} images carry loss masks, which the "
                           "cache does not hold; set data.cache=false, or data.masked_loss=false to ignore them")
        if cfg.cache and captions.active(cfg.caption):
            raise GenError("config key 'data.caption': a cache holds one text embedding per image, encoded before "
                           "caption options apply; set data.cache=false to use them")
        if self.buckets and self.streaming and not cfg.cache:
            raise GenError("config key 'data.buckets': bucketing WebDataset shards needs data.cache=true "
                           "(the cache records each image's bucket in one pass over the shards)")

    def __len__(self) -> int:
        return len(self.source)

    def size(self, i: int) -> int | tuple[int, int]:
        return self.cfg.resolution if self.assignment is None else self.buckets.sizes[self.assignment[i]]

    def example(self, i: int, pos: int, img: Image.Image, text: str, mask: Image.Image | None = None,
                hint: Image.Image | None = None) -> dict:
        rng = np.random.default_rng([self.seed, pos])
        pixels, crop, mask, hint = augment(img, self.size(i), self.cfg.crop, self.cfg.flip, rng, mask, hint)
        if captions.active(self.cfg.caption):  # its own stream: the crop and flip stay as they were
            text = captions.augment(text, self.cfg.caption, np.random.default_rng([self.seed, pos, 1]))
        # SDXL's size micro-conditioning: the picture's (height, width) before resizing, and the crop's top-left
        row = {"pixel_values": pixels, "text": text, "index": i,
               "original_size": torch.tensor([img.height, img.width]), "crop_top_left": torch.tensor(crop)}
        if self.masked:  # every row of a masked dataset has one (collate stacks them); no mask weighs 1
            row["mask"] = mask if mask is not None else torch.ones((1, *pixels.shape[1:]))
        if hint is not None:  # stage=controlnet: the control image, (3, H, W) in [0, 1]
            row["control"] = hint
        return row

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, pos = key
        if self.masked or self.control:
            img, text, mask, hint = self.source.load(i, mask=self.masked, control=self.control)
        else:
            (img, text), mask, hint = self.source[i], None, None
        return self.example(i, pos, img, text, mask, hint)

    def fingerprint(self) -> dict:
        fp = {**self.source.fingerprint(), "resolution": self.cfg.resolution, **captions.fingerprint(self.cfg.caption)}
        if self.masked:
            fp["masks"] = self.source.num_masked
        if self.buckets:
            fp |= {"bucket_step": self.cfg.bucket_step, "max_aspect": self.cfg.max_aspect}
        return fp


    def stamp(self) -> str | None:
        """What the fingerprint leaves out: the files' sizes and modification times (None for the shapes world).
        Caches depend on it; a resume does not (a copied dataset has new times and the same pictures)."""
        return self.source.stamp() if hasattr(self.source, "stamp") else None


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


def loader(data, batch_size: int, position: int, world: int, rank: int, num_workers: int = 0) -> DataLoader:
    """Batches from stream position `position` (samples consumed by all processes) on, for process `rank`.
    `data` is a TrainData or a cache (train/data/cache.py) with the same surface."""
    workers = dict(num_workers=num_workers, persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)
    if getattr(data, "streaming", False):
        return DataLoader(ShardStream(data, batch_size, position, world, rank), batch_size=None, **workers)
    if data.assignment is not None:
        sampler = BucketSampler(data.assignment, data.seed, batch_size, position, world, rank)
        if rank == 0:
            print(data.buckets.report(data.assignment, batch_size), file=sys.stderr)
    else:
        sampler = OrderSampler(len(data), data.seed, batch_size, position, world, rank)
    return DataLoader(data, batch_sampler=sampler, collate_fn=data.collate, **workers)
