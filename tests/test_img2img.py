"""img2img, inpainting and the hires fix: parity with diffusers' pipelines on the same weights, and the rules."""

import numpy as np
import pytest
import torch
from diffusers import (StableDiffusion3Img2ImgPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       UNet2DConditionModel)
from PIL import Image

from tests.conftest import diffusers_pipeline, quiet_pipeline, tiny_sd_components
from gen.errors import GenError
from gen.samplers import SAMPLERS

KW = dict(num_inference_steps=6, guidance_scale=6.0, output_type="np")


def source(size=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8))


def mask(size=32):
    m = np.zeros((size, size), np.uint8)
    m[8:24, 4:20] = 255
    return Image.fromarray(m)


def use(theirs, sampler):
    cls, settings = SAMPLERS[sampler][1:]
    theirs.scheduler = cls.from_config(theirs.folder_scheduler_config, **settings)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def gens(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def sd(sd_folder):
    i2i = diffusers_pipeline(StableDiffusionImg2ImgPipeline, sd_folder, safety_checker=None)
    inpaint = diffusers_pipeline(StableDiffusionInpaintPipeline, sd_folder, safety_checker=None)
    return i2i, inpaint, quiet_pipeline(sd_folder)


@pytest.mark.parametrize("sampler, strength", [("ddim", 0.6), ("euler-a", 0.75), ("dpm++2m", 0.5)])
def test_img2img_matches_diffusers(sd, sampler, strength):
    theirs, _, ours = sd
    a = use(theirs, sampler)(["a red circle"], image=source(), strength=strength, negative_prompt=["blurry"],
                             num_images_per_prompt=2, generator=gens(3, 2), **KW).images
    b = ours("a red circle", image=source(), strength=strength, negative_prompt="blurry", num_images_per_prompt=2,
             seed=3, sampler=sampler, **KW).images
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("sampler, strength", [("ddim", 1.0), ("euler-a", 0.7)])
def test_inpainting_with_a_regular_unet_matches_diffusers(sd, sampler, strength):
    _, theirs, ours = sd
    a = use(theirs, sampler)(["a red circle"], image=source(), mask_image=mask(), strength=strength, height=32,
                             width=32, negative_prompt=["blurry"], generator=gens(3, 1), **KW).images
    b = ours("a red circle", image=source(), mask_image=mask(), strength=strength, negative_prompt="blurry", seed=3,
             sampler=sampler, **KW).images
    assert np.abs(a - b).max() <= 1e-4


def test_inpainting_only_the_masked_area_matches_diffusers(sd):
    _, theirs, ours = sd
    a = use(theirs, "euler-a")("a red circle", image=source(), mask_image=mask(), strength=0.8, height=32, width=32,
                               padding_mask_crop=4, generator=gens(3, 1), num_inference_steps=5).images[0]
    b = ours("a red circle", image=source(), mask_image=mask(), strength=0.8, height=32, width=32,
             padding_mask_crop=4, seed=3, sampler="euler-a", num_inference_steps=5).images[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # 8-bit rounding


def test_inpainting_keeps_the_unmasked_latents_and_blur_pastes_the_source(sd):
    *_, ours = sd
    call = dict(image=source(), seed=3, sampler="ddim", num_inference_steps=6)
    x0 = ours("a red circle", strength=0.0, output_type="latent", **call).images  # strength 0: the source latents
    z = ours("a red circle", mask_image=mask(), strength=0.7, output_type="latent", **call).images
    keep = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask()) / 255.0)[None, None].float(),
                                           size=z.shape[-2:]) < 0.5
    assert torch.equal(z[keep.expand_as(z)], x0[keep.expand_as(x0)])
    assert not torch.equal(z, x0)
    blurred = np.asarray(ours("a red circle", mask_image=mask(), mask_blur=2, **call).images[0])
    far = np.ones((32, 32), bool)
    far[2:30, 0:26] = False  # beyond the blur's reach of the mask's box
    assert np.array_equal(blurred[far], np.asarray(source())[far])


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory):
    """A tiny SD-1.5-inpainting layout: a 9-channel UNet (latents, mask, masked image latents)."""
    parts = tiny_sd_components()
    torch.manual_seed(1)
    parts["unet"] = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=9,
                                         out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                         norm_num_groups=32)
    path = tmp_path_factory.mktemp("inpainting") / "tiny-sd-inpainting"
    StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(path)
    return path


