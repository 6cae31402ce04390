"""train.distributed=fsdp under `accelerate launch` on 2 CPU processes (torch's fully_shard over gloo): each
process checkpoints its own half of every sharded tensor, training matches DDP's, resume under 2 processes is
bitwise exact, the exported model is the gathered EMA and samples, and a mismatched resume is refused in one
line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gen.pipeline import Pipeline
from tests.train.conftest import fast_config, losses
from tests.train.test_distributed import free_port, launch


def shards(run, step, part):
    folder = run / "checkpoints" / f"step-{step:08d}"
    return [load_file(str(folder / f"{part}-{rank}.safetensors")) for rank in (0, 1)]


def test_fsdp_two_processes_resume_exactly_and_export(base_dit, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(fast_config(base_dit, tmp_path / "straight", train__max_steps=4, train__checkpoint_every=2,
                                  train__keep_checkpoints=5, train__distributed="fsdp").to_yaml())
    launch(config)
    straight = tmp_path / "straight"
    step2 = straight / "checkpoints" / "step-00000002"
    assert not (step2 / "model.json").exists()  # no full copy: only per-process shards
    assert json.loads((step2 / "state.json").read_text())["sharded_over"] == 2
    model = shards(straight, 2, "model")
    bias = "blocks.0.adaLN_modulation.1.bias"
    assert model[0][bias].shape[0] == model[1][bias].shape[0] > 0
    assert not torch.equal(model[0][bias], model[1][bias])  # two halves, not two copies

    # the same training as DDP's (the same start: the main process's weights; the same update), to float noise
    ddp = tmp_path / "ddp"
    launch(config, f"train.output_dir={ddp}", "train.distributed=ddp", "train.stop_at_step=2")
    assert losses(ddp) == pytest.approx(losses(straight)[:2], rel=1e-5)
    for part in ("model", "ema"):
        full = load_file(str(ddp / "checkpoints" / "step-00000002" / f"{part}.safetensors"))
        halves = shards(straight, 2, part)
        for k in full:
            torch.testing.assert_close(torch.cat([halves[0][k], halves[1][k]]), full[k], rtol=0, atol=1e-5)

    resumed = tmp_path / "resumed"
    launch(config, f"train.output_dir={resumed}", f"train.resume={step2}")
    for part in ("model", "ema", "optimizer"):
        for a, b in zip(shards(straight, 4, part), shards(resumed, 4, part)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert losses(resumed) == losses(straight)[2:]

    # the export is the EMA (validation.use_ema) gathered from both processes' shards
    ema = shards(resumed, 4, "ema")
    exported = load_file(str(next((resumed / "model" / "transformer").glob("*.safetensors"))))
    for k in ema[0]:
        assert torch.equal(exported[k], torch.cat([ema[0][k], ema[1][k]])), k
    pipe = Pipeline.from_pretrained(resumed / "model")
    pipe.progress = False
    image = pipe("a red circle", num_inference_steps=2, seed=0, output_type="np").images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()

    # an FSDP checkpoint resumed unsharded: one line, no traceback
    done = subprocess.run([sys.executable, "-m", "gen", "train", str(config), f"train.output_dir={tmp_path / 'ddp'}",
                           f"train.resume={step2}", "train.distributed=ddp"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "saved sharded" in done.stderr and "Traceback" not in done.stderr, done.stderr
    # ... or over another number of processes (1, under torchrun): refused, naming the count that saved it
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                           str(free_port()), "-m", "gen", "train", str(config), f"train.output_dir={tmp_path / 'one'}",
                           f"train.resume={step2}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "saved sharded over 2 processes" in done.stderr, done.stderr[-3000:]
