"""Training fixtures: tiny base folders (frozen CLIP + VAE) and a fast config on the shapes world."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from train.config import load_config


@pytest.fixture(scope="session")
def base_dit(tmp_path_factory):
    from gen.models.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("base") / "dit"
    tiny_pipeline("dit").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def base_unet(tmp_path_factory):
    from gen.models.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("base") / "unet"
    tiny_pipeline("unet").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def captioned(tmp_path_factory):
    """An image folder for data.source=folder recipes: 6 shapes-world images and their metadata.jsonl."""
    from train.data.shapes import write_folder

    return write_folder(tmp_path_factory.mktemp("images") / "shapes", 6)


@pytest.fixture(scope="session")
def tagged_masked(tmp_path_factory):
    """6 shapes-world images captioned with two variant lines of tags; every other one has a loss mask."""
    import json

    import numpy as np
    from PIL import Image

    from train.data.shapes import write_folder

    root = write_folder(tmp_path_factory.mktemp("images") / "tagged", 6)
    rows = [json.loads(r) for r in (root / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        tags = row["text"].replace(" left of ", ", left of, ").replace(" and ", ", ")
        row["text"] = [tags, f"shapes, {tags}, white background"]
        if i % 2 == 0:
            mask = np.zeros((64, 64), np.uint8)
            mask[:, 16 * (i // 2):] = 255
            Image.fromarray(mask).save(root / row["file_name"].replace(".png", ".mask.png"))
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def fast_config(base, out, **overrides):
    """A few-step run on 16 px shapes; validation off, logging every step to metrics.jsonl."""
    settings = {"model.base": str(base), "data.source": "shapes", "data.resolution": 16, "data.num_images": 24,
                "train.output_dir": str(out), "train.batch_size": 4, "train.max_steps": 6,
                "train.checkpoint_every": 3, "train.ema_decay": 0.9, "optim.lr": 1e-3, "optim.warmup_steps": 2,
                "validation.prompts": [], "sampling.steps": 2, "log.every": 1, "log.tracker": "none",
                "log.progress": False}
    if "unet" in str(base):
        settings |= {"model.denoiser": "unet", "model.preset": "tiny", "objective.type": "ddpm"}
    settings |= {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config(None, extra=settings)


def checkpoint_tensors(run, step):
    folder = run / "checkpoints" / f"step-{step:08d}"
    return {part: load_file(str(folder / f"{part}.safetensors")) for part in ("model", "ema", "optimizer")}


def losses(run):
    import json

    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
