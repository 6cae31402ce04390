"""`gen sample --sampler/--scheduler/--list-samplers` as a real subprocess: gen's, A1111's and ComfyUI's names run the
same sampler, the PNG carries A1111's names and `--from` (gen's PNG, or the same PNG as A1111 writes it) runs it
again; unknown names and samplers a model cannot take are one-line errors."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from gen.sampling import names
from tests.conftest import quiet_pipeline
from tests.test_cli import gen

ARGS = ["--steps", 3, "--seed", 4, "--height", 16, "--width", 16, "--guidance", 5.0, "--no-progress"]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def one_line(r, *parts):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(p in lines[0] for p in parts), lines[0]


def test_list_samplers_prints_every_name_and_formulation():
    r = gen("sample", "--list-samplers")
    assert r.returncode == 0, r.stderr
    sampler_part, schedule_part = r.stdout.split("\n\n")
    rows = {line.split()[0]: line for line in sampler_part.splitlines()}
    for s in names.SAMPLERS:
        assert all(label in rows[s.name] for label in (s.a1111, s.comfy, *s.aliases) if label), s.name
    assert rows["dpm++2m-sde"].endswith("  ddpm") and rows["euler"].endswith("ddpm, flow")
    assert "DPM++ 2M SDE" in rows["dpm++2m-sde"] and "dpmpp_2m_sde" in rows["dpm++2m-sde"]
    schedules = {line.split()[0]: line for line in schedule_part.splitlines()}
    assert all(n in schedules for n in ("karras", "exponential", "sgm_uniform", "kl_optimal", "beta", "trailing"))
    assert schedules["lcm"].endswith("  ddpm") and "SGM Uniform" in schedules["sgm_uniform"]


def test_a1111_comfyui_and_gen_names_make_the_same_image_and_from_remakes_it(sd_folder, tmp_path):
    made = {}
    for sampler, schedule in (("dpm++2m-sde", "karras"), ("DPM++ 2M SDE", "Karras"), ("dpmpp_2m_sde", "karras")):
        out = tmp_path / f"{sampler}.png"
        r = gen("sample", "a red circle", "--model", sd_folder, *ARGS, "--sampler", sampler, "--scheduler", schedule,
                "--out", out)
        assert r.returncode == 0, r.stderr
        made[sampler] = pixels(out)
    first = made["dpm++2m-sde"]
    assert first.std() > 3 and all(np.array_equal(first, m) for m in made.values())
    api = quiet_pipeline(sd_folder)("a red circle", num_inference_steps=3, guidance_scale=5.0, seed=4, height=16,
                                    width=16, sampler="dpm++2m-sde", schedule="karras").images[0]
    assert np.array_equal(np.asarray(api), first)
    params = Image.open(tmp_path / "dpm++2m-sde.png").text["parameters"]
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras" in params
    again = tmp_path / "again.png"
    assert gen("sample", "--from", tmp_path / "dpm++2m-sde.png", "--out", again, "--no-progress").returncode == 0
    assert np.array_equal(pixels(again), first)
    # the same PNG as A1111 writes it (no gen fields): its Sampler and Schedule type alone pick the same run
    a1111 = ", ".join(f for f in params.split(", ") if not f.startswith("gen "))
    info = PngInfo()
    info.add_text("parameters", a1111)
    Image.open(again).save(tmp_path / "a1111.png", pnginfo=info)
    r = gen("sample", "--from", tmp_path / "a1111.png", "--model", sd_folder, "--out", tmp_path / "b.png",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(tmp_path / "b.png"), first)


@pytest.mark.parametrize("flags,parts", [
    (["--sampler", "dpmpp_2m_sdee"], ["unknown sampler 'dpmpp_2m_sdee'; did you mean", "dpmpp_2m_sde"]),
    (["--sampler", "euler", "--scheduler", "karas"], ["unknown schedule 'karas'; did you mean", "karras"]),
    (["--scheduler", "Karrass"], ["unknown schedule 'Karrass'; did you mean", "Karras"]),
])
def test_an_unknown_name_is_one_line_with_the_nearest(flags, parts, tmp_path):
    one_line(gen("sample", "a cat", "--model", tmp_path / "not-loaded", *flags, "--out", tmp_path), *parts)


def test_a_sampler_the_formulation_cannot_take_is_one_line(dit_folder, tmp_path):
    one_line(gen("sample", "a cat", "--model", dit_folder, *ARGS, "--sampler", "DPM++ 2M SDE", "--out", tmp_path),
             "sampler 'dpm++2m-sde' cannot sample flow models")
    one_line(gen("sample", "a cat", "--model", dit_folder, *ARGS, "--scheduler", "trailing", "--out", tmp_path),
             "schedule 'trailing' is for DDPM models")
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("sampler,schedule", [("lcm", "lcm"), ("euler", "trailing")])
def test_the_few_step_commands_make_the_pipelines_image(sd_folder, tmp_path, sampler, schedule):
    """README's `--sampler lcm --scheduler lcm --steps 4` and `--sampler euler --scheduler trailing --steps 4`."""
    out = tmp_path / "a.png"
    r = gen("sample", "a castle", "--model", sd_folder, "--sampler", sampler, "--scheduler", schedule, "--steps", 4,
            "--seed", 1, "--height", 16, "--width", 16, "--no-progress", "--out", out)
    assert r.returncode == 0, r.stderr
    api = quiet_pipeline(sd_folder)("a castle", num_inference_steps=4, seed=1, height=16, width=16, sampler=sampler,
                                    schedule=schedule).images[0]
    assert pixels(out).std() > 3 and np.array_equal(pixels(out), np.asarray(api))


def test_an_lcm_scheduler_folder_samples_with_lcm_at_4_steps_by_default(sd_folder, tmp_path):
    """README's `gen sample PROMPT --model LCM-FOLDER`: lcm on the lcm schedule, 4 steps, guidance 1, no warning; a
    --sampler given runs on the model's own schedule, not the lcm one."""
    folder = tmp_path / "lcm"
    shutil.copytree(sd_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"_class_name": "LCMScheduler"}))
    size = ["--seed", 1, "--height", 16, "--width", 16, "--no-progress"]
    r = gen("sample", "a castle", "--model", folder, *size, "--out", tmp_path / "a.png")
    assert r.returncode == 0 and "LCMScheduler" not in r.stderr, r.stderr
    params = Image.open(tmp_path / "a.png").text["parameters"]
    assert "Steps: 4" in params and "Sampler: LCM" in params and "CFG scale: 1" in params, params
    assert gen("sample", "a castle", "--model", folder, *size, "--sampler", "euler", "--out",
               tmp_path / "b.png").returncode == 0
    pipe = quiet_pipeline(folder)
    for name, sampler in (("a", None), ("b", "euler")):
        api = pipe("a castle", seed=1, height=16, width=16, sampler=sampler).images[0]
        assert pixels(tmp_path / f"{name}.png").std() > 3 and np.array_equal(pixels(tmp_path / f"{name}.png"),
                                                                             np.asarray(api))
    on_lcm = pipe("a castle", seed=1, height=16, width=16, sampler="euler", schedule="lcm").images[0]
    assert not any(np.array_equal(pixels(tmp_path / "b.png"), x) for x in (pixels(tmp_path / "a.png"), on_lcm))
