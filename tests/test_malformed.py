"""Malformed safetensors: every load path gives a one-line GenError, never a crash or a large allocation."""

import json
import shutil
import struct
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

from gen.errors import GenError
from gen.info import describe
from gen.io import load_state_dict, read_metadata
from gen.pipeline import Pipeline


def forge(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def good_bytes(tmp_path) -> bytes:
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "good.safetensors")
    return (tmp_path / "good.safetensors").read_bytes()


def w(dtype="F32", shape=(2, 3), offsets=(0, 24)):
    return {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


CASES = {
    "zero bytes": lambda g: b"",
    "shorter than the length field": lambda g: g[:5],
    "truncated in the header": lambda g: g[:20],
    "truncated in the data": lambda g: g[:-7],
    "header length 2**63": lambda g: forge(w(), bytes(24), length=2 ** 63),
    "header length 1 GiB": lambda g: forge(w(), bytes(24), length=2 ** 30),
    "header not JSON": lambda g: forge(b"\xff\xfe not json at all", bytes(24)),
    "header a JSON list": lambda g: forge([1, 2, 3], bytes(24)),
    "offsets past the end": lambda g: forge(w(offsets=(0, 2 ** 40)), bytes(24)),
    "offsets reversed": lambda g: forge(w(offsets=(24, 0)), bytes(24)),
    "negative offset": lambda g: forge(w(offsets=(-8, 16)), bytes(24)),
    "wrong dtype string": lambda g: forge(w(dtype="F33"), bytes(24)),
    "shape larger than data": lambda g: forge(w(shape=(2 ** 31, 2 ** 31)), bytes(24)),
    "negative dimension": lambda g: forge(w(shape=(-2, -3)), bytes(24)),
    "missing data_offsets": lambda g: forge({"w": {"dtype": "F32", "shape": [1]}}, bytes(4)),
    "a pickle named .safetensors": lambda g: b"\x80\x04\x95" + bytes(64),
}


def one_line_error(fn) -> str:
    with pytest.raises(GenError) as e:
        fn()
    msg = str(e.value)
    assert msg and "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.fixture(scope="module")
def folder(dit_folder, tmp_path_factory):
    dst = tmp_path_factory.mktemp("malformed") / "model"
    shutil.copytree(dit_folder, dst)
    return dst


@pytest.mark.parametrize("case", CASES)
def test_malformed_file_is_one_line_error_on_every_path(case, tmp_path, folder, dit_pipe):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(CASES[case](good_bytes(tmp_path)))
    tracemalloc.start()
    try:
        assert "not a valid safetensors file" in one_line_error(lambda: load_state_dict(bad))
        one_line_error(lambda: read_metadata(bad))
        one_line_error(lambda: describe(bad))  # gen info
        one_line_error(lambda: dit_pipe.load_lora(bad))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2 ** 20, f"{case}: {peak / 2 ** 20:.1f} MiB allocated"  # nothing sized by the forged header
    for part in ("transformer", "vae", "text_encoder"):
        weights = next((folder / part).glob("*.safetensors"))
        original = weights.read_bytes()
        try:
            weights.write_bytes(bad.read_bytes())
            assert str(weights) in one_line_error(lambda: Pipeline.from_pretrained(folder))
        finally:
            weights.write_bytes(original)


def test_the_good_file_loads(tmp_path):
    good = tmp_path / "g.safetensors"
    good.write_bytes(good_bytes(tmp_path))
    assert torch.equal(load_state_dict(good)["w"], torch.arange(6.0).reshape(2, 3))
