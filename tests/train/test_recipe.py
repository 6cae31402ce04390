"""Run: `.venv/bin/python -m pytest -q -s bench/recipe_learns.py` (~4 min on a 2-core CPU; not part of
`make test`). Status: this reduced size does NOT learn enough yet -- measured 2026-11-24: VAE PSNR 23.6 dB at
32 px, CLIP single-object retrieval 69.7%, but single-object color right only 22.2% after 1500 DiT steps x 32,
so the color assertion fails; the reduced recipe needs retuning before it can join the suite.

The default-model recipe (configs/default-model.yaml: clip -> vae -> DiT flow on the shapes world), run at
reduced size, learns: its samples follow the prompt's color far above chance by `gen eval adherence`'s scorer.
The full-size run and its figures are in gen/assets/default/ (train.log, adherence.json)."""

from __future__ import annotations

import json

from train.chain import run_chain
from train.evaluate import evaluate_adherence

REDUCED = [
    "data.resolution=32", "data.num_images=5000", "log.tracker=none", "log.progress=false",
    "validation.every=0", "train.checkpoint_every=0",
    "clip:clip.text_options=" + json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                           "max_position_embeddings": 16}),
    "clip:clip.vision=" + json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "patch_size": 8}),
    "clip:clip.projection_dim=64", "clip:clip.eval_images=64", "clip:train.max_steps=250",
    "clip:train.batch_size=64",
    "vae:vae.eval_images=32", "vae:train.max_steps=250", "vae:train.batch_size=16",
    "denoiser:model.options=" + json.dumps({"depth": 3, "hidden_size": 96, "num_heads": 3}),
    "denoiser:train.max_steps=1500", "denoiser:train.batch_size=32", "denoiser:optim.warmup_steps=20",
    "denoiser:train.ema_decay=0.99", "denoiser:optim.lr=1e-3", "denoiser:validation.prompts=[]",
]


def test_reduced_recipe_learns_colors(tmp_path):
    from gen.pipeline import Pipeline

    folder = run_chain("configs/default-model.yaml", [f"output_dir={tmp_path}", *REDUCED])
    vae = json.loads((folder / "stage-vae.json").read_text())["metrics"]
    clip = json.loads((folder / "stage-clip.json").read_text())["metrics"]
    pipe = Pipeline.from_pretrained(folder)
    pipe.progress = False
    result = evaluate_adherence(pipe, n=1, seed=0)
    single = result["summary"]["single"]
    print("reduced recipe:", {"vae_psnr": vae["psnr"], **clip, **single})
    assert vae["psnr"] > 20, vae
    assert clip["retrieval_top1_single"] > 50, clip  # chance is 1/18
    assert single["color_right"] >= 50, single  # chance: a region of the named color is ~never found in noise
