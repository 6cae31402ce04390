"""WebDataset shards: tar files of `KEY.<image ext>` + `KEY.txt` members (+ `KEY.control.png`, the hint, for
stage=controlnet), read as a stream.

Shards live in a local folder, a glob, a brace pattern (`shard-{000000..000099}.tar`) or any fsspec URL
(`s3://bucket/shards/`, needs `pip install fsspec` and the filesystem's package). They are read with
Python's tarfile, one sample at a time, never unpacked to disk.

The stream of process r of W is, epoch after epoch, the shards `perm_e[r::W]` in order, where perm_e
is a permutation of the shard list seeded by seed + e (the same generator the folder order uses), each
shard's samples in tar order. A sample's place in that stream is a pure function of the loop's
position, so a resume skips whole shards (and, inside one, member headers only) and continues exactly.
Sample counts come from the `shards.json` index that `gen data pack` writes, or from one header scan.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import logging
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from gen.errors import GenError
from train.data import controls, exif

log = logging.getLogger("gen")

INDEX = "shards.json"  # {"shardlist": [{"url": NAME, "nsamples": N}, ...]}, as WebDataset's wids index
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
CONTROL_EXTS = ("control.png", "control.jpg", "control.jpeg", "control.webp")  # a sample's hint (stage=controlnet)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise GenError("config key 'data.path': reading shards from a URL needs fsspec: pip install fsspec "
                       "(plus s3fs, gcsfs, ... for the storage)") from None
    return fsspec


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar; `{x,y}` -> x y (WebDataset's shard notation)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        width = len(r.group(1))
        options = [str(i).zfill(width) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def list_shards(path: str) -> list[str]:
    """A folder, glob, brace pattern, single .tar or URL of any of those -> sorted shard paths/URLs."""
    if not path:
        raise GenError("config key 'data.path' is empty: give a folder, glob or URL of .tar shards")
    if "{" in path:
        return expand_braces(path)
    if _is_remote(path):
        fs, root = _fsspec().core.url_to_fs(path)
        pattern = root if any(c in root for c in "*?[") or root.endswith(".tar") else root.rstrip("/") + "/*.tar"
        found = sorted(fs.glob(pattern))
        urls = [fs.unstrip_protocol(p) for p in found]
    else:
        p = Path(path.removeprefix("file://"))
        if p.is_dir():
            urls = [str(q) for q in sorted(p.glob("*.tar"))]
        elif any(c in path for c in "*?["):
            urls = sorted(glob.glob(str(p)))
        else:
            urls = [str(p)] if p.is_file() else []
    if not urls:
        raise GenError(f"config key 'data.path': no .tar shards found at {path}")
    return urls


def open_binary(url: str):
    if _is_remote(url):
        return _fsspec().open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def _split(name: str) -> tuple[str, str]:
    """WebDataset keys: the member path up to the first '.' of its base name; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {ext: member}) for each run of consecutive members sharing a key and holding an image."""
    def key(m):
        return _split(m.name)[0]
    files = (m for m in tar if m.isfile() and not _split(m.name)[0].rsplit("/", 1)[-1].startswith("."))
    for k, group in itertools.groupby(files, key):
        members = {_split(m.name)[1]: m for m in group}
        if any(e in members for e in IMAGE_EXTS):
            yield k, members


def count_samples(url: str) -> int:
    with open_binary(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return sum(1 for _ in samples(tar))


def _read_counts(urls: list[str]) -> list[int]:
    """Sample counts from a shards.json next to the shards, else by scanning member headers (no image decode)."""
    folder = urls[0].rsplit("/", 1)[0]
    index = f"{folder}/{INDEX}"
    try:
        with open_binary(index) as f:
            known = {row["url"].rsplit("/", 1)[-1]: int(row["nsamples"]) for row in json.load(f)["shardlist"]}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    missing = [u for u in urls if u.rsplit("/", 1)[-1] not in known]
    if missing:
        log.info("counting the samples of %d shard(s) (no %s lists them)", len(missing), INDEX)
    counts = []
    for u in urls:
        name = u.rsplit("/", 1)[-1]
        try:
            counts.append(known[name] if name in known else count_samples(u))
        except (OSError, tarfile.TarError) as e:
            raise GenError(f"config key 'data.path': cannot read shard {u}: {e}") from None
    return counts


def _hint_member(url: str, key: str, members: dict) -> tarfile.TarInfo:
    """A sample's control member; a sample without one is an error naming its shard and key."""
    ext = next((e for e in CONTROL_EXTS if e in members), None)
    if ext is None:
        raise GenError(f"stage=controlnet: the sample {key} of shard {url} has no control image (expected a "
                       f"{key}.control.png member beside {key}.<image>); add one to every sample, or leave it out")
    return members[ext]


