"""The `vae` and `clip` stages through the one loop, and the chain of stages into one model folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gen.errors import GenError
from train.config import load_config
from train.loop import train
from train.stages import contrastive_loss, false_captions, train_tokenizer

CLIP = {"clip.text_preset": "tiny", "clip.text_options": {"max_position_embeddings": 16},
        "clip.vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "patch_size": 8},
        "clip.projection_dim": 32, "clip.vocab_size": 400, "clip.eval_images": 24}
SWAPS = [["left", "right"], ["above", "below"], ["red", "green", "blue", "yellow", "purple", "orange"],
         ["circle", "square", "triangle"]]
COMMON = {"data.source": "shapes", "data.resolution": 16, "data.num_images": 64, "train.batch_size": 8,
          "train.checkpoint_every": 0, "train.ema_decay": 0.0, "optim.lr": 2e-3, "log.every": 1,
          "log.tracker": "none", "log.progress": False, "validation.every": 0}


def _cfg(out, stage, steps=4, **extra):
    extra = {k.replace("__", "."): v for k, v in extra.items()}
    return load_config(None, extra={**COMMON, "stage": stage, "train.output_dir": str(out),
                                    "train.max_steps": steps, **(CLIP if stage == "clip" else {}),
                                    **({"vae.preset": "tiny", "vae.eval_images": 16} if stage == "vae" else {}),
                                    **extra})


def test_tokenizer_learns_whole_words_and_still_reads_any_text():
    from train.data.shapes import ShapesWorld

    world = ShapesWorld(500, 0)
    tok = train_tokenizer([world.scene(i).caption for i in range(500)], 400)
    words = tok.convert_ids_to_tokens(tok("an orange triangle left of a blue square").input_ids)
    assert words[1:-1] == ["an</w>", "orange</w>", "triangle</w>", "left</w>", "of</w>", "a</w>", "blue</w>",
                           "square</w>"]
    assert len(tok("zebra ünïcode 🙂").input_ids) > 4  # unseen text falls back to bytes


def test_contrastive_loss_counts_repeated_captions_as_positives():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    caps = ["a", "b", "a", "c"]
    aligned = contrastive_loss(e, e, torch.tensor(20.0), caps)
    shuffled = contrastive_loss(e, e[[1, 0, 3, 2]], torch.tensor(20.0), caps)
    assert aligned < shuffled
    # two copies of one pair: the soft target (1/2, 1/2) is met exactly, so the loss is its entropy, ln 2 --
    # with one-hot targets the copies would be pushed apart instead
    same = torch.nn.functional.normalize(torch.ones(2, 8), dim=-1)
    assert float(contrastive_loss(same, same, torch.tensor(20.0), ["x", "x"])) == pytest.approx(math.log(2))


def test_false_captions_swap_relations_and_bindings():
    assert false_captions("a red circle left of a blue square", SWAPS) == [
        "a red circle right of a blue square", "a blue circle left of a red square",
        "a red square left of a blue circle"]
    assert false_captions("a red circle above a red square", SWAPS) == [
        "a red circle below a red square", "a red square above a red circle"]
    assert false_captions("a red circle", SWAPS) == []  # nothing to swap; another image's caption is negative enough
    assert false_captions("a red circle", []) == []


def test_hard_negatives_join_the_image_to_text_softmax_only():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.3 * torch.randn(3, 8, generator=g), dim=-1)
    caps, scale = ["a", "b", "c"], torch.tensor(10.0)
    base = contrastive_loss(img, txt, scale, caps)
    far = contrastive_loss(img, txt, scale, caps, negatives=-img)  # negatives each image rejects: ~no change
    near = contrastive_loss(img, txt, scale, caps, negatives=img)  # negatives as close as can be: higher loss
    assert float(far) == pytest.approx(float(base), abs=1e-3)
    assert float(near) > float(base) + 0.1
    # the text->image half is untouched: only the image->text half moves
    i2t = torch.nn.functional.cross_entropy(scale * img @ torch.cat([txt, img]).t(), torch.arange(3))
    t2i = torch.nn.functional.cross_entropy(scale * txt @ img.t(), torch.arange(3))
    assert float(near) == pytest.approx(0.5 * float(i2t + t2i), rel=1e-5)


def test_weight_decay_spares_embeddings_norms_and_biases():
    from transformers import CLIPTextConfig, CLIPTextModel

    from train.loop import param_groups

    model = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8))
    decay, rest = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "embedding" not in names[id(p)] for p in decay["params"])
    assert {id(model.get_input_embeddings().weight), *(id(p) for n, p in model.named_parameters()
                                                         if "norm" in n or n.endswith("bias"))} <= {id(p) for p in rest["params"]}
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert len(param_groups(model, 0.0)) == 1


def test_vae_stage_learns_and_sets_latent_scaling(tmp_path):
    from diffusers import AutoencoderKL

    from gen.models import vae as vae_lib
    from train.stages import holdout

    out = train(_cfg(tmp_path / "vae", "vae", steps=12))
    stage = json.loads((out / "stage.json").read_text())
    rows = [json.loads(r) for r in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert np.isfinite(stage["metrics"]["psnr"]) and stage["metrics"]["psnr"] > 5
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(stage["scaling_factor"])
    pixels, _ = holdout(_cfg(tmp_path / "x", "vae"), 16)
    with torch.no_grad():
        z = vae_lib.encode(vae, pixels, torch.Generator().manual_seed(0))
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(1.0, abs=0.05)  # unit model space


def test_clip_stage_exports_a_text_encoder_the_pipeline_reads(tmp_path):
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    out = train(_cfg(tmp_path / "clip", "clip", steps=6, clip__negative_words=SWAPS))
    metrics = json.loads((out / "stage.json").read_text())["metrics"]
    assert 0 <= metrics["retrieval_top1"] <= 100
    assert 0 <= metrics["true_over_false"] <= 100  # held-out images that prefer their caption to its swaps
    text, tok = CLIPTextModel.from_pretrained(out / "text_encoder"), CLIPTokenizer.from_pretrained(out / "tokenizer")
    clip = CLIPModel.from_pretrained(out / "clip")
    ids = tok(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(text(ids).last_hidden_state, clip.text_model(ids).last_hidden_state)


def test_caption_reconstruction_makes_the_pooled_state_spell_out_its_caption(tmp_path):
    """clip.reconstruct: the pooled text state learns to give back each token at its position (relation
    words and word order included); the head is not exported."""
    from transformers import CLIPModel

    out = train(_cfg(tmp_path / "recon", "clip", steps=150, clip__reconstruct=1.0, data__num_images=512))
    metrics = json.loads((out / "stage.json").read_text())["metrics"]
    # held-out captions; the most common token at each position would score 50% on them (at step 0: ~0%)
    assert metrics["reconstruct_token_acc"] > 60
    clip = CLIPModel.from_pretrained(out / "clip")  # both towers, no caption head
    assert not any("caption_head" in k for k in clip.state_dict())
    plain = train(_cfg(tmp_path / "plain", "clip", steps=2))
    assert "reconstruct_token_acc" not in json.loads((plain / "stage.json").read_text())["metrics"]


def test_chain_trains_three_stages_into_one_folder_and_skips_done_stages(tmp_path):
    from gen.pipeline import Pipeline
    from train.chain import run_chain

    stage_cfg = {"clip": CLIP, "vae": {"vae.preset": "tiny", "vae.eval_images": 16},
                 "denoiser": {"model.preset": "DiT-T/2", "sampling.steps": 2, "validation.prompts": ["a red circle"],
                              "validation.seeds": [0]}}
    chain = {"chain": {}, "output_dir": str(tmp_path / "run")}
    for stage, extra in stage_cfg.items():
        (tmp_path / f"{stage}.yaml").write_text(json.dumps({"stage": stage}))
        chain["chain"][stage] = f"{stage}.yaml"
    (tmp_path / "chain.yaml").write_text(json.dumps(chain))
    overrides = [f"{k}={json.dumps(v)}" for k, v in COMMON.items()] + ["train.max_steps=2"]
    overrides += [f"{s}:{k}={json.dumps(v)}" for s, extra in stage_cfg.items() for k, v in extra.items()]
    folder = run_chain(tmp_path / "chain.yaml", overrides)
    assert (folder / "stage-clip.json").is_file() and (folder / "stage-vae.json").is_file()
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.text.tokenizer.convert_ids_to_tokens(pipe.text.tokenize(["a red circle"])[0])[1] == "a</w>"
    assert pipe("a red circle", seed=0, output_type="np").images.shape == (1, 16, 16, 3)
    before = (folder / "model_index.json").stat().st_mtime_ns
    run_chain(tmp_path / "chain.yaml", overrides)  # everything done: nothing retrains
    assert (folder / "model_index.json").stat().st_mtime_ns == before
    with pytest.raises(GenError, match="no stage 'dit'"):
        run_chain(tmp_path / "chain.yaml", ["dit:train.max_steps=1"])


def test_denoiser_stage_without_parts_is_a_clear_error(tmp_path):
    with pytest.raises(GenError, match="model.base"):
        load_config(None, extra={**COMMON, "train.output_dir": str(tmp_path)})
    cfg = load_config(None, extra={**COMMON, "train.output_dir": str(tmp_path), "model.text_encoder": str(tmp_path),
                                   "model.vae": str(tmp_path)})
    with pytest.raises(GenError, match="model.text_encoder"):
        train(cfg)


def test_text_encoder_trains_with_the_denoiser_resumes_exactly_and_is_exported(base_dit, tmp_path):
    """model.train_text_encoder: the text tower is part of the trained model -- its weights move, the checkpoint
    holds them (a resumed run ends bitwise equal to a straight one) and the exported folder carries them."""
    from safetensors.torch import load_file

    from tests.train.conftest import fast_config
    from gen.pipeline import Pipeline

    straight = train(fast_config(base_dit, tmp_path / "a", model__train_text_encoder=True, train__cond_dropout=0.5))
    train(fast_config(base_dit, tmp_path / "b", model__train_text_encoder=True, train__cond_dropout=0.5,
                      train__max_steps=3))
    resumed = train(fast_config(base_dit, tmp_path / "b", model__train_text_encoder=True, train__cond_dropout=0.5,
                                train__resume="auto"))
    base = load_file(str(base_dit / "text_encoder" / "model.safetensors"))
    mine = load_file(str(straight / "text_encoder" / "model.safetensors"))
    assert mine.keys() == base.keys()
    assert any(not torch.equal(mine[k], base[k]) for k in base)  # the text tower trained
    again = load_file(str(resumed / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(mine[k], again[k]) for k in mine)
    assert Pipeline.from_pretrained(straight)("a red circle", seed=0, output_type="np").images.shape == (1, 16, 16, 3)
    with pytest.raises(GenError, match="data.cache"):
        train(fast_config(base_dit, tmp_path / "c", model__train_text_encoder=True, data__cache=True))


def test_vae_and_clip_stages_read_shards(tmp_path):
    from train.data.shapes import write_folder
    from train.data.shards import pack

    pack(write_folder(tmp_path / "images", 20), tmp_path / "shards", shard_size=8, progress=False)
    shards = {"data.source": "shards", "data.path": str(tmp_path / "shards")}
    for stage, evals in (("vae", {"vae.eval_images": 4}), ("clip", {"clip.eval_images": 4})):
        out = train(_cfg(tmp_path / stage, stage, steps=2, **shards, **evals))
        assert json.loads((out / "stage.json").read_text())["stage"] == stage


def test_vae_and_clip_stages_train_under_two_processes(tmp_path):
    """accelerate wraps the model in DDP: the stages' losses run through its forward (tiny: 2 steps each)."""
    from tests.train.test_distributed import launch

    for stage in ("vae", "clip"):
        config = tmp_path / f"{stage}.yaml"
        config.write_text(_cfg(tmp_path / stage, stage, steps=2).to_yaml())
        assert "2 process(es) on cpu" in launch(config)
        assert (tmp_path / stage / "model" / ("vae" if stage == "vae" else "text_encoder")).is_dir()
