"""GGUF transformer / UNet files, as city96's ComfyUI-GGUF writes them and diffusers' GGUF loader reads them.

The file holds one denoiser in its original key layout (BFL's Flux, SAI's MMDiT, the LDM UNet; no
`model.diffusion_model.` prefix) and names it in `general.architecture` (flux, sd3, sdxl, sd1). GGUF lists
dimensions innermost first, so a tensor's torch shape is its GGUF shape reversed; a quantized tensor is rows of
blocks along its last dimension, read as uint8 (rows..., bytes) and kept so: dequantized per layer on use by
diffusers' torch dequantization functions (diffusers/quantizers/gguf/utils.py, the same maths as ComfyUI-GGUF's
dequant.py). F32/F16/BF16 tensors load as plain tensors. A tensor the converter stored flattened names its shape
in `comfy.gguf.orig_shape.<name>` (ComfyUI-GGUF's loader reshapes it so too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gen.errors import GenError
from gen.quant.store import Packed, Storage, gguf_module

ARCHITECTURES = ("flux", "sd3", "sdxl", "sd1")  # general.architecture values gen reads
LDM = ("sdxl", "sd1")  # UNet files: keys get the single-file UNet prefix
UNET = "model.diffusion_model."
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ORIG_SHAPE = "comfy.gguf.orig_shape."


def supported() -> list[str]:
    """The GGUF quant types gen dequantizes: those diffusers' torch dequantization handles."""
    from diffusers.quantizers.gguf.utils import dequantize_functions

    return sorted({q.name for q in dequantize_functions} - set(PLAIN))


def _field(reader, name: str):
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def _open(path: Path):
    """gguf's reader of `path` and its `general.architecture`, or a one-line GenError."""
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise GenError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GenError(f"{path}: a GGUF file for architecture {arch!r}, which gen does not know; gen reads GGUF "
                       f"denoisers of {', '.join(ARCHITECTURES)}")
    return reader, arch


def describe(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """`gen info`'s lines for a GGUF file (architecture, tensors per storage type, parameters and bytes) and its
    tensors' shapes under the single-file names (a UNet's under `model.diffusion_model.`)."""
    from collections import Counter

    reader, arch = _open(path)
    types = Counter(gguf_module().GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    values = sum(int(t.n_elements) for t in reader.tensors)
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    lines = [f"GGUF file {path}", f"  architecture: {arch}",
             f"  tensors: {len(reader.tensors)} ({', '.join(f'{n} {k}' for k, n in types.most_common())})",
             f"  parameters: {values / 1e6:.2f}M in {stored / 2 ** 20:.1f} MiB "
             f"({8 * stored / max(values, 1):.2f} bits a value)"]
    return lines, {_name(t.name, arch): _shape(reader, t)[1] for t in reader.tensors}


def _name(name: str, arch: str) -> str:
    return UNET + name if arch in LDM and not name.startswith(UNET) else name


def _shape(reader, t) -> tuple[tuple[int, ...], list[int]]:
    """(a tensor's stored torch shape, its logical shape: `comfy.gguf.orig_shape.` where the converter flattened it)."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    final = _field(reader, ORIG_SHAPE + t.name)
    return shape, [int(d) for d in final] if final else list(shape)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], dict[str, str]]:
    """A GGUF file -> (tensors: Packed for quantized ones, the single-file key layout), their logical shapes,
    metadata (`general.architecture` and the like, as strings). One-line GenErrors for a file gen cannot read."""
    gguf = gguf_module()
    reader, arch = _open(path)
    quants = set(supported())
    state, shapes = {}, {}
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        shape, logical = _shape(reader, t)
        final = tuple(logical) if list(shape) != logical else None
        data = torch.from_numpy(np.array(t.data))  # a copy: the memory map is not writable
        if kind in PLAIN:
            tensor = data.view(PLAIN[kind]).reshape(final or shape)
        elif kind in quants:
            tensor = Packed(data.view(torch.uint8), Storage(kind, shape, None, final))
        else:
            raise GenError(f"{path}: tensor {t.name} is {kind}, a GGUF quant type gen does not read; it reads "
                           f"{', '.join(sorted(quants))} and F32/F16/BF16")
        name = _name(t.name, arch)
        state[name], shapes[name] = tensor, logical
    meta = {k: str(_field(reader, k)) for k in reader.fields if k.startswith("general.")}
    return state, shapes, meta
