"""The `gen` command, run as a real subprocess."""

import subprocess
import sys

import pytest
from PIL import Image

from gen.recipe import read_png


def gen(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_sample_writes_pngs_with_a1111_parameters(dit_folder, tmp_path):
    r = gen("sample", "a red circle", "--model", dit_folder, "--negative-prompt", "blurry", "--steps", 3,
            "--guidance", 4.5, "--seed", 42, "--num-images", 3, "--batch-size", 2, "--sampler", "flow-heun",
            "--out", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["42.png", "43.png", "44.png"]  # two calls: seeds 42-43, then 44
    params = Image.open(files[1]).text["parameters"]
    assert params.splitlines()[0] == "a red circle"
    assert params.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: Heun, Schedule type: Simple, CFG scale: 4.5, Seed: 43, Size: 32x32, Model hash: " \
        in params
    assert ", Model: tiny-dit, gen sampler: flow-heun, " in params  # A1111's sampler name, and gen's own
    # the parameters regenerate the image: the same seed alone (not the second of a batch) gives the same pixels
    r = gen("sample", "a red circle", "--model", dit_folder, "--negative-prompt", "blurry", "--steps", 3,
            "--guidance", 4.5, "--seed", 43, "--sampler", "flow-heun", "--out", tmp_path / "again.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(files[1]).tobytes()


def test_sample_never_overwrites(dit_folder, tmp_path):
    for _ in range(2):
        assert gen("sample", "x", "--model", dit_folder, "--steps", 1, "--seed", 5, "--out", tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5-1.png", "5.png"]


@pytest.mark.parametrize("args, msg", [
    (["--model", "/nonexistent/model"], "model folder not found"),
    (["--model", "{tmp}"], "not a model folder"),
    (["--height", "30"], "height must be a positive multiple of 4"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--guidance", "-2"], "--guidance must be >= 0"),
    (["--sampler", "bogus"], "unknown sampler 'bogus' (`gen sample --list-samplers` lists them all)"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--seed", "-5"], "seed must be an integer"),
])
def test_bad_input_one_line_exit_2(dit_folder, tmp_path, args, msg):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args += ["--model", str(dit_folder)]
    r = gen("sample", "a red circle", *args, "--out", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("gen: error")]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_empty_and_unicode_prompts_work(dit_folder, tmp_path):
    for i, prompt in enumerate(["", "un cercle rouge ✓ 赤い"]):
        r = gen("sample", prompt, "--model", dit_folder, "--steps", 2, "--out", tmp_path / f"{i}.png")
        assert r.returncode == 0, r.stderr
        assert read_png(tmp_path / f"{i}.png").prompt == prompt


def test_info_describes_a_model_folder(dit_folder, sd_folder):
    r = gen("info", dit_folder)
    assert r.returncode == 0, r.stderr
    assert "transformer: DiT" in r.stdout and "formulation: flow" in r.stdout
    assert "sampler=flow-euler" in r.stdout
    r = gen("info", sd_folder)
    assert r.returncode == 0, r.stderr
    assert "unet: UNet2DConditionModel" in r.stdout and "prediction_type=epsilon" in r.stdout
    r = gen("info", "/nonexistent")
    assert r.returncode == 2 and "not found" in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = gen("--debug", "sample", "x", "--model", tmp_path / "missing")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_version_report_names_gen_and_the_key_dependencies():
    from importlib.metadata import version

    r = gen("--version")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        assert lines[name] == version(name)  # what is installed, not what is imported by default
    assert lines["gen"] == version("gen") and lines["python"].startswith(sys.version.split()[0])
    assert gen("info", "--versions").stdout == r.stdout
    r = gen("info")  # no path: the bundled model, as `gen sample` uses it (tests/train/test_newcomer.py)
    assert r.returncode == 0 and "model folder" in r.stdout and "Traceback" not in r.stderr


def test_an_interrupted_batch_keeps_what_was_made_and_says_how_many(dit_folder, tmp_path):
    """SIGTERM (what a scheduler sends) in the middle of `--num-images 6`: the images made so far are there,
    whole, and the last line says how many."""
    import os
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gen", "sample", "a red circle", "--model", str(dit_folder),
                             "--steps", "4", "--seed", "7", "--num-images", "6", "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not list(out.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)  # frozen after its first image: the signal lands mid-batch
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr
    files = sorted(out.iterdir())
    assert 1 <= len(files) < 6 and all(f.suffix == ".png" for f in files)  # no half-written file
    assert stderr.strip().splitlines()[-1] == f"gen: interrupted: wrote {len(files)} of 6 images ({out})"
    assert stdout.split() == [str(f) for f in files] == [str(out / f"{7 + i}.png") for i in range(len(files))]
    for f in files:
        Image.open(f).load()


def one_line_error(r, message):
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"gen: error: {message}"], r.stderr


def test_sd3_options_on_the_command_line(sd3_folder, tmp_path):
    """--max-sequence-length needs a T5 (a T5-less folder refuses it in one line); with one, it runs beside
    skip-layer guidance, offload and bf16 weights."""
    args = ["sample", "a red circle", "--model", sd3_folder, "--steps", 2, "--height", 16, "--width", 16,
            "--max-sequence-length", 16, "--out", tmp_path / "a.png", "--no-progress"]
    if "no-t5" in sd3_folder.name:
        one_line_error(gen(*args), "max_sequence_length (--max-sequence-length) sets the T5 encoder's token length, "
                                   "but this SD3 model has no T5 encoder (text_encoder_3); leave it out or use a "
                                   "folder with text_encoder_3/")
        return
    r = gen(*args, "--slg-layers", "0", "--slg-scale", 3, "--slg-stop", 0.9, "--offload", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "a.png").size == (16, 16)


def test_flux_refusals_on_the_command_line(flux_folder, tmp_path):
    """A guidance value on a schnell-style model (which has no guidance input) and skip-layer guidance on Flux."""
    args = ["sample", "a cat", "--model", flux_folder, "--steps", 1, "--height", 16, "--width", 16, "--out", tmp_path]
    if not _guidance_embeds(flux_folder):
        one_line_error(gen(*args, "--guidance", 3.5), "this Flux model (schnell-style) has no guidance input, so "
                       "guidance 3.5 would change nothing; leave --guidance out (for classifier-free guidance give a "
                       "negative prompt and true_cfg_scale)")
    else:
        one_line_error(gen(*args, "--slg-layers", "0"), "skip-layer guidance is for SD3 models; a Flux model cannot "
                                                        "skip layers")


def _guidance_embeds(folder):
    import json

    return json.loads((folder / "transformer" / "config.json").read_text())["guidance_embeds"]
