"""Parity with diffusers, both ways: same weights, scheduler, steps, CFG, negative prompt, seeds."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from gen.pipeline import Pipeline
from gen.samplers import SAMPLERS
from tests.conftest import diffusers_pipeline

PROMPTS = ["a red circle", "a blue square left of a green triangle"]


def diffusers_images(pipe, sampler, seed=7, n=2, steps=8, guidance=6.0, negative="blurry", size=32):
    cls, settings = SAMPLERS[sampler][1], SAMPLERS[sampler][2]
    pipe.scheduler = cls.from_config(pipe.folder_scheduler_config, **settings)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(PROMPTS) * n)]
    return pipe(PROMPTS, negative_prompt=[negative] * len(PROMPTS), num_inference_steps=steps,
                guidance_scale=guidance, num_images_per_prompt=n, generator=gens, output_type="np",
                height=size, width=size).images


def gen_images(pipe, sampler, seed=7, n=2, steps=8, guidance=6.0, negative="blurry", size=32):
    return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                num_images_per_prompt=n, seed=seed, sampler=sampler, output_type="np", height=size, width=size).images


@pytest.fixture(scope="module")
def both(sd_folder):
    theirs = diffusers_pipeline(StableDiffusionPipeline, sd_folder, safety_checker=None)
    ours = Pipeline.from_pretrained(sd_folder)
    ours.progress = False
    return theirs, ours


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "euler", "euler-a", "dpm++2m-karras", "unipc", "heun"])
def test_gen_matches_diffusers_on_a_diffusers_folder(both, sampler):
    theirs, ours = both
    a = diffusers_images(theirs, sampler)
    b = gen_images(ours, sampler)
    assert a.shape == b.shape == (4, 32, 32, 3)
    assert np.abs(a - b).max() <= 1e-4
    assert a.std() > 0.01  # a real image, not a constant


def test_folder_saved_by_gen_loads_in_diffusers(both, tmp_path):
    _, ours = both
    ours.save_pretrained(tmp_path / "by-gen")
    theirs = diffusers_pipeline(StableDiffusionPipeline, tmp_path / "by-gen")
    reloaded = Pipeline.from_pretrained(tmp_path / "by-gen")
    reloaded.progress = False
    for sampler in ("ddim", "dpm++2m", "euler"):
        a = diffusers_images(theirs, sampler)
        b = gen_images(reloaded, sampler)
        assert np.abs(a - b).max() <= 1e-4
