"""The recipe in gen's PNGs, read by AUTOMATIC1111's rules; `gen sample --from` and `--prompts`."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tests.test_lora import peft_lora_saved_by_diffusers

from gen import recipe
from gen.cli import main
from gen.pipeline import Pipeline
from gen.samplers import SAMPLERS
from gen.sampling import names
from gen.sampling.names import a1111_fields, from_a1111

# ---- AUTOMATIC1111's reading, re-implemented from its source (AUTOMATIC1111/stable-diffusion-webui, master) --
# modules/infotext_utils.py: re_param, re_imagesize, unquote() and parse_generation_parameters() (without the
# prompt-styles, hires-fix and settings defaults it also fills in); modules/sd_samplers.py:
# get_sampler_and_scheduler(); the sampler labels with their default schedulers from
# modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py and sd_samplers_lcm.py; the scheduler labels
# from modules/sd_schedulers.py.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
A1111_KDIFFUSION = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
                    "DPM++ 2M SDE Heun": "exponential", "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential",
                    "Euler a": None, "Euler": None, "LMS": None, "Heun": None, "DPM2": "karras",
                    "DPM2 a": "karras", "DPM fast": None, "DPM adaptive": None, "Restart": "karras"}
A1111_TIMESTEPS = ["DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"]
A1111_SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                    "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
                    "beta": "Beta"}


def a1111_parse(x: str) -> dict:
    *lines, lastline = x.strip().split("\n")
    if len(A1111_PARAM.findall(lastline)) < 3:  # no parameters line: all of it is the prompt
        lines, lastline = lines + [lastline], ""
    res, part = {"Prompt": "", "Negative prompt": ""}, "Prompt"
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            part, line = "Negative prompt", line[len("Negative prompt:"):].strip()
        res[part] = f"{res[part]}\n{line}" if res[part] else line
    for k, v in A1111_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except Exception:
                pass
        m = A1111_SIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res.setdefault("Schedule type", "Automatic")
    return res


def a1111_sampler(res: dict) -> tuple[str, str | None]:
    """The sampler A1111 runs for a parsed infotext, and the schedule it then uses (None for its timestep
    samplers, which take none; an Automatic k-diffusion sampler without a default uses its model's sigmas,
    i.e. Uniform)."""
    name = res.get("Sampler") or "DPM++ 2M"  # samplers[0]
    by_name = {**{key: key for key in A1111_SCHEDULERS}, **{label: key for key, label in A1111_SCHEDULERS.items()}}
    found = by_name.get(res["Schedule type"], "automatic")
    for key, label in A1111_SCHEDULERS.items():
        for option in (label, key):
            if name.endswith(" " + option):
                found, name = key, name[:-len(option) - 1]
                break
    if name not in A1111_KDIFFUSION and name not in A1111_TIMESTEPS:
        name = "DPM++ 2M"  # an unknown name: the default sampler
    if name in A1111_TIMESTEPS:
        return name, None
    if found == "automatic":
        found = A1111_KDIFFUSION[name] or "uniform"
    return name, A1111_SCHEDULERS[found]


# gen's sampler -> what A1111 must run: read off A1111's sampler lists, not off gen's table
EXPECTED = {"ddpm": ("DDIM", None), "ddim": ("DDIM", None), "pndm": ("PLMS", None), "unipc": ("UniPC", None),
            "dpm++2m": ("DPM++ 2M", "Uniform"), "dpm++2m-karras": ("DPM++ 2M", "Karras"),
            "euler": ("Euler", "Uniform"), "euler-a": ("Euler a", "Uniform"), "heun": ("Heun", "Uniform"),
            "flow-euler": ("Euler", "Simple"), "flow-heun": ("Heun", "Simple")}
PROMPT, NEG = "a red circle, left: of a square", "blurry, low: quality"


def gen(*args):
    return subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True, timeout=300)


def pixels(path):
    return np.asarray(Image.open(path))


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gen: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def folder_hash_by_shell(folder) -> str:
    """docs/sampling.md's definition of a folder's `Model hash`, run with coreutils."""
    cmd = ("find . -type f -name '*.safetensors' -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum "
           "| sha256sum | cut -c1-10")
    return subprocess.run(["bash", "-c", cmd], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def addnet_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return peft_lora_saved_by_diffusers(tmp_path_factory.mktemp("lora") / "a.safetensors", 1, r=4, unet_alpha=8,
                                        text_alpha=2)


@pytest.fixture(scope="module")
def odd_model(sd_folder, tmp_path_factory):
    """The tiny SD model in a folder whose name holds `,` and `:`."""
    return shutil.copytree(sd_folder, tmp_path_factory.mktemp("models") / "tiny, v1: test")


@pytest.fixture(scope="module")
def lora_png(odd_model, lora_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("png") / "x.png"
    r = gen("sample", PROMPT, "--model", odd_model, "--negative-prompt", NEG, "--lora", f"{lora_file}:0.5",
            "--sampler", "dpm++2m-karras", "--steps", 3, "--guidance", 6, "--guidance-rescale", 0.7,
            "--cache-interval", 2, "--seed", 7, "--height", 16, "--width", 16, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def test_a1111_reads_every_field_of_gens_png(lora_png, odd_model, lora_file):
    res = a1111_parse(Image.open(lora_png).text["parameters"])
    assert res["Prompt"] == f"{PROMPT} <lora:a:0.5>" and res["Negative prompt"] == NEG
    assert a1111_sampler(res) == ("DPM++ 2M", "Karras")
    assert (res["Steps"], res["CFG scale"], res["Seed"], res["Size-1"], res["Size-2"]) == ("3", "6", "7", "16", "16")
    assert res["Model"] == "tiny, v1: test" and res["Model hash"] == folder_hash_by_shell(odd_model)
    assert res["Lora hashes"] == f"a: {addnet_hash(lora_file)}"
    assert res["gen sampler"] == "dpm++2m-karras" and res["gen model"] == str(odd_model.resolve())
    assert res["gen guidance rescale"] == "0.7" and res["gen cache interval"] == "2"
    assert res["gen LoRA 1"] == f"{lora_file.resolve()}:0.5"
    assert "gen guidance interval" not in res  # the default is not written


def test_from_remakes_a_lora_image_exactly(lora_png, lora_file, tmp_path):
    again = tmp_path / "again.png"
    r = gen("sample", "--from", lora_png, "--out", again, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(again), pixels(lora_png))
    assert Image.open(again).text["parameters"] == Image.open(lora_png).text["parameters"]
    # the recipe's fast mode and LoRA made that image: flags given override them, and change it
    for flags in (["--cache-interval", "1"], ["--lora", f"{lora_file}:0"]):
        out = tmp_path / f"{flags[0][2:]}.png"
        assert main(["sample", "--from", str(lora_png), *flags, "--out", str(out), "--no-progress"]) == 0
        assert not np.array_equal(pixels(out), pixels(lora_png))


def test_a_recipe_whose_files_are_gone_is_a_one_line_error(sd_folder, lora_file, tmp_path, capsys):
    gone_lora, gone_model = tmp_path / "gone.safetensors", tmp_path / "gone-model"
    shutil.copy(lora_file, gone_lora)
    shutil.copytree(sd_folder, gone_model)
    png = tmp_path / "x.png"
    args = ["--steps", "1", "--height", "16", "--width", "16", "--no-progress"]
    assert main(["sample", "x", "--model", str(gone_model), "--lora", str(gone_lora), "--out", str(png), *args]) == 0
    capsys.readouterr()
    gone_lora.unlink()
    assert main(["sample", "--from", str(png), "--out", str(tmp_path / "o")]) == 2
    assert "gone.safetensors, which is not there" in error_line(capsys)
    shutil.rmtree(gone_model)
    assert main(["sample", "--from", str(png), "--lora", str(lora_file), "--out", str(tmp_path / "o")]) == 2
    assert "gone-model, which is not there; pass --model" in error_line(capsys)
    assert main(["sample", "--from", str(tmp_path / "none.png")]) == 2 and "no such file" in error_line(capsys)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["sample", "--from", str(tmp_path / "plain.png")]) == 2 and "holds no recipe" in error_line(capsys)
    assert not (tmp_path / "o").exists()


def a1111_png(path, text):
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


def test_from_reads_an_a1111_png(sd_folder, lora_file, tmp_path, capsys, caplog):
    png = a1111_png(tmp_path / "a1111.png", (
        "a red circle <lora:a:0.5>\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
        'CFG scale: 6, Seed: 7, Size: 16x16, Model hash: 0123456789, Model: v1-5-pruned, Lora hashes: "a: '
        '0123456789ab", Clip skip: 2, Version: v1.10.1'))
    assert main(["sample", "--from", str(png)]) == 2
    assert "model 'v1-5-pruned' (hash 0123456789), which gen cannot find by name; pass --model" in error_line(capsys)
    assert main(["sample", "--from", str(png), "--model", str(sd_folder)]) == 2
    assert "LoRA 'a' (<lora:a:0.5>)" in error_line(capsys)
    out = tmp_path / "out.png"
    assert main(["sample", "--from", str(png), "--model", str(sd_folder), "--lora", f"{lora_file}:0.5",
                 "--out", str(out), "--no-progress"]) == 0
    warned = caplog.text
    assert "model hash 0123456789" in warned and "LoRA hash 0123456789ab" in warned and "Clip skip" not in warned
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.progress = False
    pipe.load_lora(lora_file, scale=0.5)
    expected = pipe("a red circle ", negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0, seed=7,
                    height=16, width=16, sampler="dpm++2m", schedule="karras",  # A1111's DPM++ 2M, Karras
                    clip_skip=2).images[0]  # A1111 takes the tag out, not the space
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert a1111_sampler(a1111_parse(Image.open(out).text["parameters"])) == ("DPM++ 2M", "Karras")


@pytest.fixture(scope="module")
def pipes(sd_folder, dit_folder):
    return {"ddpm": Pipeline.from_pretrained(sd_folder), "flow": Pipeline.from_pretrained(dit_folder)}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_has_its_a1111_name(name, pipes):
    """gen's diffusers-scheduler samplers on the model's own schedule, as A1111 reads them; and what gen runs for
    those fields again writes the same fields."""
    pipe = pipes[SAMPLERS[name][0]]
    fields = a1111_fields(name, None, pipe.formulation, pipe.scheduler_config)
    r = recipe.Recipe(prompt="x", steps=2, guidance=3.0, seed=1, width=16, height=16, sampler=name)
    res = a1111_parse(recipe.infotext(r, fields))
    assert a1111_sampler(res) == EXPECTED[name]
    assert res.get("Eta DDIM") == ("1" if name == "ddpm" else None)  # DDIM at eta 1 is DDPM
    eta = float(res.get("Eta DDIM", 0))
    again = a1111_fields(*from_a1111(res["Sampler"], res["Schedule type"], eta, pipe.formulation.kind),
                         pipe.formulation, pipe.scheduler_config)
    assert a1111_sampler(a1111_parse(recipe.infotext(r, again))) == EXPECTED[name]


A1111_LABELED = [(s.name, n) for s in names.SAMPLERS if s.a1111 and s.a1111 not in A1111_TIMESTEPS and s.fn
                 for n, (label, _) in names.SCHEDULES.items() if label and label != "Automatic"]


@pytest.mark.parametrize("name,schedule", A1111_LABELED)
def test_every_a1111_sampler_and_schedule_round_trips(name, schedule, pipes):
    """Each of gen's samplers A1111 has, on each schedule A1111 has, is written as A1111's labels, which A1111's
    parser reads as that sampler and schedule, and gen's --from reading reads back as the same pair."""
    pipe = pipes["ddpm"]
    fields = a1111_fields(name, schedule, pipe.formulation, pipe.scheduler_config)
    res = a1111_parse(recipe.infotext(recipe.Recipe(prompt="x", steps=2, guidance=3.0, seed=1, width=16,
                                                    height=16, sampler=name), fields))
    assert a1111_sampler(res) == (names.BY_NAME[name].a1111, names.SCHEDULES[schedule][0])
    assert from_a1111(res["Sampler"], res["Schedule type"], 0.0, "ddpm") == (name, schedule)


