"""Files as users have them. Whole SD-1.x / SD-2.x / SDXL checkpoints written by the diffusers project's own writer
of the original layout (tests/vendor, its convert_diffusers_to_original_*.py scripts), sampled with nothing beside
them; EMA twins, schedule buffers, inpainting UNets, a swapped VAE; Flux and SD3.5 from a transformer file plus the
clip_l / clip_g / t5xxl / ae files ComfyUI users hold; and the one-line refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from gen.errors import GenError
from gen.models.text import bundled_tokenizer
from gen.pipeline import Pipeline

from tests.conftest import diffusers_pipeline
from tests.vendor import diffusers_to_original_sd as sd_script
from tests.vendor import diffusers_to_original_sdxl as sdxl_script

RUN = dict(num_inference_steps=3, height=32, width=32, output_type="np")
PROMPT, NEGATIVE = "a photo of a cat on a red sofa", "blurry"


def _clip(klass, width: int, act: str, layers: int = 2, **extra):
    from transformers import CLIPTextConfig

    return klass(CLIPTextConfig(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                hidden_size=width, intermediate_size=37, num_attention_heads=max(width // 64, 1),
                                num_hidden_layers=layers, max_position_embeddings=77, hidden_act=act, **extra))


def _vae(latent: int = 4, scale: float = 0.18215, **extra):
    """Four levels, two resnets each: the shape diffusers' writer scripts' VAE tables are written for."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=2, latent_channels=latent,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=scale, **extra)


def _unet(xl: bool, **extra):
    """SD's level order (attention in the first levels, none in the last: SD-1.x/2.x) or SDXL's (none in the
    first level), two resnets a level, as the writer scripts' UNet tables have them."""
    from diffusers import UNet2DConditionModel

    if xl:
        return UNet2DConditionModel(
            block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=8, cross_attention_dim=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 1, 1),
            transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, **extra)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **extra)


def _v4_names(state: dict) -> dict:
    """A CLIP tower's weights as transformers 4 named them -- `text_model.*`, `text_projection.weight` -- which is
    how every shared file (SD checkpoints, ComfyUI's clip_l / clip_g) holds them; transformers 5 drops the prefix."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in state.items() if not k.endswith("position_ids")}


def _folder(family: str, path, seed: int = 0, in_channels: int = 4):
    """A tiny diffusers folder of the family (saved by diffusers), and the text towers its file holds (SD-2.x's
    has one more block than the folder's, as a real SD-2.x file: diffusers drops it, gen reads the one before)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if family == "sdxl":
        parts = dict(unet=_unet(True), vae=_vae(scale=0.13025, force_upcast=True),
                     text_encoder=_clip(CLIPTextModel, 64, "quick_gelu"), tokenizer=bundled_tokenizer("clip"),
                     text_encoder_2=_clip(CLIPTextModelWithProjection, 64, "gelu", projection_dim=32),
                     tokenizer_2=bundled_tokenizer("clip", "!"),
                     scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                      steps_offset=1, timestep_spacing="leading"))
        StableDiffusionXLPipeline(**parts).save_pretrained(path)
        return {"text_encoder": parts["text_encoder"], "text_encoder_2": parts["text_encoder_2"]}
    if family == "sd2":
        tower = _clip(CLIPTextModel, 64, "gelu", layers=24)
        text = _clip(CLIPTextModel, 64, "gelu", layers=23)
        text.load_state_dict(tower.state_dict(), strict=False)  # the file's first 23 blocks
        unet = _unet(False, cross_attention_dim=64, attention_head_dim=(1, 1), use_linear_projection=True,
                     in_channels=in_channels)
        tokenizer = bundled_tokenizer("clip", "!")
    else:
        text = tower = _clip(CLIPTextModel, 64, "quick_gelu")
        unet, tokenizer = _unet(False, cross_attention_dim=64, attention_head_dim=8, in_channels=in_channels), \
            bundled_tokenizer("clip")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=_vae(), text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return {"text_encoder": tower}


