"""Flux and SD3.5 as ComfyUI users hold them: a transformer-only file (BFL's / SAI's original layout) and the
clip_l / clip_g / t5xxl / ae files beside it, with no diffusers folder (--base) and no tokenizer: gen's shipped
tokenizers and the family's scheduler fill the rest, and the image is the diffusers folder's. The text-encoder
layouts people share (transformers', OpenCLIP's inside SDXL checkpoints, an fp8 e4m3fn T5), and the one-line
error naming the files a transformer-only file still needs (CLI and `gen info`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from gen.errors import GenError
from gen.models.text import bundled_tokenizer
from gen.pipeline import Pipeline
from tests.conftest import diffusers_pipeline, quiet_pipeline
from tests.test_user_files import _clip, _gen, _v4_names, _vae
from tests.vendor import diffusers_to_original_sd as sd_script
from tests.vendor import diffusers_to_original_sdxl as sdxl_script

PROMPT = "a photo of a cat on a red sofa"
RUN = dict(num_inference_steps=3, height=32, width=32)
E4M3 = getattr(torch, "float8_e4m3fn", None)
# FLUX.1-dev's and FLUX.1-schnell's scheduler/scheduler_config.json, SD3.5's (as published with the models)
FLUX_DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096)
FLUX_SCHNELL = FLUX_DEV | dict(shift=1.0, use_dynamic_shifting=False)
SD35 = dict(shift=3.0)


def _t5(width: int, fp8: bool = False):
    """A tiny T5 v1.1 encoder (gated-gelu, as t5xxl) over T5's 32128-row vocabulary; `fp8`: its matrices rounded to
    e4m3fn, so the folder holds what an fp8 file upcasts to."""
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=32128, d_model=width, d_ff=37, d_kv=16, num_layers=1,
                                    num_heads=width // 16, feed_forward_proj="gated-gelu", pad_token_id=0,
                                    eos_token_id=1))
    if fp8:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(p.to(E4M3).float())
    return model


def _t5_file(model, dst, fp8: bool = False):
    """t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors: transformers' keys, `shared` only (embed_tokens is tied)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file({k: v.to(E4M3) if fp8 and v.dim() >= 2 else v for k, v in state.items()}, dst)


def _ae_file(vae, dst):
    """ae.safetensors: the LDM VAE names, bare, by diffusers' own writer script."""
    save_file({k: v.contiguous() for k, v in sd_script.convert_vae_state_dict(vae.state_dict()).items()}, dst)


def _transformer_file(folder, dst) -> dict:
    """The folder's transformer alone in the original layout (gen's writer: BFL's / SAI's keys, checked against
    diffusers' and ComfyUI's readers in tests/test_mmdit_file.py), the model.diffusion_model. prefix dropped."""
    whole = dst.parent / "whole.tmp.safetensors"
    quiet_pipeline(folder).save_pretrained(whole, single_file=True)
    prefix = "model.diffusion_model."
    bare = {k[len(prefix):]: v for k, v in load_file(whole).items() if k.startswith(prefix)}
    whole.unlink()
    save_file(bare, dst)
    return bare