def test_values_with_commas_colons_newlines_and_quotes_survive():
    odd = ['tiny, v1: test', 'two\nlines', '"quoted"', ' padded ', 'C:\\models\\x', 'plain']
    r = recipe.Recipe(prompt="line one\nline two, with: colon", negative_prompt="neg, a: b\nsecond", steps=3,
                      guidance=7.5, seed=2 ** 40, width=8, height=8, sampler="euler", model_name=odd[0],
                      model=odd[1], lora_hashes={"a": "0123456789ab", "b": "ba9876543210"})
    text = recipe.infotext(r, {"Sampler": "Euler", "Schedule type": "Uniform"})
    res = a1111_parse(text)
    assert res["Prompt"] == r.prompt and res["Negative prompt"] == r.negative_prompt
    assert res["Model"] == odd[0] and res["gen model"] == odd[1] and res["Seed"] == str(2 ** 40)
    assert res["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"
    for value in odd:
        assert a1111_parse(f"p\nSteps: 1, Sampler: Euler, Model: {recipe.quote(value)}, Seed: 1")["Model"] == value
    back = recipe.from_text(text)
    assert (back.prompt, back.negative_prompt, back.model_name, back.model) == (r.prompt, r.negative_prompt, *odd[:2])
    assert back.lora_hashes == r.lora_hashes and (back.seed, back.guidance) == (r.seed, r.guidance)


@pytest.mark.parametrize("guidance", [0.7, 0.6, 1.9])  # 0.7 * 12.5 / 12.5 is not 0.7 in floats
def test_ddim_cfgpp_writes_and_reads_a1111s_cfg_scale(guidance):
    """A1111 runs "DDIM CFG++" at its CFG scale / 12.5: a PNG's CFG scale is A1111's, gen's own scale is exact."""
    r = recipe.Recipe(prompt="p", steps=4, guidance=guidance, seed=1, width=8, height=8, sampler="ddim-cfg++")
    res = a1111_parse(recipe.infotext(r, {"Sampler": "DDIM CFG++"}))
    assert float(res["CFG scale"]) == guidance * 12.5
    assert recipe.from_text(recipe.infotext(r, {"Sampler": "DDIM CFG++"})).guidance == guidance
    assert recipe.from_text("p\nSteps: 20, Sampler: DDIM CFG++, CFG scale: 7.5, Seed: 1").guidance == 0.6
    euler = recipe.infotext(recipe.Recipe(prompt="p", steps=4, guidance=guidance, seed=1, width=8, height=8,
                                          sampler="euler"), {"Sampler": "Euler"})
    assert "gen guidance" not in euler and recipe.from_text(euler).guidance == guidance


def test_a_single_file_model_hash_is_a1111s(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not really weights")
    assert recipe.model_hash(f) == hashlib.sha256(b"not really weights").hexdigest()[:10]


# ---- --prompts -------------------------------------------------------------------------------------------------
def test_prompts_file_one_png_each_with_its_own_settings(dit_folder, tmp_path):
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": "a red circle"}, {"prompt": "a blue square", "negative_prompt": "green", "seed": 99,
                                          "width": 16, "height": 16, "steps": 2, "guidance": 3.5}, {"prompt": ""}]
    prompts.write_text("\n".join(map(json.dumps, lines[:2])) + "\n\n" + json.dumps(lines[2]) + "\n")
    r = gen("sample", "--prompts", prompts, "--model", dit_folder, "--steps", 3, "--seed", 10, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    names = ["0001-10.png", "0002-99.png", "0004-11.png"]  # line numbers; lines without a seed count on from --seed
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == names
    assert r.stdout.split() == [str(tmp_path / "o" / n) for n in names]  # written as they were made
    assert "images: 100%" in r.stderr and "3/3" in r.stderr  # one bar over the batch
    got = recipe.read_png(tmp_path / "o" / names[1])
    assert (got.prompt, got.negative_prompt, got.seed, got.width, got.height, got.steps, got.guidance) == (
        "a blue square", "green", 99, 16, 16, 2, 3.5)
    pipe = Pipeline.from_pretrained(dit_folder)
    pipe.progress = False
    alone = pipe("a blue square", negative_prompt="green", seed=99, width=16, height=16, num_inference_steps=2,
                 guidance_scale=3.5).images[0]
    assert np.array_equal(pixels(tmp_path / "o" / names[1]), np.asarray(alone))
    assert recipe.read_png(tmp_path / "o" / names[2]).steps == 3  # the flag, where the line sets none


def test_plain_prompts_file_and_no_progress(dit_folder, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n  a blue square  \n")
    r = gen("sample", "--prompts", tmp_path / "p.txt", "--model", dit_folder, "--steps", 1, "--seed", 3,
            "--out", tmp_path / "b.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert [recipe.read_png(tmp_path / f"b-{i}.png").prompt for i in range(2)] == ["a red circle", "a blue square"]
    assert "images" not in r.stderr and "sampling" not in r.stderr


@pytest.mark.parametrize("content, msg", [
    ('{"prompt": "ok"}\n{"prompt": "x", "seed": 1\n', "p.jsonl line 2: not JSON"),
    ('{"prompt": "ok"}\n\n{"prompt": "x", "sed": 1}\n', "p.jsonl line 3: unknown key 'sed'"),
    ('{"prompt": "ok"}\n["x"]\n', 'p.jsonl line 2: expected a JSON object with a "prompt" string'),
    ('{"prompt": "ok", "steps": 0}\n', "p.jsonl line 1: steps must be >= 1"),
    ('{"prompt": "ok", "seed": 1.5}\n', "p.jsonl line 1: seed must be an integer"),
    ('{"prompt": "ok"}\n{"prompt": "x", "width": 30}\n', "p.jsonl line 2: width 30 is not a multiple of 4"),
    ("\n\n", "holds no prompts"),
])
def test_bad_prompt_lines_stop_before_any_image(dit_folder, tmp_path, capsys, content, msg):
    (tmp_path / "p.jsonl").write_text(content)
    assert main(["sample", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(dit_folder), "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert msg in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_prompt_sources_conflict_or_are_missing(capsys, tmp_path):
    (tmp_path / "p.txt").write_text("x\n")
    assert main(["sample", "x", "--prompts", str(tmp_path / "p.txt")]) == 2 and "not both" in error_line(capsys)
    assert main(["sample"]) == 2 and "needs a PROMPT" in error_line(capsys)


def test_file_hashes_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    """A multi-GB checkpoint is hashed once, not on every `gen sample`: the cache answers while the file is
    unchanged, and a changed file is hashed again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 1000)
    truth = hashlib.sha256(f.read_bytes()).hexdigest()
    assert recipe.sha256(f) == truth and recipe.hash_cache().is_file()
    cache = json.loads(recipe.hash_cache().read_text())
    (entry,) = cache.values()
    entry["sha256"] = "0" * 64  # what the cache says is what a cached file gets: the file is not read again
    recipe.hash_cache().write_text(json.dumps(cache))
    assert recipe.sha256(f) == "0" * 64
    f.write_bytes(b"y" * 1001)  # another size (and mtime): hashed again
    assert recipe.sha256(f) == hashlib.sha256(b"y" * 1001).hexdigest()
    assert recipe.sha256(f, 8) == hashlib.sha256(b"y" * 993).hexdigest()  # each start offset is its own entry


def test_a_hash_still_running_at_exit_stops_and_the_exit_stays_clean(tmp_path):
    """A background hash still reading at exit stops within one 1 MiB read and is joined before the interpreter
    finalizes (a daemon thread killed mid-read once turned a `gen sample` exit 2 into an abort, -6), promptly."""
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(6 << 30)  # 6 GiB of sparse zeros: a full hash takes seconds
    # registered before gen's handler, so it runs after it (atexit runs last-registered first)
    code = ("import atexit, threading, time\n"
            "atexit.register(lambda: print('alive', [t.name for t in threading.enumerate() if 'hash' in t.name], "
            "time.time() - t0))\n"
            f"from gen import recipe\nh = recipe.HashInBackground({str(big)!r})\ntime.sleep(0.3)\nt0 = time.time()\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("alive [] "), out.stdout  # the hash thread had ended
    assert float(out.stdout.split()[-1]) < 2.0, out.stdout  # at once, not after the whole file
    assert not (tmp_path / "cache" / "gen" / "hashes.json").exists()  # the stopped hash cached nothing
