"""Data: the shapes world as specified, image folders, unreadable files, and the resumable order."""

import json
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest

from gen.errors import GenError
from train.config import load_config
from train.data import OrderSampler, TrainData, transform
from train.data.folder import ImageFolder
from train.data.shapes import (COLORS, HELDOUT_PAIRS, KINDS, RELATIONS, SHAPES, ShapesWorld, relation_of, render,
                               scene, write_folder)


def test_shapes_world_follows_the_spec():
    world = ShapesWorld(300, seed=3)
    kinds, relations = set(), set()
    for i in range(len(world)):
        s = world.scene(i)
        img = np.asarray(render(s))
        assert img.shape == (64, 64, 3) and tuple(img[0, 0]) in {(255, 255, 255)} | set(COLORS.values())
        assert 1 <= len(s.objects) <= 2
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 16 <= x1 - x0 <= 32 and y1 - y0 == x1 - x0 and 0 <= x0 and x1 <= 64 and y1 <= 64
            inside = img[y0:y1, x0:x1].reshape(-1, 3)
            assert (inside == COLORS[o.color]).all(axis=1).sum() > 0.3 * len(inside)  # drawn in its exact RGB
            kinds.add((o.color, o.shape))
            assert f"{'an' if o.color == 'orange' else 'a'} {o.color} {o.shape}" in s.caption
        colors_in_image = {tuple(c) for c in img.reshape(-1, 3)} - {(255, 255, 255)}
        assert colors_in_image == {COLORS[o.color] for o in s.objects}  # no anti-aliasing blends
        if len(s.objects) == 2:
            a, b = (o.box for o in s.objects)
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # never overlap
            if s.relation:
                relations.add(s.relation)
                assert relation_of(*s.objects) == s.relation and f" {s.relation} " in s.caption
    assert len(kinds) == len(COLORS) * len(SHAPES) and relations == set(RELATIONS)
    assert [world.scene(i) for i in range(5)] == [ShapesWorld(300, seed=3).scene(i) for i in range(5)]
    assert world.scene(0) != ShapesWorld(300, seed=4).scene(0)


def test_a_fifth_of_the_pairs_never_share_a_scene_and_every_object_still_pairs_with_others():
    assert len(HELDOUT_PAIRS) == 30 and all(len(p) == 2 and p <= set(KINDS) for p in HELDOUT_PAIRS)
    seen = set()
    for seed in (0, 1):
        world = ShapesWorld(3000, seed=seed)
        for i in range(len(world)):
            objs = world.scene(i).objects
            if len(objs) == 2:
                seen.add(frozenset((o.color, o.shape) for o in objs))
    assert not seen & HELDOUT_PAIRS
    assert len(seen) == 153 - 30  # every other pair is drawn
    assert {k for p in seen for k in p} == set(KINDS)


def test_color_weights_draw_a_color_more_often_and_a_uniform_world_is_unchanged():
    heavy = ShapesWorld(6000, seed=0, color_weights={"purple": 1.5})
    counts = Counter(o.color for i in range(len(heavy)) for o in heavy.scene(i).objects)
    share = {c: n / sum(counts.values()) for c, n in counts.items()}
    others = [share[c] for c in COLORS if c != "purple"]
    assert max(others) - min(others) < 0.02  # the other five equally often
    assert abs(share["purple"] / (sum(others) / 5) - 1.5) < 0.15
    assert heavy.fingerprint()["color_weights"] == {"purple": 1.5}  # a cache of the uniform world is not reused
    uniform = ShapesWorld(50, seed=0)
    assert "color_weights" not in uniform.fingerprint()
    assert [uniform.scene(i) for i in range(50)] == [scene(0, i) for i in range(50)]
    empty = ShapesWorld(50, seed=0, color_weights={})  # no weights: the uniform world, its scenes and fingerprint
    assert empty.fingerprint() == uniform.fingerprint() and [empty.scene(i) for i in range(50)] == [scene(0, i) for i in range(50)]
    for bad in ({"pink": 2.0}, {"red": -1.0}, dict.fromkeys(COLORS, 0.0)):
        with pytest.raises(GenError, match="data.color_weights"):
            ShapesWorld(10, color_weights=bad)
    cfg = load_config("configs/default/dit-polish.yaml", ["data.color_weights.purple=1.5"])
    assert TrainData(cfg.data, 0).fingerprint()["color_weights"] == {"purple": 1.5}


