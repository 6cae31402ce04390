"""Reading a single file's tensors: its header, one component at a time (`Source`), the tokenizers its text towers
use, and models built on the meta device and filled with its tensors. Shared by gen/single_file.py (LDM files),
gen/families/mmdit_file.py (SD3/Flux files) and gen/components.py (component files)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gen import quant
from gen.errors import GenError
from gen.io import PICKLE_SUFFIXES, check_safetensors, load_state_dict

META = "gen"  # the header's __metadata__ key holding gen's JSON (family, prediction type, defaults, hints)


def header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, metadata) of a safetensors file, validated, no tensor read; a one-line GenError
    where it holds fp8 tensors and this torch has no float8 dtypes."""
    head = check_safetensors(path)
    meta = head.pop("__metadata__", None) or {}
    if any(str(v.get("dtype", "")).startswith("F8_") for v in head.values()):
        quant.store.need_fp8(f"{path} holds fp8 weights, which")
    return {k: v["shape"] for k, v in head.items()}, meta


class Source:
    """A single file's tensors, handed out one component (key prefix) at a time and then forgotten."""

    def __init__(self, path: Path, allow_pickle: bool):
        self.path, self.state, self.handle, self.scales = path, None, None, set()
        if path.suffix in PICKLE_SUFFIXES:
            try:  # refused unless allowed; then read by gen.io's weights-only unpickler
                self.state = load_state_dict(path, allow_pickle)
            except GenError as e:
                raise GenError(f"single file {e}") from None
            self.shapes, self.meta = {k: list(v.shape) for k, v in self.state.items()}, {}
        elif path.suffix == ".gguf":  # a GGUF denoiser, its quantized tensors kept so (gen/quant)
            from gen.quant import gguf

            self.state, self.shapes, self.meta = gguf.read(path)
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            self.shapes, self.meta = header(path)
            self.scales = set(self.shapes) - set(shapes := quant.fp8.visible(self.shapes))
            self.shapes = shapes  # scaled fp8's scales travel with their weights (take_keys)
            self.handle = safe_open(str(path), framework="pt")
        else:
            raise GenError(f"{path}: unsupported single-file format {path.suffix!r}; expected .safetensors or .gguf")
        from gen.families import ldm

        self.names = ldm.unet_names(self.shapes)  # a UNet-only file's keys, under the single-file names
        self.old = {old: new for new, old in self.names.items()}
        if self.names:
            self.shapes = {new: self.shapes[old] for new, old in self.names.items()}

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.take_keys([k for k in self.shapes if k.startswith(prefix)])

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read and kept (a later take still has it)."""
        key = self.names.get(key, key)
        return self.state[key] if self.state is not None else self.handle.get_tensor(key)

    def take_keys(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """`keys`' tensors, fp8/GGUF ones kept stored (gen/quant), a scaled fp8 weight's scale folded in."""
        keys = [self.names.get(k, k) for k in keys]
        if self.state is not None:
            out = quant.fp8.wrap({k: self.state.pop(k) for k in keys})
        else:
            scales = [s for k in keys if (s := k.rpartition(".")[0] + ".scale_weight") in self.scales]
            out = quant.fp8.wrap({k: self.handle.get_tensor(k) for k in keys + scales})
        return {self.old.get(k, k): v for k, v in out.items()} if self.old else out


def gen_meta(meta: dict) -> dict:
    try:
        return json.loads(meta.get(META, "{}"))
    except json.JSONDecodeError:
        raise GenError(f"the file's '{META}' metadata is not JSON") from None


def tokenizers(path: Path, texts, family, given: str | Path | None, meta: dict, shapes: dict) -> dict:
    """The tokenizer of each text tower in `texts` (the family's file_texts): from `given` (a diffusers folder, or
    a tokenizer folder), else the file's metadata (gen writes it there), else a tokenizer/ folder beside the file,
    else the CLIP or T5 tokenizer gen ships (as ComfyUI ships them), checked against the tower's vocabulary."""
    out = {}
    for _, tok, prefix, kind in texts:
        klass = family.tokenizer_class(tok)
        where = [Path(given) / tok, Path(given)] if given else [path.parent / tok]
        folder = next((p for p in where if (p / "tokenizer_config.json").is_file()), None)
        if folder is None and not given and f"{META}.{tok}" in meta:
            with tempfile.TemporaryDirectory() as tmp:
                for name, text in json.loads(meta[f"{META}.{tok}"]).items():
                    (Path(tmp) / Path(name).name).write_text(text)
                out[tok] = klass.from_pretrained(tmp)
        elif folder is not None:
            out[tok] = klass.from_pretrained(folder)
        elif given:
            raise GenError(f"{given} has no {tok}/ tokenizer for {path}: pass --tokenizer FOLDER (tokenizer=FOLDER), "
                           f"a diffusers {family.title} folder whose {tok}/ gen uses, or leave it out (gen's own)")
        else:
            out[tok] = _bundled(path, tok, prefix, kind, family, shapes)
    return out


def _bundled(path: Path, tok: str, prefix: str, kind: str, family, shapes: dict):
    """gen's own CLIP or T5 tokenizer for a tower whose file carries none, if the tower's vocabulary fits it."""
    from gen.models.text import bundled_tokenizer

    name = "t5" if kind == "t5" else "clip"
    tokenizer = bundled_tokenizer(name, "!" if tok in family.file_pad_zero else None)
    rows = next((shapes[prefix + k][0] for k in ("text_model.embeddings.token_embedding.weight",
                                                  "token_embedding.weight", "shared.weight",
                                                  "encoder.embed_tokens.weight") if prefix + k in shapes), None)
    if rows is not None and rows < len(tokenizer):
        raise GenError(f"{path}: its {tok.replace('tokenizer', 'text tower')} has a vocabulary of {rows} tokens, "
                       f"not {name.upper()}'s {len(tokenizer)}, and the file carries no tokenizer: pass --tokenizer "
                       f"FOLDER (tokenizer=FOLDER) with the model's own {tok}/")
    return tokenizer


def empty(factory):
    """A model built on the meta device (buffers stay real): no memory for weights, no random init."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def fill(model, state: dict, what: str):
    """`model`'s parameters become `state`'s tensors (assigned, not copied)."""
    expected = set(model.state_dict())
    state, stored = quant.store.split(model, state)  # fp8/GGUF weights stay stored (gen/quant)
    missing = sorted(expected - set(state))
    if missing:
        raise GenError(f"the file lacks {len(missing)} {what} weights gen expects for the shapes it read, "
                       f"e.g. {missing[0]}; is it truncated or an unusual variant?")
    model.load_state_dict({k: state[k].contiguous() for k in expected}, strict=True, assign=True)
    quant.store.attach_all(model, stored)
    return model
