"""Latent and text-embedding caches: the frozen VAE and text encoders run once per image, not once per step.

A cache is a folder `<data.cache_dir>/<key>/` named by a hash of everything its contents depend on: the
VAE's and text encoders' weights and configs, their tokenizers, the model family, the dataset's fingerprint
and its files' sizes and modification times (a stat per file: hashing every byte would read the whole dataset at
each start, while an edited, converted or re-downloaded image gets a new time), the resolution or bucket sizes,
the crop and flip settings, the encoders' dtype and the latent mode. A changed setting gives a new key, so stale
data is never reused; an unchanged one finds `index.json` and reuses it.

Building splits the data into units (runs of items of a folder, or whole shards) dealt round-robin to
the processes under accelerate; each process encodes its units in batches (the same batches whatever
the number of processes) and writes its own safetensors files; the main process then merges their
item lists into `index.json`. Each file records the units it finished, so a build stopped by a signal (or
killed) continues where it was: finished units are kept, a unit in progress is encoded again. Per image it
stores the VAE posterior's mean (and std, for data.cache_latents=sample, so each step draws a fresh latent
exactly as the uncached path does), the mirrored image's too when data.flip is on, the caption's whole
conditioning as the family encodes it (every text encoder's part: CLIP's states and pooled embedding, T5's
states), and the picture's original size and crop top-left (SDXL's size conditioning).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from gen.errors import GenError
from gen.models import vae as vae_lib
from train.data import TrainData, center_sizes, collate, transform
from train.data.shards import decode
from train.lock import hold

log = logging.getLogger("gen")

VERSION = 2
FLUSH_ITEMS = 1024  # items per written file: bounds a process's memory while building


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's config and weights (names, dtypes, shapes, bytes): its identity."""
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers | diffusers
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tokenizer_digest(text) -> str:
    """sha256 of a TextEncoder's tokenizer and token length."""
    tok = text.tokenizer
    if hasattr(tok, "backend_tokenizer"):  # minus the padding/truncation state that a call leaves behind
        state = {k: v for k, v in json.loads(tok.backend_tokenizer.to_str()).items() if k not in ("padding", "truncation")}
        tok_state = json.dumps(state, sort_keys=True)
    else:
        tok_state = json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{tok_state}\0{text.max_length}".encode()).hexdigest()[:16]


def key_parts(data: TrainData, models) -> dict:
    """What a cache's contents depend on; `models`: the frozen encoders (.texts, .vae, .family)."""
    c = data.cfg
    return {"version": VERSION, "data": data.fingerprint(), "files": data.stamp(), "vae": module_digest(models.vae),
            "family": models.family.name, "text_encoders": [module_digest(t.model) for t in models.texts],
            "tokenizers": [tokenizer_digest(t) for t in models.texts],
            "buckets": data.buckets.sizes if data.buckets else None, "crop": c.crop, "flip": c.flip,
            "dtype": str(models.vae.dtype).removeprefix("torch."), "latents": c.cache_latents}


def cache_folder(cfg, parts: dict) -> Path:
    root = Path(cfg.data.cache_dir or Path(cfg.train.output_dir) / "cache")
    return root / hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _units(data: TrainData, unit: int) -> list[tuple[int, object]]:
    """Work units (number of items, iterable factory of (item, name, image or None, caption)): whole shards,
    or runs of `unit` items of a folder."""
    if data.streaming:
        return [(n, lambda j=j: ((i, name, decode(b, name), t or "") for i, name, b, t in data.source.read(j)))
                for j, n in enumerate(data.source.counts)]

    def run(lo):
        for i in range(lo, min(lo + unit, len(data))):
            img, text = data.source[i]
            yield i, str(i), img, text
    return [(min(unit, len(data) - lo), lambda lo=lo: run(lo)) for lo in range(0, len(data), unit)]


