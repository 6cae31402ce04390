"""Sizes and schedulers gen does not sample as asked are said, never silently changed."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import quiet_pipeline
from gen.errors import GenError

KW = dict(num_inference_steps=2, output_type="np", seed=0)


def picture(width, height):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3)).astype(np.uint8))


def refusal(call) -> str:
    with pytest.raises(GenError) as e:
        call()
    return str(e.value)


@pytest.mark.parametrize("mask", [False, True], ids=["img2img", "inpaint"])
def test_img2img_refuses_a_size_text_to_image_refuses(sd_folder, mask):
    """A height that is no multiple of the model's size multiple is refused with text-to-image's message, not
    rounded down; so is an image of such a size when no height/width is given (it is sampled at its own size)."""
    pipe = quiet_pipeline(sd_folder)
    m = pipe.size_multiple
    odd, good = 4 * m + 1, 4 * m
    extra = {"mask_image": Image.new("L", (odd, odd), 255)} if mask else {}
    text_to_image = refusal(lambda: pipe("x", height=odd, width=good, **KW))
    assert refusal(lambda: pipe("x", image=picture(odd, odd), height=odd, width=good, **KW, **extra)) == text_to_image
    own = refusal(lambda: pipe("x", image=picture(odd, odd), **KW, **extra))
    assert f"{odd}x{odd}" in own and f"multiples of {m}" in own and f"--width {good} --height {good}" in own
    out = pipe("x", image=picture(odd, odd), height=good + m, width=good, **KW, **extra).images  # resized as asked
    assert out.shape == (1, good + m, good, 3)


def test_the_cli_refuses_an_init_image_of_such_a_size_in_one_line(dit_folder, tmp_path):
    picture(33, 30).save(tmp_path / "src.png")  # the tiny DiT samples multiples of 4 (VAE factor 2, patch 2)
    r = subprocess.run([sys.executable, "-m", "gen", "sample", "x", "--model", str(dit_folder), "--init-image",
                        str(tmp_path / "src.png"), "--steps", "2", "--out", str(tmp_path / "out.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "the init image is 33x30" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out.png").exists()


# LCMScheduler and TCDScheduler folders sample with lcm and tcd: test_ksampling, test_ksampling_more
@pytest.mark.parametrize("scheduler", ["EDMEulerScheduler"])
def test_a_folder_scheduler_gen_has_no_sampler_for_is_named_in_a_warning(sd_folder, tmp_path, caplog, scheduler):
    folder = tmp_path / "distilled"
    shutil.copytree(sd_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text()) | {"_class_name": scheduler}
    config_file.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="gen"):
        pipe = quiet_pipeline(folder)
    said = [r.getMessage() for r in caplog.records if scheduler in r.getMessage()]
    assert len(said) == 1, caplog.text
    d = pipe.defaults
    assert f"samples with {d['sampler']} at {d['steps']} steps instead" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gen"):  # a scheduler gen has: no warning
        quiet_pipeline(sd_folder)
    assert not caplog.records, caplog.text
