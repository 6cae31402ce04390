"""Weights kept in their storage format -- fp8 values, ComfyUI's scaled fp8, GGUF blocks -- and upcast per layer.

A stored weight is a Linear/Conv layer's `weight` parameter holding the raw bytes (uint8: fp8 values viewed as
bytes, or GGUF blocks, one row of blocks per output row), so `Module.to(dtype)` leaves it alone, with a
`Storage` record on the layer saying how to read it. A forward pre-hook puts the upcast weight in its place for
the call (in the input's dtype: the compute dtype) and a forward hook puts the bytes back, as diffusers'
layerwise casting hooks do; peft's LoRA layers call the wrapped layer, so the hooks run under them as well.

On the way from a file to a model a stored tensor is a `Packed`: a tensor subclass that keeps its format through
the family's key conversion, whose row slices and concatenations (a fused qkv split into to_q/to_k/to_v) are
row operations on the bytes too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from gen.errors import GenError

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the layers whose weight may stay stored


@functools.cache
def fp8_dtypes() -> dict[str, torch.dtype]:
    """The fp8 formats (safetensors' names) this torch has; empty on a torch without float8 dtypes."""
    names = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
    return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


def need_fp8(what: str) -> dict[str, torch.dtype]:
    formats = fp8_dtypes()
    if len(formats) < 2:
        raise GenError(f"{what} needs float8 dtypes (torch.float8_e4m3fn), which this torch {torch.__version__} "
                       "lacks; install torch >= 2.1 (or load a bf16/fp16 file)")
    return formats


def gguf_module():
    """The gguf package, or a one-line GenError naming the install."""
    try:
        import gguf
    except ImportError:
        raise GenError("reading a .gguf file needs the gguf package: pip install 'gen[gguf]' "
                       "(or pip install gguf)") from None
    return gguf


@functools.cache
def _gguf_kernel(kind: str):
    """(diffusers' torch dequantization function, block size, bytes a block) for GGUF quant type `kind`: looked up
    once per type, not at every layer's call."""
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions

    qtype = gguf_module().GGMLQuantizationType[kind]
    return (dequantize_functions[qtype], *GGML_QUANT_SIZES[qtype])


def dequantize(data: torch.Tensor, kind: str, shape) -> torch.Tensor:
    """GGUF blocks (uint8, rows of blocks) of quant type `kind` -> a float32 tensor of `shape`."""
    fn, block_size, type_size = _gguf_kernel(kind)
    return fn(data.reshape(-1, type_size), block_size, type_size, torch.float32).reshape(shape)


@dataclass
class Storage:
    """How a layer's stored weight reads: `kind` an fp8 format (F8_E4M3, F8_E5M2) or a GGUF quant type name,
    `shape` the weight's shape, `scale` ComfyUI's per-tensor scale_weight (scaled fp8), `final` a shape the
    upcast rows are reshaped to (GGUF files record one for tensors stored flattened)."""
    kind: str
    shape: tuple[int, ...]
    scale: float | None = None
    final: tuple[int, ...] | None = None

    def upcast(self, data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        fp8 = fp8_dtypes()
        if self.kind in fp8:
            w = data.view(fp8[self.kind])
            w = w.to(dtype) if self.scale is None else (w.float() * self.scale).to(dtype)
        else:
            w = dequantize(data, self.kind, self.shape).to(dtype)
        return w if self.final is None else w.reshape(self.final)


class Packed(torch.Tensor):
    """A tensor as the file stores it (fp8 values, or GGUF rows of blocks as uint8) with its `Storage`, carried
    through key conversion: the results of ops on it (slices, cat, contiguous) stay Packed. fp8 data has its
    logical shape, so any op is valid; GGUF data only takes row ops (the last dim is bytes)."""

    storage: Storage

    @staticmethod
    def __new__(cls, data: torch.Tensor, storage: Storage):
        t = torch.Tensor._make_subclass(cls, data, False)
        t.storage = storage
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        src = next((a for a in _flat(args) if isinstance(a, Packed)), None)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if src is None or func in (torch.Tensor.__repr__, torch.Tensor.__format__):
            return out
        if isinstance(out, torch.Tensor):
            return _rewrap(out, src)
        if isinstance(out, (tuple, list)):
            return type(out)(_rewrap(o, src) if isinstance(o, torch.Tensor) else o for o in out)
        return out

    def raw(self) -> torch.Tensor:
        """The stored bytes as a plain uint8 tensor."""
        plain = self.as_subclass(torch.Tensor)
        return plain.view(torch.uint8) if plain.dtype != torch.uint8 else plain

    def logical_shape(self) -> tuple[int, ...]:
        return self.storage.shape


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _rewrap(out: torch.Tensor, src: Packed):
    s = src.storage
    if out.dtype != src.dtype:  # a reduction, a comparison, a cast: not the stored bytes any more
        return out
    if s.kind in fp8_dtypes():
        return Packed(out, Storage(s.kind, tuple(out.shape), s.scale))
    if out.dim() != src.dim() or s.final is not None:
        raise GenError(f"a {s.kind} GGUF tensor of shape {list(s.shape)} cannot be reshaped while loading; "
                       "this file's layout is not one gen converts")
    per_byte = s.shape[-1] / src.shape[-1]  # elements per stored byte (a whole number of blocks per row)
    return Packed(out, Storage(s.kind, (*out.shape[:-1], int(out.shape[-1] * per_byte)), s.scale))


def shape_of(t: torch.Tensor) -> list[int]:
    """A tensor's logical shape (a Packed GGUF tensor's data shape counts bytes)."""
    return list(t.storage.final or t.storage.shape) if isinstance(t, Packed) else list(t.shape)


# ---- layers ---------------------------------------------------------------------------------------------------
def stored(module: nn.Module) -> Storage | None:
    return getattr(module, "gen_storage", None)


def _pre(module, args):
    x = args[0] if args else None
    dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else torch.float32
    data = module._parameters["weight"]
    module.__dict__["_gen_bytes"] = data  # a plain attribute (setattr would register the Parameter)
    module._parameters["weight"] = module.gen_storage.upcast(data, dtype)  # for this call only


def _post(module, args, output):
    data = module.__dict__.pop("_gen_bytes", None)
    if data is not None:
        module._parameters["weight"] = data


def attach(module: nn.Module, storage: Storage, data: torch.Tensor) -> None:
    """Makes `module`'s weight the stored bytes `data` (uint8), upcast per call by hooks."""
    module._parameters["weight"] = nn.Parameter(data.contiguous(), requires_grad=False)
    if stored(module) is None:
        module._gen_hooks = (module.register_forward_pre_hook(_pre),
                             module.register_forward_hook(_post, always_call=True))
    module.gen_storage = storage


def detach(module: nn.Module, dtype: torch.dtype) -> None:
    """Upcasts a stored weight for good (to `dtype`) and removes the hooks."""
    storage = stored(module)
    data = module._parameters["weight"]
    module._parameters["weight"] = nn.Parameter(storage.upcast(data, dtype), requires_grad=False)
    for h in module._gen_hooks:
        h.remove()
    del module.gen_storage, module._gen_hooks


def store_as(module: nn.Module, kind: str) -> None:
    """Stores a Linear/Conv layer's floating weight in fp8 format `kind` (F8_E4M3 or F8_E5M2)."""
    w = module.weight.detach()
    attach(module, Storage(kind, tuple(w.shape)), w.to(fp8_dtypes()[kind]).view(torch.uint8))


def split(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A state dict bound for `model` -> (the state dict to load, with meta placeholders for the Packed weights of
    Linear/Conv layers and every other Packed tensor upcast to fp32 -- a norm or an embedding stays high
    precision, and so do the layers the model keeps in fp32 (`_keep_in_fp32_modules`: T5's `wo`, whose caller
    casts its input to the weight's dtype) --, {layer name: Packed weight} to attach after loading)."""
    import re

    modules = dict(model.named_modules())
    fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    out, keep = {}, {}
    for k, v in state.items():
        if not isinstance(v, Packed):
            out[k] = v
            continue
        layer, _, param = k.rpartition(".")
        if param == "weight" and isinstance(modules.get(layer), LAYERS) and not any(re.search(p, layer) for p in fp32):
            keep[layer] = v
            out[k] = torch.empty(shape_of(v), device="meta")
        else:
            out[k] = v.storage.upcast(v.raw(), torch.float32)
    return out, keep


def attach_all(model: nn.Module, keep: dict[str, "Packed"]) -> None:
    modules = dict(model.named_modules())
    for layer, v in keep.items():
        attach(modules[layer], v.storage, v.raw())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold (stored weights at their stored size, bitsandbytes' weights
    with their quantization statistics)."""
    from gen.quant.bnb import statistics_bytes

    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) + statistics_bytes(model)
