"""SD3 / SD3.5 ControlNet single files (gen/control/sd35.py, gen/control/keyed.py): Stability's SD3.5 large layout
(sd3.5_large_controlnet_{blur,canny,depth}.safetensors), written here from a tiny SD3ControlNetModel by the inverse
renaming restated in this test from ComfyUI's key list (comfy/cldm/dit_embedder.py ControlNetEmbedder: DismantledBlock
`attn.qkv`, `attn.proj`, `mlp.fc1/fc2`, `adaLN_modulation.1`; diffusers-named time/text embedders; `control_type`),
gives through `gen sample --control` the images diffusers' StableDiffusion3ControlNetPipeline gives with the original
net; InstantX's SD3 ControlNets shared as a lone diffusers-keyed file load as their folder; ComfyUI's double_y_emb
variant, which diffusers cannot express, is a one-line refusal."""

import numpy as np
import pytest
import torch
from diffusers import (SD3ControlNetModel, SD3Transformer2DModel, StableDiffusion3ControlNetPipeline,
                       StableDiffusion3Pipeline)
from PIL import Image
from safetensors.torch import load_file as read_tensors, save_file

from gen.cli import main
from gen.control.files import load_file
from gen.errors import GenError
from tests import test_controlnet
from tests.conftest import quiet_pipeline, tiny_sd3_components
from tests.test_controlnet import PROMPTS, matches_diffusers, quiet, randomized

hint_images = test_controlnet.hint_images  # the fixture: two random 32 px hints


def stability_layout(net: SD3ControlNetModel, control_type: int = 1) -> dict:
    """The SD3.5 release's tensors of `net` (Stability's names, as ComfyUI's ControlNetEmbedder holds them)."""
    sd, out = net.state_dict(), {"control_type": torch.tensor(float(control_type))}
    blocks = {"attn.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
              "norm1.linear": "adaLN_modulation.1"}
    for i in range(len(net.transformer_blocks)):
        for leaf in ("weight", "bias"):
            p = f"transformer_blocks.{i}."
            out[f"{p}attn.qkv.{leaf}"] = torch.cat([sd.pop(f"{p}attn.to_{x}.{leaf}") for x in "qkv"])
            for theirs, ours in blocks.items():
                out[f"{p}{ours}.{leaf}"] = sd.pop(f"{p}{theirs}.{leaf}")
    for k in list(sd):
        if k.startswith(("time_text_embed.", "pos_embed_input.", "controlnet_blocks.")):
            out[k] = sd.pop(k)
    assert not sd, f"left unwritten: {sorted(sd)}"  # every weight of the net has its place in the layout
    return {k: v.contiguous() for k, v in out.items()}


def large(comp: dict) -> dict:
    """The tiny SD3's parts with a transformer 128 wide (SD3.5's ControlNets have 64-wide heads and share the base's
    width; a width equal to the pooled text's 64 would read as the double_y_emb variant, as in ComfyUI)."""
    torch.manual_seed(0)
    return comp | {"transformer": SD3Transformer2DModel.from_config(
        {**comp["transformer"].config, "num_layers": 2, "attention_head_dim": 32, "caption_projection_dim": 128})}


def release_file(path, seed: int = 9) -> SD3ControlNetModel:
    """A random SD3.5-large-style ControlNet for large()'s base (self-attention blocks, no text embedder, no patch
    embedding of its own), written to `path` in Stability's layout; returns the net."""
    net = randomized(SD3ControlNetModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=None, pooled_projection_dim=64, pos_embed_max_size=None, pos_embed_type=None,
        use_pos_embed=False, force_zeros_for_pooled_projection=False), seed)
    with torch.no_grad():  # the blocks' modulation is zero-initialised too: random, so that every block counts
        for block in net.transformer_blocks:
            block.norm1.linear.weight.normal_(0, 0.3)
    save_file(stability_layout(net), path)
    return net


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    comp = large(tiny_sd3_components(t5=False))
    with torch.no_grad():  # the posterior pinned: diffusers draws an unseeded sample, gen takes the mean
        comp["vae"].encoder.conv_out.bias[4:] = -100.0
    tmp = tmp_path_factory.mktemp("cn-sd35")
    StableDiffusion3Pipeline(**comp).save_pretrained(tmp / "sd3")
    net = release_file(tmp / "sd3.5_large_controlnet_canny.safetensors")
    theirs = StableDiffusion3ControlNetPipeline.from_pretrained(tmp / "sd3", controlnet=net, text_encoder_3=None,
                                                                tokenizer_3=None)  # (it lends net the pos_embed)
    return tmp, quiet_pipeline(tmp / "sd3"), quiet({"one": theirs})


