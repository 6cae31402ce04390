"""Textual-inversion embeddings, as AUTOMATIC1111, ComfyUI and diffusers use them: a file holds one learned vector
(or several) per CLIP tower, and a prompt uses it by name.

Layouts read (A1111's modules/textual_inversion/textual_inversion.py load_from_file, diffusers'
TextualInversionLoaderMixin._retrieve_tokens_and_embeddings):
- A1111's own: `string_to_param: {"*": (n, D)}` in a .pt (pickle: only with allow_pickle / --allow-pickle), or a
  `.safetensors` with its one tensor under `emb_params` (or `*`);
- diffusers' `learned_embeds.safetensors`: `{token: (n, D) or (D,)}`;
- SDXL's: `clip_l` (n, 768) and `clip_g` (n, 1280), one for each tower.
The name is the file's stem, as A1111 names it (diffusers names an A1111 .pt by its `name` field instead); a
diffusers file whose one key is its own token (`<cat-toy>`) is named by that token, as diffusers does.

In a prompt the name (a whole word, any case: A1111 matches the name's tokens, which the CLIP tokenizer
lowercases) or ComfyUI's `embedding:name` stands for the file's n vectors: n token positions whose input
embeddings are the file's, at the weight of the text around it; they stay together in one 75-token chunk as
A1111 keeps them. With one-token-per-vector names (`name name_1 ...`, diffusers' multi-vector expansion) this is
what diffusers' load_textual_inversion gives. Nothing is added to the tokenizer or to the text encoder: each call
tokenizes with placeholder ids (negative, below every real id) and runs a copy of the tower whose token embedding
also looks those up (gen.prompt_weights reads them), so no state is left on shared encoders. Where a CLIP config
has transformers' legacy `eos_token_id: 2` (the released SD towers), the pooled output is the end token's, as in
A1111 and ComfyUI; diffusers' added tokens outrank the end token there and move its pooled output onto them.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gen.errors import GenError

log = logging.getLogger("gen")

SUFFIXES = (".safetensors", ".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")
WIDTHS = {768: "SD-1.x's CLIP-L", 1024: "SD-2.x's OpenCLIP-H", 1280: "SDXL's CLIP-G"}
PREFIX = "embedding:"  # ComfyUI's


@dataclass
class Embedding:
    name: str
    vectors: tuple[torch.Tensor, ...]  # (n, D) for each CLIP tower it is for: (one,) or (clip_l, clip_g)
    path: Path

    @property
    def count(self) -> int:
        return self.vectors[0].shape[0]

    def short_hash(self) -> str:
        """A1111's `TI hashes` value: the first 12 hex digits of the file's sha256."""
        from gen.recipe import sha256

        return sha256(self.path)[:12]


def read(path: str | Path, allow_pickle: bool = False, name: str | None = None) -> Embedding:
    """An embedding file in any of the layouts above; a one-line GenError for anything else."""
    from gen.io import load_object

    path = Path(path)
    if not path.is_file():
        raise GenError(f"embedding file not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise GenError(f"{path} is not an embedding file: expected .safetensors (or .pt / .bin with --allow-pickle)")
    data = load_object(path, allow_pickle)
    vectors, token = _layout(data, path)
    for v in vectors:
        if not v.is_floating_point() or v.ndim != 2 or not v.shape[0] or not torch.isfinite(v).all():
            raise GenError(f"{path}: the embedding's vectors are {tuple(v.shape)} {v.dtype}, not finite (n, width) "
                           "floats")
    if len({v.shape[0] for v in vectors}) > 1:
        raise GenError(f"{path}: clip_l and clip_g hold {vectors[0].shape[0]} and {vectors[1].shape[0]} vectors; "
                       "an SDXL embedding has as many for each tower")
    return Embedding(name or token or path.stem, tuple(v.float() for v in vectors), path)


def _layout(data, path: Path) -> tuple[tuple[torch.Tensor, ...], str | None]:
    """(vectors per tower, the file's own token or None) of a loaded embedding file."""
    if isinstance(data, torch.Tensor):  # a bare tensor (diffusers asks for a token; the stem is it here)
        return (_2d(data),), None
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # A1111's .pt
        params = data["string_to_param"]
        if len(params) != 1 or not isinstance(next(iter(params.values())), torch.Tensor):
            raise GenError(f"{path}: an A1111 embedding holds one tensor in string_to_param, this one "
                           f"{len(params)} entries")
        return (_2d(next(iter(params.values()))),), None
    if isinstance(data, dict) and all(isinstance(data.get(k), torch.Tensor) for k in SDXL_KEYS):
        return tuple(_2d(data[k]) for k in SDXL_KEYS), None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        key, tensor = next(iter(data.items()))
        return (_2d(tensor),), None if key in ("emb_params", "*", "string_to_param.*") else key
    keys = ", ".join(sorted(map(str, data))[:6]) if isinstance(data, dict) else type(data).__name__
    raise GenError(f"{path} is not a textual-inversion embedding (it holds {keys or 'nothing'}): expected A1111's "
                   "emb_params / string_to_param, diffusers' one {token: tensor} or SDXL's clip_l and clip_g")


def _2d(t: torch.Tensor) -> torch.Tensor:
    return t.detach()[None] if t.ndim == 1 else t.detach()


def _describe(widths: list[int]) -> str:
    if len(widths) == 2:
        return f"SDXL's two towers ({widths[0]} + {widths[1]} wide)"
    return f"{widths[0]}-wide vectors ({WIDTHS.get(widths[0], 'a CLIP tower')})" if widths else "no CLIP tower"


def clip_towers(encoders: list) -> list:
    from gen.prompt_weights import is_clip

    return [e for e in encoders if is_clip(e.model)]


def check(emb: Embedding, encoders: list) -> None:
    """Refuses an embedding made for other text encoders (its widths against the model's CLIP towers)."""
    want = [e.model.get_input_embeddings().weight.shape[-1] for e in clip_towers(encoders)]
    got = [v.shape[-1] for v in emb.vectors]
    if got != want:
        raise GenError(f"the embedding {emb.name!r} ({emb.path.name}) is for {_describe(got)}, but this model's "
                       f"text encoder{'s take' if len(want) > 1 else ' takes'} {_describe(want)}; use an embedding "
                       "made for this model")


def _is_word(name: str, tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return name in vocab or name.lower() in vocab or f"{name.lower()}</w>" in vocab


class Embeddings:
    """The embeddings one Pipeline knows: files loaded by name, and folders whose files are read on first use."""

    def __init__(self):
        self.files: dict[str, Embedding] = {}  # lowercased name -> embedding
        self.folders: dict[str, Path] = {}  # lowercased stem (and relative path) -> file, of the folders added
        self.read: dict[Path, Embedding] = {}  # the folders' files read so far
        self.allow_pickle = False

    @staticmethod
    def of(pipe) -> "Embeddings":
        if "_embeddings" not in pipe.__dict__:
            pipe._embeddings = Embeddings()
        return pipe._embeddings

    def load(self, path: str | Path, encoders: list, token: str | None = None, allow_pickle: bool = False) -> list[str]:
        """An embedding file (its name: `token`, else the file's), or a folder of them (used by name on use)."""
        path = Path(path)
        self.allow_pickle = self.allow_pickle or allow_pickle
        if path.is_dir():
            found = {}
            for f in sorted(path.rglob("*")):
                if f.suffix.lower() in SUFFIXES and f.is_file() and f.stat().st_size:
                    found.setdefault(f.stem.lower(), f)
                    found[f.relative_to(path).as_posix().lower()] = f
            if not found:
                raise GenError(f"the embeddings folder {path} holds no embedding files (.safetensors, .pt, .bin)")
            self.folders.update(found)
            return sorted({f.stem for f in found.values()})
        emb = read(path, allow_pickle, token)
        check(emb, encoders)
        key = emb.name.lower()
        if key in self.files:
            raise GenError(f"two embeddings are named {emb.name!r} ({self.files[key].path.name} and {path.name}); "
                           "rename one of the files")
        tokenizer = clip_towers(encoders)[0].tokenizer
        if _is_word(emb.name, tokenizer):
            raise GenError(f"the embedding name {emb.name!r} ({path.name}) is a token the tokenizer already has, so it "
                           "would replace that word in every prompt; rename the file (or pass another token)")
        self.files[key] = emb
        return [emb.name]

    def _pattern(self, tokenizer) -> re.Pattern:
        """Known names as whole words (folder files that are also vocabulary words only as embedding:NAME), and
        every embedding:NAME."""
        plain = {*self.files, *(k for k in self.folders if "/" not in k and not _is_word(k, tokenizer))}
        names = "|".join(re.escape(n) for n in sorted(plain, key=len, reverse=True))
        return re.compile(rf"(?<![\w:]){re.escape(PREFIX)}([^\s,()\[\]]+)" + (rf"|(?<![\w:])({names})(?!\w)"
                                                                                 if names else ""), re.I)

    def _lookup(self, name: str, encoders: list) -> Embedding:
        key = name.lower()
        for k in (key, *(key + s for s in SUFFIXES)):
            if k in self.files:
                return self.files[k]
            if k in self.folders:
                path = self.folders[k]
                if path not in self.read:
                    emb = read(path, self.allow_pickle, name=path.stem)
                    check(emb, encoders)
                    self.read[path] = emb
                return self.read[path]
        where = ", ".join(sorted({str(p.parent) for p in self.folders.values()})) or "no --embeddings folder"
        raise GenError(f"the prompt names the embedding {PREFIX}{name}, which is neither a loaded --embedding nor "
                       f"a file in {where}")

    def used(self, texts: list[str], encoders: list) -> dict[str, Embedding]:
        """The embeddings these prompts use, by the (lowercased) name they are used by, in order of first use."""
        towers = clip_towers(encoders)
        if not towers or not (self.files or self.folders):
            return {}
        pattern, out = self._pattern(towers[0].tokenizer), {}
        for text in texts:
            for m in pattern.finditer(text):
                name = (m[1] or m[2]).lower()
                if name not in out:
                    out[name] = self._lookup(name, encoders)
        return out

    def for_call(self, encoders: list, texts: list[str]) -> list:
        """Copies of the encoders that read these prompts' embeddings (gen.prompt_weights): the CLIP towers' copies
        look the embeddings' vectors up; the encoders given are left as they are."""
        from gen.prompt_weights import is_clip

        used = self.used(texts, encoders)
        if not used:
            return encoders
        pattern = self._pattern(clip_towers(encoders)[0].tokenizer)
        out, tower = [], 0
        for e in encoders:
            e = copy.copy(e)
            if is_clip(e.model):
                e.vocab = Vocab(pattern, used, tower)
                e.model = with_token_embedding(e.model, e.vocab.vectors)
                tower += 1
            out.append(e)
        return out


class Vocab:
    """One tower's view of a call's embeddings: names in a prompt -> placeholder ids, and their vectors."""

    def __init__(self, pattern: re.Pattern, used: dict[str, Embedding], tower: int):
        self.pattern, self.by_name = pattern, used
        distinct = list({id(e): e for e in used.values()}.values())
        self.ids, start = {}, 0
        for emb in distinct:
            self.ids[id(emb)] = [-(start + k + 1) for k in range(emb.count)]
            start += emb.count
        self.vectors = torch.cat([emb.vectors[tower] for emb in distinct])  # (K, D): row k is id -(k + 1)

    def tokenize(self, tokenizer, texts: list[str]) -> list[list]:
        """Each text's token ids, with each embedding as the list of its placeholder ids."""
        out = []
        for text in texts:
            ids, last = [], 0
            for m in self.pattern.finditer(text):
                ids += tokenizer(text[last:m.start()], add_special_tokens=False, verbose=False)["input_ids"]
                ids.append(self.ids[id(self.by_name[(m[1] or m[2]).lower()])])
                last = m.end()
            out.append(ids + tokenizer(text[last:], add_special_tokens=False, verbose=False)["input_ids"])
        return out


class TokenEmbedding(nn.Module):
    """A tower's token embedding that also looks up extra vectors: id -(k + 1) is row k of `extra`."""

    def __init__(self, base: nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.base, self.extra = base, extra

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(min=0))
        extra = self.extra.to(out)[(-ids - 1).clamp(0, len(self.extra) - 1)]
        return torch.where((ids >= 0)[..., None], out, extra)


def with_token_embedding(model: nn.Module, extra: torch.Tensor) -> nn.Module:
    """A copy of `model` (sharing every weight) whose token embedding also looks up `extra`; the modules on the
    path to it are copied, the model itself is left as it is."""
    base = model.get_input_embeddings()
    path = next(name for name, m in model.named_modules() if m is base).split(".")
    top = parent = copy.copy(model)
    top._modules = dict(model._modules)
    for part in path[:-1]:
        child = copy.copy(parent._modules[part])
        child._modules = dict(child._modules)
        parent._modules[part] = child
        parent = child
    parent._modules[path[-1]] = TokenEmbedding(base, extra)
    return top
