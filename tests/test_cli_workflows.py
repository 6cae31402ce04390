"""`gen sample` with img2img, inpainting, the hires fix and prompt options, as real subprocesses: the flags, the
recipe written with A1111's field names, `--from` making the same image, and bad values."""

import numpy as np
import pytest
from PIL import Image

from test_cli import gen


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(root / "src.png")
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 4:20] = 255
    Image.fromarray(m).save(root / "mask.png")
    Image.new("L", (16, 16), 255).save(root / "small-mask.png")
    (root / "not-an-image.png").write_text("hello")
    return root


def params(path):
    return Image.open(path).text["parameters"]


def test_inpaint_and_prompt_flags_are_recorded_and_reproduced(dit_folder, images, tmp_path):
    r = gen("sample", "a (red:1.3) circle", "--model", dit_folder, "--init-image", images / "src.png", "--strength",
            0.6, "--mask", images / "mask.png", "--mask-blur", 2, "--clip-skip", 2, "--steps", 3, "--seed", 4,
            "--out", tmp_path / "a.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    text = params(tmp_path / "a.png")
    for field in ("Denoising strength: 0.6", "Clip skip: 2", "Mask blur: 2", "Size: 32x32",
                  f"gen init image: {(images / 'src.png').resolve()}", f"gen mask: {(images / 'mask.png').resolve()}"):
        assert field in text, text
    r = gen("sample", "--from", tmp_path / "a.png", "--out", tmp_path / "b.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    r = gen("sample", "--from", tmp_path / "a.png", "--no-weighting", "--inpaint-full-res", "--inpaint-padding", 4,
            "--out", tmp_path / "c.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    text = params(tmp_path / "c.png")
    assert "Emphasis: None" in text and "Inpaint area: Only masked, Masked area padding: 4" in text


def test_hires_fix_is_recorded_and_reproduced(dit_folder, tmp_path):
    r = gen("sample", "a red circle", "--model", dit_folder, "--hires", 1.5, "--hires-strength", 0.5,
            "--hires-upscaler", "image", "--steps", 2, "--seed", 4, "--out", tmp_path / "a.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "a.png").size == (48, 48)
    text = params(tmp_path / "a.png")
    assert "Size: 32x32" in text and "Denoising strength: 0.5" in text and "Hires upscale: 1.5" in text
    assert "Hires upscaler: Lanczos" in text
    r = gen("sample", "--from", tmp_path / "a.png", "--out", tmp_path / "b.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()


@pytest.mark.parametrize("args, msg", [
    (["--init-image", "{src}", "--strength", "1.5"], "--strength must be in [0, 1], not 1.5"),
    (["--init-image", "{src}", "--mask", "{dir}/small-mask.png"], "--mask is 16x16 but --init-image is 32x32"),
    (["--init-image", "{dir}/not-an-image.png"], "--init-image"),
    (["--mask", "{dir}/mask.png"], "--mask needs --init-image"),
    (["--init-image", "{src}", "--inpaint-full-res"], "--inpaint-full-res needs --mask"),
    (["--hires", "0.5"], "hires scale must be a number in [1, 8]"),
    (["--hires", "2", "--init-image", "{src}"], "--hires is for text-to-image"),
    (["--clip-skip", "0"], "--clip-skip must be >= 1"),
])
def test_bad_values_one_line_exit_2(dit_folder, images, tmp_path, args, msg):
    args = [a.replace("{src}", str(images / "src.png")).replace("{dir}", str(images)) for a in args]
    r = gen("sample", "a red circle", "--model", dit_folder, *args, "--out", tmp_path / "o.png")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, r.stderr
