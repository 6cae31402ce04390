"""Stability's SD3.5 ControlNet files as released (sd3.5_large_controlnet_{blur,canny,depth}.safetensors): an
SD3ControlNetModel of self-attention-only blocks (diffusers' `joint_attention_dim=None`, `use_pos_embed=False`),
in the layout of Stability's code. The layout, restated from ComfyUI's comfy/controlnet.py (load_controlnet_sd35:
told by `pos_embed_input.proj.weight` with `transformer_blocks.0.adaLN_modulation.1.bias`; width = the pooled
embedder's rows, 64-wide heads) and comfy/cldm/dit_embedder.py (ControlNetEmbedder, commit 8f848c9e8b09), and
from diffusers' scripts/convert_sd3_controlnet_to_diffusers.py (commit a63c316a5a88):

    transformer_blocks.N.attn.qkv            -> transformer_blocks.N.attn.to_q | to_k | to_v  (rows split in three)
    transformer_blocks.N.attn.proj           -> transformer_blocks.N.attn.to_out.0
    transformer_blocks.N.mlp.fc1 | fc2       -> transformer_blocks.N.ff.net.0.proj | ff.net.2
    transformer_blocks.N.adaLN_modulation.1  -> transformer_blocks.N.norm1.linear
    time_text_embed.*, pos_embed_input.proj.*, controlnet_blocks.N.*: as diffusers names them
    control_type (a scalar: 0 blur, 1 canny, 2 depth): dropped

The file holds no patch embedding of the latents: it borrows the base transformer's (diffusers' pipeline hands it
over; families/sd3.py control_attach). A file whose pooled embedder is square is ComfyUI's `double_y_emb` variant,
which embeds the pooled text twice through the base's own embedder and feeds each block the input rather than the
previous block's output: diffusers' SD3ControlNetModel cannot express it, so it is refused."""

from __future__ import annotations

import re

from gen.errors import GenError

KEY = "transformer_blocks.0.adaLN_modulation.1.bias"
HINT = "pos_embed_input.proj.weight"
POOLED = "time_text_embed.text_embedder.linear_1.weight"
HEAD = 64  # Stability's head width (ComfyUI: heads = width // 64)
BLOCK = {"attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
         "adaLN_modulation.1": "norm1.linear"}


def is_sd35(keys: set) -> bool:
    return HINT in keys and KEY in keys


def to_diffusers(state: dict, path) -> dict:
    """The file's tensors under SD3ControlNetModel's names."""
    width, pooled = state[POOLED].shape
    if width == pooled:
        raise GenError(f"{path} is an SD3.5 ControlNet with a second pooled-text embedder (ComfyUI's double_y_emb "
                       "variant), which diffusers' SD3ControlNetModel cannot express; gen does not run it")
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if k == "control_type":
            continue
        if m and m[2] == "attn.qkv":
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3)):
                out[f"transformer_blocks.{m[1]}.attn.{name}.{m[3]}"] = part
        elif m and m[2] in BLOCK:
            out[f"transformer_blocks.{m[1]}.{BLOCK[m[2]]}.{m[3]}"] = v
        else:
            out[k] = v
    return out
