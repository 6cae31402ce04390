"""Shared fixtures: tiny random models built on the fly (no network), saved to real folders."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The triton kernels run on CPU tensors in triton's interpreter. triton reads the variable when it is first imported,
# and diffusers imports it through torch, so it is set here, before any test module: then no test order matters.
# (The ahead-of-time compile tests run their compiler in a subprocess without it.)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def diffusers_pipeline(cls, folder, **kwargs):
    """diffusers' pipeline `cls` from a folder, progress bar off, with the folder's scheduler config kept (the
    parity tests swap samplers from it). An SD3 folder without T5 loads the way diffusers loads one:
    text_encoder_3=None, tokenizer_3=None."""
    from pathlib import Path

    if cls.__name__.startswith("StableDiffusion3") and not (Path(folder) / "text_encoder_3").is_dir():
        kwargs = dict(text_encoder_3=None, tokenizer_3=None) | kwargs
    pipe = cls.from_pretrained(folder, **kwargs)
    pipe.folder_scheduler_config = pipe.scheduler.config
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quiet_pipeline(folder, **kwargs):
    """gen's Pipeline for a folder or file, with its progress bar off."""
    from gen.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder, **kwargs)
    pipe.progress = False
    return pipe


def tiny_sd_components(seed: int = 0):
    """A tiny SD-architecture model built with diffusers/transformers classes directly (not with gen)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from gen.models.text import byte_level_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                                        vocab_size=len(tokenizer), max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler)


def tiny_sdxl_components(seed: int = 0):
    """A tiny SDXL-architecture model (diffusers' own SDXL test shapes): two CLIP towers, the second with a
    projection, a text_time UNet; built with diffusers/transformers classes directly."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gen.models.text import byte_level_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                                norm_num_groups=32)  # 80 = 6 time ids x 8 + the 32-wide pooled embedding
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        force_upcast=True, scaling_factor=0.13025)
    config = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                  num_attention_heads=4, num_hidden_layers=5, vocab_size=len(tokenizer), hidden_act="gelu",
                  projection_dim=32, max_position_embeddings=77)
    text = CLIPTextModel(CLIPTextConfig(**config))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                tokenizer_2=byte_level_tokenizer(), scheduler=scheduler)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    """A tiny StableDiffusionXLPipeline saved by diffusers."""
    from diffusers import StableDiffusionXLPipeline

    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny StableDiffusionPipeline saved by diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def dit_folder(tmp_path_factory):
    """A tiny DiT + rectified-flow model saved by gen."""
    from gen.models.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("dit") / "tiny-dit"
    tiny_pipeline("dit").save_pretrained(path)
    return path


@pytest.fixture()
def dit_pipe(dit_folder):
    from gen.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(dit_folder)
    pipe.progress = False
    return pipe


def tiny_t5_tokenizer(path=None):
    """A T5TokenizerFast over a small Unigram vocabulary given here (no downloaded sentencepiece model; T5's special
    tokens first); with `path`, saved there and loaded back, as a folder holds it."""
    from transformers import T5TokenizerFast

    words = "a an the red blue green circle square triangle left of right blurry photo cat dog".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0 - i / 10) for i, w in enumerate(words)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    if path is None:
        return tokenizer
    tokenizer.save_pretrained(path)
    return T5TokenizerFast.from_pretrained(path)


def tiny_sd3_components(seed: int = 0, t5: bool = True):
    """A tiny SD3-architecture model (after diffusers' own SD3 test shapes): CLIP-L and CLIP-G with projection,
    an optional tiny T5 encoder wider than the CLIPs' concatenation (so the CLIP states are padded), an
    SD3Transformer2DModel, a VAE with scaling and shift factors; built with diffusers/transformers classes."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from gen.models.text import byte_level_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=80, pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)
    config = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                  num_attention_heads=4, num_hidden_layers=5, vocab_size=len(tokenizer), hidden_act="gelu",
                  projection_dim=32, max_position_embeddings=77)
    text, text_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**config)) for _ in range(2))
    tokenizer_3 = tiny_t5_tokenizer() if t5 else None
    text_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=80, d_ff=37, d_kv=8, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                     pad_token_id=0, eos_token_id=1)) if t5 else None
    return dict(transformer=transformer, vae=vae, text_encoder=text, text_encoder_2=text_2, text_encoder_3=text_3,
                tokenizer=tokenizer, tokenizer_2=byte_level_tokenizer(), tokenizer_3=tokenizer_3,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


@pytest.fixture(scope="session", params=["with-t5", "no-t5"])
def sd3_folder(request, tmp_path_factory):
    """A tiny StableDiffusion3Pipeline saved by diffusers, with a T5 encoder and without (zeros stand in)."""
    from diffusers import StableDiffusion3Pipeline

    path = tmp_path_factory.mktemp("sd3") / f"tiny-sd3-{request.param}"
    StableDiffusion3Pipeline(**tiny_sd3_components(t5=request.param == "with-t5")).save_pretrained(path)
    return path


def tiny_flux_components(tmp_path, guidance_embeds: bool = True, seed: int = 0):
    """A tiny Flux-architecture model (diffusers' own Flux test shapes, with 4 latent channels packed to 16): CLIP
    for the pooled embedding, a tiny T5, a FluxTransformer2DModel, a 2x VAE, the dynamic-shift flow scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from gen.models.text import byte_level_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer(tmp_path / "t5-tokenizer")
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=len(tokenizer), hidden_act="gelu", projection_dim=32,
                                        max_position_embeddings=77))
    text_2 = T5EncoderModel(T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=37,
                                     vocab_size=len(tokenizer_2), pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return dict(transformer=transformer, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler)


@pytest.fixture(scope="session", params=[True, False], ids=["dev", "schnell"])
def flux_folder(request, tmp_path_factory):
    """A tiny FluxPipeline saved by diffusers: dev-style (guidance embedding) and schnell-style (none)."""
    from diffusers import FluxPipeline

    tmp = tmp_path_factory.mktemp("flux")
    FluxPipeline(**tiny_flux_components(tmp, guidance_embeds=request.param)).save_pretrained(tmp / "tiny-flux")
    return tmp / "tiny-flux"


@pytest.fixture(scope="session")
def flux_bfl(tmp_path_factory):
    """A tiny Flux folder (dev-style) and its transformer in BFL's original layout (bare keys, fp32), as the
    transformer-only files people share hold it (the fp8 and GGUF tests store it in their formats)."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("flux-bfl")
    FluxPipeline(**tiny_flux_components(tmp)).save_pretrained(tmp / "folder")
    quiet_pipeline(tmp / "folder").save_pretrained(tmp / "whole.safetensors", single_file=True)
    prefix = "model.diffusion_model."
    bfl = {k[len(prefix):]: v.float() for k, v in load_file(tmp / "whole.safetensors").items()
           if k.startswith(prefix)}
    return tmp / "folder", bfl


def psnr(a, b) -> float:
    """PSNR in dB of two images in [0, 1] (inf where equal)."""
    import numpy as np

    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))
