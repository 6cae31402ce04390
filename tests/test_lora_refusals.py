"""Files given as a LoRA that gen cannot load as one are named for what they are."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import quiet_pipeline
from gen.errors import GenError


def test_a_whole_checkpoint_given_as_a_lora_is_named(sdxl_folder, tmp_path):
    pipe = quiet_pipeline(sdxl_folder)
    checkpoint = tmp_path / "model.safetensors"
    pipe.save_pretrained(checkpoint, single_file=True)  # the A1111/ComfyUI layout
    with pytest.raises(GenError, match=rf"is a whole {pipe.family.title} checkpoint, not a LoRA: pass it as --model"):
        pipe.load_lora(checkpoint)



@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.weight": (8,)}, "LyCORIS variants other than LoHa and LoKr"),
    ({"encoder.layer.0.dense.weight": (8, 8), "encoder.layer.0.dense.bias": (8,)}, "keys gen cannot read"),
])
def test_an_unknown_layout_is_a_one_line_error_exit_2(keys, message, sd_folder, tmp_path):
    """An IA3-style kohya file (one `.weight` per layer) and a file of plain tensors: named, exit 2, no traceback."""
    path = tmp_path / "odd.safetensors"
    save_file({k: torch.ones(shape) for k, shape in keys.items()}, str(path))
    with pytest.raises(GenError, match=message) as e:
        quiet_pipeline(sd_folder).load_lora(path)
    assert "\n" not in str(e.value)
    args = [sys.executable, "-m", "gen", "sample", "x", "--model", str(sd_folder), "--lora", str(path), "--steps", "1",
            "--height", "16", "--width", "16", "--out", str(tmp_path / "x.png"), "--no-progress"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
