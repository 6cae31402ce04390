"""Distributed: `accelerate launch` of `gen train` on 2 CPU processes (gloo). Each process takes its own share
of the data stream, only the main process writes shared checkpoint parts (each writes its RNG state),
resume under 2 processes is exact, and the exported model loads in gen.Pipeline and samples."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import torch

from gen.pipeline import Pipeline
from tests.train.conftest import checkpoint_tensors, fast_config, losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, *overrides):
    """`accelerate launch --multi_gpu --num_processes 2 -m gen train CONFIG ...`: on a machine without a GPU
    this runs 2 processes over gloo (`--cpu` alone would start one: accelerate needs mpirun for that)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "gen", "train", str(config), *overrides]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def test_two_processes_train_resume_and_sample(base_dit, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(fast_config(base_dit, tmp_path / "straight", train__max_steps=4, train__checkpoint_every=2,
                                  train__keep_checkpoints=5).to_yaml())
    err = launch(config)
    assert "2 process(es) on cpu: batch 4 x 1 accumulation x 2 = 8 images per step" in err
    assert err.count("# resolved config") == 1  # printed by the main process only

    straight = tmp_path / "straight"
    step2 = straight / "checkpoints" / "step-00000002"
    names = sorted(p.name for p in step2.iterdir())
    assert names == sorted(["ema.json", "ema.safetensors", "model.json", "model.safetensors", "optimizer.json",
                            "optimizer.safetensors", "rng-0.json", "rng-0.safetensors", "rng-1.json",
                            "rng-1.safetensors", "state.json"])
    state = json.loads((straight / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["position"] == 4 * 4 * 2  # 2 processes x batch 4 consumed per step
    rng = [json.loads((step2 / f"rng-{r}.json").read_text()) for r in (0, 1)]
    assert rng[0] != rng[1]  # each process's own RNG state

    # resume under 2 processes from the step-2 checkpoint, into another run folder: bitwise the same
    resumed = tmp_path / "resumed"
    launch(config, f"train.output_dir={resumed}", f"train.resume={step2}")
    a, b = checkpoint_tensors(straight, 4), checkpoint_tensors(resumed, 4)
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert losses(resumed) == losses(straight)[2:]

    pipe = Pipeline.from_pretrained(resumed / "model")
    pipe.progress = False
    image = pipe("a red circle", num_inference_steps=2, seed=0, output_type="np").images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()
