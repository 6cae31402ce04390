"""stage=controlnet (train/controlnet.py) on a tiny SD folder: `gen train configs/controlnet-sd.yaml` trains a
ControlNet from the base's UNet on image + control image pairs; checkpoints hold the ControlNet alone and resume
is exact; the exported folder and original-layout file load in diffusers (StableDiffusionControlNetPipeline gives
gen's images) and in gen; the hint is cropped and flipped with its image; missing or unreadable control images are
one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from gen.cli import main as gen_main
from gen.control import Control
from gen.control.files import load_file as load_controlnet, to_original
from gen.errors import GenError
from tests.conftest import quiet_pipeline, tiny_sd_components
from train.config import load_config
from train.data import TrainData
from train.data.shapes import write_folder
from train.loop import train

SIZE = 32
RECIPE = "configs/controlnet-sd.yaml"


def settings(base, images, out, **more):
    s = {"model.base": str(base), "data.path": str(images), "data.resolution": SIZE, "train.output_dir": str(out),
         "train.batch_size": 2, "train.grad_accum": 1, "train.max_steps": 4, "train.checkpoint_every": 2,
         "train.mixed_precision": "no", "optim.lr": 1e-3, "validation.prompts": ["a red circle"],
         "validation.seeds": [0], "validation.every": 0, "sampling.steps": 2, "log.every": 1, "log.tracker": "none",
         "log.progress": False}
    return s | {k.replace("__", "."): v for k, v in more.items()}


def step_tensors(run, step, part):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / f"{part}.safetensors"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six shapes-world scenes at 32 px, each with its mask as the control image (metadata.jsonl's column)."""
    return write_folder(tmp_path_factory.mktemp("cn-data") / "shapes", 6, size=SIZE, control=True)


@pytest.fixture(scope="module")
def runs(sd_folder, images, tmp_path_factory):
    """A: `gen train` with the shipped recipe straight to step 4. B: 2 steps, then resumed to step 4."""
    root = tmp_path_factory.mktemp("cn-runs")
    overrides = [f"{k}={json.dumps(v)}" for k, v in settings(sd_folder, images, root / "a").items()]
    assert gen_main(["train", RECIPE, *overrides]) == 0
    b = settings(sd_folder, images, root / "b")
    train(load_config(RECIPE, extra=b | {"train.max_steps": 2}))
    assert train(load_config(RECIPE, extra=b)) == root / "b" / "controlnet"
    return root / "a", root / "b"


def test_checkpoints_hold_the_controlnet_alone_and_resume_is_exact(runs):
    a, b = runs
    model = step_tensors(b, 2, "model")
    names = {f"controlnet.{k}" for k in ControlNetModel.from_pretrained(a / "controlnet").state_dict()}
    assert set(model) == names  # the ControlNet's weights, none of the frozen UNet's
    for part in ("model", "optimizer"):
        x, y = step_tensors(a, 4, part), step_tensors(b, 4, part)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), part
    zero = "controlnet.controlnet_mid_block.weight"
    assert not torch.equal(step_tensors(a, 2, "model")[zero], step_tensors(a, 4, "model")[zero])
    fa, fb = load_file(a / "controlnet.safetensors"), load_file(b / "controlnet.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_the_validation_grid_shows_each_hint_beside_its_image(runs, images):
    grid = Image.open(runs[0] / "samples" / "step-00000004.png")
    assert grid.size == (2 * SIZE, SIZE)  # one seed, one prompt: the hint, then the image
    hint = np.asarray(Image.open(images / "000000.control.png").convert("RGB"))
    assert np.array_equal(np.asarray(grid)[:, :SIZE], hint)


def test_the_trained_controlnet_loads_in_diffusers_with_gens_images(runs, sd_folder, images):
    folder, file = runs[0] / "controlnet", runs[0] / "controlnet.safetensors"
    net = ControlNetModel.from_pretrained(folder)
    assert all(k.startswith("control_model.") for k in load_file(file))  # the original (LDM) layout
    from_file = load_controlnet(file)
    assert all(torch.equal(from_file.state_dict()[k], v) for k, v in net.state_dict().items())
    hint = Image.open(images / "000003.control.png").convert("RGB")
    run = dict(num_inference_steps=3, guidance_scale=6.0, height=SIZE, width=SIZE, output_type="np")
    theirs = StableDiffusionControlNetPipeline.from_pipe(
        StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None), controlnet=net)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs("a red circle", image=hint, generator=[torch.Generator().manual_seed(5)], **run).images
    ours = quiet_pipeline(sd_folder)
    plain = ours("a red circle", seed=5, **run).images
    diffs = {}
    for name, model in (("folder", folder), ("file", file)):
        got = ours("a red circle", seed=5, control=[Control(str(model), hint)], **run).images
        diffs[name] = float(np.abs(got - expected).max())
    print(f"gen vs diffusers, trained ControlNet: max abs diff {diffs}")
    assert max(diffs.values()) <= 1e-4
    assert np.abs(expected - plain).max() > 1e-3  # four steps moved the ControlNet off its zero start