class Shards:
    """A list of shards and their sample counts; item i is the i-th sample of all shards in list order. With
    `control` (stage=controlnet) every sample must carry a `KEY.control.png` (.jpg, .webp) member: local shards
    are checked now (member headers only), remote ones as they are read."""

    def __init__(self, path: str, control: bool = False):
        self.urls, self.control = list_shards(path), control
        self.counts = _read_counts(self.urls)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        if not self.offsets[-1]:
            raise GenError(f"config key 'data.path': the shards at {path} hold no image samples")
        for url in self.urls if control else ():
            if not _is_remote(url):
                with open_binary(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    for key, members in samples(tar):
                        _hint_member(url, key, members)

    def __len__(self) -> int:
        return self.offsets[-1]

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for u, n in zip(self.urls, self.counts):
            h.update(f"{u.rsplit('/', 1)[-1]}\0{n}\n".encode())
        return {"source": "shards", "num_images": len(self), "num_shards": len(self.urls), "sha256": h.hexdigest()[:16]}

    def stamp(self) -> str:
        """A digest of every shard's size and modification time (a remote store's ETag or mtime where it gives
        one): what a cache of their pixels depends on."""
        h = hashlib.sha256()
        for u in self.urls:
            if _is_remote(u):
                fs, path = _fsspec().core.url_to_fs(u)
                info = fs.info(path)
                stamp = [info.get(k) for k in ("size", "ETag", "etag", "mtime", "LastModified", "md5Hash")]
            else:
                st = Path(u.removeprefix("file://")).stat()
                stamp = [st.st_size, st.st_mtime_ns]
            h.update(f"{u.rsplit('/', 1)[-1]}\0{stamp}\n".encode())
        return h.hexdigest()[:16]

    def order(self, seed: int, epoch: int, world: int, rank: int) -> list[int]:
        """The shards process `rank` reads in `epoch`."""
        perm = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(seed + epoch))
        return perm[rank::world].tolist()

    def read(self, j: int, skip: int = 0, hints: bool = False) -> Iterator[tuple]:
        """(item, key, image bytes or None if unreadable, caption or None) of shard j from its `skip`-th sample;
        with `hints`, the control member's bytes (None if unreadable) after them."""
        url, n = self.urls[j], 0
        try:
            with open_binary(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for key, members in samples(tar):
                    n += 1
                    if n <= skip:
                        continue
                    ext = next(e for e in IMAGE_EXTS if e in members)
                    hint = _hint_member(url, key, members) if hints else None
                    try:
                        data = tar.extractfile(members[ext]).read()
                        text = tar.extractfile(members["txt"]).read().decode("utf-8").strip() if "txt" in members else None
                        control = (tar.extractfile(hint).read(),) if hints else ()
                    except (OSError, tarfile.TarError, UnicodeDecodeError):
                        data, text, control = None, None, (None,) if hints else ()
                    yield self.offsets[j] + n - 1, f"{url}:{key}", data, text, *control
                    tar.members.clear()  # tarfile keeps every header it read; a shard can be large
        except (OSError, tarfile.TarError) as e:
            raise GenError(f"shard {url} cannot be read ({e}); fix or remove it from data.path") from None
        if n != self.counts[j]:
            raise GenError(f"shard {url} holds {n} samples but its index says {self.counts[j]}; the shards "
                           f"changed: rewrite {INDEX} (gen data pack) or delete it to recount")

    def stream(self, seed: int, world: int, rank: int, start: int) -> Iterator[tuple[int, tuple]]:
        """(local index, sample) of process `rank`'s endless stream, from its `start`-th sample on."""
        if len(self.urls) < world:
            raise GenError(f"config key 'data.path': {len(self.urls)} shard(s) for {world} processes; each "
                           f"process reads whole shards, so write at least {world} (gen data pack --shard-size)")
        base = 0
        for epoch in itertools.count():
            for j in self.order(seed, epoch, world, rank):
                n = self.counts[j]
                if base + n > start:
                    skip = max(0, start - base)
                    for k, sample in enumerate(self.read(j, skip, self.control)):
                        yield base + skip + k, sample
                base += n


def decode(data: bytes | None, name: str) -> Image.Image | None:
    """Image bytes -> RGB image; None (with one warning naming the sample) when they do not decode."""
    try:
        if data is None:
            raise OSError("unreadable member")
        with Image.open(io.BytesIO(data)) as im:
            return exif.upright(im).convert("RGB")
    except exif.IMAGE_ERRORS as e:
        if name not in _warned:  # once per sample and process, not every epoch
            _warned.add(name)
            log.warning("skipped a corrupt sample %s (%s)", name, e)
        return None


_warned: set[str] = set()


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches of one process's shard stream from loop position `position` (samples consumed by all
    processes). DataLoader workers take batches round-robin, so the batch order never depends on their
    number; a corrupt sample is dropped from its batch (the batch is one smaller), never replaced."""

    def __init__(self, data, batch_size: int, position: int, world: int, rank: int):
        self.data, self.bs, self.world, self.rank = data, batch_size, world, rank
        self.start = position // world  # every process consumes the same number of samples per step

    def key(self, local: int) -> int:
        """The augmentation seed position of a local sample: where the folder order would put it."""
        return (local // self.bs * self.world + self.rank) * self.bs + local % self.bs

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        source, rows = self.data.source, []
        for local, (item, name, data, text, *control) in source.stream(self.data.seed, self.world, self.rank,
                                                                        self.start):
            k = (local - self.start) // self.bs
            if k % nw == wid:
                img = decode(data, name)
                hint = controls.read(control[0], img.size, f"of the sample {name}") if control and img is not None else None
                if img is not None:
                    rows.append(self.data.example(item, self.key(local), img, text or "", hint=hint))
                if (local - self.start) % self.bs == self.bs - 1:
                    if not rows:
                        raise GenError(f"every sample of a batch was corrupt (last: {name}); check data.path")
                    yield self.data.collate(rows)
                    rows = []


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def pack(src: str | Path, out: str | Path, shard_size: int = 1000, progress: bool = True) -> list[Path]:
    """Writes the images and captions of an image folder, in its order, to out/shard-NNNNNN.tar + shards.json,
    with each image's control image (stage=controlnet's metadata.jsonl column or NAME.control.png) where it has
    one, as `KEY.control.EXT`. Files go in unchanged (no re-encoding), so a shard decodes to exactly the folder's
    pixels."""
    from tqdm.auto import tqdm

    from train.data.folder import ImageFolder

    if shard_size < 1:
        raise GenError(f"--shard-size must be >= 1, not {shard_size}")
    folder, out = ImageFolder(src), Path(out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise GenError(f"{out} already holds .tar files; remove them or give another output folder")
    out.mkdir(parents=True, exist_ok=True)
    written, rows, width, hints = [], [], max(6, len(str(len(folder) // shard_size))), 0
    bar = tqdm(total=len(folder), desc="pack", unit="img", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(folder), shard_size):
        path = out / f"shard-{s // shard_size:0{width}d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        chunk = folder.items[s:s + shard_size]
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for i, (p, text) in enumerate(chunk, start=s):
                key = f"{i:09d}"
                _tar_add(tar, f"{key}{p.suffix.lower()}", p.read_bytes())
                _tar_add(tar, f"{key}.txt", text.encode("utf-8"))
                hint = folder.given.get(p) or controls.control_file(p)
                if hint.is_file() and f"control{hint.suffix.lower()}" in CONTROL_EXTS:
                    _tar_add(tar, f"{key}.control{hint.suffix.lower()}", hint.read_bytes())
                    hints += 1
                bar.update(1)
        tmp.replace(path)
        written.append(path)
        rows.append({"url": path.name, "nsamples": len(chunk)})
    bar.close()
    if hints:
        log.info("packed %d control image(s) with their %d images", hints, len(folder))
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": Path(src).name, "shardlist": rows}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return written


def pack_main(args) -> int:
    """`gen data pack SRC OUT --shard-size N`."""
    written = pack(args.src, args.out, args.shard_size, progress=True)
    print(f"wrote {len(written)} shard(s) to {args.out}", file=sys.stderr)
    return 0
