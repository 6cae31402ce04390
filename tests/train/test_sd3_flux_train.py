"""SD3 and Flux through the one loop on tiny random models: a Flux LoRA (transformer + CLIP, gradient checkpointing)
resumes bitwise and its file gives diffusers' images; so does an SD3 LoRA (both CLIPs, bf16); an SD3 full fine-tune
with its CLIPs resumes bitwise and a Flux one keeps its base's scheduler, both sampling as diffusers does;
diffusers' own LoRA files load in gen; a Flux dev model trains with its guidance input; the latent/conditioning
cache trains as the uncached path for SD3, Flux and SDXL; SD3 and Flux models train from scratch; a Flux LoRA on
an SD3 model is a one-line error."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from gen.cli import main as gen_main
from gen.errors import GenError
from gen.pipeline import Pipeline
from tests.conftest import quiet_pipeline, tiny_flux_components, tiny_sd3_components
from tests.train.conftest import losses
from tests.train.test_sdxl_train import (PROMPT, args, assert_same_checkpoints, images, settings,  # noqa: F401
                                         step_tensors, straight_and_resumed)
from train.config import load_config
from train.data import TrainData
from train.data.cache import build
from train.loop import train
from train.lora import LoraTask
from train.task import DenoiserTask

SEED, RES = 3, 16
PIPES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
LORA = {"lora.rank": 4, "lora.alpha": 8, "lora.targets": "attn+ff", "lora.text_encoder": True, "lora.save_dtype": "fp32"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A dev-style Flux folder and an SD3 folder with T5, as diffusers saves them."""
    root = tmp_path_factory.mktemp("sd3flux-bases")
    FluxPipeline(**tiny_flux_components(root, guidance_embeds=True)).save_pretrained(root / "flux")
    StableDiffusion3Pipeline(**tiny_sd3_components()).save_pretrained(root / "sd3")
    return {"flux": root / "flux", "sd3": root / "sd3"}


def sample(pipe, gen_side: bool, **kw):
    run = dict(num_inference_steps=3, guidance_scale=3.5, height=RES, width=RES, output_type="np") | kw
    if gen_side:
        return pipe(PROMPT, seed=SEED, **run).images
    return pipe(PROMPT, generator=[torch.Generator("cpu").manual_seed(SEED)], **run).images


def diffusers_pipe(family, folder):
    pipe = PIPES[family].from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_diffusers_parity(family, base, path):
    """gen with the LoRA file gives diffusers' images with it (load_lora_weights), and the LoRA changes them."""
    ours = quiet_pipeline(base)
    before = sample(ours, True)
    ours.load_lora(path)
    mine = sample(ours, True)
    theirs = diffusers_pipe(family, base)
    theirs.load_lora_weights(path)
    diff = float(np.abs(mine - sample(theirs, False)).max())
    assert float(np.abs(mine - before).max()) > 1e-3  # the LoRA changes the image
    assert diff <= 1e-4, diff


@pytest.fixture(scope="module")
def flux_runs(bases, images, tmp_path_factory):
    """A: `gen lora` straight to step 2; B: 1 step, then resumed to 2. Transformer + CLIP, checkpointed."""
    more = LORA | {"train.gradient_checkpointing": True}
    return straight_and_resumed("configs/lora-sd3-flux.yaml", bases["flux"], images,
                                tmp_path_factory.mktemp("flux-lora-runs"), more, LoraTask, steps=2)


def test_a_flux_lora_run_resumes_bitwise(flux_runs):
    a, b = flux_runs
    assert_same_checkpoints(a, b, 2)
    keys = step_tensors(a, 2, "model")
    assert {k.split(".")[0] for k in keys} == {"denoiser", "text_encoder"}  # CLIP; T5 stays frozen
    assert any(".single_transformer_blocks.0.proj_mlp.lora_" in k for k in keys)
    assert load_file(str(a / "lora.safetensors")).keys() == load_file(str(b / "lora.safetensors")).keys()


def test_the_flux_lora_file_gives_diffusers_images(flux_runs, bases):
    path = flux_runs[0] / "lora.safetensors"
    assert {k.split(".")[0] for k in load_file(str(path))} == {"transformer", "text_encoder"}
    assert_diffusers_parity("flux", bases["flux"], path)


def test_an_sd3_lora_trained_in_bf16_gives_diffusers_images(bases, images, tmp_path):
    s = settings(bases["sd3"], images, tmp_path, **LORA, **{"train.max_steps": 2, "train.mixed_precision": "bf16"})
    path = train(load_config("configs/lora-sd3-flux.yaml", extra=s), LoraTask)
    assert {k.split(".")[0] for k in load_file(str(path))} == {"transformer", "text_encoder", "text_encoder_2"}
    assert_diffusers_parity("sd3", bases["sd3"], path)


def test_an_sd3_full_fine_tune_with_its_clips_resumes_bitwise(bases, images, tmp_path):
    more = {"model.init_from_base": True, "model.train_text_encoder": True, "train.ema_decay": 0.9}
    straight_and_resumed("configs/finetune-sd3-flux.yaml", bases["sd3"], images, tmp_path, more, steps=2)
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b", 2, ("model", "ema", "optimizer"))
    assert {k.split(".")[0] for k in step_tensors(tmp_path / "a", 2, "model")} == \
        {"denoiser", "text_encoder", "text_encoder_2"}
    out = tmp_path / "a" / "model"
    ours = quiet_pipeline(out)
    assert ours.family.name == "sd3"
    assert np.abs(sample(ours, True) - sample(diffusers_pipe("sd3", out), False)).max() <= 1e-4


