"""The CLIP and T5 tokenizers gen ships (gen/assets/tokenizers/): a checkpoint with nothing beside it samples
offline, and gives the image of the equivalent diffusers folder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gen.errors import GenError
from gen.io import write_safetensors
from gen.models.text import bundled_tokenizer
from gen.pipeline import Pipeline

from tests.conftest import diffusers_pipeline, tiny_sd_components, tiny_sdxl_components


def test_bundled_tokenizers_give_the_published_ids():
    """Token ids as OpenAI's CLIP and Google's T5 tokenize (the ids their model cards and papers show)."""
    clip = bundled_tokenizer("clip")
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip) == 49408 and clip.pad_token_id == 49407 and clip.model_max_length == 77
    assert bundled_tokenizer("clip", "!").pad_token_id == 0  # OpenCLIP's padding
    t5 = bundled_tokenizer("t5")
    assert t5("Hello world").input_ids == [8774, 296, 1]
    assert len(t5) == 32100 and t5.pad_token_id == 0 and t5.eos_token_id == 1


def _clip(klass, width: int, act: str, **extra):
    from transformers import CLIPTextConfig

    return klass(CLIPTextConfig(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                hidden_size=width, intermediate_size=37, num_attention_heads=1, num_hidden_layers=2,
                                max_position_embeddings=77, hidden_act=act, **extra))


def _sd1():
    """A tiny SD-1.x with a real-vocabulary CLIP-L-like tower and the conventions a bare file implies (8 heads)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    parts = tiny_sd_components()
    parts["unet"] = UNet2DConditionModel.from_config(dict(parts["unet"].config) | dict(
        cross_attention_dim=64, attention_head_dim=8))
    return parts | dict(text_encoder=_clip(CLIPTextModel, 64, "quick_gelu"), tokenizer=bundled_tokenizer("clip"))


def _sdxl():
    """A tiny SDXL: CLIP-L-like (quick_gelu) and bigG-like (gelu, projection, "!" padding) towers, 64 channels a
    head in the UNet, as a bare SDXL file implies."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = tiny_sdxl_components()
    parts["unet"] = UNet2DConditionModel.from_config(dict(parts["unet"].config) | dict(
        cross_attention_dim=128, attention_head_dim=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32))
    return parts | dict(text_encoder=_clip(CLIPTextModel, 64, "quick_gelu"), tokenizer=bundled_tokenizer("clip"),
                        text_encoder_2=_clip(CLIPTextModelWithProjection, 64, "gelu", projection_dim=32),
                        tokenizer_2=bundled_tokenizer("clip", "!"))


def _bare_file(folder, dst):
    """The folder as a single file another tool wrote: the original layout, no metadata, nothing beside it."""
    file = dst.parent / "by-gen" / dst.name
    Pipeline.from_pretrained(folder).save_pretrained(file, single_file=True)
    with safe_open(str(file), "pt") as f:
        write_safetensors(dst, {k: f.get_tensor(k) for k in f.keys()}, {})
    return dst


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_lone_checkpoint_samples_the_folders_image(family, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = tmp_path / "folder"
    if family == "sdxl":
        klass, extra = StableDiffusionXLPipeline, {}
        klass(**_sdxl()).save_pretrained(folder)
    else:
        klass, extra = StableDiffusionPipeline, dict(safety_checker=None, requires_safety_checker=False)
        klass(**_sd1(), feature_extractor=None, **extra).save_pretrained(folder)
    (tmp_path / "alone").mkdir()
    file = _bare_file(folder, tmp_path / "alone" / f"{family}.safetensors")
    ours = Pipeline.from_pretrained(file)
    ours.progress = False
    pad = [t.tokenizer.pad_token_id for t in ours.texts]
    assert pad == ([49407, 0] if family == "sdxl" else [49407])
    theirs = diffusers_pipeline(klass, folder, **extra)
    run = dict(num_inference_steps=3, height=32, width=32, output_type="np", guidance_scale=5.0)
    prompt, negative = "a photo of a cat on a red sofa", "blurry"
    a = theirs(prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(4),
               **run).images
    b = ours(prompt, negative_prompt=negative, seed=4, sampler="euler" if family == "sdxl" else "ddim",
             **run).images
    assert a.std() > 0.01 and np.abs(a - b).max() <= 1e-4


def test_the_cli_samples_a_lone_file_offline(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "folder"
    StableDiffusionPipeline(**_sd1(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    (tmp_path / "alone").mkdir()
    file = _bare_file(folder, tmp_path / "alone" / "model.safetensors")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "gen", "sample", "a castle", "--model", str(file), "--steps", "2",
                          "--height", "32", "--width", "32", "--out", str(tmp_path / "out.png")],
                         capture_output=True, text=True, cwd=tmp_path / "alone", env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.png").is_file()
    info = subprocess.run([sys.executable, "-m", "gen", "info", str(file)], capture_output=True, text=True, env=env)
    assert "bundled CLIP tokenizer" in info.stdout


def test_a_tower_the_bundled_vocabulary_does_not_fit_is_refused(sd_folder, tmp_path):
    """The tests' byte-level tower (514 tokens) cannot take CLIP's ids: one line naming --tokenizer."""
    file = _bare_file(sd_folder, tmp_path / "alone" / "small-vocab.safetensors")
    with pytest.raises(GenError, match="vocabulary of 514 tokens.*--tokenizer FOLDER") as e:
        Pipeline.from_pretrained(file)
    assert "\n" not in str(e.value)
    assert Pipeline.from_pretrained(file, tokenizer=sd_folder).texts[0].tokenizer.vocab_size == 514
