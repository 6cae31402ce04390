"""Every YAML recipe in configs/ loads through train.config.load_config (chains: each stage's file as its
stage), so none of them rots when a key is renamed. Paths a user fills in are overridden."""

from pathlib import Path

import pytest

from gen.models.dit import DIT_PRESETS
from gen.models.unet import UNET_PRESETS
from train.chain import STAGES
from train.config import load_config, read_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.y*ml"))
USER_PATHS = {"model.base": "some/model-folder", "data.path": "some/image-folder"}


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
