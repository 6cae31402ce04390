"""`gen info`: describe a model folder or a .safetensors file without loading the models."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from math import prod
from pathlib import Path

from safetensors import safe_open

from gen.errors import GenError
from gen.io import check_safetensors, read_json


def _count(files: list[Path]) -> int:
    n = 0
    for f in files:
        check_safetensors(f)  # bounded header, offsets in range: before safetensors reads it
        try:
            with safe_open(str(f), framework="pt") as h:
                n += sum(prod(h.get_slice(k).get_shape()) for k in h.keys())
        except Exception as e:
            raise GenError(f"{f} is not a valid safetensors file ({e})") from None
    return n


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def describe_folder(path: Path) -> str:
    from gen import families

    index = read_json(path / "model_index.json")
    lines = [f"model folder {path}", f"  family: {families.detect_folder(path, index).title}",
             "  layout: diffusers folder", f"  pipeline: {index.get('_class_name', '?')}"]
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        weights = sorted((path / name).glob("*.safetensors"))
        size = f", {_human(_count(weights))} parameters" if weights else ""
        lines.append(f"  {name}: {spec[1]}{size}")
    gen_cfg = path / "gen_config.json"
    if gen_cfg.is_file():
        extra = read_json(gen_cfg)
        f = dict(extra.get("formulation", {}))
        lines.append(f"  formulation: {f.pop('type', '?')} " + ", ".join(f"{k}={v}" for k, v in f.items()))
        lines.append("  sampling defaults: " + ", ".join(f"{k}={v}" for k, v in extra.get("sampling", {}).items()))
        if extra.get("recipe"):
            lines.append("  recipe: " + json.dumps(extra["recipe"]))
    else:
        sched = read_json(path / "scheduler" / "scheduler_config.json")
        lines.append(f"  formulation: read from {sched.get('_class_name')} "
                     f"(prediction_type={sched.get('prediction_type', 'flow')})")
    return "\n".join(lines)


def describe_file(path: Path) -> str:
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as h:
            keys = list(h.keys())
            meta = h.metadata() or {}
    except Exception as e:
        raise GenError(f"{path} is not a valid safetensors file ({e})") from None
    from gen import lora, single_file

    if lora.is_lora(keys):
        return lora.describe(path) + f"\n  parameters: {_human(_count([path]))}"
    lines = [f"safetensors file {path}", f"  tensors: {len(keys)}, parameters: {_human(_count([path]))}"]
    if single_file.is_checkpoint(keys):  # a whole model in the original layout (or SD3/Flux: said so)
        shapes, _ = single_file.header(path)
        return "\n".join(lines + single_file.describe(path, shapes, meta))
    lines += [f"  {k}: {v[:200]}" for k, v in meta.items()]
    return "\n".join(lines)


def describe_gguf(path: Path) -> str:
    """A GGUF denoiser file, and what it needs beside it, as `gen info` says it of a transformer-only .safetensors."""
    from gen import single_file
    from gen.families.mmdit_file import missing_message, missing_parts
    from gen.quant import gguf

    lines, shapes = gguf.describe(path)
    family = single_file.detect(path, shapes)
    return "\n".join(lines + [f"  family: {family.title}",
                              f"  missing: {missing_message(path, family, *missing_parts(family, set(shapes), None))}"])


# What bug reports in this field ask for (diffusers' and transformers' `env` commands list the same).
KEY_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub",
                "tokenizers", "numpy", "pillow", "triton", "xformers")


def versions() -> str:
    """gen's version, Python, the platform and the key dependencies' versions, one per line; read from the
    installed packages' metadata, so nothing heavy is imported."""
    from gen import __version__

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"gen {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"platform {platform.platform()}"]
    lines += [f"{name} {version(name)}" for name in KEY_PACKAGES]
    return "\n".join(lines)


def describe(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir() and (path / "model_index.json").is_file():
        return describe_folder(path)
    if path.is_file() and path.suffix == ".safetensors":
        return describe_file(path)
    if path.is_file() and path.suffix == ".gguf":
        return describe_gguf(path)
    if not path.exists():
        raise GenError(f"not found: {path}")
    raise GenError(f"{path} is neither a model folder (with model_index.json) nor a .safetensors or .gguf file")
