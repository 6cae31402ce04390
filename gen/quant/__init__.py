"""Weight storage: fp8 and GGUF weights kept as stored and upcast per layer when used (gen/quant/store.py).

`weights` (Pipeline.from_pretrained(weights=...), `gen sample --weights`):
  auto  (default) a file's fp8 and GGUF weights stay stored; everything else is in the pipeline's dtype
  fp8   also store the denoiser's and text encoders' Linear/Conv weights as float8_e4m3fn, computing in the
        pipeline's dtype (diffusers' enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn)); the layers that
        must stay high precision -- norms, embeddings, biases and diffusers' skip patterns (pos_embed, patch_embed,
        norm*, the top-level proj_in/proj_out, a model's own _skip_layerwise_casting_patterns and
        _keep_in_fp32_modules) -- stay in the pipeline's dtype
  nf4, fp4, int8  the same Linear layers quantized by bitsandbytes (gen/quant/bnb.py: Linear4bit computing in the
        pipeline's dtype, Linear8bitLt); needs `pip install 'gen[quant]'`
  full  upcast every stored weight on load, to the pipeline's dtype (more memory; LoRAs can then be fused)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from gen.errors import GenError
from gen.quant import bnb, fp8, store  # noqa: F401  (gen.quant.fp8 / .store for the loaders)
from gen.quant.store import LAYERS, detach, need_fp8, store_as, stored

WEIGHTS = ("auto", "fp8", *bnb.KINDS, "full")


def check(weights: str | None) -> str:
    weights = weights or "auto"
    if weights not in WEIGHTS:
        raise GenError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    if weights == "fp8":
        need_fp8("--weights fp8")
    if weights in bnb.KINDS:
        bnb.package(f"--weights {weights}")
    return weights


def check_offload(weights: str, offload) -> None:
    """Streamed offload (`offload` "group" / "sequential") moves plain tensors with diffusers' hooks, which would
    leave bitsandbytes' quantization state behind: refused with nf4/fp4/int8 (whole-component offload works)."""
    if weights in bnb.KINDS and offload not in (None, False, True, "model"):
        raise GenError(f"--offload {offload} streams plain tensors and cannot move bitsandbytes' {weights} layers; "
                       "use --offload (model) with them, or --weights fp8")


def skip_patterns(model: nn.Module) -> tuple[str, ...]:
    """The module-name patterns kept high precision under fp8 storage, as diffusers' enable_layerwise_casting
    picks them: its DEFAULT_SKIP_MODULES_PATTERN plus the model's own lists."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    own = [*(getattr(model, "_skip_layerwise_casting_patterns", None) or ()),
           *(getattr(model, "_keep_in_fp32_modules", None) or ())]
    return tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(own)


def eligible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for each of `model`'s Linear/Conv layers whose weight a storage option (fp8, nf4/fp4/int8)
    may lower: a floating weight not already stored, in a layer no skip pattern names. The one rule for every
    option, so each keeps the same layers high precision."""
    patterns = skip_patterns(model)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, LAYERS) and stored(m) is None and m.weight.is_floating_point()
            and not any(re.search(p, name) for p in patterns)]


def store_fp8(model: nn.Module) -> int:
    """Stores `model`'s eligible Linear/Conv weights as float8_e4m3fn; returns how many."""
    layers = eligible(model)
    for _, m in layers:
        store_as(m, "F8_E4M3")
    return len(layers)


def apply(pipe, weights: str | None, dtype: torch.dtype) -> None:
    """Applies the `weights` option to a loaded pipeline (before it is placed on its device in `dtype`)."""
    weights = check(weights)
    if weights == "full":
        for model in pipe.models:
            for m in model.modules():
                if stored(m) is not None:
                    detach(m, dtype)
    elif weights == "fp8":
        for model in [pipe.denoiser, *pipe.text_parts.values()]:
            store_fp8(model)
    elif weights in bnb.KINDS:
        for model in [pipe.denoiser, *pipe.text_parts.values()]:
            bnb.quantize(model, weights, dtype)
    pipe.weights = weights


def layers(models) -> int:
    """How many layers of `models` hold stored (fp8 / GGUF) or bitsandbytes-quantized weights."""
    return sum(stored(m) is not None or bnb.is_quantized(m) for model in models for m in model.modules())


def refuse(models, what: str) -> None:
    """A one-line GenError for an operation that needs full-precision weights (`what`: fuse_lora, saving)."""
    n = layers(models)
    if n:
        raise GenError(f"{what} needs full-precision weights, and {n} layers keep fp8/GGUF/bitsandbytes weights (the LoRA "
                       "runs unfused beside them, as loaded); load the model with --weights full (weights='full') "
                       f"to {what}")
