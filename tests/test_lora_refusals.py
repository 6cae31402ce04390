"""Files given as a LoRA that gen cannot load as one are named for what they are."""

import pytest

from conftest import quiet_pipeline
from gen.errors import GenError


def test_a_whole_checkpoint_given_as_a_lora_is_named(sdxl_folder, tmp_path):
    pipe = quiet_pipeline(sdxl_folder)
    checkpoint = tmp_path / "model.safetensors"
    pipe.save_pretrained(checkpoint, single_file=True)  # the A1111/ComfyUI layout
    with pytest.raises(GenError, match=rf"is a whole {pipe.family.title} checkpoint, not a LoRA: pass it as --model"):
        pipe.load_lora(checkpoint)

