"""`gen lora` on a tiny SD folder: the trained file loads in diffusers with gen's images (diffusers and kohya
layouts), checkpoints hold adapters + optimizer state, and resume is exact; a DiT DoRA run; config errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from gen import lora
from gen.cli import main as gen_main
from gen.errors import GenError
from gen.io import read_metadata
from gen.pipeline import Pipeline
from train.config import load_config
from train.loop import train
from train.lora import LoraTask

PROMPT, NEG, SEED = "a photo of sks dog", "blurry", 3
RUN = dict(num_inference_steps=3, guidance_scale=6.0, height=16, width=16)


def settings(base, images, out, **more):
    """A 4-step text-encoder + UNet LoRA (alpha != rank, attention + feed-forward) on the subject preset."""
    s = {"model.base": str(base), "data.path": str(images), "data.resolution": 16, "data.flip": False,
         "train.output_dir": str(out), "train.batch_size": 2, "train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
         "train.mixed_precision": "no", "optim.lr": 1e-2, "lora.rank": 4, "lora.alpha": 8,
         "lora.text_encoder": True, "lora.save_dtype": "fp32", "validation.prompts": [PROMPT],
         "validation.seeds": [0], "validation.every": 0, "sampling.steps": 2, "log.every": 1,
         "log.tracker": "none", "log.progress": False}
    return s | {k.replace("__", "."): v for k, v in more.items()}


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def step_tensors(run, step, part):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / f"{part}.safetensors"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four uncaptioned photos of the 'subject' (a red square on noise): the subject preset captions them."""
    d = tmp_path_factory.mktemp("subject")
    rng = np.random.default_rng(0)
    for i in range(4):
        a = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        a[4:12, 4:12] = (230, 20, 20)
        Image.fromarray(a).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def runs(sd_folder, images, tmp_path_factory):
    """A: `gen lora` straight to step 4 (lora.format left at its default: kohya for an SD model). B: 2 steps, then
    the same run resumed from its checkpoint and trained on to step 4 (diffusers layout; the constant LR makes the
    two schedules the same)."""
    root = tmp_path_factory.mktemp("lora-runs")
    overrides = [f"{k}={json.dumps(v)}" for k, v in settings(sd_folder, images, root / "a").items()]
    assert gen_main(["lora", "configs/lora-subject.yaml", *overrides]) == 0
    b = settings(sd_folder, images, root / "b", lora__format="diffusers")
    train(load_config("configs/lora-subject.yaml", extra=b | {"train.max_steps": 2}), LoraTask)
    assert train(load_config("configs/lora-subject.yaml", extra=b), LoraTask) == root / "b" / "lora.safetensors"
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def theirs(sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs_images(pipe, path):
    pipe.load_lora_weights(path)
    try:
        return pipe(PROMPT, negative_prompt=NEG, generator=[torch.Generator("cpu").manual_seed(SEED)],
                    output_type="np", **RUN).images
    finally:
        pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def ours(sd_folder, runs):
    """gen's images of the base model and with run A's LoRA."""
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.progress = False
    sample = lambda: pipe(PROMPT, negative_prompt=NEG, seed=SEED, sampler="ddim", output_type="np",  # noqa: E731
                          **RUN).images
    base = sample()
    pipe.load_lora(runs[0] / "lora.safetensors")
    return {"base": base, "lora": sample()}


def test_trained_lora_is_kohya_by_default_and_loads_in_diffusers_with_gens_images(runs, theirs, ours):
    keys = load_file(runs[0] / "lora.safetensors")  # A1111 and ComfyUI read every layer of these names
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys) and any("_attn1_to_q." in k for k in keys)
    assert diff(ours["lora"], ours["base"]) > 1e-2  # four steps at lr 1e-2 moved the images
    assert diff(theirs_images(theirs, runs[0] / "lora.safetensors"), ours["lora"]) <= 1e-4


