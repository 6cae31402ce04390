"""Aspect-ratio buckets: sizes at the pixel budget, batches that never mix aspect ratios beyond a bucket's
range, a deterministic and resumable order, per-bucket counts printed, and a bucketed DiT run."""

import math

import numpy as np
import pytest
from PIL import Image

from gen.errors import GenError
from tests.train.conftest import fast_config, losses
from train.config import load_config
from train.data import TrainData, loader
from train.data.buckets import make_buckets
from train.loop import train


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """40 images of random sizes, aspect ratios from 1:3 to 3:1 (some beyond max_aspect=2)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i in range(40):
        w, h = (int(v) for v in rng.integers(12, 49, size=2))
        h = int(np.clip(h, w / 3, w * 3))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    return root


def bucketed(path, **kv):
    cfg = load_config(None, extra={"model.base": "unused", "data.path": str(path), "data.resolution": 32,
                                   "data.buckets": True, "data.bucket_step": 4, "data.max_aspect": 2.0, **kv})
    return TrainData(cfg.data, seed=cfg.train.seed)


def stream(data, n, position=0, bs=2, world=1, rank=0):
    return [b for _, b in zip(range(n), loader(data, bs, position, world, rank))]


def test_bucket_sizes():
    sizes = make_buckets(64, 8, 2.0)
    assert (64, 64) in sizes and (48, 80) in sizes and (80, 48) in sizes
    for w, h in sizes:
        assert w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 and max(w, h) <= 2 * min(w, h)
        assert w * h > 64 * 64 - 8 * max(w, h)  # no room for another row or column: the budget is used
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    with pytest.raises(GenError, match="data.bucket_step"):
        make_buckets(64, 12, 2.0)


def test_batches_never_mix_aspect_ratios(mixed, capfd, caplog):
    data = bucketed(mixed)
    assert "aspect ratio beyond data.max_aspect" in caplog.text  # the images beyond 2:1 are named by count
    sizes = {i: Image.open(p).size for i, (p, _) in enumerate(data.source.items)}
    batches = stream(data, 30)
    assert "aspect-ratio buckets" in capfd.readouterr().err  # per-bucket counts at start
    for b in batches:
        h, w = b["pixel_values"].shape[-2:]
        bucket = data.buckets.sizes.index((w, h))
        lo, hi = data.buckets.bounds(bucket)
        lo, hi = max(lo, 1 / 2.0), min(hi, 2.0)  # the end buckets take images up to max_aspect
        assert hi / lo < 1.4  # the tolerance: a bucket's span of aspect ratios
        for i in b["index"].tolist():
            assert data.assignment[i] == bucket
            iw, ih = sizes[i]
            if max(iw, ih) <= 2.0 * min(iw, ih):  # (images beyond max_aspect go to the end buckets, warned)
                assert lo - 1e-9 <= iw / ih <= hi + 1e-9
    used = {tuple(b["pixel_values"].shape[-2:]) for b in batches}
    assert len(used) >= 3  # the data really spans several buckets


def test_bucket_order_is_deterministic_and_resumable(mixed):
    data = bucketed(mixed)
    whole = [b["index"].tolist() for b in stream(data, 12)]
    assert whole == [b["index"].tolist() for b in stream(bucketed(mixed), 12)]
    assert whole != [b["index"].tolist() for b in stream(TrainData(data.cfg, seed=1), 12)]
    assert [b["index"].tolist() for b in stream(data, 6, position=12)] == whole[6:]
    two = [stream(data, 6, world=2, rank=r) for r in (0, 1)]
    assert [b["index"].tolist() for k in range(6) for b in (two[0][k], two[1][k])] == whole


def test_every_image_trains_every_epoch_even_in_buckets_smaller_than_the_batch(mixed, capfd):
    data = bucketed(mixed)
    counts = np.bincount(data.assignment)
    assert any(0 < c < 8 for c in counts)  # buckets smaller than the batch
    per_epoch = sum(-(-int(c) // 8) for c in counts)
    batches = stream(data, 2 * per_epoch, bs=8)
    assert "batches (the last of" in capfd.readouterr().err
    for epoch in (batches[:per_epoch], batches[per_epoch:]):
        seen = [i for b in epoch for i in b["index"].tolist()]
        assert sorted(seen) == list(range(len(data)))  # each image once per epoch
    assert {len(b["index"]) for b in batches} - {8}  # some batches are partial


def test_a_bucketed_run_trains(mixed, base_dit, tmp_path):
    cfg = fast_config(base_dit, tmp_path, data__source="folder", data__path=str(mixed), data__buckets=True,
                      data__bucket_step=4, train__batch_size=2, train__max_steps=3, train__checkpoint_every=0)
    train(cfg)
    assert len(losses(tmp_path)) == 3 and all(math.isfinite(v) for v in losses(tmp_path))
    assert (tmp_path / "model" / "model_index.json").is_file()
