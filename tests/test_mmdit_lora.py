"""SD3/Flux LoRA files in the original (kohya sd-scripts / ComfyUI) layout: read with every key matched and the
same delta W as diffusers' own converter gives, written with fused qkv as ComfyUI names and applies them."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from gen.errors import GenError
from gen.families.mmdit_keys import flux_links, lora_to_diffusers
from gen.lora import save_lora
from gen.lora_formats import parse
from tests.conftest import quiet_pipeline

# The peer's LoRA targets (diffusers' Flux/SD3 training scripts): attention, feed-forward, Flux single blocks.
TARGETS = (r"(.*\.)?(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out|ff\.net\.0\.proj|ff\.net\.2|"
           r"ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|single_transformer_blocks\.\d+\.proj_out)")


def _kohya_flux(h: int, mlp: int, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya Flux LoRA (sd-scripts networks/lora_flux.py names: fused qkv and linear1), one double and one single
    block of width h, dense random ups (so no part is block-diagonal), alpha 2."""
    g = torch.Generator().manual_seed(seed)
    layers = {"double_blocks_0_img_attn_qkv": (h, 3 * h), "double_blocks_0_txt_attn_qkv": (h, 3 * h),
              "double_blocks_0_img_attn_proj": (h, h), "double_blocks_0_txt_attn_proj": (h, h),
              "double_blocks_0_img_mlp_0": (h, mlp), "double_blocks_0_img_mlp_2": (mlp, h),
              "double_blocks_0_txt_mlp_0": (h, mlp), "double_blocks_0_txt_mlp_2": (mlp, h),
              "double_blocks_0_img_mod_lin": (h, 6 * h), "double_blocks_0_txt_mod_lin": (h, 6 * h),
              "single_blocks_0_linear1": (h, 3 * h + mlp), "single_blocks_0_linear2": (h + mlp, h),
              "single_blocks_0_modulation_lin": (h, 3 * h)}
    out = {}
    for name, (cin, cout) in layers.items():
        out[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, cin, generator=g) / cin ** 0.5
        out[f"lora_unet_{name}.lora_up.weight"] = torch.randn(cout, rank, generator=g)
        out[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    return out


def test_kohya_flux_reads_as_diffusers_converter_does():
    """At Flux.1's real width (diffusers' converter assumes 3072): gen's layers and delta W = diffusers'."""
    h, mlp = 3072, 12288
    sd = _kohya_flux(h, mlp)
    lora = parse(dict(sd))
    ours = lora_to_diffusers(flux_links(dict(num_attention_heads=24, attention_head_dim=128, num_layers=1,
                                             num_single_layers=1)), lora.factors["denoiser"], kohya=True)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    layers = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in theirs if k.endswith("lora_A.weight")}
    assert {n.replace(".", "_") for n in layers} == set(ours) and len(ours) == 20  # 13 file layers: 10 whole, 3 fused ones split 3+3+4
    worst = 0.0
    for n in layers:
        a, b = theirs[f"transformer.{n}.lora_A.weight"], theirs[f"transformer.{n}.lora_B.weight"]
        f = ours[n.replace(".", "_")]
        worst = max(worst, (f.scale * f.up @ f.down - b @ a).abs().max().item())
    assert worst < 1e-5, worst


@pytest.fixture(scope="module")
def flux(flux_folder):
    return _with_adapter(flux_folder)


def _with_adapter(folder):
    """A pipeline whose transformer carries a random adapter on the peer's targets (rank 2, alpha 3)."""
    pipe = quiet_pipeline(folder)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS), pipe.denoiser, "default")
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pipe.denoiser.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    return pipe


