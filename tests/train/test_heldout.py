"""validation.loss_path: the loss on fixed held-out (image, timestep, noise) triples, logged with the train loss."""

import json

import pytest
import torch

from gen.errors import GenError
from tests.train.conftest import fast_config
from train.heldout import HeldOut
from train.loop import train
from train.task import DenoiserTask


def test_heldout_loss_is_logged_fixed_and_follows_training(base_dit, captioned, tmp_path):
    cfg = fast_config(base_dit, tmp_path, validation__loss_path=str(captioned), validation__loss_images=5,
                      train__max_steps=4, log__every=2, optim__lr=3e-3)
    train(cfg)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    held = {r["step"]: r["heldout_loss"] for r in rows}
    assert sorted(held) == [2, 4] and all("loss" in r for r in rows)
    assert held[2] != held[4]  # the model moved between the two

    task = DenoiserTask(cfg, torch.device("cpu"))
    heldout = HeldOut(cfg, task)
    assert sum(len(b["text"]) for b in heldout.batches) == 5 and len(heldout.batches) == 2  # batch size 4
    state = torch.random.get_rng_state()
    first = heldout(task.model)
    assert heldout(task.model) == first  # the same triples every time
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random streams are untouched
    assert task.model.training
    assert HeldOut(fast_config(base_dit, tmp_path), task)(task.model) == {}


def test_heldout_errors_name_the_key(base_dit, tmp_path):
    with pytest.raises(GenError, match="validation.loss_images"):
        fast_config(base_dit, tmp_path, validation__loss_path="x", validation__loss_images=0)
    cfg = fast_config(base_dit, tmp_path, validation__loss_path=str(tmp_path / "missing"))
    with pytest.raises(GenError, match="image folder not found"):
        train(cfg)
