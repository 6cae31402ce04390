"""Every YAML recipe in configs/ loads through train.config.load_config (chains: each stage's file as its
stage), so none of them rots when a key is renamed; and every one trains and resumes through the real CLI,
shrunk by overrides and on tiny stand-ins for its base (a recipe nobody ran is how full fine-tuning broke)."""

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen.cli import main as gen_main
from gen.control import Control
from gen.models.dit import DIT_PRESETS
from gen.models.unet import UNET_PRESETS
from gen.pipeline import Pipeline
from train.chain import STAGES
from train.config import load_config, read_yaml
from train.data.shapes import write_folder
from train.loop import _has_accelerator

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.y*ml"))
USER_PATHS = {"model.base": "some/model-folder", "data.path": "some/image-folder"}

# What every trained recipe is shrunk by: 16 px, 3 steps of 2 images (no accumulation), a validation grid of one
# prompt and seed, 2 sampling steps.
SMALL = ["data.resolution=16", "data.num_images=16", "train.batch_size=2", "train.grad_accum=1", "train.max_steps=3",
         "validation.prompts=[a red circle]", "validation.seeds=[0]", "sampling.steps=2", "log.progress=false",
         "log.tracker=none"]
# Per recipe: what shrinks its model (its base and images are the stand-ins below).
SHRINK = {
    "dit-shapes.yaml": ["model.options={depth: 2, hidden_size: 64, num_heads: 2}"],
    "unet-folder.yaml": ["model.options={block_out_channels: [32, 32, 32, 32], layers_per_block: 1}"],
    "unet-sd15-finetune.yaml": [],
    "lora-sd.yaml": ["lora.rank=4"],
    "lora-subject.yaml": ["lora.rank=4"],
    "lora-sd3-flux.yaml": ["lora.rank=4"],
    "finetune-sd3-flux.yaml": [],
    "controlnet-sd.yaml": [],
    "controlnet-sd3-flux.yaml": ["controlnet.num_layers=1", "controlnet.num_single_layers=1"],
    "default/dit-polish.yaml": [],  # the bundled model's second DiT run, on the tiny DiT stand-in
    "default/dit-purple.yaml": [],  # and its third
}


def flux_base(tmp_path: Path) -> Path:
    from diffusers import FluxPipeline

    from tests.conftest import tiny_flux_components

    FluxPipeline(**tiny_flux_components(tmp_path)).save_pretrained(tmp_path / "flux")
    return tmp_path / "flux"


def sd3_base(tmp_path: Path) -> Path:
    from diffusers import StableDiffusion3Pipeline

    from tests.conftest import tiny_sd3_components

    StableDiffusion3Pipeline(**tiny_sd3_components()).save_pretrained(tmp_path / "sd3")
    return tmp_path / "sd3"


# Recipes for other families than SD and gen's DiT, and the stand-in base each trains on.
FAMILY_BASES = {"lora-sd3-flux.yaml": flux_base, "finetune-sd3-flux.yaml": sd3_base, "controlnet-sd3-flux.yaml": flux_base}
# The chain configs/default-model.yaml, whose stages are default/clip.yaml, default/vae.yaml, default/dit.yaml.
CHAIN = ["data.resolution=16", "data.num_images=16", "train.batch_size=2", "train.max_steps=3", "log.progress=false",
         "log.tracker=none", "clip:clip.eval_images=8", "vae:vae.eval_images=8", "denoiser:sampling.steps=2",
         "denoiser:validation.prompts=[a red circle]", "denoiser:validation.seeds=[0]",
         "denoiser:model.options={depth: 2, hidden_size: 64, num_heads: 2}"]


def check(cfg) -> None:
    if cfg.stage == "denoiser" and not cfg.model.init_from_base:
        presets = DIT_PRESETS if cfg.model.denoiser == "dit" else UNET_PRESETS
        assert cfg.model.preset in presets, f"model.preset {cfg.model.preset!r} is not a {cfg.model.denoiser} preset"


