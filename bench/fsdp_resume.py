"""train.distributed=fsdp end to end under a launcher: a tiny DiT trains 4 steps with a checkpoint at step 2, a
second run resumes from it, and every shard of the step-4 checkpoints (weights, EMA, optimizer) must match bit
for bit; the exported model must load.

    .venv/bin/python bench/fsdp_resume.py                  # CUDA: one process per GPU over NCCL, bf16
    .venv/bin/python bench/fsdp_resume.py --device cpu     # 2 CPU processes over gloo, fp32

On a CUDA machine this is the NCCL + bf16 (MixedPrecisionPolicy) path that tests/train/test_fsdp.py, on gloo
and fp32, does not reach. NCCL takes one GPU per process, so on a single GPU the "sharding" is over one
process: the plumbing (DTensors on CUDA, the gather for export, exact resume) is checked, not the split.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import torch  # noqa: E402


def launch(procs: int, cpu: bool, config: Path, *overrides: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port),
           "-m", "gen", "train", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        sys.exit(f"fsdp run failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    a = ap.parse_args(argv)
    from safetensors.torch import load_file

    from gen.models.tiny import tiny_pipeline
    from gen.pipeline import Pipeline
    from train.config import load_config

    cpu = a.device == "cpu"
    procs = 2 if cpu else torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_pipeline("dit").save_pretrained(tmp / "dit")
        settings = {"model.base": str(tmp / "dit"), "data.source": "shapes", "data.resolution": 16,
                    "data.num_images": 24, "train.output_dir": str(tmp / "straight"), "train.batch_size": 4,
                    "train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 5,
                    "train.distributed": "fsdp", "train.mixed_precision": "no" if cpu else "bf16",
                    "validation.prompts": [], "sampling.steps": 2, "log.tracker": "none", "log.progress": False}
        config = tmp / "config.yaml"
        config.write_text(load_config(None, extra=settings).to_yaml())
        launch(procs, cpu, config)
        launch(procs, cpu, config, f"train.output_dir={tmp / 'resumed'}",
               f"train.resume={tmp / 'straight' / 'checkpoints' / 'step-00000002'}")
        checked = 0
        for part in ("model", "ema", "optimizer"):
            for rank in range(procs):
                a_, b_ = (load_file(str(tmp / run / "checkpoints" / "step-00000004" / f"{part}-{rank}.safetensors"))
                          for run in ("straight", "resumed"))
                bad = [k for k in a_ if not torch.equal(a_[k], b_[k])]
                if bad or a_.keys() != b_.keys():
                    sys.exit(f"fsdp resume differs: {part}-{rank} {bad[:3]}")
                checked += len(a_)
        Pipeline.from_pretrained(tmp / "resumed" / "model")
    print(f"fsdp resume on {procs} {a.device} process(es), {'fp32' if cpu else 'bf16'}: "
          f"bitwise identical ({checked} tensors); export loads")


if __name__ == "__main__":
    main()
