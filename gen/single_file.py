"""Single-file checkpoints (the original LDM / A1111 / SGM layout that ComfyUI, A1111 and model-sharing sites use):
reading them offline into a Pipeline's parts, and writing a Pipeline as one.

The family is recognised from the state dict's keys and shapes (`Family.recognises_file`), each component's
config is derived from tensor shapes (gen/families/ldm.py), and the weights are moved component by component:
one component's tensors are read (lazily, with safe_open), renamed, and *assigned* to a model built on the meta
device, so at no time are two copies of the weights held. What a file cannot say -- the prediction type of an
SD-2.x model, the tokenizer -- comes from gen's metadata when gen wrote the file, else from the caller.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gen import families, formulations, quant
from gen.errors import GenError
from gen.families import ldm, mmdit_file
from gen.io import PICKLE_SUFFIXES, check_safetensors, load_state_dict, write_safetensors

META = "gen"  # the header's __metadata__ key holding gen's JSON (family, prediction type, defaults, hints)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def scheduler_config(prediction_type: str) -> dict:
    """The SD-1.x/2.x/SDXL training schedule (scaled_linear betas 0.00085..0.012 over 1000 steps), as diffusers'
    single_file_utils.SCHEDULER_DEFAULT_CONFIG, for DDIM sampling."""
    return {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
            "clip_sample": False, "timestep_spacing": "leading", "prediction_type": prediction_type}


def header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, metadata) of a safetensors file, validated, no tensor read."""
    head = check_safetensors(path)
    meta = head.pop("__metadata__", None) or {}
    return {k: v["shape"] for k, v in head.items()}, meta


def is_checkpoint(keys) -> bool:
    """Whether a file's keys are a model's single-file checkpoint: a UNet's or an original-layout transformer's
    (SD3/Flux; possibly the transformer alone, with bare keys)."""
    keys = set(keys)
    return any(k.startswith(ldm.UNET) for k in keys) or any(f.recognises_file(keys, {}) for f in families.families())


def detect(path: Path, shapes: dict) -> type[families.Family]:
    """The family of a single file from its keys and shapes, or a one-line GenError saying what it is."""
    keys = set(shapes)
    for fam in families.families():
        refusal = fam.refuses_file(keys, shapes)
        if refusal:
            raise GenError(f"{path}: {refusal}")
        if fam.recognises_file(keys, shapes):
            return fam
    tops = sorted({".".join(k.split(".")[:2]) for k in keys})[:4]
    raise GenError(f"{path}: a single file of an architecture gen does not know (keys under {', '.join(tops)}); "
                   "gen reads SD-1.x, SD-2.x, SDXL, SD3/3.5 and Flux files in the original layout")


class _Source:
    """A single file's tensors, handed out one component (key prefix) at a time and then forgotten."""

    def __init__(self, path: Path, allow_pickle: bool):
        self.path, self.state, self.handle = path, None, None
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
            self.shapes = quant.fp8.visible(path, self.shapes)  # scaled fp8's scales travel with their weights
            self.handle = safe_open(str(path), framework="pt")
        else:
            raise GenError(f"{path}: unsupported single-file format {path.suffix!r}; expected .safetensors or .gguf")

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.state is not None:
            return quant.fp8.wrap({k: self.state.pop(k) for k in [k for k in self.state if k.startswith(prefix)]})
        return quant.fp8.wrap({k: self.handle.get_tensor(k) for k in self.handle.keys() if k.startswith(prefix)})


def _gen_meta(meta: dict) -> dict:
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


