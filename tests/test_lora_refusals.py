"""Files given as a LoRA that gen cannot load as one are named for what they are."""

import pytest
import torch
from safetensors.torch import save_file

from conftest import quiet_pipeline
from gen.errors import GenError


def test_a_whole_checkpoint_given_as_a_lora_is_named(sdxl_folder, tmp_path):
    pipe = quiet_pipeline(sdxl_folder)
    checkpoint = tmp_path / "model.safetensors"
    pipe.save_pretrained(checkpoint, single_file=True)  # the A1111/ComfyUI layout
    with pytest.raises(GenError, match=rf"is a whole {pipe.family.title} checkpoint, not a LoRA: pass it as --model"):
        pipe.load_lora(checkpoint)


def test_a_lora_with_t5_layers_says_so(dit_pipe, tmp_path):
    """sd-scripts' SD3/Flux LoRAs trained with --train_t5xxl carry lora_te3_ layers, which gen does not load."""
    tensors = {}
    for name, (i, o) in {"lora_unet_blocks_0_attn_qkv": (8, 24), "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (
            8, 8), "lora_te3_encoder_block_0_layer_0_SelfAttention_k": (8, 8)}.items():
        tensors |= {f"{name}.lora_down.weight": torch.zeros(2, i), f"{name}.lora_up.weight": torch.zeros(o, 2),
                    f"{name}.alpha": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "t5.safetensors")
    with pytest.raises(GenError, match=r"is a LoRA with 2 T5 text-encoder layers \(lora_te3_ keys\)"):
        dit_pipe.load_lora(tmp_path / "t5.safetensors")