def _flux(tmp_path, dev: bool, fp8_t5: bool):
    """A tiny FLUX.1 (dev: guidance input) as a diffusers folder, and as the files ComfyUI users hold."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    parts = dict(transformer=FluxTransformer2DModel(  # 128-wide heads: Flux.1's rotary axes (16, 56, 56)
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 56, 56], guidance_embeds=dev),
        vae=_vae(latent=16, scale=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(CLIPTextModel, 32, "quick_gelu"), tokenizer=bundled_tokenizer("clip"),
        text_encoder_2=_t5(32, fp8_t5), tokenizer_2=bundled_tokenizer("t5"),
        scheduler=FlowMatchEulerDiscreteScheduler(**(FLUX_DEV if dev else FLUX_SCHNELL)))
    folder = tmp_path / "folder"
    FluxPipeline(**parts).save_pretrained(folder)
    files = tmp_path / "files"
    files.mkdir()
    name = "flux1-dev.safetensors" if dev else "flux1-schnell.safetensors"
    _transformer_file(folder, files / name)
    save_file(_v4_names(parts["text_encoder"].state_dict()), files / "clip_l.safetensors")
    t5 = "t5xxl_fp8_e4m3fn.safetensors" if fp8_t5 else "t5xxl_fp16.safetensors"
    _t5_file(parts["text_encoder_2"], files / t5, fp8_t5)
    _ae_file(parts["vae"], files / "ae.safetensors")
    return folder, files, name, ["clip_l.safetensors", t5]


@pytest.mark.parametrize("dev,fp8_t5", [(True, False), (False, True)], ids=["dev", "schnell-fp8-t5"])
def test_flux_from_component_files_alone_is_the_folders_image(dev, fp8_t5, tmp_path):
    from diffusers import FluxPipeline

    if fp8_t5 and E4M3 is None:
        pytest.skip("this torch has no float8 dtypes")
    folder, files, name, texts = _flux(tmp_path, dev, fp8_t5)
    guidance = 3.5 if dev else 0.0
    theirs = diffusers_pipeline(FluxPipeline, folder)(PROMPT, generator=torch.Generator().manual_seed(4),
                                                      guidance_scale=guidance, output_type="np", **RUN).images
    pipe = quiet_pipeline(files / name, vae=files / "ae.safetensors", text_encoders=[files / t for t in texts])
    assert pipe.scheduler_config["use_dynamic_shifting"] is dev  # guidance_in present: dev's schedule
    ours = pipe(PROMPT, seed=4, guidance_scale=guidance, output_type="np", **RUN).images
    assert theirs.std() > 0.01 and np.abs(ours - theirs).max() <= 1e-5, np.abs(ours - theirs).max()
    args = [a for t in texts for a in ("--text-encoder", t)]
    run = _gen("sample", PROMPT, "--model", name, *args, "--vae", "ae.safetensors", "--seed", 4, "--steps", 3,
               "--guidance", guidance, "--height", 32, "--width", 32, "--out", tmp_path / "out.png", "--no-progress",
               cwd=files)
    assert run.returncode == 0, run.stderr
    png = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float32) / 255
    assert np.abs(png - theirs[0]).max() <= 1 / 255 + 1e-4


def _sd35(tmp_path, openclip_g: bool):
    """A tiny SD3.5 (qk-normed MMDiT, a dual-attention block as 3.5 Medium) as a diffusers folder, and as files:
    the MMDiT under model.diffusion_model., clip_l, clip_g (transformers' layout as ComfyUI's, or OpenCLIP's as
    an SDXL checkpoint's conditioner.embedders.1.model.*), t5xxl, the VAE in the LDM layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    parts = dict(transformer=SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=128, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)),
        vae=_vae(latent=16, scale=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(CLIPTextModelWithProjection, 32, "quick_gelu", projection_dim=32),
        text_encoder_2=_clip(CLIPTextModelWithProjection, 64, "gelu", projection_dim=32),
        text_encoder_3=_t5(128), tokenizer=bundled_tokenizer("clip"), tokenizer_2=bundled_tokenizer("clip", "!"),
        tokenizer_3=bundled_tokenizer("t5"), scheduler=FlowMatchEulerDiscreteScheduler(**SD35))
    folder = tmp_path / "folder"
    StableDiffusion3Pipeline(**parts).save_pretrained(folder)
    StableDiffusion3Pipeline(**parts | dict(text_encoder_3=None, tokenizer_3=None)).save_pretrained(tmp_path / "no-t5")
    files = tmp_path / "files"
    files.mkdir()
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    mmdit = _transformer_file(folder, files / "mmdit.tmp.safetensors")
    (files / "mmdit.tmp.safetensors").unlink()
    save_file({"model.diffusion_model." + k: v for k, v in mmdit.items()}, files / "sd3.5_medium.safetensors")
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit))  # diffusers' reader: the folder's tensors
    want = parts["transformer"].state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    save_file(_v4_names(parts["text_encoder"].state_dict()), files / "clip_l.safetensors")
    g = _v4_names(parts["text_encoder_2"].state_dict())
    if openclip_g:
        g = sdxl_script.convert_openclip_text_enc_state_dict(g)
        g["text_projection"] = g.pop("text_projection.weight").T
        g = {"conditioner.embedders.1.model." + k: v.contiguous() for k, v in g.items()}
    save_file(g, files / "clip_g.safetensors")
    _t5_file(parts["text_encoder_3"], files / "t5xxl_fp16.safetensors")
    _ae_file(parts["vae"], files / "vae.safetensors")
    return folder, files


