"""Safe weight loading: safetensors only, unless the caller explicitly allows pickle-based files."""

from __future__ import annotations

import json
from math import prod
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gen.errors import GenError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# safetensors dtype string -> bytes per element
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                      "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8}


def _refuse_pickle(path: Path) -> GenError:
    return GenError(f"{path} is a pickle-based file, which can run code when loaded; refused. "
                    "Convert it to .safetensors, or pass allow_pickle=True / --allow-pickle if you trust it.")


def check_safetensors(path: str | Path) -> dict:
    """Validates a safetensors file before any tensor is read: the header length is bounded by the file and
    MAX_HEADER_BYTES (so a forged length allocates nothing), every dtype is known, every tensor's byte range
    lies in the data section and matches its shape. Returns the header; raises a one-line GenError."""
    path = Path(path)

    def bad(why: str) -> GenError:
        return GenError(f"{path} is not a valid safetensors file: {why}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"it is {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"the header claims {n} bytes but the file has {size - 8} after the length (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = prod(int(d) for d in shape) if all(isinstance(d, int) and d >= 0 for d in shape) else -1
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data):
            raise bad(f"tensor {name!r} has offsets [{start}, {end}] outside the {data}-byte data section "
                      "(truncated or corrupt)")
        if count < 0 or count * SAFETENSORS_DTYPES[dtype] != end - start:
            raise bad(f"tensor {name!r}: shape {shape} of {dtype} does not match its {end - start} bytes")
    return header


def _load_pickle(path: Path, flat: bool = True) -> dict[str, torch.Tensor]:
    """The one audited place a pickle-based file is opened (tests/test_lint.py checks it is the only one).
    torch's weights_only unpickler builds tensors and plain containers only: a pickle that names any other
    callable (os.system, a __reduce__ payload) is refused before that callable runs, even when allowed.
    flat=False: the object as stored (nested dicts, strings, numbers: an A1111 embedding's .pt)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for a refused global; others for a broken file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenError(f"refused to load {path}: it is not a plain tensor file ({first[:200]})") from None
    if not flat:
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning / original SD .ckpt
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GenError(f"{path} does not hold a flat dict of tensors")
    return obj


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Loads a weights file as a flat state dict; `.safetensors` always, pickle formats only if allowed."""
    path = Path(path)
    if not path.is_file():
        raise GenError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        check_safetensors(path)
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types for malformed files
            raise GenError(f"{path} is not a valid safetensors file ({e})") from None
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _refuse_pickle(path)
        return _load_pickle(path)
    raise GenError(f"unsupported weights format {path.suffix!r} for {path}: expected .safetensors")


def load_object(path: str | Path, allow_pickle: bool = False):
    """A weights file's contents as stored: a .safetensors file's flat dict of tensors, or, only if allowed, a
    pickle's plain object (tensors in nested dicts, strings, numbers), read by `_load_pickle`."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES and path.is_file():
        if not allow_pickle:
            raise _refuse_pickle(path)
        return _load_pickle(path, flat=False)
    return load_state_dict(path, allow_pickle)


def load_model(klass, folder: str | Path, allow_pickle: bool = False, dtype: torch.dtype | None = None):
    """A diffusers or transformers model class from a component folder (config.json + weights), every weights
    file going through this module: safetensors are validated before the library reads them; pickle-based
    files (.bin, .ckpt, ...) are refused unless allowed, and then read by `_load_pickle` only. `dtype`: the
    weights are read straight into it (an fp16 folder asked for in fp16 never exists in fp32, which would
    double the peak host memory); None: the library's default."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    tensors = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not tensors and not pickles:
        raise GenError(f"{folder} has no weights file (.safetensors)")
    if not tensors and not allow_pickle:
        raise GenError(f"{folder} has only pickle-based weights ({', '.join(p.name for p in pickles)}), which "
                       "can run code when loaded; refused. Convert them to safetensors, or pass "
                       "allow_pickle=True / --allow-pickle if you trust them.")
    try:
        if tensors:
            for p in tensors:
                check_safetensors(p)
            diffusers = hasattr(klass, "load_config")  # a diffusers ModelMixin, else a transformers PreTrainedModel
            kwargs = {} if dtype is None else {"torch_dtype" if diffusers else "dtype": dtype}
            return klass.from_pretrained(folder, use_safetensors=True, **kwargs)
        state = {}
        for p in pickles:  # several files: a sharded checkpoint
            state.update(load_state_dict(p, allow_pickle=True))
        if hasattr(klass, "load_config"):  # diffusers ModelMixin
            model = klass.from_config(klass.load_config(folder))
        else:  # transformers PreTrainedModel
            model = klass(klass.config_class.from_pretrained(folder))
        if dtype is not None:
            model.to(dtype)
        missing, _ = model.load_state_dict(state, strict=False)  # unexpected keys: legacy buffers
        if missing:
            raise GenError(f"{folder}: the weights lack {len(missing)} parameters, e.g. {missing[0]}")
        return model
    except GenError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenError(f"could not load {folder}: {first}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header."""
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise GenError(f"{path} is not a valid safetensors file ({e})") from None


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GenError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenError(f"{path} is not valid JSON ({e})") from None



_TORCH_TO_SAFETENSORS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                         torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Writes a safetensors file tensor by tensor (safetensors' save_file first builds the whole file in memory:
    a second copy of the weights), to a temporary file renamed into place, so a failed write loses nothing."""
    import os

    path = Path(path)
    items = sorted(tensors.items())
    head: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        head[name] = {"dtype": _TORCH_TO_SAFETENSORS[t.dtype], "shape": list(t.shape),
                      "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(head, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for _, t in items:
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_image(path: str | Path, what: str = "the image"):
    """A PIL image from a file, or a GenError naming `what` and why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise GenError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise GenError(f"{what} {path}: not a readable image ({str(e).splitlines()[0] if str(e) else e})") from None