def _deltas(model) -> dict[str, torch.Tensor]:
    """{layer: scale * B @ A} of the peft adapter in `model` (the reference the files are checked against)."""
    return {n: m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# ComfyUI's Flux module names (comfy/utils.py flux_to_diffusers, v0.26.1), and its kohya key rule (comfy/lora.py
# model_lora_keys_unet: "lora_unet_" + the state dict key without "diffusion_model." and ".weight", dots as _).
COMFY_DOUBLE = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin")
COMFY_SINGLE = ("linear1", "linear2", "modulation.lin")


def test_a_kohya_flux_file_has_comfyui_names_and_fused_deltas(flux, tmp_path):
    path = save_lora(tmp_path / "k.safetensors", flux.denoiser, {}, "default", format="kohya", family=flux.family)
    sd = load_file(path)
    comfy = {f"lora_unet_double_blocks_0_{m.replace('.', '_')}" for m in COMFY_DOUBLE} | \
        {f"lora_unet_single_blocks_0_{m.replace('.', '_')}" for m in COMFY_SINGLE}
    layers = {k.split(".")[0] for k in sd}
    assert layers <= comfy and len(layers) == 10, sorted(layers)  # all ComfyUI's; mod/modulation not trained
    d, h = _deltas(flux.denoiser), flux.denoiser.config.num_attention_heads * flux.denoiser.config.attention_head_dim

    def fused(name):
        up, down = sd[f"lora_unet_{name}.lora_up.weight"], sd[f"lora_unet_{name}.lora_down.weight"]
        return sd[f"lora_unet_{name}.alpha"].item() / down.shape[0] * up @ down  # what ComfyUI adds to the weight

    b, s = "transformer_blocks.0.attn.", "single_transformer_blocks.0."
    want = {"double_blocks_0_img_attn_qkv": torch.cat([d[b + "to_q"], d[b + "to_k"], d[b + "to_v"]]),
            "double_blocks_0_txt_attn_qkv": torch.cat([d[b + "add_q_proj"], d[b + "add_k_proj"], d[b + "add_v_proj"]]),
            "single_blocks_0_linear1": torch.cat([d[s + "attn.to_q"], d[s + "attn.to_k"], d[s + "attn.to_v"],
                                                  d[s + "proj_mlp"]]),
            "double_blocks_0_img_mlp_2": d["transformer_blocks.0.ff.net.2"],
            "single_blocks_0_linear2": d[s + "proj_out"]}
    assert want["single_blocks_0_linear1"].shape == (7 * h, h)  # ComfyUI's linear1 weight: q, k, v, 4h of mlp
    for name, delta in want.items():
        assert (fused(name) - delta).abs().max() < 1e-5, name
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 6  # rank 3r, block-diagonal


def _fused_weights(folder, path=None) -> dict[str, torch.Tensor]:
    """The transformer's weights with the LoRA file fused in (fused weights stay when the adapter is unloaded)."""
    pipe = quiet_pipeline(folder)
    if path is not None:
        pipe.load_lora(path)  # raises unless every layer of the file matched
        pipe.fuse_lora()
        pipe.unload_lora()
    return pipe.denoiser.state_dict()


def test_kohya_and_comfyui_flux_files_load_in_gen_as_the_diffusers_file(flux, flux_folder, tmp_path):
    kohya = save_lora(tmp_path / "k.safetensors", flux.denoiser, {}, "default", format="kohya", family=flux.family)
    ref = save_lora(tmp_path / "d.safetensors", flux.denoiser, {}, "default", family=flux.family)
    # ComfyUI/others: the same layers dotted under diffusion_model., lora_A/lora_B, with alphas
    comfy = {k.replace("lora_unet_", "diffusion_model.").replace("double_blocks_0_", "double_blocks.0.")
             .replace("single_blocks_0_", "single_blocks.0.").replace("_attn_", "_attn.").replace("_mlp_", "_mlp.")
             .replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in load_file(kohya).items()}
    save_file(comfy, tmp_path / "c.safetensors")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in comfy
    want, base = _fused_weights(flux_folder, ref), _fused_weights(flux_folder)
    assert len([k for k in want if not torch.equal(want[k], base[k])]) == 17  # 12 double-block layers, 5 single-block ones
    for path in (kohya, tmp_path / "c.safetensors"):
        got = _fused_weights(flux_folder, path)
        assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5


def test_a_fused_layer_of_another_width_is_refused(flux_folder, tmp_path):
    sd = _kohya_flux(16, 64)  # the tiny model is 32 wide
    save_file(sd, tmp_path / "wide.safetensors")
    with pytest.raises(GenError, match="rows"):
        quiet_pipeline(flux_folder).load_lora(tmp_path / "wide.safetensors")


def test_sd3_kohya_file_names_mmdit_layers_and_reads_back(sd3_folder, tmp_path):
    """SD3 (sd-scripts lora_sd3.py naming): every layer is ComfyUI's kohya rule over the MMDiT's own weight names
    (those of gen's SD3 single file, which diffusers' converter reads: test_mmdit_file), and it reads back in gen
    to the weights the diffusers-layout file gives."""
    file = tmp_path / "sd3.safetensors"
    quiet_pipeline(sd3_folder).save_pretrained(file, single_file=True)
    mmdit = {"lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
             for k in load_file(file) if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    pipe = _with_adapter(sd3_folder)
    kohya = save_lora(tmp_path / "k.safetensors", pipe.denoiser, {}, "default", format="kohya", family=pipe.family)
    ref = save_lora(tmp_path / "d.safetensors", pipe.denoiser, {}, "default", family=pipe.family)
    layers = {k.split(".")[0] for k in load_file(kohya)}
    assert layers <= mmdit and {"lora_unet_joint_blocks_0_x_block_attn_qkv",
                                "lora_unet_joint_blocks_0_context_block_attn_qkv"} <= layers
    want, got = _fused_weights(sd3_folder, ref), _fused_weights(sd3_folder, kohya)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5


def test_a_flux_clip_lora_is_written_and_read_as_lora_te1(flux_folder, tmp_path):
    """sd-scripts' lora_flux.py names CLIP-L's layers lora_te1_text_model_…; gen writes and reads them."""
    pipe = quiet_pipeline(flux_folder)
    clip = pipe.texts[0].model
    inject_adapter_in_model(LoraConfig(r=2, target_modules=r".*self_attn\.(q_proj|v_proj)"), clip, "default")
    with torch.no_grad():
        for n, p in clip.named_parameters():
            if "lora_B" in n:
                p.normal_()
    kohya = save_lora(tmp_path / "te.safetensors", pipe.denoiser, {"text_encoder": clip}, "default", format="kohya",
                      family=pipe.family)
    names = {k.split(".")[0] for k in load_file(kohya)}
    assert names == {f"lora_te1_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    ours = quiet_pipeline(flux_folder)
    before = {k: v.clone() for k, v in ours.texts[0].model.state_dict().items()}
    ours.load_lora(kohya)  # raises unless every layer matched
    ours.fuse_lora()
    ours.unload_lora()  # the fused weights stay
    after = ours.texts[0].model.state_dict()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert sorted(k.removeprefix("text_model.") for k in changed) == sorted(  # transformers 5: no text_model.
        f"encoder.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj"))