def test_there_are_recipes():
    assert {"dit-shapes.yaml", "unet-folder.yaml", "unet-sd15-finetune.yaml"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_recipe_loads(name):
    path = CONFIGS / name
    tree = read_yaml(path)
    if "chain" in tree:  # stage name -> config file, loaded as run_chain loads it
        assert set(tree) <= {"chain", "output_dir"} and set(tree["chain"]) <= set(STAGES)
        for stage, file in tree["chain"].items():
            check(load_config(path.parent / file, extra={**USER_PATHS, "stage": stage}))
        return
    check(load_config(path, extra=USER_PATHS))


def test_every_recipe_is_trained_here():
    chain = read_yaml(CONFIGS / "default-model.yaml")["chain"]
    assert set(FILES) == set(SHRINK) | {"default-model.yaml"} | {f"default/{Path(f).name}" for f in chain.values()}


def gen(*argv: str) -> None:
    assert gen_main(["--debug", *map(str, argv)]) == 0


def weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def resumed(run: Path, paused: dict, caplog) -> None:
    """The run went on from its step-2 checkpoint and its trained weights moved after that."""
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} (step 2)" in caplog.text
    final = weights(run, 3)
    assert final.keys() == paused.keys() and any(not torch.equal(final[k], paused[k]) for k in final)


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_recipe_trains_and_resumes(name, sd_folder, base_dit, captioned, tmp_path, caplog):
    """`gen train|lora configs/NAME` to train.stop_at_step=2, then the same command resumes it to step 3,
    draws its validation grid and exports a product that samples. Stand-ins: a tiny diffusers-made SD folder for SD
    bases, a tiny gen DiT, tiny Flux and SD3 folders (FAMILY_BASES)."""
    path, run = CONFIGS / name, tmp_path / "run"
    tree = read_yaml(path)
    command = "lora" if "lora" in tree else "train"
    base = base_dit if tree["model"].get("denoiser") == "dit" else sd_folder
    if name in FAMILY_BASES:
        base = FAMILY_BASES[name](tmp_path)
    args = [f"model.base={base}", f"train.output_dir={run}", *SMALL, *SHRINK[name]]
    controlnet = tree.get("stage") == "controlnet"
    if controlnet:  # images with control images (NAME.control.png)
        args.append(f"data.path={write_folder(tmp_path / 'pairs', 6, control=True)}")
    elif tree["data"]["source"] == "folder":
        args.append(f"data.path={captioned}")
    if tree["train"].get("mixed_precision") == "fp16" and not _has_accelerator():
        args.append("train.mixed_precision=bf16")  # fp16 needs a GPU (tests/train/test_config.py); none ships it
    gen(command, path, *args, "train.stop_at_step=2")
    product = run / ("lora.safetensors" if command == "lora" else "controlnet" if controlnet else "model")
    assert not product.exists()
    paused = weights(run, 2)
    with caplog.at_level(logging.INFO, logger="gen"):
        gen(command, path, *args)
    resumed(run, paused, caplog)
    assert (run / "samples" / "step-00000003.png").is_file()
    pipe = Pipeline.from_pretrained(base if command == "lora" or controlnet else product)
    if "guidance_interval" in tree.get("sampling", {}):  # the recipe's sampling defaults travel with the model
        assert list(pipe.defaults["guidance_interval"]) == tree["sampling"]["guidance_interval"]
    if command == "lora":
        pipe.load_lora(product)
    pipe.progress = False
    control = [Control(product, tmp_path / "pairs" / "000000.control.png")] if controlnet else None
    images = pipe("a red circle", seed=0, num_inference_steps=2, height=16, width=16, output_type="np",
                  control=control).images
    assert images.shape == (1, 16, 16, 3)


def test_default_model_chain_trains_and_resumes_each_stage(tmp_path, caplog):
    """configs/default-model.yaml (default/clip.yaml -> default/vae.yaml -> default/dit.yaml): each stage pauses
    at step 2, which ends that run of the chain; the next run resumes it to step 3 and goes on to the next."""
    out, stages = tmp_path / "run", ["clip", "vae", "denoiser"]
    chain = [CONFIGS / "default-model.yaml", f"output_dir={out}", *CHAIN]
    for i, stage in enumerate(stages + [None]):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gen"):
            gen("train", *chain, *[f"{s}:train.stop_at_step=2" for s in stages[i:]])
        if i:
            resumed(out / stages[i - 1], paused, caplog)
            assert (out / stages[i - 1] / "model").is_dir()
        if stage:
            assert not (out / stage / "model").exists()
            paused = weights(out / stage, 2)
    pipe = Pipeline.from_pretrained(out / "denoiser" / "model")
    pipe.progress = False
    images = pipe("a red circle", seed=0, num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