def test_diffusers_export_of_a_resumed_run_loads_in_diffusers_with_the_same_images(runs, theirs, ours):
    assert all(k.startswith(("unet.", "text_encoder.")) for k in load_file(runs[1] / "lora.safetensors"))
    assert diff(theirs_images(theirs, runs[1] / "lora.safetensors"), ours["lora"]) <= 1e-4


def test_checkpoints_hold_adapters_and_optimizer_state_and_resume_is_exact(runs):
    a, b = runs
    model = step_tensors(b, 2, "model")
    assert model and all(".lora_A." in k or ".lora_B." in k for k in model)  # no frozen base weights
    assert any(k.startswith("text_encoder.") for k in model)
    optim = step_tensors(b, 2, "optimizer")
    assert sum(".exp_avg_sq" in k or "exp_avg_sq" in k for k in optim) == len(model)  # Adam moments per tensor
    for part in ("model", "optimizer"):
        x, y = step_tensors(a, 4, part), step_tensors(b, 4, part)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), part
    assert not torch.equal(step_tensors(a, 2, "model")[next(iter(model))], step_tensors(a, 4, "model")[next(iter(model))])


def test_exported_files_carry_rank_alpha_recipe_and_base(runs, sd_folder):
    meta = read_metadata(runs[0] / "lora.safetensors")
    assert meta["gen.rank"] == "4" and meta["gen.alpha"] == "8" and meta["gen.base_model"] == str(sd_folder)
    recipe = json.loads(meta["gen.recipe"])
    assert recipe["lora"]["rank"] == 4 and recipe["trained_steps"] == 4 and recipe["lora"]["instance_prompt"] == PROMPT
    assert recipe["objective"]["type"] == "ddpm"  # read from the base folder, not the config's default
    kohya = read_metadata(runs[0] / "lora.safetensors")
    assert kohya["ss_network_dim"] == "4" and kohya["ss_network_alpha"] == "8"
    assert kohya["ss_network_module"] == "networks.lora" and kohya["ss_max_train_steps"] == "4"
    grid = Image.open(runs[0] / "samples" / "step-00000004.png")
    assert grid.size == (16, 32)  # one prompt; seed 0 without the LoRA, then with it
    top, bottom = np.asarray(grid)[:16], np.asarray(grid)[16:]
    assert not np.array_equal(top, bottom)


def test_gen_lora_needs_no_transformers_peft_integration(sd_folder, images, tmp_path, monkeypatch):
    """Training, saving, loading and fusing a text-encoder + UNet LoRA never call transformers' PEFT mixin
    (`add_adapter`, `load_adapter`, ...), so a transformers release whose integration refuses the installed peft
    cannot break gen. Every public method of the mixin is made to raise for the whole test."""
    from transformers.integrations.peft import PeftAdapterMixin

    def unavailable(*args, **kwargs):
        raise RuntimeError("transformers' PEFT integration was called")

    for name, value in vars(PeftAdapterMixin).items():
        if callable(value) and not name.startswith("_"):
            monkeypatch.setattr(PeftAdapterMixin, name, unavailable)
    with pytest.raises(RuntimeError, match="integration was called"):
        Pipeline.from_pretrained(sd_folder).text.model.add_adapter(None)  # the guard is in place
    for fmt in ("diffusers", "kohya"):
        cfg = load_config("configs/lora-subject.yaml", extra=settings(sd_folder, images, tmp_path / fmt, lora__format=fmt,
                                                                      train__max_steps=2, train__checkpoint_every=0))
        path = train(cfg, LoraTask)
        pipe = Pipeline.from_pretrained(sd_folder)
        pipe.progress = False
        sample = lambda: pipe(PROMPT, negative_prompt=NEG, seed=SEED, sampler="ddim", output_type="np",  # noqa: E731
                              **RUN).images
        base = sample()
        pipe.load_lora(path)
        loaded = sample()
        assert diff(loaded, base) > 1e-3, fmt
        pipe.fuse_lora()
        assert diff(sample(), loaded) <= 1e-4, fmt


