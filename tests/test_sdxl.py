"""SDXL as a family: parity with diffusers' StableDiffusionXLPipeline on tiny random weights (every sampler, with
and without a negative prompt), folders both ways, the fast mode, attention backends, refusals."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from gen.errors import GenError
from gen.pipeline import Pipeline
from gen.samplers import SAMPLERS, names_for
from tests.conftest import diffusers_pipeline, quiet_pipeline

PROMPTS = ["a red circle", "a blue square left of a green triangle"]
SIZE = 32


def theirs_images(pipe, sampler, negative="blurry", seed=7, n=2, steps=6, guidance=6.0, size=SIZE, scheduler=None,
                  **kw):
    """`scheduler`: settings over the folder's scheduler config (a flow shift); `kw`: more pipeline arguments."""
    cls, settings = SAMPLERS[sampler][1], SAMPLERS[sampler][2]
    pipe.scheduler = cls.from_config(pipe.folder_scheduler_config, **settings, **scheduler or {})
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(PROMPTS) * n)]
    neg = None if negative is None else [negative] * len(PROMPTS)
    return pipe(PROMPTS, negative_prompt=neg, num_inference_steps=steps, guidance_scale=guidance,
                num_images_per_prompt=n, generator=gens, output_type="np", height=size, width=size, **kw).images


def our_images(pipe, sampler, negative="blurry", seed=7, n=2, steps=6, guidance=6.0, size=SIZE, **kw):
    return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                num_images_per_prompt=n, seed=seed, sampler=sampler, output_type="np", height=size, width=size,
                **kw).images


@pytest.fixture(scope="module")
def theirs(sdxl_folder):
    return diffusers_pipeline(StableDiffusionXLPipeline, sdxl_folder)


@pytest.fixture(scope="module")
def ours(sdxl_folder):
    return quiet_pipeline(sdxl_folder)


def test_an_sdxl_folder_is_recognised_with_both_text_encoders(ours):
    assert ours.family.name == "sdxl"
    assert [type(t.model).__name__ for t in ours.texts] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert ours.defaults["sampler"] == "euler" and ours.defaults["guidance"] == 5.0


@pytest.mark.parametrize("sampler", names_for("ddpm"))
def test_sdxl_matches_diffusers_with_every_sampler(theirs, ours, sampler):
    a, b = theirs_images(theirs, sampler), our_images(ours, sampler)
    assert a.shape == b.shape == (4, SIZE, SIZE, 3)
    assert a.std() > 0.01
    assert np.abs(a - b).max() <= 1e-4


def test_no_negative_prompt_is_zero_conditioning_as_in_diffusers(theirs, ours):
    a, b = theirs_images(theirs, "euler", negative=None), our_images(ours, "euler", negative=None)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - our_images(ours, "euler", negative="")).max() > 1e-3  # "" is encoded, None is zeros


def test_the_default_size_and_a_non_square_one(theirs, ours):
    a = theirs_images(theirs, "dpm++2m", size=None)  # the folder's default size
    b = our_images(ours, "dpm++2m", size=None)
    assert np.abs(a - b).max() <= 1e-4
    wide = ours("a red circle", num_inference_steps=2, seed=1, height=16, width=32, output_type="np").images
    assert wide.shape == (1, 16, 32, 3)


def test_folder_saved_by_gen_loads_in_diffusers_with_the_same_images(ours, tmp_path):
    ours.save_pretrained(tmp_path / "by-gen")
    index = json.loads((tmp_path / "by-gen" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    theirs = diffusers_pipeline(StableDiffusionXLPipeline, tmp_path / "by-gen")
    reloaded = quiet_pipeline(tmp_path / "by-gen")
    assert np.abs(theirs_images(theirs, "euler-a") - our_images(reloaded, "euler-a")).max() <= 1e-4


def test_fast_mode_on_sdxl_is_exact_at_1_and_close_at_3(ours):
    exact = our_images(ours, "dpm++2m", n=1)
    assert np.array_equal(our_images(ours, "dpm++2m", n=1, cache_interval=1), exact)
    fast = our_images(ours, "dpm++2m", n=1, cache_interval=3)
    assert 0 < np.abs(fast - exact).max() < 0.25


@pytest.mark.parametrize("backend", ["math", "auto"])
def test_attention_backends_give_the_sdpa_images(sdxl_folder, ours, backend):
    pipe = quiet_pipeline(sdxl_folder, attention=backend)
    assert np.abs(our_images(pipe, "euler", n=1) - our_images(ours, "euler", n=1)).max() <= 1e-4


def test_a_refiner_folder_is_refused_as_a_base(sdxl_folder, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(sdxl_folder, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index |= {"text_encoder": [None, None], "tokenizer": [None, None], "requires_aesthetics_score": True}
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(GenError, match="SDXL refiner folder"):
        Pipeline.from_pretrained(refiner)
