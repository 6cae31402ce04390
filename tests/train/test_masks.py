"""Masked loss: NAME.mask.png or the alpha channel weights the loss on the latent grid; a zero half gets zero
gradients; masks follow their image's crop and flip; images without masks train as before."""

import numpy as np
import pytest
import torch
from PIL import Image

from gen.errors import GenError
from tests.train.conftest import fast_config
from train.data import TrainData, collate
from train.task import DenoiserTask


def half_mask(size=16) -> Image.Image:
    a = np.full((size, size), 255, np.uint8)
    a[:, : size // 2] = 0  # the left half does not count
    return Image.fromarray(a, "L")


@pytest.fixture()
def folder(tmp_path):
    """a.png with a.mask.png (left half black), b.png with the same mask as its alpha channel, c.png unmasked."""
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(pics[0]).save(tmp_path / "a.png")
    half_mask().save(tmp_path / "a.mask.png")
    Image.fromarray(np.dstack([pics[1], np.asarray(half_mask())])).save(tmp_path / "b.png")
    Image.fromarray(pics[2]).save(tmp_path / "c.png")
    for n in "abc":
        (tmp_path / f"{n}.txt").write_text(f"picture {n}")
    return tmp_path


def config(base, folder, tmp_path, **more):
    return fast_config(base, tmp_path / "run", data__source="folder", data__path=str(folder), **more)


def test_masks_are_read_from_files_and_alpha_and_unmasked_images_weigh_one(base_dit, folder, tmp_path):
    data = TrainData(config(base_dit, folder, tmp_path).data, 0)
    assert len(data) == 3 and data.masked  # a.mask.png is not an image to train on
    rows = {data[i, 0]["text"]: data[i, 0] for i in range(3)}
    want = torch.from_numpy(np.asarray(half_mask(), np.float32) / 255)[None]
    assert torch.equal(rows["picture a"]["mask"], want) and torch.equal(rows["picture b"]["mask"], want)
    assert torch.equal(rows["picture c"]["mask"], torch.ones(1, 16, 16))
    off = TrainData(config(base_dit, folder, tmp_path, data__masked_loss=False).data, 0)
    assert "mask" not in off[0, 0] and "masks" not in off.fingerprint() and "masks" in data.fingerprint()


def test_a_mask_follows_its_images_crop_and_flip(base_dit, tmp_path):
    a = np.zeros((8, 24, 3), np.uint8)  # 8 px tall: crops without resizing (no blurred edge)
    a[:, :9] = (255, 0, 0)  # red exactly where the mask is white
    Image.fromarray(a).save(tmp_path / "x.png")
    Image.fromarray(np.where(a[..., 0] > 0, 255, 0).astype(np.uint8)).save(tmp_path / "x.mask.png")
    data = TrainData(config(base_dit, tmp_path, tmp_path, data__crop="random", data__flip=True,
                            data__resolution=8).data, 0)
    seen = set()
    for pos in range(12):
        row = data[0, pos]
        red = row["pixel_values"][0] > 0.5
        assert torch.equal(red, row["mask"][0] > 0.5)
        seen.add((bool(red[:, 0].any()), bool(red[:, -1].any())))
    assert (True, False) in seen and (False, True) in seen  # both flips drawn


def test_a_zero_half_mask_leaves_that_halfs_gradients_zero(base_dit, folder, tmp_path):
    cfg = config(base_dit, folder, tmp_path, train__cond_dropout=0.0)
    data = TrainData(cfg.data, 0)
    task = DenoiserTask(cfg, torch.device("cpu"))
    grads = []

    def keep(module, args, output):
        output[0].register_hook(grads.append)
    task.model.register_forward_hook(keep)
    batch = collate([data[i, 0] for i in range(3)])  # a, b masked on the left; c not
    task.loss(task.model, batch, torch.Generator().manual_seed(0)).backward()
    (g,) = grads  # (3, C, 8, 8): the latent grid of the 16 px images
    assert g.shape[-1] == 8
    for k, text in enumerate(batch["text"]):
        left, right = g[k, ..., :4], g[k, ..., 4:]
        assert right.abs().min() > 0
        assert (left == 0).all() if text != "picture c" else left.abs().min() > 0
    assert sum(p.grad.abs().sum() for p in task.model.parameters() if p.grad is not None) > 0


def test_a_cache_refuses_masks(base_dit, folder, tmp_path):
    with pytest.raises(GenError, match="data.cache.*loss masks"):
        TrainData(config(base_dit, folder, tmp_path, data__cache=True).data, 0)
    assert not TrainData(config(base_dit, folder, tmp_path, data__cache=True, data__masked_loss=False).data, 0).masked


def test_a_corrupt_mask_leaves_its_image_unmasked_with_a_warning(base_dit, folder, tmp_path, caplog):
    (folder / "a.mask.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    data = TrainData(config(base_dit, folder, tmp_path).data, 0)
    i = [p.name for p, _ in data.source.items].index("a.png")
    with caplog.at_level("WARNING", logger="gen"):
        row = data[i, 0]
    assert row["text"] == "picture a" and row["mask"].eq(1).all()  # its own image, weighing 1 everywhere
    assert "a.mask.png" in caplog.text and "trains unmasked" in caplog.text