@pytest.fixture(scope="module")
def dit_base(tmp_path_factory):
    """A tiny gen DiT whose adaLN-zero gates are open (a fresh one passes every block through unchanged)."""
    from gen.models.tiny import tiny_pipeline

    pipe = tiny_pipeline("dit")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pipe.denoiser.parameters():
            if not p.any():
                p.normal_(std=0.05)
    path = tmp_path_factory.mktemp("dit") / "tiny-dit"
    pipe.save_pretrained(path)
    return path


def test_dit_dora_lora_on_a_gen_model(dit_base, images, tmp_path):
    dit_folder = dit_base
    cfg = load_config(None, extra=settings(dit_folder, images, tmp_path, lora__dora=True, lora__targets="attn+ff",
                                           lora__text_encoder=False, validation__prompts=[],
                                           train__max_steps=2, train__checkpoint_every=0,
                                           lora__instance_prompt=PROMPT))
    path = train(cfg, LoraTask)
    text = lora.describe(path)
    assert "layout: diffusers (DoRA)" in text and "targets: 20 layers (transformer 20)" in text
    pipe = Pipeline.from_pretrained(dit_folder)
    pipe.progress = False
    run = dict(num_inference_steps=2, seed=1, output_type="latent", height=16, width=16)
    base = pipe(PROMPT, **run).images
    pipe.load_lora(path)
    names = set(lora.extract(pipe.denoiser, "denoiser", "lora"))  # blocks' attention + MLP, not the embedders'
    assert all(n.startswith("blocks.") and "adaLN" not in n for n in names) and "blocks.1.mlp.2" in names
    assert not torch.equal(pipe(PROMPT, **run).images, base)


@pytest.mark.parametrize("bad, message", [
    ({"lora.dora": True, "lora.format": "kohya"}, "diffusers layout only"),
    ({"data.cache": True}, "cannot be used with lora.text_encoder"),
    ({"lora.targets": "ff+attn"}, "lora.targets"),
    ({"lora.rank": 0}, "lora.rank"),
    ({"model.train_text_encoder": True}, "model.train_text_encoder.*lora.text_encoder=true"),
])
def test_config_errors_name_the_key(bad, message, sd_folder, images, tmp_path):
    with pytest.raises(GenError, match=message):
        LoraTask(load_config("configs/lora-subject.yaml", extra=settings(sd_folder, images, tmp_path) | bad),
                 torch.device("cpu"))


def test_lora_on_a_single_file_base_equals_the_folders(sd_folder, images, tmp_path):
    """model.base=FILE.safetensors (the same model as one original-layout file) trains the same LoRA as the folder."""
    file = tmp_path / "base.safetensors"
    Pipeline.from_pretrained(sd_folder).save_pretrained(file, single_file=True)
    out = {}
    for name, base in (("folder", sd_folder), ("file", file)):
        cfg = load_config("configs/lora-subject.yaml", extra=settings(base, images, tmp_path / name, train__max_steps=2,
                                                                      train__checkpoint_every=0))
        out[name] = load_file(str(train(cfg, LoraTask)))
    assert out["folder"].keys() == out["file"].keys() and len(out["file"]) > 0
    assert max(diff(out["folder"][k], out["file"][k]) for k in out["file"]) <= 1e-6


def test_ema_of_a_lora_copies_the_adapters_only(sd_folder, images, tmp_path):
    from train.ema import EMA

    task = LoraTask(load_config(None, extra=settings(sd_folder, images, tmp_path)), torch.device("cpu"))
    ema = EMA(task.model, 0.9)
    ours, theirs = dict(task.model.named_parameters()), dict(ema.model.named_parameters())
    assert ours.keys() == theirs.keys()
    frozen = [k for k, p in ours.items() if not p.requires_grad]
    assert frozen and all(theirs[k] is ours[k] for k in frozen)  # the base: shared, not copied
    adapters = [k for k, p in ours.items() if p.requires_grad]
    assert adapters and all(theirs[k] is not ours[k] for k in adapters)
    with torch.no_grad():
        for k in adapters:
            ours[k].add_(1.0)
    ema.update(task.model)
    assert all(not torch.equal(theirs[k], ours[k]) for k in adapters)  # the EMA lags the adapters
