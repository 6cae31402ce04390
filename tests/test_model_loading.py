"""Loading models: what the Python API prints, the dtype weights load in, the folder hash."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.conftest import quiet_pipeline, tiny_sd_components
from gen import recipe


def test_the_python_api_keeps_bitsandbytes_kernel_message_off_stderr():
    """diffusers imports bitsandbytes where it is installed, whose CPU backend warns that an optional 4-bit kernel
    package is missing; `gen.Pipeline.from_pretrained` (not only the CLI) keeps that off stderr."""
    pytest.importorskip("bitsandbytes")
    code = "import gen; gen.Pipeline.from_pretrained(); print('loaded')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr
    assert "kernels" not in r.stderr, r.stderr


class Float32Allocations(TorchDispatchMode):
    """Counts the fp32 elements every torch op makes on a real device (meta tensors hold no memory)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                self.elements += t.numel()
        return out


def test_a_half_precision_folder_loads_without_an_fp32_copy(tmp_path):
    """An fp16 folder asked for in fp16 is read straight into fp16: no parameter is ever made in fp32 (which
    doubled the peak host memory: fp32 first, then cast)."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "sd-fp16"
    pipe = StableDiffusionPipeline(**tiny_sd_components(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)
    with Float32Allocations() as fp32:
        loaded = quiet_pipeline(folder, dtype="fp16")
    params = sum(p.numel() for m in loaded.models for p in m.parameters())
    assert {p.dtype for m in loaded.models for p in m.parameters()} == {torch.float16}
    assert fp32.elements < params / 100, f"{fp32.elements} fp32 elements made while loading {params} parameters"
    with Float32Allocations() as fp32:  # the same count catches a float32 load (the default on a CPU)
        quiet_pipeline(folder, dtype="fp32")
    assert fp32.elements >= params


def readme_hash_command() -> str:
    """The shell command docs/sampling.md documents for a model folder's hash (MODEL standing for the folder)."""
    text = (Path(__file__).parents[1] / "docs" / "sampling.md").read_text()
    return re.search(r"`\((cd MODEL && find [^`]*)\)`", text).group(1)


def test_a_folder_hash_is_the_readme_commands(tmp_path, monkeypatch):
    """`Model hash` of a folder is what docs/sampling.md's shell command prints: its *.safetensors files only (a stray
    pickle file gen never loads does not count), symbolic links followed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "my model"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet weights")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a stray pickle")
    (folder / "model.ckpt").write_bytes(b"another")
    (tmp_path / "blob").write_bytes(b"vae weights, in a hub cache's blob")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(tmp_path / "blob")
    (folder / "model_index.json").write_text("{}")
    command = readme_hash_command().replace("MODEL", shlex.quote(str(folder)))
    shell = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True).stdout.strip()
    assert recipe.model_hash(folder) == shell
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"changed: still not counted")
    assert recipe.model_hash(folder) == shell
