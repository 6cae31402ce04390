"""Lone ControlNet files in diffusers' key layout (gen/control/keyed.py): a Flux ControlNet's
diffusion_pytorch_model.safetensors shared without its config (InstantX's and Shakker-Labs' way, union models
included) loads as the folder does, config read from the shapes; XLabs' layout, files that are no ControlNet and
a file for another family are one-line errors."""

import inspect
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetModel
from safetensors.torch import save_file

from gen.cli import main
from gen.control import Control
from gen.control.files import load_file
from gen.errors import GenError
from tests import test_controlnet
from tests.conftest import quiet_pipeline, tiny_sdxl_components
from tests.test_controlnet import randomized
from tests.test_controlnet_union import flux_base, tiny_flux_union, tiny_sdxl_union

hint_images = test_controlnet.hint_images  # the fixture: two random 32 px hints


def lone(net, folder, name):
    """The file InstantX shares: save_pretrained's weights, renamed, without config.json."""
    net.save_pretrained(folder / name)
    shutil.copy(folder / name / "diffusion_pytorch_model.safetensors", folder / f"{name}.safetensors")
    return folder / f"{name}.safetensors"


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    tmp, comp = flux_base(tmp_path_factory, "cn-files")
    torch.manual_seed(21)
    plain = randomized(FluxControlNetModel.from_transformer(comp["transformer"], num_layers=1, num_single_layers=1,
                                                            attention_head_dim=16, num_attention_heads=2), 22)
    union = randomized(tiny_flux_union(comp["transformer"]), 23)
    return tmp, quiet_pipeline(tmp / "flux"), {"plain": plain, "union": union}


@pytest.mark.parametrize("which", ["plain", "union"])
def test_a_lone_flux_controlnet_file_loads_as_its_folder(flux_files, hint_images, which):
    tmp, pipe, nets = flux_files
    net = nets[which]
    path = lone(net, tmp, which)
    back = load_file(path, base=pipe.denoiser)
    assert type(back) is FluxControlNetModel
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in net.config.items() if not k.startswith("_")}
    assert back.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    mode = "depth" if which == "union" else None
    images = [pipe("a red circle", control=[Control(m, hint_images[0], 0.8, 0.0, 0.7, mode=mode)],
                   num_inference_steps=2, seed=3, height=16, width=16, output_type="np").images for m in (net, path)]
    assert np.array_equal(*images)


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    from diffusers import ControlNetModel

    comp = tiny_sdxl_components()
    torch.manual_seed(24)
    plain = randomized(ControlNetModel.from_unet(comp["unet"], conditioning_embedding_out_channels=(8, 16)), 25)
    return tmp_path_factory.mktemp("cn-files-xl"), comp["unet"], {"plain": plain,
                                                                 "union": randomized(tiny_sdxl_union(comp["unet"]), 26)}


def init_config(net) -> dict:
    takes = inspect.signature(type(net).__init__).parameters
    return {k: list(v) if isinstance(v, tuple) else v for k, v in net.config.items() if k in takes}


@pytest.mark.parametrize("which", ["plain", "union"])
def test_a_lone_sdxl_controlnet_file_loads_as_its_folder_and_in_diffusers(sdxl_files, which):
    tmp, unet, nets = sdxl_files
    net = nets[which]
    path = lone(net, tmp, which)
    back = load_file(path, base=unet)
    assert type(back) is type(net) and init_config(back) == init_config(net)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    if which == "union":  # diffusers' from_single_file reads no ControlNetUnionModel
        return
    theirs = type(net).from_single_file(str(path), config=str(tmp / which))  # diffusers reads the file alike
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in back.state_dict().items())


def test_an_sdxl_controlnet_in_the_original_layout_reads_back(sdxl_files, tmp_path):
    from gen.control.files import to_original

    net = sdxl_files[2]["plain"]
    to_original(net, tmp_path / "control_sdxl.safetensors")  # checks the read-back itself
    back = load_file(tmp_path / "control_sdxl.safetensors")
    assert init_config(back) == init_config(net) and back.config.addition_embed_type == "text_time"
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())


def test_lone_files_that_gen_cannot_run_are_one_line_errors(flux_files, hint_images, tmp_path, capsys):
    tmp, pipe, nets = flux_files
    xlabs = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "controlnet_blocks.0.weight": torch.zeros(2, 2),
             "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}
    save_file(xlabs, tmp_path / "flux-canny-controlnet-v3.safetensors")
    with pytest.raises(GenError, match="is an XLabs Flux ControlNet .* which gen does not run yet"):
        load_file(tmp_path / "flux-canny-controlnet-v3.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(GenError, match="is not a ControlNet in the original .* layout"):
        load_file(tmp_path / "vae.safetensors")
    state = {k: v for k, v in nets["plain"].state_dict().items() if not k.startswith("context_embedder")}
    save_file(state, tmp_path / "cut.safetensors")
    with pytest.raises(GenError, match=r"is not a FluxControlNetModel gen can read: it lacks 'context_embedder"):
        load_file(tmp_path / "cut.safetensors", base=pipe.denoiser)
    # a Flux file for an SD-1.x model, through the command line: one line, exit 2
    path = lone(nets["plain"], tmp, "for-sd")
    sd = tmp_path / "sd"
    from diffusers import StableDiffusionPipeline

    from tests.conftest import tiny_sd_components

    StableDiffusionPipeline(**tiny_sd_components(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(sd)
    hint_images[0].save(tmp_path / "hint.png")
    capsys.readouterr()  # the saves' progress bars
    assert main(["sample", "x", "--model", str(sd), "--steps", "1", "--height", "32", "--width", "32",
                 "--control", f"{path}:{tmp_path / 'hint.png'}", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "is a FluxControlNetModel, for another model family" in err and len(err.strip().splitlines()) == 1, err