def _checkpoint(family: str, folder, towers: dict, dst) -> dict:
    """The folder as one original-layout file, by diffusers' writer scripts (what their __main__ does)."""
    script = sdxl_script if family == "sdxl" else sd_script
    state = {"model.diffusion_model." + k: v for k, v in
             script.convert_unet_state_dict(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")).items()}
    state |= {"first_stage_model." + k: v for k, v in
              script.convert_vae_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")).items()}
    first = _v4_names(towers["text_encoder"].state_dict())
    if family == "sdxl":
        state |= {"conditioner.embedders.0.transformer." + k: v for k, v in first.items()}
        second = script.convert_openclip_text_enc_state_dict(_v4_names(towers["text_encoder_2"].state_dict()))
        second["text_projection"] = second.pop("text_projection.weight").T.contiguous()
        state |= {"conditioner.embedders.1.model." + k: v for k, v in second.items()}
    elif family == "sd2":
        assert "text_model.encoder.layers.22.layer_norm2.bias" in first  # the script's own v2 test
        v2 = sd_script.convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in first.items()})
        state |= {"cond_stage_model.model." + k: v for k, v in v2.items()}
    else:
        state |= {"cond_stage_model.transformer." + k: v for k, v in first.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, dst)
    return state


def _theirs(family: str, folder) -> np.ndarray:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    klass = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = diffusers_pipeline(klass, folder, **extra)
    return pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(4), guidance_scale=5.0,
                **RUN).images


def _ours(path, family: str, **kw) -> np.ndarray:
    pipe = Pipeline.from_pretrained(path, **kw)
    pipe.progress = False
    return pipe(PROMPT, negative_prompt=NEGATIVE, seed=4, guidance_scale=5.0,
                sampler="euler" if family == "sdxl" else "ddim", **RUN).images


def _gen(*args, cwd=None):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_checkpoint_diffusers_wrote_samples_alone_the_folders_image(family, tmp_path):
    folder = tmp_path / "folder"
    towers = _folder(family, folder)
    alone = tmp_path / "alone"
    file = alone / f"{family}.safetensors"
    _checkpoint(family, folder, towers, file)
    theirs = _theirs(family, folder)
    ours = _ours(file, family)
    assert np.abs(ours - _ours(folder, family)).max() == 0  # the file is the folder, weight for weight
    # SDXL: gen's sdpa attention and diffusers' differ by 6e-4 on this 3-level UNet, the file plays no part
    assert theirs.std() > 0.01 and np.abs(theirs - ours).max() <= (1e-3 if family == "sdxl" else 1e-4)
    out = tmp_path / "out.png"  # the command line, offline, in a folder holding the file alone
    run = _gen("sample", PROMPT, "--model", file.name, "--negative-prompt", NEGATIVE, "--seed", 4, "--steps", 3,
               "--guidance", 5.0, "--height", 32, "--width", 32, "--sampler", "euler" if family == "sdxl" else "ddim",
               "--out", out, "--no-progress", cwd=alone)
    assert run.returncode == 0, run.stderr
    png = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert np.abs(png - ours[0]).max() <= 1 / 255 + 1e-6
    assert sorted(p.name for p in alone.iterdir()) == [file.name]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """An SD-1.x folder, its diffusers-written file, and that file's state dict."""
    tmp = tmp_path_factory.mktemp("sd1")
    towers = _folder("sd1", tmp / "folder")
    state = _checkpoint("sd1", tmp / "folder", towers, tmp / "sd1.safetensors")
    return tmp, state


