"""fp8 tensors in safetensors files: plain float8_e4m3fn / float8_e5m2 weights (flux1-dev-fp8, t5xxl_fp8_e4m3fn)
and ComfyUI's "scaled fp8" checkpoints.

A scaled fp8 file marks itself with a `scaled_fp8` tensor under the model's prefix (its dtype names the format;
an fp32 marker means e4m3fn) and stores, beside each fp8 weight `<layer>.weight`, the fp32 per-tensor scale
`<layer>.scale_weight`: the weight is `fp8 * scale_weight` (ComfyUI's comfy/utils.py convert_old_quants turns these
into its TensorCoreFP8Layout, whose dequantize is that product). `<layer>.scale_input` scales the input of
ComfyUI's fp8 matmul only; a weight upcast to the compute dtype does not use it.
"""

from __future__ import annotations

import torch

from gen.errors import GenError
from gen.quant.store import Packed, Storage, fp8_dtypes

MARKER = "scaled_fp8"
SCALES = (".scale_weight", ".scale_input")


def extra(key: str) -> bool:
    """Whether a key is scaled fp8's bookkeeping (the marker, a scale) rather than a model tensor."""
    return key.rpartition(".")[2] == MARKER or key.endswith(SCALES)


def visible(shapes: dict) -> dict:
    """A safetensors file's tensor shapes without scaled fp8's bookkeeping keys."""
    return {k: v for k, v in shapes.items() if not extra(k)}


def wrap(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors -> the same with every fp8 tensor a Packed one (its scale_weight folded in as the
    Storage's scale), scaled fp8's bookkeeping keys dropped."""
    kinds = {dtype: kind for kind, dtype in fp8_dtypes().items()}
    out = {}
    for k, v in tensors.items():
        if extra(k):
            continue
        scale = tensors.get(k.rpartition(".")[0] + ".scale_weight") if k.endswith(".weight") else None
        if scale is not None and scale.numel() != 1:
            raise GenError(f"{k}: a scale_weight of shape {list(scale.shape)}; gen reads ComfyUI's per-tensor "
                           "(one-number) scaled fp8 only")
        scale = None if scale is None else float(scale.float().item())
        if v.dtype in kinds:
            out[k] = Packed(v, Storage(kinds[v.dtype], tuple(v.shape), scale))
        elif scale is not None:
            out[k] = (v.float() * scale).to(v.dtype)
        else:
            out[k] = v
    return out
