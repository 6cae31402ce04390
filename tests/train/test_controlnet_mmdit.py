"""stage=controlnet on the flow families (train/controlnet.py, Family.new_controlnet): on a tiny SD3 and a tiny Flux
folder, `gen train configs/controlnet-sd3-flux.yaml` trains a zero-initialised SD3ControlNetModel /
FluxControlNetModel (from_transformer) with the hint as VAE latents; a run stopped at step 2 and resumed ends as one
run straight through (bitwise); the exported folder and lone diffusers-keyed file give, in diffusers'
StableDiffusion3ControlNetPipeline / FluxControlNetPipeline, gen's `--control` images; the file loads in gen and
equals the folder, with the keys ComfyUI's loader recognises; a base that takes no ControlNet and a controlnet.* key
the family lacks are one-line errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import (FluxControlNetModel, FluxControlNetPipeline, FluxPipeline, SD3ControlNetModel,
                       SD3Transformer2DModel, StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline)
from PIL import Image
from safetensors.torch import load_file

from gen.cli import main as gen_main
from gen.control import Control
from gen.control.files import load_file as load_controlnet
from gen.errors import GenError
from tests.conftest import quiet_pipeline, tiny_flux_components, tiny_sd3_components
from train.config import load_config
from train.data.shapes import write_folder
from train.loop import train

SIZE, PROMPT = 16, "a red circle"
RECIPE = "configs/controlnet-sd3-flux.yaml"
NETS = {"sd3": SD3ControlNetModel, "flux": FluxControlNetModel}
LAYERS = {"sd3": {"controlnet.num_layers": 1}, "flux": {"controlnet.num_layers": 1, "controlnet.num_single_layers": 1}}
# ComfyUI's load_controlnet_state_dict (comfy/controlnet.py) sends a file with controlnet_blocks.0.weight and these
# keys to load_controlnet_mmdit (SD3, diffusers' keys; not with SD3.5's adaLN_modulation) and
# load_controlnet_flux_instantx (Flux)
COMFY_KEYS = {"sd3": "pos_embed_input.proj.weight", "flux": "controlnet_x_embedder.weight"}


def settings(base, images, out, family, **more):
    s = {"model.base": str(base), "data.path": str(images), "data.resolution": SIZE, "train.output_dir": str(out),
         "train.batch_size": 2, "train.grad_accum": 1, "train.max_steps": 4, "train.checkpoint_every": 2,
         "train.mixed_precision": "no", "train.gradient_checkpointing": False, "optim.lr": 1e-3,
         "validation.prompts": [PROMPT], "validation.seeds": [0], "validation.every": 0, "sampling.steps": 2,
         "log.every": 1, "log.tracker": "none", "log.progress": False}
    return s | LAYERS[family] | {k.replace("__", "."): v for k, v in more.items()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A two-block SD3 folder (its last block takes no ControlNet residual) whose VAE's posterior is pinned to a
    standard deviation of 3e-7 (diffusers' SD3 ControlNet pipeline draws an unseeded sample of the hint, gen takes
    the mean: tests/test_controlnet.py), and a dev-style Flux folder."""
    root = tmp_path_factory.mktemp("cn-mmdit-bases")
    comp = tiny_sd3_components(t5=False)
    torch.manual_seed(0)
    comp["transformer"] = SD3Transformer2DModel.from_config({**comp["transformer"].config, "num_layers": 2})
    with torch.no_grad():
        comp["vae"].encoder.conv_out.bias[4:] = -100.0
    StableDiffusion3Pipeline(**comp).save_pretrained(root / "sd3")
    FluxPipeline(**tiny_flux_components(root, guidance_embeds=True)).save_pretrained(root / "flux")
    return {"sd3": root / "sd3", "flux": root / "flux"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("cn-mmdit-data") / "shapes", 6, size=SIZE, control=True)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def runs(request, bases, images, tmp_path_factory):
    """A: `gen train` with the shipped recipe straight to step 4. B: 2 steps, then resumed to step 4."""
    family, root = request.param, tmp_path_factory.mktemp(f"cn-{request.param}")
    a = settings(bases[family], images, root / "a", family)
    assert gen_main(["train", RECIPE, *[f"{k}={json.dumps(v)}" for k, v in a.items()]]) == 0
    b = settings(bases[family], images, root / "b", family)
    train(load_config(RECIPE, extra=b | {"train.max_steps": 2}))
    assert train(load_config(RECIPE, extra=b)) == root / "b" / "controlnet"
    return family, root / "a", root / "b"


def step_tensors(run, step, part):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / f"{part}.safetensors"))


def test_a_resumed_run_ends_as_one_straight_run(runs, images):
    family, a, b = runs
    names = {f"controlnet.{k}" for k in NETS[family].from_pretrained(a / "controlnet").state_dict()}
    assert set(step_tensors(b, 2, "model")) == names  # the ControlNet's weights alone, none of the transformer's
    for part in ("model", "optimizer"):
        x, y = step_tensors(a, 4, part), step_tensors(b, 4, part)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), part
    zero = "controlnet.controlnet_blocks.0.weight"  # zero-initialised: training moved it
    assert not torch.equal(step_tensors(a, 2, "model")[zero], step_tensors(a, 4, "model")[zero])
    grid = Image.open(a / "samples" / "step-00000004.png")
    assert grid.size == (2 * SIZE, SIZE)  # one seed, one prompt: the hint, then the image
    hint = np.asarray(Image.open(images / "000000.control.png").convert("RGB"))
    assert np.array_equal(np.asarray(grid)[:, :SIZE], hint)


