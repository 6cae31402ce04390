"""optim.name: every optimizer trains through the loop, its state is in the checkpoints and resume is bitwise
exact (on CPU); the LR schedules match transformers'; a missing package, bad options or a changed optimizer on
resume are one-line errors."""

import sys

import pytest
import torch

from gen.errors import GenError
from tests.train.conftest import checkpoint_tensors, fast_config, losses
from train.config import load_config
from train.loop import train
from train.optim import lr_lambda

# optimizer -> (optim.* settings, a key fragment its checkpointed state must hold)
OPTIMIZERS = {
    "adamw": ({}, "exp_avg_sq"),
    "adamw8bit": ({"options": {"min_8bit_size": 0}}, "state1"),  # 8-bit moments even for the tiny tensors
    "prodigy": ({"lr": 1.0}, "p0"),
    "adafactor": ({}, "exp_avg_sq_row"),
    "lion": ({"lr": 3e-4}, "exp_avg"),
    "sgd": ({"options": {"momentum": 0.9}}, "momentum_buffer"),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_checkpoints_and_resumes_exactly(name, base_dit, tmp_path):
    settings, state_key = OPTIMIZERS[name]
    extra = {"optim__name": name, "train__max_steps": 4, "train__checkpoint_every": 2, "optim__schedule": "linear",
             **{f"optim__{k}": v for k, v in settings.items()}}
    straight = tmp_path / "straight"
    train(fast_config(base_dit, straight, **extra))
    half = straight / "checkpoints" / "step-00000002"
    train(fast_config(base_dit, tmp_path / "resumed", **extra, train__resume=str(half)))

    a, b = checkpoint_tensors(straight, 4), checkpoint_tensors(tmp_path / "resumed", 4)
    for part in ("model", "ema", "optimizer"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}/{k} differs"
    assert any(state_key in k for k in a["optimizer"]), sorted(a["optimizer"])[:6]
    before = checkpoint_tensors(straight, 2)["model"]
    assert any(not torch.equal(before[k], a["model"][k]) for k in before)  # it updated the weights
    assert losses(straight)[2:] == losses(tmp_path / "resumed")[-2:]


def test_resume_refuses_another_optimizers_state(base_dit, tmp_path):
    train(fast_config(base_dit, tmp_path, train__max_steps=2, optim__name="lion"))
    with pytest.raises(GenError, match="holds lion state and optim.name is adamw"):
        train(fast_config(base_dit, tmp_path, train__max_steps=4))


@pytest.mark.parametrize("schedule, peer", [
    ("linear", "get_linear_schedule_with_warmup"),
    ("cosine", "get_cosine_schedule_with_warmup"),
    ("cosine_with_restarts", "get_cosine_with_hard_restarts_schedule_with_warmup")])
def test_schedules_match_transformers(schedule, peer):
    import transformers

    cfg = load_config(None, extra={"model.base": "x", "data.source": "shapes", "optim.schedule": schedule,
                                   "optim.warmup_steps": 5, "optim.cycles": 3, "train.max_steps": 60})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kwargs = {"num_cycles": 3} if schedule == "cosine_with_restarts" else {}
    theirs = getattr(transformers, peer)(opt, num_warmup_steps=5, num_training_steps=60, **kwargs).lr_lambdas[0]
    ours = lr_lambda(cfg)
    # transformers' warmup starts at 0 (step / warmup), gen's at 1 / warmup ((step + 1) / warmup); after it, equal
    for step in range(5, 60):
        assert ours(step) == pytest.approx(theirs(step), abs=1e-12), step
    cfg.optim.min_lr_ratio = 0.1
    assert lr_lambda(cfg)(59) >= 0.1


def test_optimizer_errors_are_one_line(base_dit, tmp_path, monkeypatch):
    with pytest.raises(GenError, match="optim.options.*sgd"):
        train(fast_config(base_dit, tmp_path / "a", optim__name="sgd", optim__options={"nesterov_typo": True}))
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
    with pytest.raises(GenError, match=r"optim.name=prodigy needs prodigyopt: pip install prodigyopt"):
        train(fast_config(base_dit, tmp_path / "b", optim__name="prodigy"))
    with pytest.raises(GenError, match="optim.name"):
        fast_config(base_dit, tmp_path, optim__name="adam")
    with pytest.raises(GenError, match="optim.cycles"):
        fast_config(base_dit, tmp_path, optim__cycles=0)


def test_changed_optimizer_settings_apply_on_resume_with_a_log_line(base_dit, tmp_path, caplog):
    """lr, betas and weight decay edited between a pause and its resume: the resumed steps use the new values."""
    import json
    import logging

    old = dict(optim__lr=1e-3, optim__weight_decay=0.01)
    train(fast_config(base_dit, tmp_path, **old, train__stop_at_step=3))
    new = dict(optim__lr=3e-3, optim__betas=[0.8, 0.99], optim__weight_decay=0.05)
    with caplog.at_level(logging.WARNING, logger="gen"):
        train(fast_config(base_dit, tmp_path, **new))
    line = [r.getMessage() for r in caplog.records if "changed optim" in r.getMessage()]
    assert len(line) == 1 and "optim.lr 0.001 -> 0.003" in line[0] and "optim.weight_decay 0.01 -> 0.05" in line[0]
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, 1e-3, 3e-3, 3e-3, 3e-3]  # logged after each step's
    groups = json.loads((tmp_path / "checkpoints" / "step-00000006" / "optimizer.json").read_text())["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and all(g["betas"] == {"__tuple__": [0.8, 0.99]}
                                                                      for g in groups)


def test_turning_weight_decay_on_at_resume_is_refused_in_one_line(base_dit, tmp_path):
    train(fast_config(base_dit, tmp_path, train__stop_at_step=2))
    with pytest.raises(GenError, match="optim.weight_decay was 0.0 there and is 0.01 now.*regroups"):
        train(fast_config(base_dit, tmp_path, optim__weight_decay=0.01))
