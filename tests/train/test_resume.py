"""Exact resume: N steps straight == N/2 steps, then resume=auto for N/2 more; bitwise, on CPU."""

import json

import pytest
import torch

from gen.errors import GenError
from tests.train.conftest import checkpoint_tensors, fast_config, losses
from train.data import TrainData, loader
from train.loop import train

CASES = {
    "dit-flow": ("base_dit", {"train__grad_accum": 2, "objective__shift": 2.0}),
    "unet-ddpm-v": ("base_unet", {"objective__prediction_type": "v_prediction", "objective__min_snr_gamma": 5.0,
                                  "objective__offset_noise": 0.1, "data__crop": "random", "data__flip": True,
                                  "optim__schedule": "cosine"}),
}


@pytest.mark.parametrize("case", CASES)
def test_resume_is_bitwise_exact(case, request, tmp_path):
    assert_resumes_exactly(request.getfixturevalue(CASES[case][0]), tmp_path, CASES[case][1])


def test_resume_is_bitwise_exact_with_every_training_option(base_dit, tagged_masked, captioned, tmp_path):
    """Caption shuffle/dropout/variants/prefix, masked loss, a non-AdamW optimizer, a restarting schedule, a
    held-out loss."""
    assert_resumes_exactly(base_dit, tmp_path, {"validation__loss_path": str(captioned), "validation__loss_images": 2,
        "data__source": "folder", "data__path": str(tagged_masked), "data__crop": "random", "data__flip": True,
        "data__caption": {"shuffle": True, "keep_tokens": 1, "tag_dropout": 0.3, "prefix": "gen, ", "variants": True},
        "optim__name": "lion", "optim__schedule": "cosine_with_restarts", "optim__cycles": 2})


def test_lora_resume_is_bitwise_exact_with_adapter_dropout(base_unet, tmp_path):
    """peft's dropout draws from torch's global RNG: the checkpoint's RNG state must be what the next step sees."""
    from train.lora import LoraTask

    assert_resumes_exactly(base_unet, tmp_path, {"lora__rank": 4, "lora__dropout": 0.5}, LoraTask)


def assert_resumes_exactly(base, tmp_path, extra: dict, task_class=None) -> None:
    train(fast_config(base, tmp_path / "straight", **extra), task_class)
    train(fast_config(base, tmp_path / "split", **extra, train__stop_at_step=3, train__checkpoint_every=0), task_class)
    assert (tmp_path / "split" / "checkpoints" / "step-00000003").is_dir()  # a paused run leaves a checkpoint
    assert not (tmp_path / "split" / "model").exists()
    train(fast_config(base, tmp_path / "split", **extra), task_class)

    a, b = checkpoint_tensors(tmp_path / "straight", 6), checkpoint_tensors(tmp_path / "split", 6)
    for part in ("model", "ema", "optimizer"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}/{k} differs"
    assert not torch.equal(a["model"][next(iter(a["model"]))], a["ema"][next(iter(a["ema"]))])  # EMA is its own
    assert losses(tmp_path / "straight") == losses(tmp_path / "split") and len(losses(tmp_path / "split")) == 6
    held = [[json.loads(r).get("heldout_loss") for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "split")]
    assert held[0] == held[1] and (None not in held[0]) == ("validation__loss_path" in extra)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["position"] == 6 * 4 * extra.get("train__grad_accum", 1)


def test_resumed_data_order_continues_the_stream(tmp_path):
    cfg = fast_config("unused", tmp_path)
    data = TrainData(cfg.data, cfg.train.seed)
    whole = [b["index"].tolist() for b, _ in zip(loader(data, 4, 0, 1, 0), range(6))]
    resumed = [b["index"].tolist() for b, _ in zip(loader(data, 4, 12, 1, 0), range(3))]
    assert resumed == whole[3:]