def test_the_trained_controlnet_gives_gens_images_in_diffusers(runs, bases, images):
    family, a, _ = runs
    folder, file = a / "controlnet", a / "controlnet.safetensors"
    net = NETS[family].from_pretrained(folder)
    hint = Image.open(images / "000003.control.png").convert("RGB")
    run = dict(num_inference_steps=3, guidance_scale=4.0, height=SIZE, width=SIZE, output_type="np")
    if family == "sd3":
        theirs = StableDiffusion3ControlNetPipeline.from_pretrained(bases[family], controlnet=net,
                                                                    text_encoder_3=None, tokenizer_3=None)
    else:
        theirs = FluxControlNetPipeline.from_pretrained(bases[family], controlnet=net)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(PROMPT, control_image=hint, generator=[torch.Generator().manual_seed(5)], **run).images
    ours = quiet_pipeline(bases[family])
    plain = ours(PROMPT, seed=5, **run).images
    diffs = {}
    for name, model in (("folder", folder), ("file", file)):
        got = ours(PROMPT, seed=5, control=[Control(str(model), hint)], **run).images
        diffs[name] = float(np.abs(got - expected).max())
    moved = float(np.abs(expected - plain).max())
    print(f"gen vs diffusers, trained {family} ControlNet: max abs diff {diffs}; from no ControlNet {moved:.2e}")
    assert max(diffs.values()) <= 1e-4
    assert moved > 1e-4  # four steps moved the ControlNet off its zero start


def test_the_lone_file_is_diffusers_keyed_and_loads_in_gen_as_the_folder(runs, bases):
    family, a, _ = runs
    folder = NETS[family].from_pretrained(a / "controlnet").state_dict()
    lone = load_file(a / "controlnet.safetensors")
    assert lone.keys() == folder.keys() and all(torch.equal(lone[k], v) for k, v in folder.items())
    assert {"controlnet_blocks.0.weight", COMFY_KEYS[family]} <= lone.keys()
    assert "transformer_blocks.0.adaLN_modulation.1.bias" not in lone
    base = quiet_pipeline(bases[family]).denoiser
    net = load_controlnet(a / "controlnet.safetensors", base=base)
    assert type(net) is NETS[family]
    back = net.state_dict()
    assert back.keys() == folder.keys() and all(torch.equal(back[k], v) for k, v in folder.items())
    print(f"{family} ControlNet file: {len(lone)} tensors")


def test_a_base_without_controlnets_and_a_key_the_family_lacks_are_one_line_errors(bases, images, dit_folder,
                                                                                    sd_folder, tmp_path, capsys):
    s = settings(dit_folder, images, tmp_path / "dit", "sd3")
    assert gen_main(["train", RECIPE, *[f"{k}={json.dumps(v)}" for k, v in s.items()]]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "takes no ControlNet" in line and "SD3 and Flux" in line
    for base, family, more, key, takes in ((bases["sd3"], "flux", {}, "num_single_layers", "num_layers"),
                                           (bases["flux"], "flux", {"controlnet.hint_channels": [16, 32]},
                                            "hint_channels", "num_layers, controlnet.num_single_layers"),
                                           (sd_folder, "sd3", {}, "num_layers", "hint_channels"),
                                           (bases["sd3"], "sd3", {"controlnet.num_layers": 0}, "num_layers", None),
                                           (bases["sd3"], "sd3", {"controlnet.num_layers": 2}, "num_layers", "")):
        # SD3: a ControlNet copies the transformer's first blocks, never its last (context_pre_only)
        why = f".*take controlnet.{takes}\\)" if takes else "0 blocks" if takes is None else "2 blocks.* at most 1$"
        with pytest.raises(GenError, match=f"'controlnet.{key}': " + why):
            train(load_config(RECIPE, extra=settings(base, images, tmp_path / key, family) | more))


def test_an_sd35_style_lone_file_reads_back_with_its_config(tmp_path):
    """A diffusers folder's weights shared alone, SD3.5-style (qk norm, a dual-attention block, 4 extra hint
    channels): gen.control.keyed reads the config from the shapes (the head width from the qk norm) and the weights."""
    import shutil

    torch.manual_seed(0)
    base = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=80,
                                 pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm",
                                 dual_attention_layers=(0,), pos_embed_max_size=24)
    net = SD3ControlNetModel.from_transformer(base, num_layers=2, num_extra_conditioning_channels=4)
    net.save_pretrained(tmp_path / "folder")
    shutil.copy(tmp_path / "folder" / "diffusion_pytorch_model.safetensors", tmp_path / "lone.safetensors")
    back = load_controlnet(tmp_path / "lone.safetensors")  # no base: every value here is in the shapes
    for key in ("num_layers", "attention_head_dim", "num_attention_heads", "qk_norm", "pos_embed_max_size",
                "extra_conditioning_channels", "joint_attention_dim", "caption_projection_dim"):
        assert back.config[key] == net.config[key], key
    assert list(back.config.dual_attention_layers) == [0]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
