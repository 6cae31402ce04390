"""SD3 as a family: parity with diffusers' StableDiffusion3Pipeline on tiny random weights (flow-euler and
flow-heun, two shifts, with and without a negative prompt, with a T5 encoder and without one), `gen info`."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from gen.errors import GenError
from tests.test_sdxl import PROMPTS, our_images, theirs_images
from tests.conftest import quiet_pipeline

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
    absent = {} if sd3_folder.name.endswith("with-t5") else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, **absent)  # diffusers' way to load without T5
    pipe.folder_scheduler_config = pipe.scheduler.config
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


@pytest.mark.parametrize("backend", ["math", "auto"])
def test_attention_backends_leave_joint_attention_to_diffusers(sd3_folder, ours, backend):
    """gen.attention.install_processor routes only diffusers' standard processors; SD3's joint attention keeps
    its JointAttnProcessor2_0, so every backend gives the sdpa images."""
    pipe = quiet_pipeline(sd3_folder, attention=backend)
    assert {type(p).__name__ for p in pipe.denoiser.attn_processors.values()} == {"JointAttnProcessor2_0"}
    assert np.abs(our_images(pipe, "flow-euler", n=1) - our_images(ours, "flow-euler", n=1)).max() <= 1e-4


def test_a_ddpm_sampler_and_the_fast_mode_are_refused(ours):
    with pytest.raises(GenError, match="flow model"):
        our_images(ours, "euler")
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
    absent = {} if ours.family.has_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    theirs = StableDiffusion3Pipeline.from_pretrained(tmp_path / "by-gen", **absent)
    theirs.folder_scheduler_config = theirs.scheduler.config
    theirs.set_progress_bar_config(disable=True)
    reloaded = quiet_pipeline(tmp_path / "by-gen")
    assert np.abs(theirs_images(theirs, "flow-euler") - our_images(reloaded, "flow-euler")).max() <= 1e-4
