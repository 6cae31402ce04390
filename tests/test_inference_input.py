"""Bad and odd inference input, from Python and from the CLI: each works, or fails in one line (exit 2)."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_lora import peft_lora_saved_by_diffusers

from gen.cli import main
from gen.errors import GenError

RUN = dict(num_inference_steps=1, height=32, width=32, output_type="np")
LONG = "a red circle " * 40 + "THE END OF A LONG PROMPT"

WORKS = {
    "empty prompt": dict(prompt=""),
    "empty negative": dict(prompt="x", negative_prompt=""),
    "unicode and emoji": dict(prompt="un cercle rouge 🔴⭕ 赤い円 ✓ \u202e\u200b"),
    "control characters": dict(prompt="tab\there\nnew line\x00nul"),
    "a list with an empty prompt": dict(prompt=["", "x"]),
    "guidance 0": dict(prompt="x", guidance_scale=0.0),
    "guidance 1": dict(prompt="x", guidance_scale=1.0),
    "largest seed": dict(prompt="x", seed=2 ** 64 - 1),
    "seed 0": dict(prompt="x", seed=0),
}

FAILS = {
    "height not a multiple of the VAE factor": (dict(height=30), "height must be a positive multiple of 4"),
    "width not a multiple": (dict(width=33), "width must be a positive multiple of 4"),
    "height 0": (dict(height=0), "height must be a positive multiple"),
    "steps 0": (dict(num_inference_steps=0), "steps must be an integer >= 1"),
    "steps negative": (dict(num_inference_steps=-3), "steps must be an integer >= 1"),
    "steps fractional": (dict(num_inference_steps=1.5), "steps must be an integer >= 1"),
    "negative guidance": (dict(guidance_scale=-1.0), "guidance scale must be >= 0"),
    "NaN guidance": (dict(guidance_scale=float("nan")), "guidance scale must be >= 0 and finite"),
    "infinite guidance": (dict(guidance_scale=float("inf")), "guidance scale must be >= 0 and finite"),
    "negative seed": (dict(seed=-1), "seed must be an integer in"),
    "seed 2**64": (dict(seed=2 ** 64), "seed must be an integer in"),
    "seed past the range with 2 images": (dict(seed=2 ** 64 - 1, num_images_per_prompt=2), "seed must be"),
    "fractional seed": (dict(seed=1.5), "seed must be an integer"),
    "seed as text": (dict(seed="7"), "seed must be an integer"),
    "no prompt": (dict(prompt=None), "prompt must be a string"),
    "a number as prompt": (dict(prompt=5), "prompt must be a string"),
    "an empty list": (dict(prompt=[]), "non-empty list"),
    "zero images": (dict(num_images_per_prompt=0), "num_images_per_prompt must be"),
    "negatives of the wrong count": (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt must be"),
    "unknown sampler": (dict(sampler="nope"), "unknown sampler"),
    "unknown output type": (dict(output_type="jpg"), "output_type must be one of"),
}


@pytest.mark.parametrize("case", WORKS)
def test_odd_input_works(case, dit_pipe):
    images = dit_pipe(**{**RUN, **WORKS[case]}).images
    assert np.isfinite(images).all() and images.shape[1:] == (32, 32, 3)


@pytest.mark.parametrize("case", FAILS)
def test_bad_input_is_one_line(case, dit_pipe):
    kwargs, msg = FAILS[case]
    with pytest.raises(GenError, match=msg.replace("*", r"\*")) as e:
        dit_pipe(**{**RUN, "prompt": "x", **kwargs})
    assert "\n" not in str(e.value)


def test_long_prompt_is_kept_whole_and_training_warns_with_the_dropped_text(dit_pipe, caplog):
    from gen.models.text import TextEncoder

    with caplog.at_level(logging.WARNING, logger="gen"):
        dit_pipe(LONG, **RUN)  # sampling encodes it in 75-token chunks (gen.prompt_weights)
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gen"):  # a training caption is one 77-token sequence
        TextEncoder(dit_pipe.text.model, dit_pipe.text.tokenizer)([LONG])
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "THE END OF A LONG PROMPT" in warnings[0].upper(), warnings
    assert len(warnings[0]) < 400


@pytest.fixture(scope="module")
def folders(sd_folder, dit_folder, tmp_path_factory):
    """Model folders gen does not load, each a copy of a real one with one thing changed."""
    root = tmp_path_factory.mktemp("unsupported")
    out = {"missing": root / "nope", "not a model folder": root / "plain"}
    out["not a model folder"].mkdir()
    out["a single weights file"] = next((dit_folder / "transformer").glob("*.safetensors"))

    def variant(name, src, edit):
        dst = root / name.replace(" ", "-")
        shutil.copytree(src, dst)
        edit(dst)
        out[name] = dst

    def edit_json(file, **changes):
        file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    variant("no vae", dit_folder, lambda d: shutil.rmtree(d / "vae"))
    variant("SDXL index", sd_folder, lambda d: edit_json(d / "model_index.json",
                                                         text_encoder_2=["transformers", "CLIPTextModelWithProjection"]))
    variant("SDXL UNet", sd_folder, lambda d: edit_json(d / "unet" / "config.json", addition_embed_type="text_time"))
    variant("SD3 transformer", dit_folder, lambda d: edit_json(d / "model_index.json",
                                                               transformer=["diffusers", "SD3Transformer2DModel"]))
    variant("broken model_index", dit_folder, lambda d: (d / "model_index.json").write_text("{not json"))
    variant("empty text_encoder", dit_folder, lambda d: [f.unlink() for f in (d / "text_encoder").glob("*.safetensors")])
    return out


def run_cli(capsys, *args):
    code = main(["sample", *map(str, args)])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if not line.startswith("WARNING")]


CLI_FAILS = [["--height", "30"], ["--width", "31"], ["--steps", "0"], ["--guidance", "-1"], ["--guidance", "nan"],
             ["--seed", str(2 ** 64)], ["--seed", "-1"], ["--num-images", "0"]]


@pytest.mark.parametrize("args", CLI_FAILS, ids=" ".join)
def test_cli_bad_input_exit_2(args, dit_folder, tmp_path, capsys):
    code, err = run_cli(capsys, "x", "--model", dit_folder, "--out", tmp_path / "o", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("gen: error:"), err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_unsupported_model_folders_exit_2(folders, tmp_path, capsys):
    for name, folder in folders.items():
        code, err = run_cli(capsys, "x", "--model", folder, "--out", tmp_path / "o")
        assert code == 2 and len(err) == 1 and err[0].startswith("gen: error:"), (name, err)


def test_cli_subprocess_long_prompt_and_wrong_base_lora(dit_folder, tmp_path):
    """Real subprocesses: an over-long prompt samples whole, without a warning; a LoRA made
    for another base model exits 2 with one line and no traceback."""
    r = subprocess.run([sys.executable, "-m", "gen", "sample", LONG, "--model", str(dit_folder), "--steps", "1",
                        "--out", str(tmp_path / "a.png"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").is_file()
    assert "dropped" not in r.stderr, r.stderr
    lora = peft_lora_saved_by_diffusers(tmp_path / "sd-lora.safetensors", seed=0, r=4, unet_alpha=4, text_alpha=4)
    r = subprocess.run([sys.executable, "-m", "gen", "sample", "x", "--model", str(dit_folder), "--steps", "1",
                        "--lora", str(lora), "--out", str(tmp_path / "b.png")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.png").exists(), r.stderr
