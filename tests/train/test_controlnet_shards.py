"""stage=controlnet on WebDataset shards (train/data/shards.py): a sample's `KEY.control.png` member is its hint;
`gen data pack` carries a folder's control images into the shards; a run on one-sample shards packed from a folder
equals the run on that folder bitwise (the shard order is then the folder's item order, and the crops and flips are
drawn from the same positions); resume inside a shard is exact; a sample without its hint, or with one that does not
decode, is a one-line error naming the shard and the key."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from gen.errors import GenError
from tests.train.conftest import losses
from tests.train.test_controlnet_train import RECIPE, SIZE, settings, step_tensors
from train.config import load_config
from train.data import TrainData, loader
from train.data.shapes import write_folder
from train.data.shards import Shards, pack
from train.loop import train


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Six scenes with their masks as hints (metadata.jsonl's column), packed by the CLI one sample a shard, and
    by pack() four a shard."""
    root = tmp_path_factory.mktemp("cn-shards")
    src = write_folder(root / "src", 6, size=SIZE, control=True)
    r = subprocess.run([sys.executable, "-m", "gen", "data", "pack", str(src), str(root / "one"), "--shard-size", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pack(src, root / "four", shard_size=4, progress=False)
    return root


def members(shard) -> dict:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_pack_carries_each_control_image_unchanged(packed):
    rows = [json.loads(line) for line in (packed / "src" / "metadata.jsonl").read_text().splitlines()]
    got = {**members(packed / "four" / "shard-000000.tar"), **members(packed / "four" / "shard-000001.tar")}
    assert len(got) == 3 * len(rows)  # image, caption, hint
    for i, row in enumerate(rows):
        assert got[f"{i:09d}.control.png"] == (packed / "src" / row["control"]).read_bytes()
        assert got[f"{i:09d}.png"] == (packed / "src" / row["file_name"]).read_bytes()


def run(base, data, out, **more):
    more = dict(data__crop="random", data__flip=True, train__max_steps=2) | more
    return load_config(RECIPE, extra=settings(base, data, out, **more))


def test_controlnet_on_shards_trains_exactly_like_its_folder(sd_folder, packed, tmp_path):
    train(run(sd_folder, packed / "src", tmp_path / "folder"))
    train(run(sd_folder, packed / "one", tmp_path / "shards", data__source="shards"))
    for part in ("model", "optimizer"):
        a, b = step_tensors(tmp_path / "folder", 2, part), step_tensors(tmp_path / "shards", 2, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert losses(tmp_path / "folder") == losses(tmp_path / "shards")
    assert len(set(losses(tmp_path / "folder"))) > 1


def test_controlnet_resume_inside_a_shard_is_exact(sd_folder, packed, tmp_path):
    kw = dict(data__source="shards")
    train(run(sd_folder, packed / "four", tmp_path / "straight", **kw))
    # stopped at step 1 = position 2: half of the first shard read
    train(run(sd_folder, packed / "four", tmp_path / "split", **kw, train__max_steps=1, train__checkpoint_every=1))
    train(run(sd_folder, packed / "four", tmp_path / "split", **kw))
    for part in ("model", "optimizer"):
        a, b = step_tensors(tmp_path / "straight", 2, part), step_tensors(tmp_path / "split", 2, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def write_shard(path, samples: dict) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def data_config(path):
    return load_config(None, extra={"data.source": "shards", "data.path": str(path), "data.resolution": 32,
                                    "data.crop": "random", "data.flip": True, "model.base": "x"},
                       check_paths=False).data


def test_the_hint_is_cropped_and_flipped_with_its_image(tmp_path):
    """A hint that is a copy of its image (a .webp one at half size: resized to the image first) comes out as the
    same view, whatever the crop and flip drew."""
    rng = np.random.default_rng(0)
    samples = {}
    for i in range(3):
        a = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        samples |= {f"s{i}.png": png(a), f"s{i}.txt": b"noise", f"s{i}.control.png": png(a)}
    write_shard(tmp_path / "a.tar", samples)
    data = TrainData(data_config(tmp_path / "a.tar"), 0, control=True)
    views = set()
    for _, batch in zip(range(4), loader(data, 3, 0, 1, 0)):
        assert torch.allclose(batch["control"] * 2 - 1, batch["pixel_values"], atol=1e-6)
        views |= {tuple(v) for v in batch["crop_top_left"].tolist()}
    assert len(views) > 1
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8), 2, 0), 2, 1)
    buf = io.BytesIO()
    Image.fromarray(smooth[::2, ::2]).save(buf, format="WEBP", lossless=True)
    write_shard(tmp_path / "b.tar", {"k.png": png(smooth), "k.control.webp": buf.getvalue()})
    batch = next(iter(loader(TrainData(data_config(tmp_path / "b.tar"), 0, control=True), 1, 0, 1, 0)))
    assert batch["control"].shape == batch["pixel_values"].shape


def test_a_sample_without_its_hint_is_a_one_line_error(sd_folder, tmp_path):
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    write_shard(tmp_path / "s.tar", {"good.png": png(a), "good.control.png": png(a), "bad.png": png(a),
                                     "bad.txt": b"x"})
    with pytest.raises(GenError, match=r"the sample bad of shard .*s\.tar has no control image"):
        TrainData(data_config(tmp_path / "s.tar"), 0, control=True)
    assert len(Shards(str(tmp_path / "s.tar"))) == 2  # other stages read those shards as they are
    r = subprocess.run([sys.executable, "-m", "gen", "train", RECIPE, f"model.base={sd_folder}", "data.source=shards",
                        f"data.path={tmp_path / 's.tar'}", f"train.output_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "the sample bad of shard" in r.stderr.strip().splitlines()[-1]
    write_shard(tmp_path / "t.tar", {"k.png": png(a), "k.control.png": b"not a png"})
    with pytest.raises(GenError, match=r"control image of the sample .*t\.tar:k is not a readable image"):
        next(iter(loader(TrainData(data_config(tmp_path / "t.tar"), 0, control=True), 1, 0, 1, 0)))
