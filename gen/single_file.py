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
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from gen import components, families, formulations
from gen.errors import GenError
from gen.families import ldm, mmdit_file
from gen.file_source import META, Source, empty, fill, gen_meta, header, tokenizers
from gen.io import load_model, read_json, write_safetensors

log = logging.getLogger(__name__)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def scheduler_config(prediction_type: str) -> dict:
    """The SD-1.x/2.x/SDXL training schedule (scaled_linear betas 0.00085..0.012 over 1000 steps), as diffusers'
    single_file_utils.SCHEDULER_DEFAULT_CONFIG, for DDIM sampling."""
    return {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
            "clip_sample": False, "timestep_spacing": "leading", "prediction_type": prediction_type}


def is_checkpoint(keys) -> bool:
    """Whether a file's keys are a model's single-file checkpoint: a UNet's or an original-layout transformer's
    (SD3/Flux; possibly the transformer alone, with bare keys)."""
    keys = set(ldm.as_ldm(dict.fromkeys(keys)))
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


def _unet(path: Path, src, ema: bool) -> dict[str, torch.Tensor]:
    """The UNet's tensors: its EMA twins (`model_ema.*`) with `ema`, else the trained weights (A1111's default)."""
    keys = [k for k in src.shapes if k.startswith(ldm.UNET)]
    if not ema:
        if components.has_ema(src.shapes):
            log.info("%s also holds EMA weights (model_ema.*); --ema (ema=True) samples with them", path.name)
        return src.take_keys(keys)
    twins = [components.ema_key(k) for k in keys]
    missing = [k for k in twins if k not in src.shapes]
    if len(missing) == len(twins):
        raise GenError(f"{path} holds no EMA weights (model_ema.*): leave out --ema")
    if missing:
        raise GenError(f"{path}: its EMA weights lack {len(missing)} of the UNet's, e.g. {missing[0]}; "
                       "leave out --ema")
    return dict(zip(keys, src.take_keys(twins).values()))


def guess_prediction(family, src, gm: dict) -> tuple[str, str]:
    """(prediction type, where it comes from) of an LDM file: gen's metadata, the modelspec.prediction_type
    header, a `v_pred` marker key (as ComfyUI reads it), else the family's guess from the weights, else epsilon."""
    if gm.get("prediction_type"):
        return gm["prediction_type"], "written by gen"
    spec = src.meta.get("modelspec.prediction_type")
    if spec in PREDICTION_TYPES:
        return spec, "the file's modelspec.prediction_type"
    if "v_pred" in src.shapes:
        return "v_prediction", "the file's v_pred key"
    guess = family.file_prediction(src)
    return guess or ("epsilon", "the default; --prediction-type v_prediction if the model is one")


def load(path: Path, tokenizer=None, prediction_type: str | None = None, allow_pickle: bool = False,
         base=None, vae=None, text_encoders=(), ema: bool = False) -> dict:
    """A single file -> Pipeline keyword arguments (models, tokenizers, scheduler config, gen's settings).
    `base`: a diffusers folder supplying what an SD3/Flux file lacks (gen/families/mmdit_file.py); `vae`,
    `text_encoders`: component files placed over the file's own parts or filling those it lacks
    (gen/components.py); `ema`: an LDM file's EMA UNet weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise GenError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, not {prediction_type!r}")
    src = Source(path, allow_pickle)
    family = detect(path, src.shapes)
    gm = gen_meta(src.meta)
    src, given = components.overlay(src, family, vae, text_encoders, allow_pickle)
    if family.file_layout != "LDM":
        if prediction_type is not None or ema:
            raise GenError(f"{'--ema' if ema else 'prediction_type'} is for LDM (SD/SDXL) files; a {family.title} "
                           "file is rectified flow with no EMA copy")
        try:
            parts = mmdit_file.load(path, src, family, tokenizer, base, gm)
        except KeyError as e:  # a weight the shapes are read from
            raise GenError(f"{path}: an incomplete {family.title} file: it has no {e.args[0]}") from None
        components.check(family, parts["denoiser"], parts["vae"], given)
        return parts
    base = mmdit_file.base_folder(base)
    lacking, _ = mmdit_file.missing_parts(family, set(src.shapes), base)
    if lacking and base is None:
        raise GenError(mmdit_file.missing_message(path, family, lacking, []))
    if base is not None and not lacking:
        raise GenError(f"base is for a file that lacks parts; {path} holds every part (tokenizer: --tokenizer)")
    hints = gm.get("hints", {})
    pred = prediction_type or _base_prediction(base, gm) or guess_prediction(family, src, gm)[0]
    parts = tokenizers(path, family.file_texts, family, tokenizer or base, src.meta, src.shapes)
    convention = family.file_convention(pred)
    for enc, tok, prefix, kind in family.file_texts:
        if enc in lacking:  # from the base folder
            parts[enc] = load_model(family.text_class(enc), base / enc)
            cfg = {"hidden_size": parts[enc].config.hidden_size} | (
                {"projection_dim": parts[enc].config.projection_dim} if hasattr(parts[enc], "text_projection") else {})
        else:
            placed = components.slot_kind(src, prefix, kind)  # an OpenCLIP tower in transformers' names: gelu
            h = ({"hidden_act": "gelu"} if (kind, placed) == ("openclip", "hf") else {}) | hints.get(enc, {})
            cfg = ldm.text_config(src.shapes, prefix, placed, h, family.file_penultimate, parts[tok])
            model = empty(lambda: family.text_class(enc)(CLIPTextConfig(**cfg)))
            parts[enc] = fill(model, ldm.to_diffusers(enc, src.take(prefix), None, prefix, placed, model), enc)
        convention["pooled_dim"] = cfg.get("projection_dim", cfg["hidden_size"])
    unet_cfg = ldm.unet_config(src.shapes, mmdit_file.base_config(base, "unet") | hints.get("unet", {}), convention)
    unet = fill(empty(lambda: family.denoiser_class().from_config(unet_cfg)),
                 ldm.to_diffusers("unet", _unet(path, src, ema), unet_cfg), "UNet")
    if "vae" in lacking:
        vae = load_model(AutoencoderKL, base / "vae")
    else:
        vae_cfg = ldm.vae_config(src.shapes, hints.get("vae", {}), convention)
        vae = fill(empty(lambda: AutoencoderKL.from_config(vae_cfg)),
                   ldm.to_diffusers("vae", src.take(ldm.VAE), vae_cfg), "VAE")
    components.check(family, unet, vae, given)
    sched = dict(gm.get("scheduler") or scheduler_config(pred))
    formulation = formulations.from_dict(gm["formulation"]) if "formulation" in gm else None
    if prediction_type is not None:  # the caller's word wins over what the file recorded
        sched["prediction_type"], formulation = prediction_type, None
    return dict(parts, vae=vae, denoiser=unet, scheduler_config=sched, formulation=formulation,
                defaults=gm.get("sampling"), recipe=gm.get("recipe"), family=family(), name=path.stem)


def _base_prediction(base: Path | None, gm: dict) -> str | None:
    """The prediction type of the base folder's scheduler, for a UNet-only file that records none."""
    if base is None or gm.get("prediction_type") or not (base / "scheduler" / "scheduler_config.json").is_file():
        return None
    return read_json(base / "scheduler" / "scheduler_config.json").get("prediction_type")


