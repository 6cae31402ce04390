"""SDXL through the one loop on the tiny SDXL folder: a LoRA on the UNet and both text encoders resumes bitwise
and its file gives diffusers' images; a full fine-tune (UNet + both text encoders from the base) resumes bitwise;
from scratch trains; the UNet is fed each image's own original size and crop as time_ids."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from gen.cli import main as gen_main
from gen.pipeline import Pipeline
from train.config import load_config
from train.data import TrainData, loader
from train.loop import train
from train.lora import LoraTask
from train.task import DenoiserTask

PROMPT, NEG, SEED, RES = "a red square", "blurry", 3, 16
RUN = dict(num_inference_steps=3, guidance_scale=5.0, height=RES, width=RES)


def settings(base, images, out, **more):
    s = {"model.base": str(base), "data.path": str(images), "data.resolution": RES, "data.crop": "random",
         "data.flip": True, "train.output_dir": str(out), "train.batch_size": 2, "train.max_steps": 4,
         "train.checkpoint_every": 2, "train.keep_checkpoints": 2, "train.mixed_precision": "no",
         "train.cond_dropout": 0.5, "train.ema_decay": 0.0, "train.gradient_checkpointing": False,
         "optim.lr": 1e-2, "optim.grad_clip": 1.0, "validation.prompts": [], "validation.every": 0,
         "sampling.steps": 2, "log.every": 1, "log.tracker": "none", "log.progress": False}
    return s | {k.replace("__", "."): v for k, v in more.items()}


def args(s: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in s.items()]


def step_tensors(run, step, part):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / f"{part}.safetensors"))


def straight_and_resumed(config, base, images, root, more, task_class=None, steps=4):
    """Run A: `gen lora|train CONFIG` straight to `steps`; run B: half of them, then resumed to `steps`. Returns
    both run folders."""
    command, more = "train" if task_class is None else "lora", more | {"train.max_steps": steps,
                                                                       "train.checkpoint_every": steps // 2}
    assert gen_main([command, config, *args(settings(base, images, root / "a", **more))]) == 0
    b = settings(base, images, root / "b", **more)
    train(load_config(config, extra=b | {"train.max_steps": steps // 2}), task_class)
    train(load_config(config, extra=b), task_class)
    return root / "a", root / "b"


def assert_same_checkpoints(a, b, step, parts=("model", "optimizer")):
    for part in parts:
        x, y = step_tensors(a, step, part), step_tensors(b, step, part)
        assert x.keys() == y.keys() and x
        for k in x:
            assert torch.equal(x[k], y[k]), f"{part}/{k} differs"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Captioned pictures of other sizes than the training resolution (so sizes and crops vary)."""
    d = tmp_path_factory.mktemp("sdxl-images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(24, 40), (20, 20), (40, 24), (16, 30)]):
        a = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        a[h // 4: h // 2, w // 4: w // 2] = (230, 20, 20)
        Image.fromarray(a).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(PROMPT if i % 2 else "a square")
    return d


@pytest.fixture(scope="module")
def lora_runs(sdxl_folder, images, tmp_path_factory):
    """A: `gen lora` straight to step 4; B: 2 steps, then resumed to 4. UNet + both text encoders."""
    more = {"lora.rank": 4, "lora.alpha": 8, "lora.targets": "attn+ff", "lora.text_encoder": True,
            "lora.save_dtype": "fp32"}
    return straight_and_resumed("configs/lora-sd.yaml", sdxl_folder, images, tmp_path_factory.mktemp("sdxl-lora-runs"),
                                more, LoraTask)


def test_an_sdxl_lora_run_on_unet_and_both_text_encoders_resumes_bitwise(lora_runs):
    a, b = lora_runs
    assert_same_checkpoints(a, b, 4)
    keys = step_tensors(a, 4, "model")
    for part in ("denoiser.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) and ".lora_" in k for k in keys), part
    assert load_file(str(a / "lora.safetensors")).keys() == load_file(str(b / "lora.safetensors")).keys()


def test_the_sdxl_lora_file_gives_diffusers_images(lora_runs, sdxl_folder):
    path = lora_runs[0] / "lora.safetensors"
    prefixes = {re.match(r"lora_(unet|te\d)_", k).group(0) for k in load_file(str(path))}  # lora.format auto: kohya
    assert prefixes == {"lora_unet_", "lora_te1_", "lora_te2_"}
    ours = Pipeline.from_pretrained(sdxl_folder)
    ours.progress = False
    base = ours(PROMPT, negative_prompt=NEG, seed=SEED, sampler="euler", output_type="np", **RUN).images
    ours.load_lora(path)
    mine = ours(PROMPT, negative_prompt=NEG, seed=SEED, sampler="euler", output_type="np", **RUN).images
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(path)
    ref = theirs(PROMPT, negative_prompt=NEG, generator=[torch.Generator("cpu").manual_seed(SEED)],
                 output_type="np", **RUN).images
    assert float(np.abs(mine - base).max()) > 1e-3  # the trained LoRA changes the image
    assert float(np.abs(mine - ref).max()) <= 1e-4


def test_an_sdxl_full_fine_tune_from_the_base_resumes_bitwise(sdxl_folder, images, tmp_path):
    more = {"model.init_from_base": True, "model.train_text_encoder": True, "train.ema_decay": 0.9}
    straight_and_resumed("configs/unet-sd15-finetune.yaml", sdxl_folder, images, tmp_path, more)
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b", 4, ("model", "ema", "optimizer"))
    keys = step_tensors(tmp_path / "a", 4, "model")
    assert {k.split(".")[0] for k in keys} == {"denoiser", "text_encoder", "text_encoder_2"}
    pipe = Pipeline.from_pretrained(tmp_path / "a" / "model")
    assert pipe.family.name == "sdxl"
    before = Pipeline.from_pretrained(sdxl_folder)
    assert not torch.equal(pipe.text_parts["text_encoder_2"].text_model.encoder.layers[0].mlp.fc1.weight,
                           before.text_parts["text_encoder_2"].text_model.encoder.layers[0].mlp.fc1.weight)


def test_an_sdxl_model_trains_from_scratch(sdxl_folder, images, tmp_path):
    s = settings(sdxl_folder, images, tmp_path, **{"model.denoiser": "unet", "model.preset": "tiny",
                                                    "train.max_steps": 2, "objective.type": "ddpm"})
    out = train(load_config(None, extra=s))
    pipe = Pipeline.from_pretrained(out)
    assert pipe.family.name == "sdxl" and pipe.denoiser.config.addition_embed_type == "text_time"
    assert pipe.denoiser.config.cross_attention_dim == sum(t.model.config.hidden_size for t in pipe.texts)
    pipe.progress = False
    assert pipe(PROMPT, seed=0, output_type="np", num_inference_steps=2, height=RES, width=RES).images.shape == \
        (1, RES, RES, 3)


@pytest.mark.parametrize("crop, buckets", [("center", False), ("random", False), ("random", True)])
def test_time_ids_hold_each_images_original_size_and_crop(sdxl_folder, images, tmp_path, crop, buckets):
    cfg = load_config(None, extra=settings(sdxl_folder, images, tmp_path, **{
        "model.init_from_base": True, "model.denoiser": "unet", "data.crop": crop, "data.flip": False,
        "data.buckets": buckets, "data.bucket_step": 4, "train.batch_size": 1, "train.cond_dropout": 0.0}))
    task = DenoiserTask(cfg, torch.device("cpu"))
    fed = []
    task.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["added_cond_kwargs"]["time_ids"]),
                                         with_kwargs=True)
    data = TrainData(cfg.data, cfg.train.seed)
    for batch, _ in zip(loader(data, 1, 0, 1, 0), range(4)):
        task.loss(task.model, batch, torch.Generator().manual_seed(0))
        i = int(batch["index"][0])
        path, _ = data.source.items[i]
        with Image.open(path) as im:
            original = im.convert("RGB")
        th, tw = batch["pixel_values"].shape[-2:]
        # independently: resize to cover the training size, then find the crop the pixels came from
        s = max(tw / original.width, th / original.height)
        resized = original.resize((max(tw, round(original.width * s)), max(th, round(original.height * s))),
                                  Image.Resampling.BICUBIC, reducing_gap=None)
        top, left = (int(v) for v in fed[-1][0, 2:4])
        view = np.asarray(resized.crop((left, top, left + tw, top + th)), dtype=np.float32) / 127.5 - 1
        assert np.array_equal(view, batch["pixel_values"][0].permute(1, 2, 0).numpy())
        assert fed[-1][0].tolist() == [original.height, original.width, top, left, th, tw]
        if crop == "center":
            assert (top, left) == ((resized.height - th) // 2, (resized.width - tw) // 2)
    sizes = {tuple(t[0, :2].tolist()) for t in fed}
    assert len(sizes) > 1 and all(size != (RES, RES) for size in sizes)  # each image's own size, not the target's