def test_gens_original_layout_file_is_what_diffusers_single_file_converter_reads(tmp_path):
    """The exporter (gen.control.files.to_original) on an SD-sized hint encoder (4 levels, what diffusers' converter
    assumes), read by ControlNetModel.from_single_file with the folder's config, offline."""
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(tiny_sd_components()["unet"])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    net.save_pretrained(tmp_path / "folder")
    to_original(net, tmp_path / "cn.safetensors")
    back = ControlNetModel.from_single_file(str(tmp_path / "cn.safetensors"), config=str(tmp_path / "folder"),
                                            local_files_only=True).state_dict()
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


def test_the_hint_is_cropped_and_flipped_with_its_image(tmp_path):
    """A control image that is a copy of its image comes out as the same view, whatever the crop and flip drew."""
    rng = np.random.default_rng(0)
    for i in range(3):
        a = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        Image.fromarray(a).save(tmp_path / f"{i}.control.png")  # the sidecar convention
        (tmp_path / f"{i}.txt").write_text("noise")
    cfg = load_config(None, extra={"data.path": str(tmp_path), "data.resolution": 32, "data.crop": "random",
                                   "data.flip": True, "model.base": "x"}, check_paths=False)
    data = TrainData(cfg.data, 0, control=True)
    assert len(data) == 3  # the control images are not training images
    views = set()
    for pos in range(8):
        row = data[pos % 3, pos]
        assert torch.allclose(row["control"] * 2 - 1, row["pixel_values"], atol=1e-6)
        views.add(tuple(row["crop_top_left"].tolist()))
    assert len(views) > 1


def gen_train(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gen", "train", *args], capture_output=True, text=True, cwd=cwd)


def test_a_missing_or_unreadable_control_image_is_a_one_line_error(sd_folder, tmp_path):
    folder = write_folder(tmp_path / "data", 3, size=SIZE, control=True)
    (folder / "000001.control.png").unlink()
    args = [RECIPE, f"model.base={sd_folder}", f"data.path={folder}", f"train.output_dir={tmp_path / 'run'}"]
    r = gen_train(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "000001.png has no control image" in line and "'control' column" in line
    (folder / "000001.control.png").write_bytes(b"not a png")
    with pytest.raises(GenError, match="control image .*000001.control.png of 000001.png is not a readable image"):
        TrainData(load_config(RECIPE, extra={"model.base": str(sd_folder), "data.path": str(folder)}).data, 0,
                  control=True)
    rows = [json.loads(r) for r in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        del row["control"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "000000.control.png").rename(folder / "000000.hint.png")  # no column: the sidecar name is the rule
    with pytest.raises(GenError, match="000000.png has no control image .*expected 000000.control.png beside it"):
        TrainData(load_config(RECIPE, extra={"model.base": str(sd_folder), "data.path": str(folder)}).data, 0,
                  control=True)


def test_a_controlnet_needs_a_base_that_takes_one(dit_folder, images, tmp_path):
    with pytest.raises(GenError, match="is a gen DiT model, which takes no ControlNet"):
        train(load_config(RECIPE, extra=settings(dit_folder, images, tmp_path / "run")))


def test_an_sdxl_controlnet_trains_and_loads_in_diffusers_with_gens_images(sdxl_folder, images, tmp_path):
    """The same task on an SDXL base (its size conditioning through the family): diffusers'
    StableDiffusionXLControlNetPipeline gives gen's images, and the original-layout file (label_emb included) holds
    the folder's weights."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    out = train(load_config(RECIPE, extra=settings(sdxl_folder, images, tmp_path / "run", train__max_steps=2,
                                                   train__checkpoint_every=0, validation__prompts=[])))
    net = ControlNetModel.from_pretrained(out)
    assert net.config.addition_embed_type == "text_time"
    from gen.control.files import load_file

    lone = load_file(out.with_suffix(".safetensors")).state_dict()
    assert lone.keys() == net.state_dict().keys() and all(torch.equal(lone[k], v) for k, v in net.state_dict().items())
    hint = Image.open(images / "000001.control.png").convert("RGB")
    run = dict(num_inference_steps=3, guidance_scale=6.0, height=SIZE, width=SIZE, output_type="np")
    theirs = StableDiffusionXLControlNetPipeline.from_pipe(StableDiffusionXLPipeline.from_pretrained(sdxl_folder),
                                                           controlnet=net)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs("a red circle", image=hint, generator=[torch.Generator().manual_seed(5)], **run).images
    got = quiet_pipeline(sdxl_folder)("a red circle", seed=5, control=[Control(str(out), hint)], **run).images
    print(f"gen vs diffusers, trained SDXL ControlNet: max abs diff {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= 1e-4
