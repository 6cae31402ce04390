"""Bad training data: corrupt, empty, non-image, decompression-bomb and binary-caption files are skipped or
defaulted with one warning each; an image that fails only when decoded mid-run is replaced by the next one,
the same way every time, so the run finishes and resumes exactly."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gen.errors import GenError
from tests.train.conftest import checkpoint_tensors, fast_config
from train.data.folder import ImageFolder
from train.loop import train

BAD_FILES = ["corrupt.png", "empty.png", "bomb.png", "text.jpg", "README.md", "half.png"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def image_bytes(seed: int, fmt: str) -> bytes:
    pixels = (np.random.default_rng(seed).random((16, 16, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(6):
        (root / f"good{i}.png").write_bytes(image_bytes(i, "PNG"))
        (root / f"good{i}.txt").write_text(f"a picture number {i}")
    (root / "good5.txt").write_bytes(b"\xff\xfe\x00\x89PNG binary \x80\x81")  # a caption that is not text
    (root / "nocaption.png").write_bytes(image_bytes(7, "PNG"))  # no .txt
    (root / "late.jpg").write_bytes(image_bytes(8, "JPEG")[:-60])  # passes verify(), fails to decode
    (root / "late.txt").write_text("truncated jpeg")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "empty.png").write_bytes(b"")
    (root / "bomb.png").write_bytes(png_header(100_000, 100_000))  # 10^10 pixels > 2 x MAX_IMAGE_PIXELS
    (root / "text.jpg").write_text("this is not a jpeg")
    (root / "README.md").write_text("a non-image file")
    (root / "half.png").write_bytes(image_bytes(9, "PNG")[:300])
    return root


def test_each_bad_file_is_skipped_or_defaulted_with_one_warning(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="gen"):
        data = ImageFolder(folder)
        items = [data[i] for i in range(len(data))]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4, warnings  # skipped files; binary caption; missing caption; the late decode failure
    skipped = next(w for w in warnings if w.startswith("skipped"))
    assert all(name in skipped for name in BAD_FILES) and "skipped 6 " in skipped
    assert any("not UTF-8" in w and "good5.txt" in w for w in warnings)
    assert any("no caption" in w for w in warnings)
    assert any("cannot decode" in w and "late.jpg" in w for w in warnings)
    names = [p.name for p, _ in data.items]
    assert names == [f"good{i}.png" for i in range(6)] + ["late.jpg", "nocaption.png"]
    captions = dict((p.name, t) for p, t in data.items)
    assert captions["good5.png"] == "" and captions["nocaption.png"] == ""
    late = names.index("late.jpg")
    assert items[late][1] == "" and np.array_equal(np.asarray(items[late][0]), np.asarray(items[late + 1][0]))
    assert all(img.size == (16, 16) for img, _ in items)


def test_a_run_on_bad_data_finishes_and_resumes_exactly(base_dit, folder, tmp_path):
    """4 steps of 4 = 2 epochs of the 8 usable images, the late-failing one among them."""
    settings = dict(data__source="folder", data__path=str(folder), train__max_steps=4, train__checkpoint_every=0)
    train(fast_config(base_dit, tmp_path / "straight", **settings))
    train(fast_config(base_dit, tmp_path / "split", **settings, train__stop_at_step=2))
    train(fast_config(base_dit, tmp_path / "split", **settings))
    a, b = checkpoint_tensors(tmp_path / "straight", 4), checkpoint_tensors(tmp_path / "split", 4)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "straight" / "model" / "model_index.json").is_file()


def test_no_usable_image_is_an_error_before_training(base_dit, folder, tmp_path):
    for p in folder.glob("good*.png"):
        p.unlink()
    (folder / "nocaption.png").unlink()
    (folder / "late.jpg").write_bytes(b"")
    with pytest.raises(GenError, match="no readable images"):
        train(fast_config(base_dit, tmp_path / "run", data__source="folder", data__path=str(folder)))
    assert not (tmp_path / "run" / "checkpoints").exists()
