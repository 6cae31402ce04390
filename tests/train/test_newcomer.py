"""A new user's first runs: the README's LoRA and training commands by recipe name from a folder outside the
checkout, with the installed `gen` (.venv/bin); recipes by name, --list, --print-config; train.mixed_precision=auto;
`gen info` with no model; the accelerate launch without --multi_gpu that starts one process."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.loop import main_alone, resolve_precision

ROOT = Path(__file__).resolve().parents[2]
# The README, then the docs pages it links to: where the commands a newcomer runs are written.
README = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
BIN = Path(sys.executable).parent  # the venv's bin/, where `pip install` put the `gen` command
# What shrinks a README command to a test's size; appended, so it overrides what the command sets.
SMALL = ["train.max_steps=2", "train.grad_accum=1", "train.batch_size=2", "data.resolution=16", "sampling.steps=2",
         "validation.prompts=[a red circle]", "validation.seeds=[0]", "log.progress=false", "log.tracker=none"]


def readme_line(start: str) -> str:
    """The first command line of README.md and docs/ that begins with `start`, without its comment."""
    lines = [line for line in README.splitlines() if line.startswith(start)]
    assert lines, f"the README has no command starting {start!r}"
    return lines[0].split("  #")[0].strip()


def run(command: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    line = command + "".join(" " + shlex.quote(e) for e in extra)
    r = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture()
def outside(tmp_path, captioned):
    """A fresh folder outside the checkout holding a captioned image folder `my-images`."""
    assert ROOT not in tmp_path.parents
    shutil.copytree(captioned, tmp_path / "my-images")
    return tmp_path


def test_readme_lora_commands_run_by_recipe_name_outside_the_checkout(outside):
    listed = run(readme_line("gen lora --list"), outside).stdout
    assert listed.split()[0] == "lora-sd" and "lora-subject" in listed and "dit-shapes" not in listed
    run(readme_line("gen lora lora-sd --print-config"), outside)
    printed = yaml.safe_load((outside / "my.yaml").read_text())
    assert printed["lora"]["rank"] == 16 and printed["train"]["mixed_precision"] == "auto"
    # the shipped recipe on this CPU, no precision override: auto resolves and the run folder records it
    run(readme_line("gen lora lora-sd model.base=default"), outside, *SMALL, "lora.rank=2")
    run_dir = outside / "runs" / "lora-sd"
    assert (run_dir / "lora.safetensors").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["mixed_precision"] in ("no", "bf16")
    run(readme_line('gen sample "a red circle" --lora runs/lora-sd/'), outside, "--steps", "2", "--no-progress")
    assert list((outside / "outputs").glob("*.png"))  # the README's tour samples with the LoRA it trained
    run("gen lora my.yaml", outside, "model.base=default", "data.path=my-images", "train.output_dir=runs/mine",
        *SMALL, "lora.rank=2")  # the printed recipe runs as a config of one's own
    assert (outside / "runs" / "mine" / "lora.safetensors").is_file()


def test_readme_training_command_runs_by_recipe_name_outside_the_checkout(outside):
    assert "dit-shapes" in run(readme_line("gen train --list"), outside).stdout
    run(readme_line("gen train dit-shapes"), outside, *SMALL, "data.num_images=8",
        "model.options={depth: 1, hidden_size: 32, num_heads: 2}")
    assert (outside / "runs" / "dit-shapes" / "model" / "model_index.json").is_file()


def test_unknown_recipe_is_one_line_naming_the_recipes(tmp_path):
    r = subprocess.run([BIN / "gen", "lora", "lora-nope"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "lora-nope" in r.stderr and "lora-sd" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gen_info_without_a_model_describes_the_bundled_one(tmp_path):
    r = subprocess.run([BIN / "gen", "info"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert str(ROOT / "gen" / "assets" / "default") in r.stdout and "family: gen DiT" in r.stdout


def test_the_bundled_model_stays_within_its_budget_and_the_readme_says_its_size():
    """Issue 30: a better bundled model in the same repository budget (25.2 MB before it) or smaller."""
    size = sum(p.stat().st_size for p in (ROOT / "gen" / "assets" / "default").rglob("*") if p.is_file())
    assert size <= 26e6, f"gen/assets/default is {size / 1e6:.1f} MB"
    assert f"gen/assets/default/ ({round(size / 1e6)} MB)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("device, bf16, amx, expected", [
    ("cuda", True, False, "bf16"),   # Ampere and later
    ("cuda", False, False, "fp16"),  # older GPUs: fp16 with loss scaling
    ("cpu", False, False, "no"),     # a CPU without fast bf16: fp32
    ("cpu", False, True, "bf16"),    # a CPU with AMX
])
def test_auto_precision_is_what_the_device_runs(device, bf16, amx, expected):
    assert resolve_precision(device, bf16, amx) == expected


def test_accelerate_launch_without_multi_gpu_is_detected():
    """accelerate's simple launcher (what `accelerate launch --num_processes 2` runs without --multi_gpu on a CPU)
    sets these for N > 1 and starts one process; torchrun and --multi_gpu set WORLD_SIZE."""
    launched = {"ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert main_alone(launched)
    assert not main_alone({**launched, "WORLD_SIZE": "2"})
    assert not main_alone({"ACCELERATE_DYNAMO_BACKEND": "NO"})  # --num_processes 1
    assert not main_alone({})


def test_accelerate_launch_num_processes_2_warns_in_one_line(tmp_path, captioned):
    """The real launcher: one process starts, and the run's log says how to get two."""
    accelerate = BIN / "accelerate"
    cmd = [accelerate, "launch", "--num_processes", "2", "--main_process_port", "0", "-m", "gen", "train",
           "dit-shapes", f"train.output_dir={tmp_path / 'run'}", *SMALL, "data.num_images=8", "train.max_steps=1",
           "model.options={depth: 1, hidden_size: 32, num_heads: 2}"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    warned = [line for line in r.stderr.splitlines() if "--multi_gpu" in line and line.startswith("WARNING: ")]
    assert len(warned) == 1 and "accelerate launch --multi_gpu --num_processes N" in warned[0]


def test_fifty_over_long_captions_warn_once_with_the_count(tmp_path):
    """A run over a folder of 50 images whose captions are longer than the text encoder's length (the bundled
    model's: 16 tokens): one warning line with the count and the first; warnings.log in the run folder has all."""
    from PIL import Image

    images = tmp_path / "long"
    images.mkdir()
    for i in range(50):
        Image.new("RGB", (16, 16), (5 * i, 0, 0)).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(f"image {i} " + "a red circle left of a blue square " * 4)
    r = run("gen lora lora-sd model.base=default data.path=long data.cache=true train.output_dir=run", tmp_path,
            *SMALL, "lora.rank=2")
    cut = [line for line in r.stderr.splitlines() if "tokens were dropped" in line or "captions were cut" in line]
    assert len(cut) == 1 and cut[0].startswith("WARNING: 50 captions were cut to 16 tokens; first: "), cut
    assert len((tmp_path / "run" / "warnings.log").read_text().splitlines()) == 50


def test_resolution_defaults_to_the_bases_native_size(sd_folder, caplog):
    """lora-sd sets no data.resolution: the base's (the bundled model: 64 px; the tiny SD folder: its UNet's
    sample_size x the VAE factor); a resolution over 2x from it is a warning that says so."""
    import json
    import logging

    from train.config import load_config

    recipe = ROOT / "configs" / "lora-sd.yaml"
    assert load_config(recipe, extra={"model.base": "default", "data.path": "x"}).data.resolution == 64
    unet = json.loads((sd_folder / "unet" / "config.json").read_text())["sample_size"]
    factor = 2 ** (len(json.loads((sd_folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    cfg = load_config(recipe, extra={"model.base": str(sd_folder), "data.path": "x"})
    assert cfg.data.resolution == unet * factor
    with caplog.at_level(logging.WARNING, logger="gen"):
        load_config(recipe, ["data.resolution=512"], extra={"model.base": "default", "data.path": "x"})
    assert [r.getMessage() for r in caplog.records if "data.resolution 512 is far from 64" in r.getMessage()]


def test_readme_says_how_to_reach_the_installed_gen_and_the_package_is_licensed():
    """`make demo` installs gen into .venv/bin only; the README says to activate it or call .venv/bin/gen. The
    package carries Apache-2.0 (as diffusers) as a LICENSE file and in its metadata."""
    import tomllib

    two = README.split("## The two commands")[1].split("\n## ")[0]
    assert "source .venv/bin/activate" in two and ".venv/bin/gen" in two
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    assert "configs/**/*.yaml" in str(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"])
    assert (ROOT / "train" / "configs").resolve() == ROOT / "configs"  # the one source, shipped as package data


def test_readme_eval_reads_what_the_readme_chain_writes():
    """The chain command's product (OUTPUT_DIR/denoiser/model, train/chain.py; trained in
    tests/train/test_configs.py) is the folder the README's `gen eval adherence --model` names."""
    chain = readme_line("gen train configs/default-model.yaml output_dir=")
    out = next(a.split("=", 1)[1] for a in chain.split() if a.startswith("output_dir="))
    evaluated = readme_line("gen eval adherence --model").split()[4]
    assert evaluated == f"{out}/denoiser/model"
    assert "denoiser" in Path(__file__).with_name("test_configs.py").read_text()
    assert "the product is output_dir/denoiser/model" in (ROOT / "train" / "chain.py").read_text().lower()