@pytest.mark.parametrize("sampler, strength", [("ddim", 1.0), ("euler-a", 0.7)])
def test_a_nine_channel_inpainting_unet_matches_diffusers(inpainting_folder, sampler, strength):
    theirs = diffusers_pipeline(StableDiffusionInpaintPipeline, inpainting_folder, safety_checker=None)
    ours = quiet_pipeline(inpainting_folder)
    a = use(theirs, sampler)(["a red circle"], image=source(), mask_image=mask(), strength=strength, height=32,
                             width=32, negative_prompt=["blurry"], generator=gens(3, 1), **KW).images
    b = ours("a red circle", image=source(), mask_image=mask(), strength=strength, negative_prompt="blurry", seed=3,
             sampler=sampler, **KW).images
    assert np.abs(a - b).max() <= 1e-4
    assert ours("a red circle", num_inference_steps=2, seed=1, output_type="np").images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("sd3_folder", ["with-t5"], indirect=True)  # diffusers' SD3 img2img needs its T5
def test_sd3_img2img_matches_diffusers(sd3_folder):
    theirs = StableDiffusion3Img2ImgPipeline.from_pretrained(sd3_folder)
    theirs.set_progress_bar_config(disable=True)
    ours = quiet_pipeline(sd3_folder)
    for strength in (0.6, 0.7):
        a = theirs("a red circle", image=source(), strength=strength, negative_prompt="blurry", generator=gens(3, 1),
                   **KW).images
        b = ours("a red circle", image=source(), strength=strength, negative_prompt="blurry", seed=3, **KW).images
        assert np.abs(a - b).max() <= 1e-4


def count_steps(pipe, **kw):
    calls = []
    handle = pipe.denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe("a red circle", image=source(), guidance_scale=1.0, seed=0, output_type="latent", **kw)
    finally:
        handle.remove()
    return len(calls)


def test_strength_sets_the_steps_run(dit_pipe, sd):
    *_, sd_pipe = sd
    assert count_steps(dit_pipe, strength=0.55, num_inference_steps=10) == 6  # flow: 10 - int(10 - 5.5)
    assert count_steps(dit_pipe, strength=0.0, num_inference_steps=10) == 0
    assert count_steps(sd_pipe, strength=0.55, num_inference_steps=10, sampler="ddim") == 5  # DDPM: int(5.5)


def test_image_k_of_a_batch_equals_it_alone_and_hires_fix(dit_pipe):
    both = dit_pipe("a red circle", image=source(), strength=0.6, num_images_per_prompt=2, seed=5,
                    num_inference_steps=4, output_type="np").images
    alone = dit_pipe("a red circle", image=source(), strength=0.6, seed=6, num_inference_steps=4,
                     output_type="np").images
    assert np.abs(both[1] - alone[0]).max() <= 1e-6
    for upscaler in ("latent", "image"):
        hi = dit_pipe("a red circle", num_images_per_prompt=2, seed=5, num_inference_steps=3, hires_scale=1.5,
                      hires_upscaler=upscaler, output_type="np")
        assert hi.images.shape == (2, 48, 48, 3) and hi.seeds == [5, 6]
        one = dit_pipe("a red circle", seed=6, num_inference_steps=3, hires_scale=1.5, hires_upscaler=upscaler,
                       output_type="np").images
        assert np.abs(hi.images[1] - one[0]).max() <= 1e-6


@pytest.mark.parametrize("kw, msg", [
    ({"strength": 1.5}, r"strength must be a number in \[0, 1\]"),
    ({"strength": -0.1}, r"strength must be a number in \[0, 1\]"),
    ({"mask_image": mask(16)}, "the mask is 16x16 but the image is 32x32"),
    ({"mask_image": Image.new("L", (32, 32))}, "the mask is all black"),
    ({"image": "/nonexistent.png"}, "no such file"),
    ({"image": None, "strength": 0.5}, "need an image"),
    ({"mask_blur": -1}, "mask_blur must be"),
    ({"hires_scale": 0.5, "image": None}, "hires scale must be"),
    ({"hires_scale": 2.0}, "hires fix is for text-to-image"),
])
def test_bad_input_is_a_clear_error(dit_pipe, kw, msg):
    with pytest.raises(GenError, match=msg):
        dit_pipe("a red circle", **{"image": source(), **kw})


@pytest.mark.parametrize("flux_folder", [True], indirect=True, ids=["dev"])
def test_flux_img2img_matches_diffusers(flux_folder):
    from diffusers import FluxImg2ImgPipeline

    theirs = FluxImg2ImgPipeline.from_pretrained(flux_folder)
    theirs.set_progress_bar_config(disable=True)
    ours = quiet_pipeline(flux_folder)
    a = theirs("a red circle", image=source(), strength=0.6, num_inference_steps=6, guidance_scale=3.5, height=32,
               width=32, generator=gens(3, 1), output_type="np").images
    b = ours("a red circle", image=source(), strength=0.6, num_inference_steps=6, guidance_scale=3.5, seed=3,
             output_type="np").images
    assert np.abs(a - b).max() <= 1e-4
