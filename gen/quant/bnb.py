"""bitsandbytes weight storage: `weights` nf4 / fp4 (QLoRA's 4-bit blockwise formats, Dettmers et al. 2023) and int8
(LLM.int8()'s row-wise absmax, Dettmers et al. 2022) for the denoiser's and the text encoders' Linear layers.

Each eligible Linear (the rule fp8 uses, gen.quant.eligible: norms, embeddings, diffusers' skip patterns and a
model's fp32 modules stay high precision; bitsandbytes has no Conv layers, so convolutions stay too) becomes a
bitsandbytes Linear4bit computing in the model's dtype (bf16/fp16/fp32), or a Linear8bitLt (threshold 0: no fp16
outlier columns). bitsandbytes >= 0.45 runs these on CPUs as well as GPUs. peft wraps these layers with its own bnb
LoRA layers, so a LoRA runs unfused on them; fusing would need the dequantized weight and is refused.

bitsandbytes is imported here only, when a model is quantized: plain sampling never imports it.
"""

from __future__ import annotations

import torch
from torch import nn

from gen.errors import GenError

KINDS = ("nf4", "fp4", "int8")


def package(what: str):
    """The bitsandbytes package, or a one-line GenError naming the install."""
    try:
        import bitsandbytes
    except ImportError:
        raise GenError(f"{what} needs bitsandbytes: pip install 'gen[quant]' (or pip install bitsandbytes)") from None
    return bitsandbytes


def layer(linear: nn.Linear, kind: str, dtype: torch.dtype) -> nn.Linear:
    """`linear` as a bitsandbytes layer holding its weight quantized as `kind`, computing in `dtype`."""
    bnb = package(f"weights {kind}")
    w, device = linear.weight.detach(), linear.weight.device
    bias = linear.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(w.float(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                              quant_type=kind, device="meta")
        q.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type=kind)
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    q.register_forward_pre_hook(_autocast)
    return q.to(device)  # bitsandbytes quantizes on the move to a (non-meta) device


def _autocast(module, args):
    """Under autocast (training's mixed precision) the input in autocast's dtype, as autocast gives a Linear: the
    bitsandbytes layer returns its input's dtype, and a norm after it expects the frozen base's."""
    x = args[0]
    if isinstance(x, torch.Tensor) and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return (x.to(torch.get_autocast_dtype(x.device.type)), *args[1:])
    return None


def quantize(model: nn.Module, kind: str, dtype: torch.dtype) -> int:
    """Replaces `model`'s eligible Linear layers by bitsandbytes `kind` layers computing in `dtype`; returns how
    many."""
    from gen.quant import eligible

    linears = [(n, m) for n, m in eligible(model) if type(m) is nn.Linear]
    for name, m in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer(m, kind, dtype))
    return len(linears)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` holds a bitsandbytes-quantized weight (without importing bitsandbytes)."""
    return type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params")


def dequantized(module: nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight as bitsandbytes' own dequantization reads it (float32)."""
    bnb = package("dequantizing")
    w = module.weight
    if type(w).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if w.SCB is not None else module.state.SCB  # Linear8bitLt moves it to its state on first use
    return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()


def statistics_bytes(model: nn.Module) -> int:
    """Bytes of the quantization statistics `model`'s bitsandbytes layers hold beside their weights (4-bit: the
    blocks' absmax, itself quantized, and the code tables; int8: the rows' scales)."""
    n = 0
    for m in model.modules():
        if not is_quantized(m):
            continue
        w = m.weight
        if type(w).__name__ == "Params4bit":
            tensors = [t for t in w.quant_state.as_dict(packed=True).values() if isinstance(t, torch.Tensor)]
        else:
            tensors = [w.SCB if w.SCB is not None else m.state.SCB]
        n += sum(t.numel() * t.element_size() for t in tensors)
    return n