def recorded_formulation(path: Path):
    """The formulation a single file samples with: the one gen recorded in it; else its family's schedule's (an
    SD/SDXL file: with the prediction type it states or `guess_prediction` guesses; SD3/Flux: `file_scheduler` of
    the transformer's shapes); None where the shapes cannot tell (a GGUF, a Flux file of unusual head width)."""
    if path.suffix != ".safetensors":
        return None
    shapes, meta = header(path)
    shapes, gm = ldm.as_ldm(shapes), gen_meta(meta)
    if "formulation" in gm:
        return formulations.from_dict(gm["formulation"])
    family = detect(path, shapes)
    if family.file_layout != "LDM":
        try:
            config = family.transformer_config(ldm.strip(shapes, mmdit_file.transformer_prefix(shapes)), {})
        except GenError:
            return None
        return formulations.from_scheduler_config(family.file_scheduler(config))
    return formulations.from_scheduler_config(scheduler_config(guess_prediction(family, _lazy(path, shapes, meta),
                                                                                gm)[0]))


def _lazy(path: Path, shapes: dict, meta: dict):
    """A file's header as a source for `guess_prediction` (a tensor read only when asked for)."""
    return SimpleNamespace(shapes=shapes, meta=meta, tensor=lambda k: Source(path, False).tensor(k))


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

    layout = "original LDM/A1111 layout"
    if ldm.unet_names(shapes):  # a UNet-only file without the prefix
        layout = "bare LDM UNet keys" if "input_blocks.0.0.weight" in shapes else "diffusers' UNet layout"
    shapes = ldm.as_ldm(shapes)
    family = detect(path, shapes)
    if family.file_layout != "LDM":
        return mmdit_file.describe(path, family, shapes)
    prefixes = {enc: prefix for enc, _, prefix, _ in family.file_texts} | {"unet": ldm.UNET, "vae": ldm.VAE}
    lines = [f"  family: {family.title}", f"  layout: single file ({layout})"]
    for part, prefix in prefixes.items():
        n = sum(prod(s) for k, s in shapes.items() if k.startswith(prefix))
        lines.append(f"  {part}: {n / 1e6:.2f}M parameters ({prefix}*)" if n else f"  {part}: not in the file")
    lacking, _ = mmdit_file.missing_parts(family, set(shapes), None)
    if lacking:
        lines.append(f"  missing: {mmdit_file.missing_message(path, family, lacking, [])}")
    pred, why = guess_prediction(family, _lazy(path, shapes, meta), gen_meta(meta))
    lines.append(f"  prediction type: {pred} ({why})")
    if shapes.get(f"{ldm.UNET}input_blocks.0.0.weight", [0, 0])[1] == 9:
        lines.append("  inpainting (9-channel UNet input)")
    lines.append("  EMA: model_ema.* present (non-EMA weights by default; --ema uses them)"
                 if components.has_ema(shapes) else "  EMA: none")
    toks = [tok for _, tok, _, _ in family.file_texts if f"{META}.{tok}" not in meta]
    lines.append("  tokenizer: in the file" if not toks else
                 "  tokenizer: none in the file (gen's bundled CLIP tokenizer; --tokenizer FOLDER overrides)")
    return lines
