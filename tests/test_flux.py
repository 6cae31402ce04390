"""Flux as a family: parity with diffusers' FluxPipeline on tiny random weights (dev-style with the guidance
embedding, schnell-style without; two sizes; true CFG), the packing, refusals, `gen info`."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from transformers import T5TokenizerFast

from gen import families
from gen.errors import GenError
from gen.info import describe
from tests.conftest import quiet_pipeline

PROMPTS = ["a red circle", "a blue square left of a green triangle"]


@pytest.fixture(scope="module")
def theirs(flux_folder):
    pipe = FluxPipeline.from_pretrained(flux_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(flux_folder):
    return quiet_pipeline(flux_folder)


def theirs_images(pipe, seed=7, n=2, steps=4, guidance=3.5, height=16, width=16, **kw):
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(PROMPTS) * n)]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
                generator=gens, output_type="np", height=height, width=width, **kw).images


def our_images(pipe, seed=7, n=2, steps=4, guidance=3.5, height=16, width=16, **kw):
    """gen's images; on a schnell model, which refuses a guidance value, its default (diffusers ignores it)."""
    guidance = guidance if pipe.denoiser.config.guidance_embeds else None
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n, seed=seed,
                output_type="np", height=height, width=width, **kw).images


def test_a_flux_folder_is_recognised_with_clip_and_t5(ours, flux_folder):
    assert ours.family.name == "flux"
    assert [type(t.model).__name__ for t in ours.texts] == ["CLIPTextModel", "T5EncoderModel"]
    assert isinstance(ours.texts[1].tokenizer, T5TokenizerFast) and ours.texts[1].max_length == 512
    dev = ours.denoiser.config.guidance_embeds
    assert (ours.defaults["steps"], ours.defaults["guidance"]) == ((28, 3.5) if dev else (4, 0.0))
    assert "family: Flux" in describe(flux_folder)


@pytest.mark.parametrize("height,width", [(16, 16), (16, 24)])
def test_flux_matches_diffusers(theirs, ours, height, width):
    a, b = theirs_images(theirs, height=height, width=width), our_images(ours, height=height, width=width)
    assert a.shape == b.shape == (4, height, width, 3)
    assert a.std() > 0.01
    assert np.abs(a - b).max() <= 1e-4


def test_the_guidance_value_is_embedded_on_dev_and_refused_on_schnell(theirs, ours):
    if not ours.denoiser.config.guidance_embeds:  # diffusers would ignore it silently
        with pytest.raises(GenError, match=r"^this Flux model \(schnell-style\) has no guidance input, so guidance 8 "
                                           r"would change nothing; leave --guidance out"):
            ours("a cat", num_inference_steps=1, guidance_scale=8.0, height=16, width=16)
        return
    low, high = our_images(ours, n=1, guidance=1.0), our_images(ours, n=1, guidance=8.0)
    assert np.abs(low - high).max() > 1e-3
    assert np.abs(theirs_images(theirs, n=1, guidance=8.0) - high).max() <= 1e-4


def test_max_sequence_length_is_diffusers(theirs, ours):
    a, b = theirs_images(theirs, n=1, max_sequence_length=24), our_images(ours, n=1, max_sequence_length=24)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - our_images(ours, n=1)).max() > 1e-4


def test_true_cfg_with_a_negative_prompt_matches_diffusers(theirs, ours):
    neg = ["blurry photo"] * len(PROMPTS)
    a = theirs_images(theirs, n=1, negative_prompt=neg, true_cfg_scale=4.0)
    b = our_images(ours, n=1, negative_prompt="blurry photo", true_cfg_scale=4.0)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - our_images(ours, n=1)).max() > 1e-3


def test_a_folder_saved_by_gen_loads_in_diffusers_with_the_same_images(ours, tmp_path):
    ours.save_pretrained(tmp_path / "by-gen")
    theirs = FluxPipeline.from_pretrained(tmp_path / "by-gen")
    theirs.set_progress_bar_config(disable=True)
    reloaded = quiet_pipeline(tmp_path / "by-gen")
    assert reloaded.family.name == "flux"
    assert np.abs(theirs_images(theirs, n=1) - our_images(reloaded, n=1)).max() <= 1e-4


def test_pack_and_unpack_are_diffusers_and_inverse():
    fam = families.get("flux")
    x = torch.randn(2, 4, 6, 8)
    packed, extra = fam.pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(extra["img_ids"][0], FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", x.dtype))
    assert torch.equal(fam.unpack(packed, 6, 8), x)


def test_a_size_that_does_not_pack_is_a_one_line_error(ours):
    with pytest.raises(GenError, match=r"^height must be a positive multiple of 4 for this model, not 18$"):
        ours("a cat", height=18, width=16, num_inference_steps=1)


def test_latent_output_is_unpacked_and_unsupported_options_are_refused(ours):
    out = ours("a cat", height=16, width=24, num_inference_steps=1, seed=0, output_type="latent").images
    assert out.shape == (1, 4, 8, 12)
    with pytest.raises(GenError, match="fast mode"):
        ours("a cat", height=16, width=16, num_inference_steps=2, cache_interval=2)
    with pytest.raises(GenError, match=r"^sampler 'flow-heun' cannot take Flux's shifted sigmas \(FluxPipeline cannot "
                                       r"run it either\); samplers that can: flow-euler$"):
        ours("a cat", height=16, width=16, num_inference_steps=2, sampler="flow-heun")
    with pytest.raises(GenError, match=r"^skip-layer guidance is for SD3 models; a Flux model cannot skip layers$"):
        ours("a cat", height=16, width=16, num_inference_steps=2, skip_guidance_layers=[0])


def test_true_cfg_on_another_family_is_refused(dit_pipe):
    with pytest.raises(GenError, match="true_cfg_scale"):
        dit_pipe("a cat", num_inference_steps=1, true_cfg_scale=2.0)


def test_gen_sample_on_the_command_line_writes_the_pipelines_image(ours, flux_folder, tmp_path):
    from PIL import Image

    from gen.cli import main

    main(["sample", "a red circle", "--model", str(flux_folder), "--steps", "2", "--seed", "3", "--height", "16",
          "--width", "24", "--out", str(tmp_path / "a.png"), "--no-progress"])
    made = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    want = ours("a red circle", num_inference_steps=2, seed=3, height=16, width=24).images[0]
    assert np.array_equal(made, np.asarray(want))
