"""A model folder in the diffusers layout (model_index.json, one subfolder per part, gen_config.json beside them
with gen's sampling defaults, objective and recipe): read into a Pipeline's parts, and written, atomically.
gen/single_file.py is the same for one .safetensors file in the original layout."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from gen import families, formulations
from gen.errors import GenError
from gen.io import load_model, read_json
from gen.samplers import saved_scheduler

GEN_CONFIG = "gen_config.json"


def load(path: Path, allow_pickle: bool, dtype: torch.dtype) -> dict:
    """The keyword arguments of Pipeline(...) for the folder at `path`: its models (in `dtype`), tokenizers,
    scheduler config and family, and gen's own settings where the folder has them."""
    from diffusers import AutoencoderKL

    if not (path / "model_index.json").is_file():
        raise GenError(f"{path} is not a model folder (no model_index.json); expected the diffusers layout")
    family = families.detect_folder(path, read_json(path / "model_index.json"))
    texts = [p for pair in family.text_parts for p in pair]
    for part in [*texts, "vae", family.denoiser_part, "scheduler"]:
        if not (path / part).is_dir():
            raise GenError(f"{path} is missing the {part}/ folder; a {family.title} folder needs "
                           f"{', '.join(texts)}, vae/, {family.denoiser_part}/ and scheduler/")
    parts = {enc: load_model(family.text_class(enc), path / enc, allow_pickle, dtype) for enc, _ in family.text_parts}
    for _, tok in family.text_parts:
        try:
            parts[tok] = family.tokenizer_class(tok).from_pretrained(path / tok)
        except (OSError, ValueError, TypeError) as e:
            raise GenError(f"could not load {path / tok}: {str(e).splitlines()[0]}") from None
    extra = read_json(path / GEN_CONFIG) if (path / GEN_CONFIG).is_file() else {}
    return dict(vae=load_model(AutoencoderKL, path / "vae", allow_pickle, dtype),
                denoiser=load_model(family.denoiser_class(), path / family.denoiser_part, allow_pickle, dtype),
                scheduler_config=read_json(path / "scheduler" / "scheduler_config.json"),
                formulation=formulations.from_dict(extra["formulation"]) if "formulation" in extra else None,
                defaults=extra.get("sampling"), recipe=extra.get("recipe"), name=path.name, family=family, **parts)


def save(pipe, path: Path) -> None:
    """Writes `pipe` as a folder at `path`: beside it first, then renamed into place (an existing folder is
    replaced only once the new one is whole), so a failed save loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write(pipe, tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            old.unlink() if old.is_symlink() else shutil.rmtree(old)  # a link to a folder: the link goes
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(pipe, path: Path) -> None:
    for (enc, tok), text in zip(pipe.family.text_parts, pipe.texts):
        text.model.save_pretrained(path / enc)
        text.tokenizer.save_pretrained(path / tok)
    pipe.vae.save_pretrained(path / "vae")
    pipe.denoiser.save_pretrained(path / pipe.family.denoiser_part)
    scheduler = saved_scheduler(pipe.defaults["sampler"], pipe.formulation, pipe.scheduler_config)
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(pipe.family.index(type(scheduler).__name__), indent=2))
    extra = {"formulation": formulations.to_dict(pipe.formulation), "sampling": pipe.defaults, "recipe": pipe.recipe}
    (path / GEN_CONFIG).write_text(json.dumps(extra, indent=2, default=str))