class _Writer:
    """Encodes batches of one size and writes this process's files `w{world}-r{rank}-{n}.safetensors`."""

    def __init__(self, folder: Path, data: TrainData, models, rank: int, world: int, bar):
        self.folder, self.data, self.models, self.vae, self.bar = folder, data, models, models.vae, bar
        self.cond: list[str] = []  # the conditioning's keys (stored as <item>.cond.<key>)
        self.prefix, self.n = f"w{world:03d}-r{rank:03d}", 0
        self.tensors, self.rows = {}, []
        self.units: list[int] = []  # units whose rows are all in the buffer
        self.open: int | None = None  # the unit being encoded
        self.mark = 0  # where its rows start in the buffer

    def resume(self) -> set[int]:
        """The units an interrupted build of this process finished (its files are kept); files holding part of an
        unfinished unit, or written before units were recorded, are removed: those units are encoded again."""
        files = sorted(self.folder.glob(f"{self.prefix}-*.safetensors"))
        meta = {}
        for f in files:
            try:
                with safe_open(str(f), "pt") as h:
                    meta[f] = h.metadata() or {}
            except (OSError, ValueError, RuntimeError):  # torn: never renamed into place, but be safe
                meta[f] = {}
        done = {u for m in meta.values() for u in json.loads(m.get("units", "[]"))}
        for f, m in meta.items():
            if "units" not in m or (m.get("open") not in (None, "null") and json.loads(m["open"]) not in done):
                f.unlink()
        for stale in self.folder.glob(f"{self.prefix}-*.tmp"):
            stale.unlink()
        kept = [int(f.stem.rsplit("-", 1)[1]) for f in files if f.exists()]
        self.n = max(kept, default=-1) + 1
        return done

    def start(self, unit: int, size: int) -> None:
        """Before a unit of `size` items: a flush first if the unit would overfill the buffer, so that a file written
        in the middle of a unit holds that unit's rows only."""
        if self.rows and len(self.rows) + size > FLUSH_ITEMS:
            self.flush()
        self.open, self.mark = unit, len(self.rows)

    def finish(self) -> None:
        self.units.append(self.open)
        self.open, self.mark = None, len(self.rows)
        if len(self.rows) >= FLUSH_ITEMS:
            self.flush()

    def drop_open(self) -> None:
        """Forgets the rows of the unfinished unit (a stop): what is flushed then is whole units only."""
        for i, _, _ in self.rows[self.mark:]:
            for k in [k for k in self.tensors if k.startswith(f"{i}.")]:
                del self.tensors[k]
        self.rows, self.open = self.rows[:self.mark], None

    @torch.no_grad()
    def encode(self, batch: list[tuple[int, torch.Tensor, str, dict]]) -> None:
        """batch: (item, pixels (3, H, W), caption, {original_size, crop_top_left, flip.crop_top_left}) rows."""
        items, pixels, captions, sizes = zip(*batch)
        x = torch.stack(pixels).to(self.vae.device, self.vae.dtype)  # (B, 3, H, W)
        views = {"": x, "flip.": x.flip(-1)} if self.data.cfg.flip else {"": x}
        out = {}
        for tag, v in views.items():
            dist = self.vae.encode(v).latent_dist
            out[f"{tag}mean"] = dist.mean
            if self.data.cfg.cache_latents == "sample":
                out[f"{tag}std"] = dist.std
        h, w = x.shape[-2:]
        cond = self.models.family.encode(self.models.texts, list(captions), h, w)
        self.cond = sorted(cond)
        out |= {f"cond.{k}": v for k, v in cond.items()} | {k: torch.stack([s[k] for s in sizes]) for k in sizes[0]}
        for k, i in enumerate(items):
            for name, t in out.items():
                self.tensors[f"{i}.{name}"] = t[k].detach().cpu().clone(memory_format=torch.contiguous_format)
        self.rows += [(i, c, (w, h)) for i, c in zip(items, captions)]
        self.bar.update(len(items))
        if len(self.rows) >= FLUSH_ITEMS:  # a unit larger than the buffer (a big shard): written in parts
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        path = self.folder / f"{self.prefix}-{self.n:05d}.safetensors"
        save_file(self.tensors, str(path.with_suffix(".tmp")),
                  metadata={"rows": json.dumps(self.rows), "cond": json.dumps(self.cond),
                            "units": json.dumps(self.units), "open": json.dumps(self.open)})
        path.with_suffix(".tmp").replace(path)
        self.tensors, self.rows, self.units, self.mark, self.n = {}, [], [], 0, self.n + 1


