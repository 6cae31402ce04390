"""SD3 as a family: parity with diffusers' StableDiffusion3Pipeline on tiny random weights (flow-euler and
flow-heun, two shifts, with and without a negative prompt, with a T5 encoder and without one, skip-layer guidance,
dynamic shifting, T5's token length), `gen info`. Attention backends: tests/test_attention.py."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from gen.errors import GenError
from tests.test_sdxl import PROMPTS, our_images, theirs_images
from tests.conftest import diffusers_pipeline, quiet_pipeline

SIZE = 32


def with_shift(folder, shift, tmp_path):
    """A copy of the folder whose scheduler has this shift."""
    if shift is None:
        return folder
    copy = tmp_path / f"shift-{shift}"
    shutil.copytree(folder, copy)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"shift": shift}))
    return copy


@pytest.fixture(scope="module")
def theirs(sd3_folder):
    return diffusers_pipeline(StableDiffusion3Pipeline, sd3_folder)


@pytest.fixture(scope="module")
def ours(sd3_folder):
    return quiet_pipeline(sd3_folder)


def test_an_sd3_folder_is_recognised_with_its_text_encoders(ours, sd3_folder):
    assert ours.family.name == "sd3"
    t5 = sd3_folder.name.endswith("with-t5")
    expected = ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"] * t5
    assert [type(t.model).__name__ for t in ours.texts] == expected
    assert ours.formulation.kind == "flow" and ours.formulation.shift == 3.0
    assert ours.defaults == dict(steps=28, guidance=7.0, height=32, width=32, sampler="flow-euler",
                                 guidance_rescale=0.0)


def test_conditioning_is_diffusers_encode_prompt(theirs, ours):
    with torch.no_grad():  # as in their __call__ (with autograd on, T5 differs in the last bits)
        theirs_cond = theirs.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                           negative_prompt=["blurry"] * 2)
    cond = ours.encode_prompts(PROMPTS)
    neg = ours.family.encode_negative(ours.texts, ["blurry"] * 2, True, SIZE, SIZE)
    # 77 CLIP tokens then 256 T5 positions (zeros without a T5), 80 wide; both CLIPs' pooled, 32 + 32
    assert cond["hidden"].shape == (2, 77 + 256, 80) and cond["pooled"].shape == (2, 64)
    for a, b in zip(theirs_cond, (cond["hidden"], neg["hidden"], cond["pooled"], neg["pooled"])):
        assert torch.equal(a, b)
    assert not torch.equal(neg["hidden"], torch.zeros_like(neg["hidden"]))  # negatives are encoded, not zeroed


@pytest.mark.parametrize("shift", [None, 1.5])  # the folder's 3.0, and another
@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun"])
def test_sd3_matches_diffusers(theirs, sd3_folder, tmp_path, sampler, shift):
    ours = quiet_pipeline(with_shift(sd3_folder, shift, tmp_path))
    a = theirs_images(theirs, sampler, scheduler=None if shift is None else {"shift": shift})
    b = our_images(ours, sampler)
    assert a.shape == b.shape == (4, SIZE, SIZE, 3)
    assert a.std() > 0.01
    assert np.abs(a - b).max() <= 1e-4


def test_no_negative_prompt_is_the_empty_prompt_encoded(theirs, ours):
    a, b = theirs_images(theirs, "flow-euler", negative=None), our_images(ours, "flow-euler", negative=None)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - our_images(ours, "flow-euler")).max() > 1e-3  # the negative prompt changes the images


def test_the_shift_changes_the_images(ours, sd3_folder, tmp_path):
    other = quiet_pipeline(with_shift(sd3_folder, 1.5, tmp_path))
    assert np.abs(our_images(ours, "flow-euler", n=1) - our_images(other, "flow-euler", n=1)).max() > 1e-3


def test_a_ddpm_sampler_and_the_fast_mode_are_refused(ours):
    with pytest.raises(GenError, match="'ddim' cannot sample flow models"):
        our_images(ours, "ddim")
    assert np.array_equal(our_images(ours, "euler", n=1), our_images(ours, "flow-euler", n=1))  # A1111's Euler
    with pytest.raises(GenError, match="fast mode supports .* not SD3Transformer2DModel"):
        our_images(ours, "flow-euler", cache_interval=2)


def test_gen_info_names_the_family(sd3_folder, capsys):
    from gen.cli import main

    main(["info", str(sd3_folder)])
    assert "family: SD3" in capsys.readouterr().out


def test_folder_saved_by_gen_loads_in_diffusers_with_the_same_images(ours, sd3_folder, tmp_path):
    ours.save_pretrained(tmp_path / "by-gen")
    index = json.loads((tmp_path / "by-gen" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert (index["text_encoder_3"][0] is None) == sd3_folder.name.endswith("no-t5")
    theirs = diffusers_pipeline(StableDiffusion3Pipeline, tmp_path / "by-gen")
    reloaded = quiet_pipeline(tmp_path / "by-gen")
    assert np.abs(theirs_images(theirs, "flow-euler") - our_images(reloaded, "flow-euler")).max() <= 1e-4


def with_config(folder, tmp_path, **settings):
    """A copy of the folder whose scheduler config has these settings."""
    copy = tmp_path / "configured"
    shutil.copytree(folder, copy)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | settings))
    return copy


@pytest.mark.parametrize("sampler,slg", [
    ("flow-euler", dict(skip_guidance_layers=[0])),  # diffusers' defaults: scale 2.8 from 1% to 20% of the steps
    ("flow-heun", dict(skip_guidance_layers=[0], skip_layer_guidance_scale=4.0, skip_layer_guidance_start=0.0,
                       skip_layer_guidance_stop=0.6))])
def test_skip_layer_guidance_matches_diffusers(theirs, ours, sampler, slg):
    a, b = theirs_images(theirs, sampler, n=1, **slg), our_images(ours, sampler, n=1, **slg)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - our_images(ours, sampler, n=1)).max() > 1e-3  # it changes the images


def test_skip_layer_guidance_is_checked_and_needs_cfg(ours, caplog):
    with pytest.raises(GenError, match=r"^skip-layer guidance layers must be in 0\.\.0 for this model, not \[3\]$"):
        our_images(ours, "flow-euler", skip_guidance_layers=[3])
    with pytest.raises(GenError, match="start and stop"):
        our_images(ours, "flow-euler", skip_guidance_layers=[0], skip_layer_guidance_start=0.5,
                   skip_layer_guidance_stop=0.1)
    with caplog.at_level("INFO", logger="gen"):
        plain = our_images(ours, "flow-euler", n=1, guidance=1.0)
        assert np.array_equal(plain, our_images(ours, "flow-euler", n=1, guidance=1.0, skip_guidance_layers=[0]))
    assert "needs classifier-free guidance" in caplog.text


def test_dynamic_shifting_matches_diffusers(sd3_folder, tmp_path):
    """An SD3.5-style scheduler with use_dynamic_shifting: mu from the image's token count, as diffusers computes it."""
    folder = with_config(sd3_folder, tmp_path, use_dynamic_shifting=True, base_image_seq_len=64,
                         max_image_seq_len=1024, base_shift=0.5, max_shift=1.16)
    theirs = diffusers_pipeline(StableDiffusion3Pipeline, folder)
    ours = quiet_pipeline(folder)
    a, b = theirs_images(theirs, "flow-euler", n=1), our_images(ours, "flow-euler", n=1)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - our_images(quiet_pipeline(sd3_folder), "flow-euler", n=1)).max() > 1e-3
    with pytest.raises(GenError, match=r"^sampler 'flow-heun' cannot take this model's dynamic shift "
                                       r"\(use_dynamic_shifting\); samplers that can: flow-euler$"):
        our_images(ours, "flow-heun")


def test_max_sequence_length_is_diffusers_or_needs_t5(theirs, ours):
    if not ours.family.has_t5:
        with pytest.raises(GenError, match=r"^max_sequence_length .* this SD3 model has no T5 encoder "
                                           r"\(text_encoder_3\); leave it out or use a folder with text_encoder_3/$"):
            our_images(ours, "flow-euler", max_sequence_length=32)
        return
    a = theirs_images(theirs, "flow-euler", n=1, max_sequence_length=32)
    b = our_images(ours, "flow-euler", n=1, max_sequence_length=32)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - our_images(ours, "flow-euler", n=1)).max() > 1e-3