def test_ema_weights_by_flag_and_schedule_buffers_ignored(sd1, tmp_path, caplog):
    """A file with model_ema.* twins (LitEma's dot-less names) and LDM's schedule buffers: the trained weights by
    default (A1111), the EMA ones with ema=True (diffusers' extract_ema); the buffers pass without a warning."""
    import shutil

    from diffusers import UNet2DConditionModel

    tmp, state = sd1
    ema_folder = tmp_path / "ema-folder"
    shutil.copytree(tmp / "folder", ema_folder)
    torch.manual_seed(7)
    ema_unet = _unet(False, cross_attention_dim=64, attention_head_dim=8)
    ema_unet.save_pretrained(ema_folder / "unet")
    ema = sd_script.convert_unet_state_dict(UNet2DConditionModel.from_pretrained(ema_folder / "unet").state_dict())
    extra = {"model_ema." + ("diffusion_model." + k).replace(".", ""): v.contiguous() for k, v in ema.items()}
    extra |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(100)}
    extra |= {name: torch.linspace(0.1, 0.9, 1000) for name in (
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")}
    file = tmp_path / "with-ema.safetensors"
    save_file(state | extra, file)
    with caplog.at_level("WARNING"):
        plain = _ours(file, "sd1")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert np.abs(plain - _theirs("sd1", tmp / "folder")).max() <= 1e-4
    with_ema = _ours(file, "sd1", ema=True)
    assert np.abs(with_ema - _theirs("sd1", ema_folder)).max() <= 1e-4
    assert np.abs(with_ema - plain).max() > 0.01
    with pytest.raises(GenError, match="holds no EMA weights"):
        Pipeline.from_pretrained(tmp / "sd1.safetensors", ema=True)
    info = _gen("info", file)
    assert "EMA: model_ema.* present" in info.stdout, info.stdout


def test_a_vae_file_replaces_the_checkpoints_own(sd1, tmp_path):
    """A1111's "SD VAE": a VAE file in diffusers' layout (sdxl_vae.safetensors' kind) or the LDM layout with bare keys
    (vae-ft-mse-840000-ema-pruned's kind) gives the image of the folder holding that VAE."""
    import shutil

    tmp, _ = sd1
    other = tmp_path / "other-vae-folder"
    shutil.copytree(tmp / "folder", other)
    torch.manual_seed(11)
    _vae().save_pretrained(other / "vae")
    want = _theirs("sd1", other)
    diffusers_layout = other / "vae" / "diffusion_pytorch_model.safetensors"
    ldm_layout = tmp_path / "vae-ldm.safetensors"
    save_file({k: v.contiguous() for k, v in sd_script.convert_vae_state_dict(load_file(diffusers_layout)).items()},
              ldm_layout)
    for vae in (diffusers_layout, ldm_layout):
        got = _ours(tmp / "sd1.safetensors", "sd1", vae=vae)
        assert np.abs(got - want).max() <= 1e-4, (vae, np.abs(got - want).max())


def test_an_inpainting_checkpoint_loads_and_says_so(tmp_path):
    towers = _folder("sd1", tmp_path / "folder", in_channels=9)
    file = tmp_path / "inpaint.safetensors"
    _checkpoint("sd1", tmp_path / "folder", towers, file)
    pipe = Pipeline.from_pretrained(file)
    assert pipe.denoiser.config.in_channels == 9 and pipe.denoiser.config.out_channels == 4
    info = _gen("info", file)
    assert "inpainting (9-channel UNet input)" in info.stdout, info.stdout


def test_prediction_type_from_what_the_file_says(sd1, tmp_path):
    """modelspec.prediction_type and a v_pred key are read; nothing said: epsilon, --prediction-type overrides."""
    from gen import single_file

    tmp, state = sd1
    for extra, meta, want in (({}, {}, "epsilon"), ({"v_pred": torch.zeros(0)}, {}, "v_prediction"),
                              ({}, {"modelspec.prediction_type": "v_prediction"}, "v_prediction")):
        file = tmp_path / f"{want}-{len(extra)}.safetensors"
        save_file(state | extra, file, metadata=meta)
        assert Pipeline.from_pretrained(file).scheduler_config["prediction_type"] == want
        assert f"prediction type: {want}" in _gen("info", file).stdout
    pipe = Pipeline.from_pretrained(file, prediction_type="epsilon")
    assert pipe.scheduler_config["prediction_type"] == "epsilon"
    assert single_file.PREDICTION_TYPES == ("epsilon", "v_prediction")


def test_a_component_of_the_wrong_kind_is_one_line_exit_2(sd1, tmp_path):
    """A text encoder file given as --vae, a VAE with other latent channels, and a CLIP of another width: refused
    in one line naming the file and what it is."""
    tmp, state = sd1
    prefix = "cond_stage_model.transformer."
    clip = tmp_path / "clip_l.safetensors"
    save_file({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, clip)
    vae16 = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in sd_script.convert_vae_state_dict(_vae(latent=16).state_dict()).items()},
              vae16)
    model = tmp / "sd1.safetensors"
    for args, match in ((["--vae", clip], "a CLIP text encoder 64 wide, not a VAE"),
                        (["--vae", vae16], "a VAE with 16 latent channels; this SD-1.x model's latents have 4"),
                        (["--text-encoder", vae16], "a VAE with 16 latent channels, not a text encoder")):
        run = _gen("sample", "x", "--model", model, "--steps", 1, "--height", 32, "--width", 32,
                   "--out", tmp_path / "x.png", *args)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert match in run.stderr, run.stderr