def build(cfg, data: TrainData, models, rank: int = 0, world: int = 1, wait=lambda: None,
          progress: bool = True, stop=lambda: None) -> tuple[Path, bool]:
    """Builds (or finds) the cache of `data`; returns (its folder, whether it was built now). `models`: the
    frozen encoders and the family that says how captions are encoded, as a Pipeline or a DenoiserTask holds
    them (.texts, .vae, .family). Every process calls this; `wait` is a barrier (accelerate's wait_for_everyone).
    `stop()` returns a signal number once the build should stop (train/signals.py's Guard): the finished units are
    written, Stopped is raised, and the next build of the same cache continues from them."""
    c = data.cfg
    if c.crop == "random":
        raise GenError("config key 'data.crop': a cache holds one crop per image; use data.crop=center with "
                       "data.cache=true (flips are cached both ways)")
    folder = cache_folder(cfg, key_parts(data, models))
    if (folder / "index.json").is_file():  # nobody writes index.json before the barrier below
        wait()
        if rank == 0:
            log.info("reusing the latent/text cache %s", folder)
        return folder, False
    with hold(folder, "the cache folder") if rank == 0 else contextlib.nullcontext():  # one build at a time
        wait()  # the other processes write once process 0 holds the lock
        _write(folder, cfg, data, models, rank, world, wait, progress, stop)
    return folder, True


