"""The default-model recipe (configs/default-model.yaml: clip -> vae -> DiT flow on the shapes world), run at
reduced size (32 px, small towers, ~1/10 of the steps), learns: its samples follow the prompt's color far above
chance by `gen eval adherence`'s scorer (~5.5 min on 2 cores: CLIP 600 x 64, VAE 400 x 16, DiT 2500 x 16;
with caption reconstruction the small CLIP needs 600 steps: at 300, single-object retrieval 79%, colors 33%).
The full-size run and its figures are in gen/assets/default/ (train.log, stage-*.json, adherence.json)."""

from __future__ import annotations

import json

from train.chain import run_chain
from train.evaluate import evaluate_adherence

TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
REDUCED = [
    "data.resolution=32", "data.num_images=5000", "log.tracker=none", "log.progress=false",
    "validation.every=0", "train.checkpoint_every=0",
    "clip:clip.text_options=" + json.dumps({**TOWER, "max_position_embeddings": 16}),
    "clip:clip.vision=" + json.dumps({**TOWER, "num_attention_heads": 4, "patch_size": 8}),
    "clip:clip.projection_dim=64", "clip:clip.eval_images=64", "clip:train.max_steps=600",
    "clip:train.batch_size=64",
    "vae:vae.eval_images=32", "vae:train.max_steps=400", "vae:train.batch_size=16",
    "denoiser:model.options=" + json.dumps({"depth": 4, "hidden_size": 128, "num_heads": 4}),
    "denoiser:train.max_steps=2500", "denoiser:train.batch_size=16", "denoiser:optim.warmup_steps=20",
    "denoiser:train.ema_decay=0.99", "denoiser:optim.lr=1e-3", "denoiser:validation.prompts=[]",
]


def test_reduced_recipe_learns_colors(tmp_path):
    from gen.pipeline import Pipeline

    folder = run_chain("configs/default-model.yaml", [f"output_dir={tmp_path}", *REDUCED])
    vae = json.loads((folder / "stage-vae.json").read_text())["metrics"]
    clip = json.loads((folder / "stage-clip.json").read_text())["metrics"]
    pipe = Pipeline.from_pretrained(folder)
    pipe.progress = False
    single = evaluate_adherence(pipe, n=2, seed=0)["summary"]["single"]
    print("reduced recipe:", {"vae_psnr": vae["psnr"], **clip, **single})
    assert vae["psnr"] > 20, vae
    assert clip["retrieval_top1_single"] > 50, clip  # chance is 1/18
    # chance is 1/6 (a model that draws a shape in a random palette color); measured here: 47% (2026-11-24, 2 cores)
    assert single["color_right"] >= 40, single