@pytest.mark.parametrize("openclip_g", [False, True], ids=["hf-clip-g", "openclip-clip-g"])
def test_sd35_from_component_files_alone_is_the_folders_image(openclip_g, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    folder, files = _sd35(tmp_path, openclip_g)
    theirs = diffusers_pipeline(StableDiffusion3Pipeline, folder)(
        PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(4), guidance_scale=5.0,
        output_type="np", **RUN).images
    texts = [files / n for n in ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")]
    pipe = quiet_pipeline(files / "sd3.5_medium.safetensors", vae=files / "vae.safetensors", text_encoders=texts)
    ours = pipe(PROMPT, negative_prompt="blurry", seed=4, guidance_scale=5.0, output_type="np", **RUN).images
    assert theirs.std() > 0.01 and np.abs(ours - theirs).max() <= 1e-5, np.abs(ours - theirs).max()
    if openclip_g:  # and without the T5 file, the image of the folder without T5 (zeros stand in, as diffusers)
        theirs = diffusers_pipeline(StableDiffusion3Pipeline, tmp_path / "no-t5")(
            PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(4), guidance_scale=5.0,
            output_type="np", **RUN).images
        pipe = quiet_pipeline(files / "sd3.5_medium.safetensors", vae=files / "vae.safetensors", text_encoders=texts[:2])
        ours = pipe(PROMPT, negative_prompt="blurry", seed=4, guidance_scale=5.0, output_type="np", **RUN).images
        assert len(pipe.texts) == 2 and np.abs(ours - theirs).max() <= 1e-5, np.abs(ours - theirs).max()
        return
    run = _gen("sample", PROMPT, "--model", "sd3.5_medium.safetensors", "--text-encoder", "clip_l.safetensors",
               "--text-encoder", "clip_g.safetensors", "--text-encoder", "t5xxl_fp16.safetensors", "--vae",
               "vae.safetensors", "--negative-prompt", "blurry", "--seed", 4, "--steps", 3, "--guidance", 5.0,
               "--height", 32, "--width", 32, "--out", tmp_path / "out.png", "--no-progress", cwd=files)
    assert run.returncode == 0, run.stderr
    png = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float32) / 255
    assert np.abs(png - theirs[0]).max() <= 1 / 255 + 1e-4


def test_a_transformer_file_missing_parts_names_the_files_it_needs(tmp_path):
    """Exit 2 and one line naming exactly the files still needed; `gen info` says the same of the file."""
    _, files, name, texts = _flux(tmp_path, True, False)
    model = files / name
    needs_all = "--text-encoder clip_l.safetensors --text-encoder t5xxl.safetensors --vae ae.safetensors"
    for given, want in (([], f"{name} holds only the transformer: add {needs_all}, or --base FOLDER"),
                        (["--text-encoder", files / texts[1]], "add --text-encoder clip_l.safetensors --vae "
                                                               "ae.safetensors, or --base FOLDER"),
                        (["--text-encoder", files / texts[0], "--vae", files / "ae.safetensors"],
                         "add --text-encoder t5xxl.safetensors, or --base FOLDER")):
        run = _gen("sample", "x", "--model", model, *given, "--steps", 1, "--out", tmp_path / "x.png")
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert want in run.stderr and "Traceback" not in run.stderr, run.stderr
    info = _gen("info", model)
    assert info.returncode == 0 and f"holds only the transformer: add {needs_all}, or --base FOLDER" in info.stdout, \
        info.stdout
    with pytest.raises(GenError, match="holds only the transformer: add --text-encoder clip_l"):
        Pipeline.from_pretrained(model)


def test_fp8_and_gguf_transformer_files_take_component_files_as_a_base_folder(tmp_path):
    """flux1-dev-fp8.safetensors (e4m3fn) and a Q8_0 GGUF with clip_l / t5xxl / ae beside them, no --base: the
    image the same file gives with --base FOLDER (the folder holding the same text encoders and VAE)."""
    if E4M3 is None:
        pytest.skip("this torch has no float8 dtypes")
    from tests.test_quant_gguf import Q, write_gguf

    folder, files, name, texts = _flux(tmp_path, True, False)
    bare = load_file(files / name)
    save_file({k: v.to(E4M3) if v.dim() >= 2 else v for k, v in bare.items()}, files / "flux1-dev-fp8.safetensors")
    write_gguf(files / "flux1-dev-Q8_0.gguf", bare, Q.Q8_0)
    kw = dict(seed=4, guidance_scale=3.5, output_type="np", **RUN)
    for model in ("flux1-dev-fp8.safetensors", "flux1-dev-Q8_0.gguf"):
        with_base = quiet_pipeline(files / model, base=folder)(PROMPT, **kw).images
        alone = quiet_pipeline(files / model, vae=files / "ae.safetensors",
                               text_encoders=[files / t for t in texts])(PROMPT, **kw).images
        assert with_base.std() > 0.01 and np.abs(alone - with_base).max() == 0, (model, np.abs(alone - with_base).max())
    run = _gen("sample", PROMPT, "--model", "flux1-dev-Q8_0.gguf", "--text-encoder", "clip_l.safetensors",
               "--text-encoder", texts[1], "--vae", "ae.safetensors", "--seed", 4, "--steps", 3, "--guidance", 3.5,
               "--height", 32, "--width", 32, "--out", tmp_path / "out.png", "--no-progress", cwd=files)
    assert run.returncode == 0, run.stderr
    png = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float32) / 255
    assert np.abs(png - with_base[0]).max() <= 1 / 255 + 1e-4
    info = _gen("info", files / "flux1-dev-Q8_0.gguf")
    assert info.returncode == 0 and "holds only the transformer: add --text-encoder clip_l.safetensors" in info.stdout, \
        info.stdout


