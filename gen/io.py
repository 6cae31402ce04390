"""Safe weight loading: safetensors only, unless the caller explicitly allows pickle-based files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gen.errors import GenError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Loads a weights file as a flat state dict; `.safetensors` always, pickle formats only if allowed."""
    path = Path(path)
    if not path.is_file():
        raise GenError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types for malformed files
            raise GenError(f"{path} is not a valid safetensors file ({e})") from None
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise GenError(
                f"{path} is a pickle-based file, which can run code when loaded; refused. "
                "Convert it to .safetensors, or pass allow_pickle=True / --allow-pickle if you trust it."
            )
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise GenError(f"could not load {path} ({e})") from None
    raise GenError(f"unsupported weights format {path.suffix!r} for {path}: expected .safetensors")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header."""
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


def png_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, guidance: float,
                   seed: int, width: int, height: int, model: str) -> str:
    """Generation parameters in AUTOMATIC1111's `parameters` PNG text layout."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(f"Steps: {steps}, Sampler: {sampler}, CFG scale: {guidance:g}, Seed: {seed}, "
                 f"Size: {width}x{height}, Model: {model}")
    return "\n".join(lines)


def save_png(image, path: str | Path, parameters: str) -> None:
    """Saves a PIL image with the A1111 `parameters` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    image.save(str(path), pnginfo=info)