def test_written_folder_reads_back(tmp_path):
    write_folder(tmp_path, 5, seed=1)
    rows = [json.loads(r) for r in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["objects"][0]["box"] and rows[0]["text"] == ShapesWorld(5, 1).scene(0).caption
    folder = ImageFolder(tmp_path)
    img, text = folder[2]
    assert text == rows[2]["text"] and np.array_equal(np.asarray(img), np.asarray(ShapesWorld(5, 1)[2][0]))


def test_sidecars_and_a_corrupt_file_warned_once(tmp_path, caplog):
    write_folder(tmp_path / "src", 3)
    for i in range(3):
        (tmp_path / "src" / f"{i:06d}.png").rename(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.jpg").write_text("hello")
    (tmp_path / "src" / "metadata.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="gen"):
        folder = ImageFolder(tmp_path)
    assert [t for _, t in folder.items] == ["caption 0", "caption 1", "caption 2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.png" in warnings[0] and "notes.jpg" in warnings[0]


def test_zero_readable_images_fail_before_training(tmp_path):
    (tmp_path / "a.png").write_text("not an image")
    cfg = load_config(None, ["model.base=/nonexistent/model", f"data.path={tmp_path}",
                             f"train.output_dir={tmp_path / 'run'}"])
    from train.loop import train
    with pytest.raises(GenError, match="no readable images"):
        train(cfg)  # raised before the (nonexistent) model folder is even opened
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_transform_crops_and_flips():
    from PIL import Image
    img = Image.new("RGB", (32, 16), "white")
    img.paste((0, 0, 0), (0, 0, 16, 16))  # left half black
    x = transform(img, 16, "center", False, np.random.default_rng(0))
    assert x.shape == (3, 16, 16) and x[:, :, :8].max() == -1 and x[:, :, 8:].min() == 1
    outs = [transform(img, 16, "random", True, np.random.default_rng(s)) for s in range(30)]
    left_dark = {bool(o[0, 0, 0] < 0) for o in outs}
    dark_cols = {int((o[0, 0] < 0).sum()) for o in outs}
    assert left_dark == {True, False} and len(dark_cols) > 3  # flips happen; crop offsets vary


def test_order_is_a_function_of_position():
    one = OrderSampler(10, seed=0, batch_size=4)
    stream = [p for k in range(6) for p in one.batch(k)]
    assert sorted(i for i, _ in stream[:10]) == list(range(10))  # an epoch is a permutation
    two = [OrderSampler(10, 0, 2, world=2, rank=r) for r in (0, 1)]
    assert [p for k in range(6) for r in (0, 1) for p in two[r].batch(k)] == stream  # 2 processes x 2 == 1 x 4
    resumed = OrderSampler(10, 0, 4, start=8)
    assert [p for k in range(4) for p in resumed.batch(k)] == stream[8:24]
    data = TrainData(load_config(None, ["model.base=m", "data.source=shapes", "data.resolution=16",
                                        "data.crop=random", "data.flip=true"]).data, seed=0)
    assert (data[(3, 17)]["pixel_values"] == data[(3, 17)]["pixel_values"]).all()


def test_data_wait_is_logged_and_sees_a_slow_loader(base_dit, tmp_path, caplog):
    """metrics.jsonl's data_wait: the fraction of each log window spent blocked on the next batch. The 16 px
    shapes world keeps up with a tiny DiT; a folder of 2400 px JPEGs (decoded and resized per item on the main
    process) does not, and the loop says which knob to turn."""
    from PIL import Image

    from tests.train.conftest import fast_config
    from train.loop import train

    def data_wait(run):  # per logged window of 2 steps x batch 4
        return [json.loads(r)["data_wait"] for r in (run / "metrics.jsonl").read_text().splitlines()]

    kw = dict(train__max_steps=4, train__checkpoint_every=0, log__every=2)
    with caplog.at_level(logging.WARNING, logger="gen"):
        train(fast_config(base_dit, tmp_path / "plain", **kw))
    plain = data_wait(tmp_path / "plain")
    assert len(plain) == 2 and all(0 <= w < 0.25 for w in plain), plain
    assert "waited for data" not in caplog.text
    big = tmp_path / "big"
    big.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (2400, 2400, 3), dtype=np.uint8)).save(big / f"{i}.jpg", quality=95)
        (big / f"{i}.txt").write_text("a red circle")
    with caplog.at_level(logging.WARNING, logger="gen"):
        train(fast_config(base_dit, tmp_path / "slow", data__source="folder", data__path=str(big), **kw))
    slowed = data_wait(tmp_path / "slow")
    assert len(slowed) == 2 and all(0.25 < w <= 1 for w in slowed), slowed
    assert "raise data.num_workers (now 0) or use data.cache" in caplog.text


def test_exif_orientation_is_applied_to_images_masks_bucket_sizes_and_shards(tmp_path):
    """A phone photo: landscape pixels with Orientation 6 (turn 90 degrees clockwise to view), its mask too."""
    from PIL import Image

    from train.data.shards import decode, pack

    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)  # (H, W): as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "a.png", exif=exif)
    mask = np.zeros((16, 32), np.uint8)
    mask[:, :8] = 255  # the stored left edge: the top once turned
    Image.fromarray(mask).save(root / "a.mask.png", exif=exif)
    (root / "a.txt").write_text("a photo")
    upright = np.rot90(stored, k=-1)  # clockwise: (32, 16)
    img, _, m, _ = ImageFolder(root).load(0, mask=True)
    assert np.array_equal(np.asarray(img), upright)
    assert np.array_equal(np.asarray(m), np.rot90(mask, k=-1))
    cfg = load_config(None, extra={"model.base": "unused", "data.path": str(root), "data.resolution": 16,
                                   "data.buckets": True, "data.bucket_step": 4})
    data = TrainData(cfg.data, 0)
    w, h = data.size(0)
    assert h > w  # a portrait bucket
    pack(root, tmp_path / "shards", progress=False)
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        png = tar.extractfile("000000000.png").read()
    assert np.array_equal(np.asarray(decode(png, "a")), upright)


def test_absolute_file_names_in_metadata_are_read_as_hf_imagefolder_reads_them(tmp_path):
    images = write_folder(tmp_path / "elsewhere", 2, seed=1)
    root = tmp_path / "data"
    root.mkdir()
    rows = [json.loads(r) for r in (images / "metadata.jsonl").read_text().splitlines()]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": str(images / r["file_name"]),
                                                             "text": r["text"]}) + "\n" for r in rows))
    cfg = load_config(None, extra={"model.base": "unused", "data.path": str(root), "data.resolution": 16})
    data = TrainData(cfg.data, 0)
    assert len(data) == 2 and data[1, 0]["text"] == rows[1]["text"]
    assert data.fingerprint()["num_images"] == 2 and data.stamp()
