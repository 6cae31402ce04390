"""Hostile files: a pickle whose __reduce__ runs a command is refused on every load path, with and without
the allow flag (allowed pickles go through torch's weights_only unpickler), and its canary never appears."""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gen.errors import GenError
from gen.io import load_state_dict
from gen.pipeline import Pipeline
from train.checkpoint import Checkpointer

FORMATS = ("raw", "zip")  # pickle.dumps bytes; torch.save's zip with data.pkl inside
SUFFIXES = (".ckpt", ".bin", ".pt")
HOSTILE = [(f, s) for f in FORMATS for s in SUFFIXES]


class Payload:
    """Unpickling this runs `touch CANARY`."""

    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return os.system, (f"touch '{self.canary}'",)


def write_hostile(path, fmt, canary):
    obj = {"state_dict": {"weight": Payload(canary)}}
    if fmt == "raw":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    return path


@pytest.fixture()
def canary(tmp_path):
    c = tmp_path / "CANARY"
    yield c
    assert not c.exists(), "the hostile pickle ran"


def test_payload_is_live(tmp_path):
    """The payload really runs when unpickled the unsafe way: the other tests could fail."""
    for fmt in FORMATS:
        c = tmp_path / f"canary-{fmt}"
        f = write_hostile(tmp_path / f"h-{fmt}.pt", fmt, c)
        if fmt == "raw":
            pickle.loads(f.read_bytes())
        else:
            torch.load(f, weights_only=False)  # the unsafe call gen never makes (tests/test_lint.py)
        assert c.exists()


def refused(fn, canary, match=None):
    with pytest.raises(GenError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    assert ("refused" in msg or "pickle" in msg) if match is None else match in msg, msg
    assert not canary.exists()


def component_folder(src, tmp_path, part, weights_name, hostile):
    """A copy of model folder `src` whose `part/` holds only `hostile` as `weights_name`."""
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    for f in (dst / part).glob("*.safetensors"):
        f.unlink()
    shutil.copy(hostile, dst / part / weights_name)
    return dst


@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("fmt, suffix", HOSTILE)
def test_every_load_path_refuses(fmt, suffix, allow, sd_folder, dit_pipe, tmp_path, canary):
    hostile = write_hostile(tmp_path / f"hostile{suffix}", fmt, canary)
    refused(lambda: load_state_dict(hostile, allow_pickle=allow), canary)
    refused(lambda: Pipeline.from_pretrained(hostile, allow_pickle=allow), canary,
            match="single file")
    for part, name in (("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
                       ("text_encoder", "pytorch_model.bin")):
        folder = component_folder(sd_folder, tmp_path / part, part, name, hostile)
        refused(lambda: Pipeline.from_pretrained(folder, allow_pickle=allow), canary)
    refused(lambda: dit_pipe.load_lora(hostile, allow_pickle=allow), canary)
    assert not any(".lora_A." in k for k in dit_pipe.denoiser.state_dict())


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_state_refuses(fmt, tmp_path, canary):
    """A checkpoint holds safetensors + JSON only; hostile bytes in its place are refused, pickles beside it
    are never opened."""
    ck = Checkpointer(tmp_path / "ckpt")
    folder = ck.save(1, {"model": {"w": torch.ones(3)}}, {"rng": {"x": torch.zeros(1)}}, {"position": 0})
    for name in ("model.pt", "optimizer.bin", "state.ckpt"):  # decoys a pickle-based trainer would read
        write_hostile(folder / name, fmt, canary)
    shared, _, _ = ck.load(ck.find("auto"))
    assert torch.equal(shared["model"]["w"], torch.ones(3))
    write_hostile(folder / "model.safetensors", fmt, canary)
    refused(lambda: ck.load(ck.find("auto")), canary, match="not a valid safetensors")


def gen_cli(*args):
    return subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_refuses_model_folder_and_lora(sd_folder, dit_folder, tmp_path, canary):
    """Two real subprocesses: a hostile UNet folder without the flag, a hostile LoRA with --allow-pickle."""
    hostile = write_hostile(tmp_path / "hostile.bin", "zip", canary)
    folder = component_folder(sd_folder, tmp_path, "unet", "diffusion_pytorch_model.bin", hostile)
    for args in (["--model", folder], ["--model", dit_folder, "--lora", f"{hostile}:0.5", "--allow-pickle"]):
        r = gen_cli("sample", "x", *args, "--steps", 1, "--out", tmp_path / "out")
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not canary.exists()
    assert not (tmp_path / "out").exists()


def test_plain_pickle_weights_load_when_allowed(sd_folder, tmp_path):
    """The allow flag works for an honest .bin: the same weights as the safetensors it came from."""
    weights = load_file(str(sd_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.save(weights, tmp_path / "w.bin")
    folder = component_folder(sd_folder, tmp_path, "unet", "diffusion_pytorch_model.bin", tmp_path / "w.bin")
    with pytest.raises(GenError, match="pickle-based"):
        Pipeline.from_pretrained(folder)
    pipe = Pipeline.from_pretrained(folder, allow_pickle=True)
    for k, v in pipe.denoiser.state_dict().items():
        assert torch.equal(v, weights[k]), k
    save_file({"a": torch.ones(1)}, tmp_path / "ok.safetensors")
    assert load_state_dict(tmp_path / "ok.safetensors")["a"].item() == 1

