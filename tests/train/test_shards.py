"""WebDataset shards: `gen data pack` output trains exactly like its folder, resume inside a shard is exact,
processes and workers split the stream deterministically, corrupt samples are skipped, URLs work."""

import io
import logging
import subprocess
import sys
import tarfile

import pytest
import torch

from gen.errors import GenError
from tests.train.conftest import checkpoint_tensors, fast_config, losses
from train.config import load_config
from train.data import TrainData, loader
from train.data.folder import ImageFolder
from train.data.shapes import write_folder
from train.data.shards import Shards, expand_braces, pack
from train.loop import train


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_folder(root / "src", 14, seed=1)
    r = subprocess.run([sys.executable, "-m", "gen", "data", "pack", str(root / "src"), str(root / "one"),
                        "--shard-size", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pack(root / "src", root / "five", shard_size=5, progress=False)
    return root


def data_config(**kv):
    return load_config(None, extra={"model.base": "unused", "data.resolution": 16, **kv}).data


def batches(data, n, position=0, bs=4, world=1, rank=0, workers=0):
    return [b for _, b in zip(range(n), loader(data, bs, position, world, rank, workers))]


def test_pack_writes_the_folder_unchanged(packed):
    assert sorted(p.name for p in (packed / "five").iterdir()) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shards.json"]
    shards, folder = Shards(str(packed / "five")), ImageFolder(packed / "src")
    assert shards.counts == [5, 5, 4]
    got = {i: (data, text) for j in range(3) for i, _, data, text in shards.read(j)}
    assert [got[i] for i in range(14)] == [(p.read_bytes(), t) for p, t in folder.items]  # bytes, not re-encoded
    with pytest.raises(GenError, match="already holds .tar"):
        pack(packed / "src", packed / "five")


def test_shards_train_exactly_like_their_folder(packed, base_dit, tmp_path):
    """One sample per shard: the shard order is then the folder's item order, so runs must be bitwise equal."""
    common = dict(data__resolution=16, train__max_steps=4, train__checkpoint_every=0, data__crop="random",
                  data__flip=True)
    train(fast_config(base_dit, tmp_path / "folder", data__source="folder", data__path=str(packed / "src"), **common))
    train(fast_config(base_dit, tmp_path / "shards", data__source="shards", data__path=str(packed / "one"), **common))
    a, b = checkpoint_tensors(tmp_path / "folder", 4), checkpoint_tensors(tmp_path / "shards", 4)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(tmp_path / "folder") == losses(tmp_path / "shards")


def test_resume_inside_a_shard_is_exact(packed, base_dit, tmp_path):
    kw = dict(data__source="shards", data__path=str(packed / "five"), train__max_steps=4, data__flip=True)
    train(fast_config(base_dit, tmp_path / "straight", **kw))
    # stop at step 2 = position 8: 4 of the 5 samples of the second shard of epoch 0 are consumed
    train(fast_config(base_dit, tmp_path / "split", **kw, train__stop_at_step=2, train__checkpoint_every=0))
    train(fast_config(base_dit, tmp_path / "split", **kw))
    a, b = checkpoint_tensors(tmp_path / "straight", 4), checkpoint_tensors(tmp_path / "split", 4)
    for part in ("model", "ema", "optimizer"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_stream_order_processes_and_workers(packed):
    data = TrainData(data_config(**{"data.source": "shards", "data.path": str(packed / "five")}), seed=0)
    whole = [b["index"].tolist() for b in batches(data, 8)]
    epoch0 = sum(whole, [])[:14]
    assert sorted(epoch0) == list(range(14))  # an epoch reads every sample once
    order = data.source.order(seed=0, epoch=0, world=1, rank=0)
    assert order != [0, 1, 2] and epoch0 == [i for j in order for i in range(5 * j, min(5 * j + 5, 14))]
    assert [b["index"].tolist() for b in batches(data, 5, position=12)] == whole[3:]  # resume mid-shard
    assert [b["index"].tolist() for b in batches(data, 5, position=12, workers=2)] == whole[3:]
    same = batches(data, 2, position=12, workers=2)[1]["pixel_values"]
    assert torch.equal(same, batches(data, 5, position=12)[1]["pixel_values"])  # augmentation is worker-free
    ranks = [[b["index"].tolist() for b in batches(data, 2, bs=2, world=2, rank=r)] for r in (0, 1)]
    for r in (0, 1):  # each process reads its own shards
        assert {i // 5 for b in ranks[r] for i in b} <= set(order[r::2])
    assert [b["index"].tolist() for b in batches(data, 1, position=4, bs=2, world=2, rank=1)] == ranks[1][1:]
    with pytest.raises(GenError, match="3 shard.*4 processes"):
        batches(data, 1, world=4)


def test_a_corrupt_sample_is_skipped_with_one_warning(packed, tmp_path, caplog):
    with tarfile.open(packed / "five" / "shard-000000.tar") as src, tarfile.open(tmp_path / "a.tar", "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "000000002.png":
                data = b"\x89PNG\r\n\x1a\nbroken"
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    data = TrainData(data_config(**{"data.source": "shards", "data.path": str(tmp_path)}), seed=0)
    with caplog.at_level(logging.WARNING, logger="gen"):
        first, again = batches(data, 2, bs=5)  # one shard: the second batch is its next epoch
    assert first["index"].tolist() == again["index"].tolist() == [0, 1, 3, 4]  # one smaller, not replaced
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "a.tar:000000002" in warnings[0]


def test_fsspec_urls_and_brace_patterns(packed):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for p in (packed / "five").iterdir():
        fs.pipe(f"/bucket/shards/{p.name}", p.read_bytes())
    local = TrainData(data_config(**{"data.source": "shards", "data.path": str(packed / "five")}), seed=0)
    remote = TrainData(data_config(**{"data.source": "shards", "data.path": "memory://bucket/shards/"}), seed=0)
    assert remote.source.counts == local.source.counts
    a, b = batches(local, 4), batches(remote, 4)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) and x["text"] == y["text"] for x, y in zip(a, b))
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    braced = Shards(str(packed / "five" / "shard-{000000..000001}.tar"))
    assert braced.counts == [5, 5] and len(braced) == 10
    with pytest.raises(GenError, match="data.path.*no .tar shards"):
        Shards(str(packed / "src"))
