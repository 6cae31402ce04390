"""XLabs' Flux LoRA layout (x-flux: `double_blocks.N.processor.qkv_lora1.down.weight`, ...): every key lands on the
module diffusers' own converter (_convert_xlabs_flux_lora_to_diffusers) names, and the image is diffusers'
FluxPipeline.load_lora_weights image; such a file on another family is a one-line error."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from gen.errors import GenError
from gen.lora import describe
from tests.conftest import quiet_pipeline
from tests.test_flux import our_images, theirs, theirs_images  # noqa: F401 (theirs: a fixture)

RUN = dict(n=1, steps=2)


def xlabs_file(config, path, prefix: str = "", rank: int = 4, seed: int = 0) -> None:
    """Random factors in XLabs' names on every layer x-flux adapts, for a FluxTransformer2DModel of this config."""
    h = config.num_attention_heads * config.attention_head_dim
    g, tensors = torch.Generator().manual_seed(seed), {}
    shapes = {}
    for i in range(config.num_layers):
        p = f"double_blocks.{i}.processor."
        shapes |= {p + "qkv_lora1": (h, 3 * h), p + "proj_lora1": (h, h), p + "qkv_lora2": (h, 3 * h),
                   p + "proj_lora2": (h, h)}
    for i in range(config.num_single_layers):  # proj_lora: on linear2's input, attention + 4h of MLP
        p = f"single_blocks.{i}.processor."
        shapes |= {p + "qkv_lora": (h, 3 * h), p + "proj_lora": (5 * h, h)}
    for name, (cin, cout) in shapes.items():
        tensors[f"{prefix}{name}.down.weight"] = torch.randn(rank, cin, generator=g) / cin ** 0.5
        tensors[f"{prefix}{name}.up.weight"] = torch.randn(cout, rank, generator=g) * 0.5
    save_file(tensors, str(path))


def lora_layers(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_an_xlabs_flux_lora_gives_diffusers_layers_and_image(theirs, flux_folder, tmp_path):
    path = tmp_path / "xlabs.safetensors"
    ours = quiet_pipeline(flux_folder)
    xlabs_file(ours.denoiser.config, path)
    base = our_images(ours, **RUN)
    ours.load_lora(path)
    theirs.load_lora_weights(str(path))
    try:
        want = lora_layers(theirs.transformer)
        assert len(want) == 12  # double block: q, k, v, out, add_q/k/v, add_out; single block: q, k, v, proj_out
        assert lora_layers(ours.denoiser) == want
        a, b = theirs_images(theirs, **RUN), our_images(ours, **RUN)
    finally:
        theirs.unload_lora_weights()
    assert np.abs(b - base).max() > 1e-2  # the LoRA changes the image
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()
    assert "layout: xlabs" in describe(path) and "targets: 6 layers" in describe(path)


def test_xlabs_keys_under_diffusion_model_read_the_same(flux_folder, tmp_path):
    pipe = quiet_pipeline(flux_folder)
    weights = []
    for prefix in ("", "diffusion_model."):
        xlabs_file(pipe.denoiser.config, tmp_path / "x.safetensors", prefix)
        pipe.load_lora(tmp_path / "x.safetensors")
        pipe.fuse_lora()
        weights.append({k: v.clone() for k, v in pipe.denoiser.state_dict().items()})
        pipe.unfuse_lora()
        pipe.unload_lora()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_xlabs_lora_on_an_sd_model_is_a_one_line_error(flux_folder, sd_folder, tmp_path):
    path = tmp_path / "xlabs.safetensors"
    xlabs_file(quiet_pipeline(flux_folder).denoiser.config, path)
    with pytest.raises(GenError, match=r"is a LoRA for Flux, not for this SD-1.x model") as e:
        quiet_pipeline(sd_folder).load_lora(path)
    assert "\n" not in str(e.value)
    args = [sys.executable, "-m", "gen", "sample", "x", "--model", str(sd_folder), "--lora", str(path), "--steps", "1",
            "--height", "16", "--width", "16", "--out", str(tmp_path / "x.png"), "--no-progress"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 2 and "LoRA for Flux" in run.stderr and "Traceback" not in run.stderr
