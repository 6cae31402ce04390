"""`gen sample` as a real subprocess: its images equal the Python API's and diffusers', its refusals are one line,
and the model hash it computes beside sampling never holds an image or an exit back."""

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from gen.recipe import read_png
from gen.samplers import SAMPLERS
from tests.conftest import diffusers_pipeline, quiet_pipeline
from tests.test_cli import gen, one_line_error

SDXL = dict(prompt="a red circle", steps=3, guidance=6.0, seed=5, size=32)


def test_sdxl_without_a_negative_prompt_is_diffusers_image_and_the_apis(sdxl_folder, tmp_path):
    """No --negative-prompt is diffusers' negative_prompt=None (zero negative conditioning on SDXL, its
    force_zeros_for_empty_prompt), in gen sample, in gen.Pipeline and again from the PNG's recipe."""
    s = SDXL
    out = tmp_path / "a.png"
    r = gen("sample", s["prompt"], "--model", sdxl_folder, "--steps", s["steps"], "--guidance", s["guidance"],
            "--seed", s["seed"], "--height", s["size"], "--width", s["size"], "--sampler", "euler", "--out", out,
            "--no-progress")
    assert r.returncode == 0, r.stderr
    cli = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    api = quiet_pipeline(sdxl_folder)(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                                      seed=s["seed"], height=s["size"], width=s["size"], sampler="euler").images[0]
    assert np.array_equal(cli, np.asarray(api, dtype=np.int16))
    theirs = diffusers_pipeline(StableDiffusionXLPipeline, sdxl_folder)
    theirs.scheduler = SAMPLERS["euler"][1].from_config(theirs.scheduler.config, **SAMPLERS["euler"][2])
    ref = theirs(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["size"],
                 width=s["size"], generator=torch.Generator("cpu").manual_seed(s["seed"]), output_type="np").images[0]
    assert cli.std() > 3 and np.abs(cli - (ref * 255).round()).max() <= 1
    assert read_png(out).negative_prompt == ""
    again = tmp_path / "b.png"
    assert gen("sample", "--from", out, "--out", again, "--no-progress").returncode == 0
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB"), dtype=np.int16), cli)


def test_a_malformed_prompt_weight_is_one_line(dit_folder, tmp_path):
    for flags in ([], ["--negative-prompt", "(blurry:1.2.3)"]):
        prompt = "a red circle" if flags else "a (red:1.2.3) circle"
        one_line_error(gen("sample", prompt, *flags, "--model", dit_folder, "--out", tmp_path),
                       "the prompt weight in (...:1.2.3) is not a number; write it as (word:1.2), or write \\( and \\) "
                       "for literal brackets")


def test_a_lora_folder_is_loaded_and_hashed_as_its_weights_file(sd_folder, tmp_path):
    """--lora FOLDER (what diffusers' training scripts write) samples with the file in it, whose hash is recorded."""
    from gen.recipe import lora_hash
    from tests.test_lora import peft_lora_saved_by_diffusers

    folder = tmp_path / "my-lora"
    folder.mkdir()
    weights = peft_lora_saved_by_diffusers(folder / "pytorch_lora_weights.safetensors", 1, r=2, unet_alpha=2,
                                           text_alpha=2)
    args = ["sample", "a cat", "--model", sd_folder, "--steps", 2, "--seed", 1, "--height", 16, "--width", 16,
            "--no-progress"]
    r = gen(*args, "--lora", f"{folder}:0.5", "--out", tmp_path / "folder.png")
    assert r.returncode == 0, r.stderr
    assert read_png(tmp_path / "folder.png").lora_hashes == {"my-lora": lora_hash(weights)}
    assert gen(*args, "--lora", f"{weights}:0.5", "--out", tmp_path / "file.png").returncode == 0
    made = np.asarray(Image.open(tmp_path / "folder.png"))
    assert np.array_equal(made, np.asarray(Image.open(tmp_path / "file.png")))
    r = gen("sample", "--from", tmp_path / "folder.png", "--out", tmp_path / "again.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), made)


def test_clip_skip_beyond_the_text_tower_is_one_line(dit_folder, tmp_path):
    one_line_error(gen("sample", "a cat", "--model", dit_folder, "--clip-skip", 4, "--out", tmp_path),
                   "clip_skip (--clip-skip) 4 is more than the 2 layers of this model's CLIP text tower; use 1 to 2")


def hashed_model(dit_folder, tmp_path, name: str):
    """A copy of the tiny model with one more weights-named file, `name`, for the model hash to read."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(dit_folder, model)
    return model, model / name


def sigterm_caught(pid: int) -> bool:
    """Whether the process has installed its SIGTERM handler (gen sample does so once its model is loaded)."""
    import signal
    from pathlib import Path

    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_does_not_wait_for_the_model_hash(dit_folder, tmp_path):
    """The model is hashed in a thread while sampling; a SIGTERM ends the command at once, not after the hash (a
    100 GB sparse file takes minutes to read here)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model, big = hashed_model(dit_folder, tmp_path, "zz-big.safetensors")
    with open(big, "wb") as f:
        f.truncate(100 << 30)
    proc = subprocess.Popen([sys.executable, "-m", "gen", "sample", "a cat", "--model", str(model), "--steps", "1",
                             "--out", str(tmp_path / "out"), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and not sigterm_caught(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 143 and stderr.strip().splitlines()[-1].startswith("gen: interrupted: wrote 0 of 1")
    finally:
        proc.kill()
        proc.wait()


def test_a_model_hash_that_fails_keeps_the_images(dit_folder, tmp_path):
    """A weights file that cannot be read (here /proc/self/mem, whose first bytes give an I/O error) costs the
    recipe its `Model hash` and a warning, not the images."""
    model, bad = hashed_model(dit_folder, tmp_path, "zz-unreadable.safetensors")
    bad.symlink_to("/proc/self/mem")
    r = gen("sample", "a cat", "--model", model, "--steps", 1, "--seed", 2, "--out", tmp_path / "a.png",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "WARNING: the model hash is unknown: could not hash" in r.stderr and "Input/output error" in r.stderr
    assert read_png(tmp_path / "a.png").model_hash is None and read_png(tmp_path / "a.png").seed == 2
