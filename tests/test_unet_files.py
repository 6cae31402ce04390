"""SD-1.x/2.x and SDXL UNet-only files, as ComfyUI's models/unet holds them (the LDM UNet keys bare or under
`model.diffusion_model.`; or a diffusers UNet's own weights file): with --vae and --text-encoder files, or with
--base FOLDER, they sample the diffusers folder's image; missing parts are named in one line (CLI and `gen info`);
a UNet GGUF (arch sdxl / sd1) loads the same way."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from gen.errors import GenError
from tests.test_user_files import NEGATIVE, PROMPT, _checkpoint, _folder, _gen, _ours, _theirs, _v4_names
from tests.vendor import diffusers_to_original_sd as sd_script
from tests.vendor import diffusers_to_original_sdxl as sdxl_script

# gen's sdpa attention and diffusers' differ by 6e-4 on the tiny SDXL UNet (tests/test_user_files.py)
TOL = {"sd1": 1e-4, "sd2": 1e-4, "sdxl": 1e-3}


def _unet_file(family: str, folder, dst, layout: str) -> dict:
    """The folder's UNet alone: "bare" / "prefixed" LDM keys (diffusers' writer scripts), or "diffusers" (the
    folder's own unet/diffusion_pytorch_model.safetensors)."""
    state = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    if layout != "diffusers":
        state = (sdxl_script if family == "sdxl" else sd_script).convert_unet_state_dict(state)
        state = {("model.diffusion_model." if layout == "prefixed" else "") + k: v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, dst)
    return state


def _component_files(family: str, folder, towers: dict, tmp_path) -> list:
    """--vae and --text-encoder flags with the files ComfyUI users hold: an LDM-named VAE (SD) or diffusers' own
    (sdxl_vae); clip_l / clip_g in transformers' names; SD-2.x's OpenCLIP-H as cut out of a checkpoint."""
    vae = tmp_path / "vae.safetensors"
    if family == "sdxl":
        shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", vae)
    else:
        save_file({k: v.contiguous() for k, v in sd_script.convert_vae_state_dict(
            load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")).items()}, vae)
    flags = ["--vae", vae]
    if family == "sd2":
        whole = _checkpoint("sd2", folder, towers, tmp_path / "whole.safetensors")
        save_file({k: v for k, v in whole.items() if k.startswith("cond_stage_model.")}, tmp_path / "clip_h.safetensors")
        return flags + ["--text-encoder", tmp_path / "clip_h.safetensors"]
    for enc, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        if enc in towers:
            save_file({k: v.contiguous() for k, v in _v4_names(towers[enc].state_dict()).items()},
                      tmp_path / f"{name}.safetensors")
            flags += ["--text-encoder", tmp_path / f"{name}.safetensors"]
    return flags


def _kw(flags: list) -> dict:
    vae = [f for flag, f in zip(flags[::2], flags[1::2]) if flag == "--vae"]
    return dict(vae=vae[0] if vae else None,
                text_encoders=[f for flag, f in zip(flags[::2], flags[1::2]) if flag == "--text-encoder"])


@pytest.mark.parametrize("family,layout", [("sd1", "bare"), ("sd1", "diffusers"), ("sd2", "prefixed"),
                                           ("sdxl", "bare"), ("sdxl", "diffusers")])
def test_a_unet_file_with_component_files_or_base_samples_the_folders_image(family, layout, tmp_path):
    folder = tmp_path / "folder"
    towers = _folder(family, folder)
    unet = tmp_path / "unet.safetensors"
    _unet_file(family, folder, unet, layout)
    flags = _component_files(family, folder, towers, tmp_path)
    theirs = _theirs(family, folder)
    ours = _ours(unet, family, **_kw(flags))
    diff = np.abs(theirs - ours).max()
    print(f"{family} {layout} component files: max abs diff vs diffusers {diff:.2e}")
    assert theirs.std() > 0.01 and diff <= TOL[family]
    assert np.abs(_ours(unet, family, base=folder) - _ours(folder, family)).max() == 0
    assert np.abs(_ours(unet, family, base=folder, vae=flags[1]) - ours).max() == 0  # a part from each
    info = _gen("info", unet)
    assert info.returncode == 0 and "  vae: not in the file" in info.stdout and "holds only the UNet" in info.stdout


def test_sd2_v_prediction_by_flag_or_from_the_base_folders_scheduler(tmp_path):
    folder = tmp_path / "folder"
    towers = _folder("sd2", folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"prediction_type": "v_prediction"}))
    unet = tmp_path / "unet.safetensors"
    _unet_file("sd2", folder, unet, "bare")
    flags = _component_files("sd2", folder, towers, tmp_path)
    theirs = _theirs("sd2", folder)
    ours = _ours(unet, "sd2", prediction_type="v_prediction", **_kw(flags))
    assert np.abs(theirs - ours).max() <= 1e-4
    assert np.abs(_ours(unet, "sd2", **_kw(flags)) - ours).max() > 0.01  # epsilon unless told
    assert np.abs(_ours(unet, "sd2", base=folder) - ours).max() == 0


def test_a_unet_file_lacking_parts_names_the_files_in_one_line(tmp_path):
    folder = tmp_path / "folder"
    towers = _folder("sdxl", folder)
    unet = tmp_path / "unet.safetensors"
    _unet_file("sdxl", folder, unet, "prefixed")
    flags = _component_files("sdxl", folder, towers, tmp_path)
    run = _gen("sample", PROMPT, "--model", unet, "--out", tmp_path / "o.png")
    want = (f"{unet} holds only the UNet: add --text-encoder clip_l.safetensors --text-encoder clip_g.safetensors "
            "--vae sdxl_vae.safetensors, or --base FOLDER")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr
    assert want in run.stderr and "Traceback" not in run.stderr
    run = _gen("sample", PROMPT, "--model", unet, *flags[:4], "--out", tmp_path / "o.png")  # VAE and clip_l
    assert run.returncode == 2 and "lacks a CLIP-G encoder: add --text-encoder clip_g.safetensors" in run.stderr
    assert not (tmp_path / "o.png").exists()
    run = _gen("sample", PROMPT, "--model", unet, *flags, "--negative-prompt", NEGATIVE, "--seed", 4, "--steps", 3,
               "--guidance", 5.0, "--height", 32, "--width", 32, "--sampler", "euler", "--out", tmp_path / "o.png",
               "--no-progress")  # docs/files.md's command
    assert run.returncode == 0, run.stderr
    png = np.asarray(Image.open(tmp_path / "o.png"), dtype=np.float32) / 255
    assert np.abs(png - _ours(unet, "sdxl", **_kw(flags))[0]).max() <= 1 / 255 + 1e-6
    info = _gen("info", unet)
    assert info.returncode == 0 and "family: SDXL" in info.stdout and f"missing: {want}" in info.stdout
    with pytest.raises(GenError, match="not a diffusers model folder"):
        _ours(unet, "sdxl", base=tmp_path)


def test_a_unet_gguf_loads_with_component_files_or_base(tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q

    from tests.test_quant_gguf import write_gguf

    folder = tmp_path / "folder"
    towers = _folder("sdxl", folder)
    bare = _unet_file("sdxl", folder, tmp_path / "unet.safetensors", "bare")
    back = write_gguf(tmp_path / "unet.gguf", bare, Q.Q8_0, arch="sdxl")
    save_file({k: v.contiguous() for k, v in back.items()}, tmp_path / "dequantized.safetensors")
    flags = _component_files("sdxl", folder, towers, tmp_path)
    ours = _ours(tmp_path / "unet.gguf", "sdxl", **_kw(flags))
    ref = _ours(tmp_path / "dequantized.safetensors", "sdxl", **_kw(flags))
    diff = np.abs(ours - ref).max()
    print(f"sdxl Q8_0 GGUF vs its dequantized weights: max abs diff {diff:.2e}; vs the folder "
          f"{np.abs(ours - _ours(folder, 'sdxl')).max():.2e}")
    assert diff <= 1e-5 and np.abs(ours - _ours(folder, "sdxl")).max() > 0  # quantized, so not the folder's
    assert np.abs(_ours(tmp_path / "unet.gguf", "sdxl", base=folder) - ours).max() == 0
    info = _gen("info", tmp_path / "unet.gguf")
    assert info.returncode == 0 and "family: SDXL" in info.stdout and "holds only the UNet: add --text-encoder clip_l.safetensors" in info.stdout