def _write(folder: Path, cfg, data: TrainData, models, rank: int, world: int, wait, progress: bool, stop) -> None:
    """Every process encodes its units (skipping those an interrupted build finished); process 0 then merges
    their item lists into index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    units = list(enumerate(_units(data, 4 * cfg.train.batch_size)))[rank::world]
    bar = tqdm(total=sum(n for _, (n, _) in units), desc=f"cache (process {rank} of {world})" if world > 1 else "cache",
               unit="img", disable=not (progress and rank == 0), dynamic_ncols=True)
    writer = _Writer(folder, data, models, rank, world, bar)
    done = writer.resume()
    if done and rank == 0:
        log.info("continuing the interrupted cache build in %s", folder)
    for u, (n, unit) in units:
        if u in done:
            bar.update(n)
            continue
        writer.start(u, n)
        pending: dict[tuple[int, int], list] = {}  # one batch per size; flushed at the unit's end
        for i, name, img, caption in unit():
            if stop():
                writer.drop_open()
                writer.flush()
                bar.close()
                _stopped(folder, stop(), rank)
            if img is None:
                continue  # a corrupt sample (warned by decode): not in the cache
            size = _size(data, i, img)
            pixels = transform(img, size, "center", False, None)
            group = pending.setdefault(size if isinstance(size, tuple) else (size, size), [])
            group.append((i, pixels, caption, center_sizes(img, size)))
            if len(group) == cfg.train.batch_size:
                writer.encode(group)
                group.clear()
        for group in pending.values():
            if group:
                writer.encode(group)
        writer.finish()
    writer.flush()
    bar.close()
    wait()
    if rank == 0:
        files = sorted(folder.glob(f"w{world:03d}-r*-*.safetensors"))
        index = {"key": key_parts(data, models), "files": {}, "cond": []}
        for f in files:
            with safe_open(str(f), "pt") as h:
                index["files"][f.name] = json.loads(h.metadata()["rows"])
                index["cond"] = json.loads(h.metadata()["cond"])
        n = sum(len(v) for v in index["files"].values())
        (folder / "index.tmp").write_text(json.dumps(index))
        (folder / "index.tmp").replace(folder / "index.json")
        for f in folder.glob("w*-r*-*.safetensors"):
            if f not in files:
                f.unlink()  # left by an interrupted build with another number of processes
        print(f"cached latents and text embeddings of {n} images in {folder}", file=sys.stderr)
    wait()


def _stopped(folder: Path, signum: int, rank: int):
    from gen.errors import Stopped
    from train.signals import EXIT_CODES

    name = signal.Signals(signum).name
    raise Stopped(f"stopped the cache build ({name}); its finished part is kept in {folder}: run the same command "
                  "again to continue it" if rank == 0 else "", EXIT_CODES.get(signum, 143))


def _size(data: TrainData, i: int, img) -> int | tuple[int, int]:
    if data.buckets is None:
        return data.cfg.resolution
    if data.assignment is not None:
        return data.size(i)
    return data.buckets.sizes[data.buckets.assign(*img.size)]  # shards: bucketed as they stream by


class CachedData(torch.utils.data.Dataset):
    """The cached dataset, with TrainData's surface: indexed by (k, position), k over the cached items in
    item order; a flip (data.flip) is drawn from the position exactly as `transform` draws it."""

    streaming = False
    collate = staticmethod(collate)

    def __init__(self, folder: Path, data: TrainData):
        self.folder, self.cfg, self.seed, self.data = folder, data.cfg, data.seed, data
        index = json.loads((folder / "index.json").read_text())
        rows = sorted((i, caption, tuple(size), name) for name, rs in index["files"].items()
                      for i, caption, size in rs)
        if not rows:
            raise GenError(f"the cache {folder} holds no images; check data.path")
        self.items, self.captions, self.sizes, self.files = (list(v) for v in zip(*rows))
        self.cond = index["cond"]
        self.buckets = data.buckets
        self.assignment = [self.buckets.sizes.index(s) for s in self.sizes] if self.buckets else None
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        k, pos = key
        i, name = self.items[k], self.files[k]
        if name not in self._open:
            self._open[name] = safe_open(str(self.folder / name), "pt")
        f = self._open[name]
        tag = "flip." if self.cfg.flip and np.random.default_rng([self.seed, pos]).random() < 0.5 else ""
        row = {"latents": f.get_tensor(f"{i}.{tag}mean")}
        if self.cfg.cache_latents == "sample":
            row["latents_std"] = f.get_tensor(f"{i}.{tag}std")
        row |= {f"cond.{c}": f.get_tensor(f"{i}.cond.{c}") for c in self.cond}
        return {**row, "original_size": f.get_tensor(f"{i}.original_size"),
                "crop_top_left": f.get_tensor(f"{i}.{tag}crop_top_left"), "text": self.captions[k], "index": i}

    def fingerprint(self) -> dict:
        return self.data.fingerprint()  # the same data as uncached: a run may resume with the cache on


def latents(vae, batch: dict, g: torch.Generator) -> torch.Tensor:
    """Model-space latents of a cached batch: the stored mean, or mean + std * noise drawn from `g` as
    diffusers' DiagonalGaussianDistribution.sample draws it (so cached and uncached runs match)."""
    z = batch["latents"]
    if "latents_std" in batch:
        z = z + batch["latents_std"] * torch.randn(z.shape, generator=g, dtype=z.dtype)
    return vae_lib.to_latents(vae, z.to(vae.device))


def cached(cfg, data: TrainData, models, acc, stop=lambda: None) -> CachedData:
    """The loop's entry: build or reuse the cache across accelerate's processes, then read it."""
    folder, _ = build(cfg, data, models, acc.process_index, acc.num_processes, acc.wait_for_everyone,
                      progress=cfg.log.progress, stop=stop)
    return CachedData(folder, data)
