"""`gen lora merge`: LoRAs fused into the base and saved as a model; its images are the base's with them loaded."""

import subprocess
import sys

import numpy as np

from gen.pipeline import Pipeline
from tests.test_lora import NEG, PROMPT, RUN, SEED, diff, peft_lora_saved_by_diffusers


def images(pipe):
    pipe.progress = False
    return pipe(PROMPT, negative_prompt=NEG, seed=SEED, sampler="ddim", output_type="np", **RUN).images


def test_merged_model_gives_the_images_of_the_base_with_the_loras_loaded(sd_folder, tmp_path):
    a = peft_lora_saved_by_diffusers(tmp_path / "a.safetensors", 1, r=4, unet_alpha=8, text_alpha=2)
    b = peft_lora_saved_by_diffusers(tmp_path / "b.safetensors", 2, r=2, unet_alpha=1, text_alpha=3)
    r = subprocess.run([sys.executable, "-m", "gen", "lora", "merge", str(sd_folder), f"{a}:0.7", str(b),
                        "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    live = Pipeline.from_pretrained(sd_folder)
    base = images(live)
    live.load_lora(a, scale=0.7)
    live.load_lora(b)
    loaded = images(live)
    merged = Pipeline.from_pretrained(tmp_path / "merged")
    assert diff(loaded, base) > 1e-2  # the LoRAs change the image
    assert diff(images(merged), loaded) <= 1e-4
    assert merged.recipe["merged_loras"][0]["scale"] == 0.7
    assert not any(".lora_" in k for k in merged.denoiser.state_dict())  # plain weights, no adapter layers
    r = subprocess.run([sys.executable, "-m", "gen", "lora", "merge", str(sd_folder), f"{a}:0.7", str(b),
                        "--out", str(tmp_path / "merged.safetensors")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert diff(images(Pipeline.from_pretrained(tmp_path / "merged.safetensors")), loaded) <= 1e-4


def test_merge_errors_are_one_line(sd_folder, dit_folder, tmp_path):
    a = peft_lora_saved_by_diffusers(tmp_path / "a.safetensors", 1, r=4, unet_alpha=8, text_alpha=2)
    for args, message in ([str(dit_folder), str(a)], "made for another model"), ([str(sd_folder), str(tmp_path / "nope.safetensors")],
                                                                  "nope.safetensors"):
        r = subprocess.run([sys.executable, "-m", "gen", "lora", "merge", *args, "--out", str(tmp_path / "m")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "m").exists()  # nothing half-written