def test_sdxl_checkpoint_takes_clip_l_and_openclip_clip_g_files_in_place_of_its_own(tmp_path):
    """An SDXL checkpoint with --text-encoder clip_l (transformers' layout) and --text-encoder clip_g (OpenCLIP's, as
    under an SDXL checkpoint's conditioner.embedders.1.model.): the image of the folder holding those towers."""
    import shutil

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tests.test_user_files import _checkpoint, _folder, _ours, _theirs

    folder = tmp_path / "folder"
    _checkpoint("sdxl", folder, _folder("sdxl", folder), tmp_path / "sdxl.safetensors")
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    torch.manual_seed(9)
    clip_l = _clip(CLIPTextModel, 64, "quick_gelu")
    clip_g = _clip(CLIPTextModelWithProjection, 64, "gelu", projection_dim=32)
    clip_l.save_pretrained(other / "text_encoder")
    clip_g.save_pretrained(other / "text_encoder_2")
    save_file(_v4_names(clip_l.state_dict()), tmp_path / "clip_l.safetensors")
    g = sdxl_script.convert_openclip_text_enc_state_dict(_v4_names(clip_g.state_dict()))
    g["text_projection"] = g.pop("text_projection.weight").T
    save_file({"conditioner.embedders.1.model." + k: v.contiguous() for k, v in g.items()},
              tmp_path / "clip_g.safetensors")
    ours = _ours(tmp_path / "sdxl.safetensors", "sdxl",
                 text_encoders=[tmp_path / "clip_l.safetensors", tmp_path / "clip_g.safetensors"])
    assert np.abs(ours - _ours(other, "sdxl")).max() == 0
    assert np.abs(ours - _ours(folder, "sdxl")).max() > 0.01  # the files' towers, not the checkpoint's
    assert np.abs(ours - _theirs("sdxl", other)).max() <= 1e-3  # gen's sdpa vs diffusers' on SDXL (test_user_files)