def test_an_sd35_release_file_gives_diffusers_images(sd35, hint_images):
    tmp, ours, theirs = sd35
    path = tmp / "sd3.5_large_controlnet_canny.safetensors"
    net = load_file(path, base=ours.denoiser)
    assert type(net) is SD3ControlNetModel and net.config.joint_attention_dim is None
    assert (net.config.num_layers, net.config.num_attention_heads, net.config.use_pos_embed) == (2, 2, False)
    got = matches_diffusers("sd35", ours, [path], theirs, hint_images, "one", "control_image", size=16)
    plain = ours(PROMPTS, num_inference_steps=3, guidance_scale=6.0, seed=7, output_type="np", height=16,
                 width=16).images
    assert np.abs(got - plain).max() > 0.01  # the ControlNet changed the image


def test_gen_sample_reads_the_release_file(sd35, hint_images, tmp_path):
    tmp, ours, _ = sd35
    hint_images[0].resize((16, 16)).save(tmp_path / "edges.png")
    args = ["sample", "a red circle", "--model", str(tmp / "sd3"), "--steps", "2", "--seed", "3", "--height", "16",
            "--width", "16", "--control", f"{tmp / 'sd3.5_large_controlnet_canny.safetensors'}:{tmp_path / 'edges.png'}"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args[:-2], "--out", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{x}.png")).astype(int) for x in "ab")
    assert np.abs(a - b).max() > 0  # with and without the ControlNet


def test_the_double_y_emb_variant_is_refused_in_one_line(sd35, tmp_path, capsys):
    tmp, ours, _ = sd35
    state = read_tensors(tmp / "sd3.5_large_controlnet_canny.safetensors")
    state["time_text_embed.text_embedder.linear_1.weight"] = torch.zeros(128, 128)
    save_file(state, tmp_path / "double.safetensors")
    with pytest.raises(GenError, match=r"double_y_emb variant\), which diffusers' SD3ControlNetModel cannot express"):
        load_file(tmp_path / "double.safetensors", base=ours.denoiser)
    Image.new("RGB", (16, 16)).save(tmp_path / "h.png")
    assert main(["sample", "x", "--model", str(tmp / "sd3"), "--steps", "1", "--height", "16", "--width", "16",
                 "--control", f"{tmp_path / 'double.safetensors'}:{tmp_path / 'h.png'}",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "double_y_emb" in err[-1] and "Traceback" not in "\n".join(err)


def test_an_instantx_sd3_controlnet_file_loads_as_its_folder(hint_images, tmp_path):
    """InstantX's SD3 ControlNets (a text embedder, zeros for the pooled text) shared as the folder's weights alone."""
    comp = tiny_sd3_components(t5=False)
    base = SD3Transformer2DModel.from_config({**comp["transformer"].config, "num_layers": 2})
    net = randomized(SD3ControlNetModel.from_transformer(base, num_layers=1, num_extra_conditioning_channels=0), 5)
    net.save_pretrained(tmp_path / "instantx")
    lone = tmp_path / "instantx.safetensors"
    lone.write_bytes((tmp_path / "instantx" / "diffusion_pytorch_model.safetensors").read_bytes())
    back = load_file(lone, base=base)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in net.config.items() if not k.startswith("_")}
    assert back.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
