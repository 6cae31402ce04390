"""Config: YAML + dotted overrides onto typed dataclasses; every mistake names its key."""

import re

import pytest

from gen.cli import main as gen_main
from gen.errors import GenError
from train.config import load_config

BASE = ["model.base=some/folder", "data.source=shapes"]


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {base: m, denoiser: unet, preset: tiny}\noptim: {lr: 3e-4, betas: [0.9, 0.99]}\n"
                        "data: {source: shapes}\n")
    cfg = load_config(cfg_file, ["optim.lr=1e-4", "train.max_steps=7", "validation.prompts=[a, b]"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.99) and cfg.train.max_steps == 7
    assert cfg.model.denoiser == "unet" and cfg.validation.prompts == ["a", "b"]
    assert "lr: 0.0001" in cfg.to_yaml()


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"), ("nope.x=1", "nope"), ("optim.lr=fast", "optim.lr"),
    ("train.max_steps=1.5", "train.max_steps"), ("objective.type=score", "objective.type"),
    ("train.max_steps=0", "train.max_steps"), ("optim.betas=[0.9]", "optim.betas"),
    ("optim=3", "optim"), ("train.ema_decay=1.5", "train.ema_decay"),
    ("train.max_steps=yes", "train.max_steps"), ("data.flip=maybe", "data.flip"), ("optim.lr=off", "optim.lr"),
    ("train.mixed_precision=fp32", "train.mixed_precision"), ("optim.betas=[0.9, no]", "optim.betas[1]"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(GenError, match=re.escape(f"'{key}'")):
        load_config(None, BASE + [override])


@pytest.mark.parametrize("override", [
    "objective.min_snr_gamma=-5", "objective.offset_noise=-0.1", "optim.weight_decay=-0.01", "optim.eps=0",
    "optim.betas=[0.9, 1.5]", "optim.min_lr_ratio=2", "optim.grad_clip=-1", "train.guidance=0",
    "data.num_workers=-1", "data.bucket_step=0", "data.max_aspect=0.5", "vae.kl_weight=-1",
    "validation.every=-1", "sampling.steps=0", "sampling.guidance=-1", "clip.projection_dim=0",
])
def test_out_of_range_values_are_one_line_errors_naming_the_key_and_the_range(override, capsys, tmp_path):
    key, value = override.split("=")
    with pytest.raises(GenError, match=rf"config key '{re.escape(key)}' has an invalid value .*; it must be "):
        load_config(None, BASE + [override])
    f = tmp_path / "c.yaml"
    f.write_text("model: {base: m}\ndata: {source: shapes}\n")
    assert gen_main(["train", str(f), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{key}'" in err[0]


@pytest.mark.parametrize("override, key, value", [
    ("train.mixed_precision=no", "train.mixed_precision", "no"),  # YAML 1.1 would read False
    ("data.path=off", "data.path", "off"), ("model.base=1e-4", "model.base", "1e-4"),
    ("model.base=2024", "model.base", "2024"), ("sampling.sampler=1", "sampling.sampler", "1"),
    ("validation.prompts=[yes, no, 3, a cat]", "validation.prompts", ["yes", "no", "3", "a cat"]),
    ("data.flip=no", "data.flip", False), ("optim.lr=1e-4", "optim.lr", 1e-4),
    ("sampling.steps=null", "sampling.steps", None), ("optim={lr: 1e-4, schedule: constant}", "optim.lr", 1e-4),
])
def test_command_line_values_are_taken_as_typed(override, key, value):
    """A string field takes what was typed where YAML 1.1 would make it a boolean or a number."""
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, BASE + ["data.path=x", override]), section), name) == value


def test_yaml_file_values_are_taken_as_written(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {base: m}\ndata: {source: shapes}\ntrain: {mixed_precision: no, output_dir: 1e-4}\n")
    cfg = load_config(f, ["data.flip=yes"])
    assert (cfg.train.mixed_precision, cfg.train.output_dir, cfg.data.flip) == ("no", "1e-4", True)
    assert load_config(f, extra={"train.mixed_precision": "bf16"}).train.mixed_precision == "bf16"


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {base: m}\ndata: {source: shapes}\ntrain: {max_step: 3}\n")
    with pytest.raises(GenError, match="'train.max_step'.*max_steps"):
        load_config(f)


def test_missing_data_path_names_the_key(tmp_path):
    with pytest.raises(GenError, match="'data.path'"):
        load_config(None, ["model.base=m"])
    from train.data import TrainData
    cfg = load_config(None, ["model.base=m", f"data.path={tmp_path / 'absent'}"])
    with pytest.raises(GenError, match="'data.path'.*not found"):
        TrainData(cfg.data, 0)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("model: {base: m}\ndata: {source: shapes}\n")
    assert gen_main(["train", str(f), "optim.lr=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'optim.lr'" in err[0] and err[0].startswith("gen: error:")


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {base: m}\ndata: {source: shapes}\ntrain: {batch_size: '16'}\n")
    with pytest.raises(GenError, match="'train.batch_size': expected integer"):
        load_config(f)


def test_fine_tuning_with_another_objective_warns(base_unet, caplog):
    import logging

    import torch

    from train.task import DenoiserTask
    settings = {"model.base": str(base_unet), "model.denoiser": "unet", "model.init_from_base": True,
                "data.source": "shapes", "data.resolution": 16, "objective.type": "ddpm"}
    with caplog.at_level(logging.WARNING, logger="gen"):
        DenoiserTask(load_config(None, extra=settings), torch.device("cpu"))
        assert not caplog.records
        DenoiserTask(load_config(None, extra={**settings, "objective.prediction_type": "v_prediction"}),
                     torch.device("cpu"))
    assert len(caplog.records) == 1 and "prediction_type" in caplog.records[0].getMessage()


@pytest.mark.parametrize("command, recipe, product", [
    ("lora", "configs/lora-sd.yaml", "lora.safetensors"),  # fp16 given
    ("train", "configs/unet-sd15-finetune.yaml", "model"),
])
def test_fp16_on_a_cpu_stops_before_training_with_one_line(command, recipe, product, sd_folder, captioned, tmp_path,
                                                           capsys):
    """accelerate runs fp16 on accelerators only: on a CPU `gen lora` / `gen train` say to use bf16 or no, in one
    line, before anything is written; with a GPU they train."""
    from train.loop import _has_accelerator

    run = tmp_path / "run"
    argv = [command, recipe, f"model.base={sd_folder}", f"data.path={captioned}", f"train.output_dir={run}",
            "train.mixed_precision=fp16", "data.resolution=16", "train.max_steps=1", "train.grad_accum=1",
            "validation.prompts=[]", "log.progress=false"]
    if _has_accelerator():
        assert gen_main(argv) == 0 and (run / product).exists()
        return
    assert gen_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gen: error:") and "'train.mixed_precision'" in err[0]
    assert "train.mixed_precision=bf16" in err[0] and "(or no)" in err[0]
    assert not run.exists()  # bf16 on a CPU trains: tests/train/test_configs.py

def test_runs_in_one_process_each_take_their_own_mixed_precision(base_dit, tmp_path):
    """accelerate's process-wide state refused a second run with another mixed precision (a chain's stages, a
    notebook): each run now sets its own."""
    from tests.train.conftest import fast_config
    from train.loop import train

    for i, precision in enumerate(["bf16", "no", "bf16"]):
        train(fast_config(base_dit, tmp_path / str(i), train__mixed_precision=precision, train__max_steps=1))
        assert (tmp_path / str(i) / "model" / "model_index.json").is_file()
