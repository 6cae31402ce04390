"""SD3/3.5 and Flux single files in the original layout: folder -> file -> folder with equal tensors and the same
images, diffusers' own SD3 loader reading gen's file, ComfyUI's Flux names, a transformer-only Flux file completed
from a base folder (CLI), and `gen info`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gen.errors import GenError
from gen.info import describe
from tests.conftest import quiet_pipeline

KW = dict(num_inference_steps=2, seed=3, output_type="np", height=16, width=16)


def _images(pipe) -> np.ndarray:
    return pipe(["a red circle", "a blue square"], **KW).images


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, m in enumerate(pipe.models) for k, v in m.state_dict().items()}


def _gen(*args):
    return subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True)


def test_sd3_folder_to_file_to_folder(sd3_folder, tmp_path):
    _round_trip(sd3_folder, tmp_path)


def test_flux_folder_to_file_to_folder(flux_folder, tmp_path):
    _round_trip(flux_folder, tmp_path)


def _round_trip(folder, tmp_path):
    """folder -> file -> Pipeline -> folder: every tensor equal, the same images, defaults and scheduler."""
    src = quiet_pipeline(folder)
    file = tmp_path / "model.safetensors"
    src.save_pretrained(file, single_file=True)
    tops = {".".join(k.split(".")[:2]) for k in safe_open(str(file), "pt").keys()}
    assert {"model.diffusion_model", "text_encoders.clip_l", "first_stage_model.decoder"} <= tops
    loaded = quiet_pipeline(file)
    assert loaded.family.name == src.family.name and len(loaded.texts) == len(src.texts)
    assert loaded.defaults == src.defaults and loaded.scheduler_config == src.scheduler_config
    a, b = _state(src), _state(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.abs(_images(loaded) - _images(src)).max() <= 1e-5
    loaded.save_pretrained(tmp_path / "again")
    again = quiet_pipeline(tmp_path / "again")
    c = _state(again)
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_diffusers_reads_gen_sd3_file_to_the_same_transformer(sd3_folder, tmp_path):
    from diffusers import SD3Transformer2DModel

    file = tmp_path / "sd3.safetensors"
    pipe = quiet_pipeline(sd3_folder)
    pipe.save_pretrained(file, single_file=True)
    theirs = SD3Transformer2DModel.from_single_file(str(file), config=str(sd3_folder), subfolder="transformer",
                                                    local_files_only=True).state_dict()
    ours = pipe.denoiser.state_dict()
    assert theirs.keys() == ours.keys()
    assert max((theirs[k] - ours[k]).abs().max().item() for k in ours) == 0.0


# BFL's Flux names as ComfyUI maps them (comfy/utils.py flux_to_diffusers, v0.26.1): per double block, per single
# block, and the rest (MAP_BASIC, guidance_in only on dev models).
COMFY_DOUBLE = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mod.lin", "txt_mod.lin",
                "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
COMFY_DOUBLE_NORMS = ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                      "txt_attn.norm.key_norm")
COMFY_SINGLE = ("linear1", "linear2", "modulation.lin")
COMFY_BASIC = ("final_layer.linear", "final_layer.adaLN_modulation.1", "img_in", "txt_in", "time_in.in_layer",
               "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer")


def test_flux_file_has_bfl_names_as_comfyui_maps_them(flux_folder, tmp_path):
    pipe = quiet_pipeline(flux_folder)
    file = tmp_path / "flux.safetensors"
    pipe.save_pretrained(file, single_file=True)
    keys = {k.removeprefix("model.diffusion_model.") for k in load_file(file) if k.startswith("model.diffusion_model.")}
    want = {f"double_blocks.0.{m}.{p}" for m in COMFY_DOUBLE for p in ("weight", "bias")} | \
        {f"double_blocks.0.{m}.scale" for m in COMFY_DOUBLE_NORMS} | \
        {f"single_blocks.0.{m}.{p}" for m in COMFY_SINGLE for p in ("weight", "bias")} | \
        {f"single_blocks.0.norm.{n}.scale" for n in ("query_norm", "key_norm")} | \
        {f"{m}.{p}" for m in COMFY_BASIC for p in ("weight", "bias")}
    if pipe.denoiser.config.guidance_embeds:
        want |= {f"guidance_in.{m}.{p}" for m in ("in_layer", "out_layer") for p in ("weight", "bias")}
    assert keys == want
    h = pipe.denoiser.config.num_attention_heads * pipe.denoiser.config.attention_head_dim
    sd, d = load_file(file), pipe.denoiser.state_dict()
    b = "transformer_blocks.0.attn."
    assert torch.equal(sd["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"],
                       torch.cat([d[b + "to_q.weight"], d[b + "to_k.weight"], d[b + "to_v.weight"]]))
    shift_scale = sd["model.diffusion_model.final_layer.adaLN_modulation.1.weight"]  # BFL: shift first
    assert torch.equal(shift_scale, torch.cat([d["norm_out.linear.weight"][h:], d["norm_out.linear.weight"][:h]]))


def test_a_transformer_only_flux_file_takes_the_rest_from_base(flux_folder, tmp_path):
    """How Flux finetunes are shared: BFL's bare keys alone; --base supplies the rest (CLI, a real subprocess)."""
    whole = tmp_path / "whole.safetensors"
    quiet_pipeline(flux_folder).save_pretrained(whole, single_file=True)
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(whole).items()
            if k.startswith("model.diffusion_model.")}
    save_file(bare, tmp_path / "ft.safetensors")
    with pytest.raises(GenError, match="--base"):
        quiet_pipeline(tmp_path / "ft.safetensors")
    save_file({k: v for k, v in bare.items() if not k.startswith("img_in.")}, tmp_path / "cut.safetensors")
    with pytest.raises(GenError, match="incomplete Flux file: it has no img_in.weight"):
        quiet_pipeline(tmp_path / "cut.safetensors", base=flux_folder)
    assert "not in the file (--base FOLDER)" in describe(tmp_path / "ft.safetensors")
    r = _gen("sample", "a red circle", "--steps", 2, "--seed", 3, "--height", 16, "--width", 16,
             "--model", tmp_path / "ft.safetensors", "--base", flux_folder, "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.int16)
    b = np.asarray(quiet_pipeline(flux_folder)("a red circle", **KW | {"output_type": "pil"}).images[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 1 and a.std() > 1


def test_gen_convert_a_file_without_gen_metadata_to_a_folder(sd3_folder, tmp_path):
    """A file as others write it (no gen metadata: configs from shapes, what they cannot tell and the tokenizers
    from --base) -> `gen convert` -> the same tensors as the folder."""
    file = tmp_path / "sd3.safetensors"
    quiet_pipeline(sd3_folder).save_pretrained(file, single_file=True)
    save_file(load_file(file), file)  # the metadata dropped
    info = describe(file)
    assert "family: SD3" in info and "SD3 MMDiT" in info and "text_encoder_2" in info
    r = _gen("convert", file, tmp_path / "back", "--base", sd3_folder)
    assert r.returncode == 0, r.stderr
    a, b = _state(quiet_pipeline(sd3_folder)), _state(quiet_pipeline(tmp_path / "back"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