def _empty(factory):
    """A model built on the meta device (buffers stay real): no memory for weights, no random init."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _fill(model, state: dict, what: str):
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


def load(path: Path, tokenizer=None, prediction_type: str | None = None, allow_pickle: bool = False,
         base=None) -> dict:
    """A single file -> Pipeline keyword arguments (models, tokenizers, scheduler config, gen's settings).
    `base`: a diffusers folder supplying what an SD3/Flux file lacks (gen/families/mmdit_file.py)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise GenError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, not {prediction_type!r}")
    src = _Source(path, allow_pickle)
    family = detect(path, src.shapes)
    gm = _gen_meta(src.meta)
    if family.file_layout != "LDM":
        if prediction_type is not None:
            raise GenError(f"prediction_type is for DDPM models; a {family.title} file is rectified flow")
        try:
            return mmdit_file.load(path, src, family, tokenizer, base, gm)
        except KeyError as e:  # a weight the shapes are read from
            raise GenError(f"{path}: an incomplete {family.title} file: it has no {e.args[0]}") from None
    if base is not None:
        raise GenError(f"base is for SD3/Flux files; a {family.title} file holds every part (tokenizer: --tokenizer)")
    hints = gm.get("hints", {})
    pred = prediction_type or gm.get("prediction_type") or "epsilon"
    parts = tokenizers(path, family.file_texts, family, tokenizer, src.meta, src.shapes)
    convention = family.file_convention(pred)
    for enc, tok, prefix, kind in family.file_texts:
        cfg = ldm.text_config(src.shapes, prefix, kind, hints.get(enc, {}), family.file_penultimate, parts[tok])
        model = _empty(lambda: family.text_class(enc)(CLIPTextConfig(**cfg)))
        parts[enc] = _fill(model, ldm.to_diffusers(enc, src.take(prefix), None, prefix, kind, model), enc)
        convention["pooled_dim"] = cfg.get("projection_dim", cfg["hidden_size"])
    unet_cfg = ldm.unet_config(src.shapes, hints.get("unet", {}), convention)
    unet = _fill(_empty(lambda: family.denoiser_class().from_config(unet_cfg)),
                 ldm.to_diffusers("unet", src.take(ldm.UNET), unet_cfg), "UNet")
    vae_cfg = ldm.vae_config(src.shapes, hints.get("vae", {}), convention)
    vae = _fill(_empty(lambda: AutoencoderKL.from_config(vae_cfg)), ldm.to_diffusers("vae", src.take(ldm.VAE), vae_cfg),
                "VAE")
    sched = dict(gm.get("scheduler") or scheduler_config(pred))
    formulation = formulations.from_dict(gm["formulation"]) if "formulation" in gm else None
    if prediction_type is not None:  # the caller's word wins over what the file recorded
        sched["prediction_type"], formulation = prediction_type, None
    return dict(parts, vae=vae, denoiser=unet, scheduler_config=sched, formulation=formulation,
                defaults=gm.get("sampling"), recipe=gm.get("recipe"), family=family(), name=path.stem)


def recorded_formulation(path: Path):
    """The formulation gen recorded in a single file it wrote, else None."""
    gm = _gen_meta(header(path)[1]) if path.suffix == ".safetensors" else {}
    return formulations.from_dict(gm["formulation"]) if "formulation" in gm else None


def _json(v):
    return list(v) if isinstance(v, tuple) else v


def save(pipe, path: Path) -> None:
    """Writes `pipe` as one .safetensors file in the original layout, gen's settings and tokenizers in the header."""
    from gen.samplers import make_scheduler

    family = pipe.family
    if not getattr(family, "file_texts", None):
        raise GenError(f"a {family.title} model has no single-file layout gen writes; save a folder instead")
    if path.suffix != ".safetensors":
        raise GenError(f"a single file is written as .safetensors, not {path.name}")
    tensors, hints, meta = {}, {}, {}
    for (_, tok, _, _), text in zip(family.file_texts, pipe.texts):
        meta[f"{META}.{tok}"] = _tokenizer_files(text.tokenizer)
    if family.file_layout != "LDM":
        tensors, hints = mmdit_file.tensors(pipe)
    else:
        for (enc, tok, prefix, kind), text in zip(family.file_texts, pipe.texts):
            tensors |= ldm.to_ldm(enc, text.model, prefix, kind)
            hints[enc] = {k: _json(getattr(text.model.config, k)) for k in ldm.HIDDEN["text"]}
        for part, model in (("unet", pipe.denoiser), ("vae", pipe.vae)):
            tensors |= ldm.to_ldm(part, model)
            hints[part] = {k: _json(model.config[k]) for k in ldm.HIDDEN[part] if k in model.config}
    scheduler = make_scheduler(pipe.defaults["sampler"], pipe.formulation, pipe.scheduler_config)
    pred = getattr(pipe.formulation, "prediction_type", None)
    meta[META] = json.dumps({"family": family.name, "prediction_type": pred, "hints": hints,
                             "formulation": formulations.to_dict(pipe.formulation), "sampling": pipe.defaults,
                             "recipe": pipe.recipe, "scheduler": json.loads(scheduler.to_json_string())},
                            default=str)
    if pred:
        meta["modelspec.prediction_type"] = pred
    write_safetensors(path, tensors, meta)


def _tokenizer_files(tokenizer) -> str:
    """A tokenizer's files as JSON {name: text}, for the header (a binary sentencepiece model is left out: the fast
    tokenizer's tokenizer.json holds the same vocabulary)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for p in sorted(Path(tmp).iterdir()):
            try:
                files[p.name] = p.read_text()
            except UnicodeDecodeError:
                continue
    return json.dumps(files)


def describe(path: Path, shapes: dict, meta: dict) -> list[str]:
    """`gen info` lines for a single file: family, layout, parameters per component, gen's settings."""
    from math import prod

    family = detect(path, shapes)
    if family.file_layout != "LDM":
        return mmdit_file.describe(family, shapes)
    prefixes = {enc: prefix for enc, _, prefix, _ in family.file_texts} | {"unet": ldm.UNET, "vae": ldm.VAE}
    lines = [f"  family: {family.title}", "  layout: single file (original LDM/A1111 layout)"]
    for part, prefix in prefixes.items():
        n = sum(prod(s) for k, s in shapes.items() if k.startswith(prefix))
        lines.append(f"  {part}: {n / 1e6:.2f}M parameters ({prefix}*)")
    gm = _gen_meta(meta)
    pred = gm.get("prediction_type")
    lines.append(f"  prediction type: {pred} (written by gen)" if pred else
                 "  prediction type: not recorded (epsilon unless --prediction-type v_prediction)")
    toks = [tok for _, tok, _, _ in family.file_texts if f"{META}.{tok}" not in meta]
    lines.append("  tokenizer: in the file" if not toks else
                 "  tokenizer: none in the file (gen's bundled CLIP tokenizer; --tokenizer FOLDER overrides)")
    return lines
