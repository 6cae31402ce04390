"""Non-finite losses: a bad step is skipped with a warning, a run of them stops the run, and no checkpoint
ever holds NaN/inf weights. Real tiny runs; the non-finite values come from inf pixels or a blown-up lr."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from gen.errors import GenError
from tests.train.conftest import fast_config, losses
from train.checkpoint import Checkpointer
from train.loop import train
from train.task import DenoiserTask


def inf_pixels_task(poisoned: set[int]):
    """The real task class, fed all-inf pixels on the listed micro-steps (1-based call count)."""

    class InfPixels(DenoiserTask):
        calls = 0

        def loss(self, model, batch, g):
            InfPixels.calls += 1
            if InfPixels.calls in poisoned:
                batch = {**batch, "pixel_values": torch.full_like(batch["pixel_values"], float("inf"))}
            return super().loss(model, batch, g)
    return InfPixels


def skipped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]


def checkpoints(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []


def all_finite(run) -> bool:
    return all(torch.isfinite(t).all() for ck in (run / "checkpoints").glob("step-*")
               for f in ck.glob("*.safetensors") for t in load_file(str(f)).values() if t.is_floating_point())


def test_a_few_bad_steps_are_skipped_and_the_run_finishes(base_dit, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gen"):
        train(fast_config(base_dit, tmp_path), task_class=inf_pixels_task({3, 4}))
    assert len(skipped(caplog)) == 2, skipped(caplog)
    assert (tmp_path / "model").is_dir() and checkpoints(tmp_path) == ["latest", "step-00000003", "step-00000006"]
    assert all_finite(tmp_path)
    assert len(losses(tmp_path)) == 6 and all(torch.isfinite(torch.tensor(losses(tmp_path))))


def test_consecutive_bad_steps_stop_the_run_and_resume_continues(base_dit, tmp_path, caplog):
    cfg = fast_config(base_dit, tmp_path, train__checkpoint_every=1, train__max_bad_steps=3)
    with caplog.at_level(logging.WARNING, logger="gen"), pytest.raises(GenError, match="3 steps in a row"):
        train(cfg, task_class=inf_pixels_task(set(range(3, 1000))))
    assert len(skipped(caplog)) == 3
    assert checkpoints(tmp_path) == ["latest", "step-00000001", "step-00000002"] and all_finite(tmp_path)
    train(cfg)  # fixed data: resume=auto picks up at step 2 and finishes
    assert all_finite(tmp_path) and (tmp_path / "model").is_dir()


def test_a_blown_up_lr_stops_the_run_with_finite_checkpoints(base_dit, tmp_path, caplog):
    """lr 1e30: the first update leaves huge weights, every later loss is inf/NaN."""
    cfg = fast_config(base_dit, tmp_path, optim__lr=1e30, optim__warmup_steps=0, train__checkpoint_every=1,
                      train__max_bad_steps=2)
    with caplog.at_level(logging.WARNING, logger="gen"), pytest.raises(GenError, match="2 steps in a row"):
        train(cfg)
    assert len(skipped(caplog)) == 2
    assert checkpoints(tmp_path) == ["latest", "step-00000001"] and all_finite(tmp_path)


def test_non_finite_weights_are_never_written(tmp_path):
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(1, {"model": {"w": torch.ones(2)}}, {}, {"position": 0})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(GenError, match="refusing to save the step-2 checkpoint.*model.w"):
            ck.save(2, {"model": {"w": torch.tensor([1.0, bad])}}, {}, {"position": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]  # nothing pruned, no partial
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"


def test_a_skipped_step_under_fp16_loss_scaling_updates_the_grad_scaler(base_dit, tmp_path, caplog, monkeypatch):
    """fp16 on a GPU: accelerate unscales the gradients in clip_grad_norm_; a skipped step must still update() the
    scaler, or the next step's unscale_ raises. accelerate builds its scaler on GPUs only, so the Accelerator here is
    set up as it does for fp16 there (native autocast, a real torch GradScaler), on the CPU."""
    import train.loop as loop

    real = loop.accelerator

    def fp16_accelerator(cfg):
        acc = real(cfg)
        acc.state._mixed_precision, acc.native_amp, acc.scaler = "fp16", True, torch.amp.GradScaler("cpu")
        return acc
    monkeypatch.setattr(loop, "accelerator", fp16_accelerator)
    with caplog.at_level(logging.WARNING, logger="gen"):
        train(fast_config(base_dit, tmp_path), task_class=inf_pixels_task({3}))
    assert len(skipped(caplog)) == 1 and (tmp_path / "model").is_dir() and all_finite(tmp_path)
    state = json.loads((tmp_path / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["scaler"]["scale"] == torch.amp.GradScaler("cpu").get_scale() * state["scaler"]["backoff_factor"]