def test_a_flux_fine_tune_keeps_the_bases_scheduler_and_samples_as_diffusers(bases, images, tmp_path):
    s = settings(bases["flux"], images, tmp_path, **{"train.max_steps": 1, "train.checkpoint_every": 0})
    out = train(load_config("configs/finetune-sd3-flux.yaml", extra=s))
    ours = quiet_pipeline(out)
    assert ours.scheduler_config["use_dynamic_shifting"]  # Flux's resolution-dependent shift, as the base
    assert np.abs(sample(ours, True) - sample(diffusers_pipe("flux", out), False)).max() <= 1e-4


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_lora_file_written_by_diffusers_loads_in_gen(bases, family, tmp_path):
    theirs = diffusers_pipe(family, bases[family])
    torch.manual_seed(0)
    theirs.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["attn.to_q", "attn.to_k", "attn.to_v"]))
    PIPES[family].save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(theirs.transformer))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    reference = diffusers_pipe(family, bases[family])
    reference.load_lora_weights(path)
    ours = quiet_pipeline(bases[family])
    ours.load_lora(path)
    assert np.abs(sample(ours, True) - sample(reference, False)).max() <= 1e-4


def guidance_fed(base, images, tmp_path, **more):
    cfg = load_config(None, extra=settings(base, images, tmp_path, **{"model.init_from_base": True} | more))
    task = DenoiserTask(cfg, torch.device("cpu"))
    fed = []
    task.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["guidance"]), with_kwargs=True)
    batch = {"pixel_values": torch.zeros(2, 3, RES, RES), "text": [PROMPT, "a square"]}
    task.loss(task.model, batch, torch.Generator().manual_seed(0))
    return fed[0]


def test_a_flux_dev_model_trains_with_its_guidance_input(bases, images, tmp_path):
    assert torch.equal(guidance_fed(bases["flux"], images, tmp_path), torch.ones(2))  # diffusers' default
    assert torch.equal(guidance_fed(bases["flux"], images, tmp_path, train__guidance=3.5), torch.full((2,), 3.5))


@pytest.mark.parametrize("which", ["sd3", "schnell"])
def test_train_guidance_on_a_model_without_the_input_is_a_one_line_error(bases, images, tmp_path, which, capsys):
    if which == "schnell":
        FluxPipeline(**tiny_flux_components(tmp_path, guidance_embeds=False)).save_pretrained(tmp_path / which)
    base = bases.get(which, tmp_path / which)
    s = settings(base, images, tmp_path / "run", **{"train.guidance": 2.0})
    assert gen_main(["lora", "configs/lora-sd3-flux.yaml", *args(s)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gen: error: config key 'train.guidance': this ") and "no guidance input" in err[-1]


@pytest.mark.parametrize("family", ["flux", "sd3", "sdxl"])
def test_cached_training_matches_uncached_and_skips_the_text_encoders(bases, sdxl_folder, images, family, tmp_path):
    base = bases.get(family, sdxl_folder)
    more = {"data.crop": "center", "train.max_steps": 2, "train.checkpoint_every": 0, "model.init_from_base": True,
            "data.cache_dir": str(tmp_path / "cache")} | ({"model.denoiser": "unet"} if family == "sdxl" else {})
    train(load_config(None, extra=settings(base, images, tmp_path / "plain", **more)))
    cfg = load_config(None, extra=settings(base, images, tmp_path / "cached", **more, **{"data.cache": True}))
    assert build(cfg, TrainData(cfg.data, 0), Pipeline.from_pretrained(base), progress=False)[1]
    calls = []

    class Counting(DenoiserTask):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            for t in self.texts:
                t.model.register_forward_hook(lambda *_: calls.append(1))
    train(cfg, Counting)  # on the cache built above
    assert calls == []
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "cached"), rel=1e-4)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_tiny_model_trains_from_scratch(bases, images, tmp_path, family):
    out = train(load_config(None, extra=settings(bases[family], images, tmp_path, **{
        "model.preset": "tiny", "train.max_steps": 2, "train.checkpoint_every": 0})))
    ours = quiet_pipeline(out)
    assert ours.family.name == family
    assert type(ours.denoiser) is type(quiet_pipeline(bases[family]).denoiser)
    # a Flux model from scratch has no guidance input (it is not guidance-distilled): sampled without a guidance value
    assert sample(ours, True, **{"guidance_scale": 1.0} if family == "flux" else {}).shape == (1, RES, RES, 3)
    with pytest.raises(GenError, match="model.preset.*not a"):
        train(load_config(None, extra=settings(bases[family], images, tmp_path / "bad", **{"model.preset": "DiT-T/2"})))


def test_a_flux_lora_on_an_sd3_model_is_a_one_line_error(flux_runs, bases, tmp_path, capsys):
    lora = flux_runs[0] / "lora.safetensors"
    code = gen_main(["sample", PROMPT, "--model", str(bases["sd3"]), "--lora", str(lora), "--steps", "1",
                     "--height", str(RES), "--width", str(RES), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("gen: error: ") and "is a LoRA for Flux, not for this SD3 model" in err[-1]