def test_resume_refuses_a_changed_model_or_dataset(base_dit, tmp_path):
    train(fast_config(base_dit, tmp_path, train__max_steps=2))
    with pytest.raises(GenError, match="denoiser changed.*depth"):
        train(fast_config(base_dit, tmp_path, train__max_steps=4, model__options={"depth": 1}))
    with pytest.raises(GenError, match="dataset changed.*num_images"):
        train(fast_config(base_dit, tmp_path, train__max_steps=4, data__num_images=30))
    with pytest.raises(GenError, match="objective changed"):
        train(fast_config(base_dit, tmp_path, train__max_steps=4, objective__shift=3.0))
    train(fast_config(base_dit, tmp_path, train__max_steps=4, train__resume="none", train__output_dir=str(tmp_path)))


def test_a_fresh_run_in_an_earlier_runs_folder_resumes_its_own_checkpoints(base_dit, tmp_path):
    """train.resume=none where another run (seed 1) checkpointed: its checkpoints are set aside, and this run's
    pause + resume equals the same run straight."""
    train(fast_config(base_dit, tmp_path / "run", train__seed=1))
    fresh = dict(train__resume="none", train__stop_at_step=3, train__checkpoint_every=0)
    train(fast_config(base_dit, tmp_path / "run", **fresh))
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-00000003"]
    assert (ck / "latest").read_text().strip() == "step-00000003"
    aside = list((tmp_path / "run").glob("checkpoints-before-*"))
    assert len(aside) == 1 and (aside[0] / "step-00000006").is_dir()
    train(fast_config(base_dit, tmp_path / "run"))  # train.resume=auto: this run's step 3
    train(fast_config(base_dit, tmp_path / "straight"))
    a, b = checkpoint_tensors(tmp_path / "straight", 6), checkpoint_tensors(tmp_path / "run", 6)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "run")


def test_checkpoints_set_aside_twice_in_one_second_keep_both(tmp_path):
    """Two train.resume=none runs in one second (tiny runs do that): the second set-aside gets its own name
    (before: rename onto the first's folder, 'Directory not empty', exit 1)."""
    import time

    from train.loop import _set_aside

    now = time.time()
    taken = {tmp_path / f"checkpoints-before-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}"
             for s in range(3)}  # whichever second the call falls in
    for folder in taken:
        (folder / "step-00000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    _set_aside(tmp_path / "checkpoints", True, lambda: None)
    moved = set(tmp_path.glob("checkpoints-before-*")) - taken
    assert len(moved) == 1 and (moved.pop() / "step-00000002").is_dir() and not (tmp_path / "checkpoints").exists()
    assert all((folder / "step-00000001").is_dir() for folder in taken)


def test_resume_refuses_other_frozen_parts_but_not_a_moved_copy(base_dit, tmp_path):
    """The VAE and text encoder are not in checkpoints: another VAE (model.vae) is refused; the same base folder
    copied elsewhere resumes."""
    import shutil

    from gen.models.tiny import tiny_pipeline

    run = tmp_path / "run"
    train(fast_config(base_dit, run, train__stop_at_step=2))
    other = tmp_path / "other"
    tiny_pipeline("dit", seed=1).save_pretrained(other)
    with pytest.raises(GenError, match=rf"frozen vae differ.*model.vae={other}.*train.resume=none"):
        train(fast_config(base_dit, run, model__vae=str(other)))
    moved = shutil.copytree(base_dit, tmp_path / "moved")
    train(fast_config(moved, run, train__max_steps=3))
    assert (run / "model").is_dir()


def test_lora_resume_refuses_another_base_denoiser(base_unet, tmp_path):
    from gen.models.tiny import tiny_pipeline
    from train.lora import LoraTask

    run = tmp_path / "run"
    train(fast_config(base_unet, run, lora__rank=4, train__stop_at_step=2), LoraTask)
    other = tmp_path / "unet-other"
    pipe = tiny_pipeline("unet")
    with torch.no_grad():
        for p in pipe.denoiser.parameters():
            p.mul_(1.5)
    pipe.save_pretrained(other)
    with pytest.raises(GenError, match="frozen denoiser differ"):
        train(fast_config(other, run, lora__rank=4), LoraTask)
