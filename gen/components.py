"""Component files: a VAE or a text encoder alone, as people share them beside a checkpoint or a transformer-only
file -- ComfyUI's clip_l / clip_g / t5xxl files (transformers' own keys: `text_model.`, `text_projection`,
`encoder.`, `shared.`), the original OpenCLIP layout (`transformer.resblocks.`, under any prefix), ae.safetensors
(the LDM VAE names, bare), sdxl_vae.safetensors (diffusers' names), or a part cut out of an SD checkpoint.

A component is recognised by its keys and shapes and laid over the main file's key space (`Overlay`): its keys are
renamed into the prefix where the family's single-file reader looks for that part (`first_stage_model.`, the family's
text prefixes), replacing what the file holds there (A1111's "SD VAE"). The readers (gen/single_file.py,
gen/families/mmdit_file.py) then take it as if the checkpoint held it, configs from shapes and all; `check` says in
one line when a part does not fit the denoiser (latent channels, text widths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from gen.errors import GenError
from gen.families import ldm

# the real towers' widths, for naming a file in messages (ComfyUI's clip loader tells them apart the same way)
CLIP_NAMES = {768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "CLIP-G"}
_ENDS = {"vae": "decoder.conv_in.weight", "hf": "text_model.embeddings.token_embedding.weight",
         "openclip": "transformer.resblocks.0.attn.in_proj_weight",
         "t5": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}


@dataclass
class Component:
    """One part found in a file: `kind` "vae", "hf" / "openclip" (CLIP, by layout) or "t5"; `prefix` where its keys
    begin; `layout` "ldm" or "diffusers" for a VAE."""
    path: Path
    src: object  # gen.file_source.Source
    kind: str
    prefix: str
    layout: str = ""

    @property
    def shapes(self) -> dict:
        return ldm.strip(self.src.shapes, self.prefix)

    def width(self) -> int:
        s = self.shapes
        if self.kind == "t5":
            return s["shared.weight" if "shared.weight" in s else "encoder.embed_tokens.weight"][1]
        return s["text_model.embeddings.token_embedding.weight" if self.kind == "hf" else "token_embedding.weight"][1]

    def describe(self) -> str:
        if self.kind == "vae":
            return f"a VAE with {self.shapes['decoder.conv_in.weight'][1]} latent channels"
        if self.kind == "t5":
            return f"a T5 encoder {self.width()} wide"
        w = self.width()
        proj = "text_projection.weight" if self.kind == "hf" else "text_projection"
        return (f"a {CLIP_NAMES.get(w, 'CLIP')} text encoder {w} wide"
                f"{' with a projection' if proj in self.shapes else ''}")


def find(path: Path, src) -> list[Component]:
    """The VAEs and text towers a file holds, by keys (the prefix is whatever stands before the part's own names)."""
    out = []
    for kind, end in _ENDS.items():
        for key in src.shapes:
            if key.endswith(end):
                prefix = key[:-len(end)]
                layout = ("ldm" if any(k.startswith(prefix + "encoder.down.") for k in src.shapes) else "diffusers") \
                    if kind == "vae" else ""
                out.append(Component(path, src, kind, prefix, layout))
    return out


def recognise(path: Path, src, want: str) -> Component:
    """The one VAE ("vae") or text encoder ("text") a component file holds, or a one-line GenError saying what it is."""
    found = [c for c in find(path, src) if (c.kind == "vae") == (want == "vae")]
    if len(found) == 1:
        return found[0]
    flag = "--vae" if want == "vae" else "--text-encoder"
    if not found:
        other = find(path, src)
        what = other[0].describe() if other else "no VAE or text encoder gen recognises"
        raise GenError(f"{path}: {what}, not {'a VAE' if want == 'vae' else 'a text encoder'} ({flag})")
    raise GenError(f"{path} holds {len(found)} {'VAEs' if want == 'vae' else 'text encoders'} (a whole checkpoint?); "
                   f"{flag} takes a file of one; pass a whole checkpoint as --model")


def _vae_names(c: Component) -> dict[str, str]:
    """A VAE's keys -> the LDM names under first_stage_model.; diffusers' names through gen's writer's renaming."""
    s = c.shapes
    if c.layout == "ldm":
        return {c.prefix + k: ldm.VAE + k for k in s}
    cfg = {"block_out_channels": [0] * ldm._count(s, "encoder.down_blocks.{}.")}
    return {c.prefix + k: ldm.VAE + ldm._vae_key(k, cfg) for k in s}


class Overlay:
    """The main file's tensors with component files laid over it, read as one `_Source`: `shapes`, `meta`, `take`,
    and `kinds` (slot prefix -> the layout of the tower placed there, where it differs from the family's)."""

    def __init__(self, src, placed: list[tuple[str, Component]], kinds: dict[str, str]):
        self.src, self.meta, self.kinds, self.path = src, src.meta, kinds, src.path
        self.renamed: dict[str, tuple[object, str]] = {}  # new key -> (source, its key there)
        for slot, c in placed:
            names = _vae_names(c) if c.kind == "vae" else {c.prefix + k: slot + k for k in c.shapes}
            self.renamed |= {new: (c.src, old) for old, new in names.items()}
        covered = tuple(slot for slot, _ in placed)
        self.shapes = {k: v for k, v in src.shapes.items() if not (covered and k.startswith(covered))}
        for new, (s, old) in self.renamed.items():
            shape = list(s.shapes[old])
            self.shapes[new] = shape + [1, 1] if ".mid.attn_1." in new and len(shape) == 2 else shape

    def tensor(self, key: str):
        return self.src.tensor(key)  # the denoiser's (never overlaid)

    def take(self, prefix: str) -> dict:
        return self.take_keys([k for k in self.shapes if k.startswith(prefix)])

    def take_keys(self, keys: list[str]) -> dict:
        out = self.src.take_keys([k for k in keys if k not in self.renamed])
        for new in (k for k in keys if k in self.renamed):
            s, old = self.renamed[new]
            v = s.take_keys([old])[old]
            out[new] = v[..., None, None] if ".mid.attn_1." in new and v.ndim == 2 else v
        return out


def overlay(src, family, vae=None, text_encoders=(), allow_pickle: bool = False):
    """`src` with the given VAE file and text encoder files placed where `family` reads them: a T5 into the T5 slot,
    a CLIP into the first CLIP slot its width names (CLIP-L / CLIP-G / H by the real towers' widths) or, for widths
    no released tower has, the first CLIP slot the main file leaves empty, then the next. Returns (source, {slot
    folder: the file placed there})."""
    from gen.file_source import Source

    if vae is None and not text_encoders:
        return src, {}
    placed, kinds, given = [], {}, {}
    if vae is not None:
        c = recognise(Path(vae), Source(Path(vae), allow_pickle), "vae")
        placed.append((ldm.VAE, c))
        given["vae"] = c
    roles = getattr(family, "file_roles", {})
    slots = [t for t in family.file_texts if not any(k.startswith(t[2]) for k in src.shapes)]
    slots += [t for t in family.file_texts if t not in slots]  # then those the file fills (replaced)
    for f in text_encoders:
        c = recognise(Path(f), Source(Path(f), allow_pickle), "text")
        name = "T5" if c.kind == "t5" else CLIP_NAMES.get(c.width())
        fits = [t for t in slots if (t[3] == "t5") == (c.kind == "t5") and t[0] not in given
                and (name is None or roles.get(t[0]) in (None, name))]
        if not fits:
            takes = ", ".join(roles.get(t[0], t[0]) for t in family.file_texts) or "no text encoder"
            raise GenError(f"{f}: {c.describe()}; a {family.title} model takes {takes}, "
                           f"{'and has that slot filled already' if name in roles.values() else 'not this'}")
        enc, _, prefix, kind = fits[0]
        placed.append((prefix, c))
        given[enc] = c
        if c.kind != kind:  # a CLIP in transformers' layout where the family's file holds OpenCLIP's, or back
            kinds[prefix] = c.kind
    return Overlay(src, placed, kinds), given


def check(family, denoiser, vae, given: dict) -> None:
    """One line when a given component file does not fit the denoiser: the VAE's latent channels, a text encoder's
    width where the family's denoiser fixes it (`Family.file_text_widths`)."""
    family = family() if isinstance(family, type) else family
    if "vae" in given:
        want = family.latent_shape(denoiser, 1, 1, 1)[1]
        if vae.config.latent_channels != want:
            raise GenError(f"{given['vae'].path}: {given['vae'].describe()}; this {family.title} model's latents "
                           f"have {want} channels: pass its own VAE file")
    widths = family.file_text_widths(SimpleNamespace(**dict(denoiser.config)))
    for enc, c in given.items():
        if enc in widths and widths[enc] is not None and c.width() != widths[enc]:
            role = getattr(family, "file_roles", {}).get(enc, enc)
            raise GenError(f"{c.path}: {c.describe()}; this {family.title} model takes a {role} "
                           f"{widths[enc]} wide there")


def lacking_hint(family, lacking: list[str], flags: bool = True) -> str:
    """The component files that supply `lacking` parts, as flags ('--text-encoder t5xxl.safetensors --vae
    ae.safetensors') or, `flags=False`, in words ('a T5 encoder and a VAE')."""
    roles = getattr(family, "file_roles", {})
    files = {"CLIP-L": "clip_l.safetensors", "CLIP-G": "clip_g.safetensors", "OpenCLIP-H": "clip_h.safetensors",
             "T5": "t5xxl.safetensors"}
    said = []
    for part in lacking:
        role = "VAE" if part == "vae" else roles.get(part, "CLIP")
        if flags:
            said.append(f"--vae {getattr(family, 'file_vae', 'vae.safetensors')}" if part == "vae" else
                        f"--text-encoder {files.get(role, 'FILE')}")
        else:
            said.append(f"a {role}" + ("" if part == "vae" else " encoder"))
    return " ".join(said) if flags else " and ".join(said)


def slot_kind(src, prefix: str, kind: str) -> str:
    """The layout of the tower at `prefix` in a (possibly overlaid) source."""
    return getattr(src, "kinds", {}).get(prefix, kind)


def ema_key(key: str) -> str:
    """An LDM UNet key's EMA twin, as CompVis' LitEma names it (dots dropped): model.diffusion_model.input_blocks.0.0
    .weight -> model_ema.diffusion_modelinput_blocks00weight (diffusers' convert_ldm_unet_checkpoint extract_ema)."""
    return "model_ema." + "".join(key.split(".")[1:])


def has_ema(keys) -> bool:
    return any(re.match(r"model_ema\.diffusion_model", k) for k in keys)
