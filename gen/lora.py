"""LoRA adapters in a Pipeline: load-check, compose, fuse/unfuse, unload, save; peft target presets.

A LoRA on layer W adds `weight * (alpha / rank) * B @ A`. The adapters are peft LoRA layers, injected exactly
as diffusers' `load_lora_weights` does, so the same file gives the same images here and in diffusers. The
file layouts (diffusers/peft and kohya/A1111) live in gen/lora_formats.py.

Components are named "denoiser" (the UNet or DiT; "unet" or "transformer" in diffusers files) and by the
family's text encoder folders ("text_encoder"; SDXL adds "text_encoder_2"). Which kohya prefixes, diffusers
prefixes and ss_base_model_version a model's LoRA files use is its family's (gen/families) to say.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from gen.errors import GenError
from gen import families, lycoris
from gen.lora_formats import (DENOISER, FORMATS, KOHYA_T5, KOHYA_UNET, PEFT_WRAPPER, TEXT, Factor, LoraFile,
                              check_kohya, config_fields, flat, is_lora, is_text, neutral, read, write)
from gen.lora_info import base_of, describe

__all__ = ["FORMATS", "TEXT_TARGETS", "Adapters", "describe", "extract", "is_lora", "lora_config", "read",
           "remove_adapters", "save_lora", "target_modules"]

MAX_LISTED = 5

# peft target presets, as regular expressions over module names: attention projections and feed-forward layers.
# A CLIP text encoder's; each family declares its denoiser's (Family.lora_targets).
TEXT_TARGETS = {"attn": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)", "ff": r"mlp\.(fc1|fc2)"}


def target_modules(presets: dict[str, str], parts: tuple[str, ...] | str = ("attn",)) -> str:
    """peft `target_modules` (a regex matched against whole module names) for a model's presets (TEXT_TARGETS,
    a family's lora_targets); parts from ("attn", "ff"), or a string "attn" / "attn+ff"."""
    parts = tuple(parts.split("+")) if isinstance(parts, str) else tuple(parts)
    if not parts or not set(parts) <= set(presets):
        raise GenError(f"no LoRA target preset {'+'.join(parts)!r}; parts: {', '.join(presets)}, "
                       f"{'+'.join(presets)}")
    return rf"(.*\.)?({'|'.join(presets[p] for p in parts)})"


def lora_config(presets: dict[str, str], rank: int, alpha: float | None = None, parts: tuple[str, ...] | str = ("attn",),
                dropout: float = 0.0, use_dora: bool = False, algo: str = "lora", **kwargs):
    """A peft LoraConfig for training; alpha defaults to rank (scale 1). B starts at zero (peft's default),
    so a fresh adapter changes nothing. algo loha / lokr: peft's LoHaConfig / LoKrConfig instead (gen/lycoris.py)."""
    from peft import LoraConfig

    if algo != "lora":
        if dropout or use_dora or kwargs:
            raise GenError(f"LoRA dropout and DoRA are LoRA's; a {algo} adapter trains without them")
        return lycoris.adapter_config(algo, target_modules(presets, parts), rank, alpha)

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, use_dora=use_dora,
                      target_modules=target_modules(presets, parts), init_lora_weights="gaussian", **kwargs)


# ---- matching a LoRA against models -----------------------------------------------------------------------
def adaptable_layers(model: nn.Module, component: str) -> dict[str, nn.Module]:
    """Layer name (text encoder: without `text_model.`) -> the Linear/Conv2d a LoRA can adapt (peft-wrapped
    layers by their base layer). Names are relative to the model, with any PeftModel wrapper removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, wrapped = {}, []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(m, BaseTunerLayer):
            wrapped.append(name)
            m = m.get_base_layer()
        elif not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        name = name.removeprefix(PEFT_WRAPPER)
        out[neutral(name) if is_text(component) else name] = m
    return out


def _shape_problem(f: Factor, layer: nn.Module) -> str | None:
    """Fits `f` to `layer` (1x1 conv <-> linear reshapes, as kohya tools do); a description if it cannot fit."""
    conv = isinstance(layer, nn.Conv2d)
    cin, cout = (layer.in_channels, layer.out_channels) if conv else (layer.in_features, layer.out_features)
    if conv and layer.kernel_size == (1, 1) and f.down.ndim == 2:
        f.down, f.up = f.down[..., None, None], f.up[..., None, None]
    elif not conv and f.down.ndim == 4 and f.down.shape[2:] == (1, 1) and f.up.shape[2:] == (1, 1):
        f.down, f.up = f.down.flatten(1), f.up.flatten(1)
    want_down = (f.rank, cin, *layer.kernel_size) if conv else (f.rank, cin)
    want_up = (cout, f.rank, 1, 1) if conv else (cout, f.rank)
    fits = tuple(f.down.shape) == want_down and tuple(f.up.shape) == want_up and not (conv and layer.groups != 1)
    if not fits:
        return (f"down {tuple(f.down.shape)} / up {tuple(f.up.shape)} but the layer is "
                f"{type(layer).__name__}({cin} -> {cout})")
    if f.magnitude is not None and f.magnitude.numel() != cout:
        return f"DoRA magnitude of {f.magnitude.numel()} values but the layer has {cout} output channels"
    return None


def file_prefixes(family: families.Family, layout: str) -> dict[str, str]:
    """Component -> the key prefix this family's LoRA files use in this layout."""
    if layout == "kohya":
        return {DENOISER: KOHYA_UNET, **family.kohya_text}
    return {DENOISER: family.denoiser_part, **{enc: enc for enc, _ in family.text_parts}}


def _family_mismatch(lora: LoraFile, family: families.Family, source: str) -> str | None:
    """A one-line message when the file is recognisably for another model family than `family`."""
    texts = {c: (p if lora.layout == "kohya" else None) for c, p in lora.prefixes.items() if is_text(c)}
    theirs = families.lora_families(texts, lora.metadata, lora.factors.get(DENOISER, ()))
    if not theirs or type(family) in theirs:
        return None
    mine = file_prefixes(family, lora.layout)
    why = [f"{lora.prefixes[c]} ({c})" for c in texts if lora.prefixes[c] not in mine.values()]
    return (f"{source} is a LoRA for {' or '.join(f.title for f in theirs)}, not for this {family.title} model"
            + (f" (its {', '.join(why)} layers have no counterpart here)" if why else "")
            + f"; load it with a {theirs[0].title} model (recorded base: {base_of(lora.metadata)})")


def match(lora: LoraFile, models: dict[str, nn.Module], family: families.Family,
          source: str = "LoRA") -> dict[str, dict[str, Factor]]:
    """Maps every LoRA layer onto a model layer, or raises GenError with the counts and the first misses.

    models: component -> model; family: the model's family (its LoRA key prefixes).
    Returns component -> {model layer name (as peft sees it) -> Factor}."""
    prefixes = file_prefixes(family, lora.layout)
    by_prefix = {p: c for c, p in prefixes.items()} if lora.layout == "kohya" else {}
    matched: dict[str, dict[str, Factor]] = {}
    unmatched, bad, no_t5 = [], [], 0
    for file_comp, factors in lora.factors.items():
        prefix = lora.prefixes.get(file_comp, "")
        comp = by_prefix.get(prefix, file_comp)  # kohya's lora_te3_ (T5) is SD3's text_encoder_3, Flux's _2
        model = models.get(comp)
        if model is None and prefix == KOHYA_T5:
            no_t5 = len(factors)
        layers = adaptable_layers(model, comp) if model is not None else {}
        if comp == DENOISER and model is not None:  # SD3/Flux files may name the original layout's layers
            factors = family.lora_from_file(factors, lora.layout == "kohya", model)
        names = {(flat(comp, n, prefix) if lora.layout == "kohya" else n): n for n in layers}
        if lora.layout == "kohya" and is_text(comp):  # also CLIP names without text_model_: what sd-scripts writes
            names = {n.replace(".", "_"): n for n in layers} | names  # under transformers 5's CLIPTextModel
        if prefix not in ("", prefixes.get(comp)):
            names = {}  # a transformer LoRA on a UNet, an SD lora_te_ on SDXL's lora_te1_: nothing can match
        real = "text_model." if is_text(comp) and hasattr(model, "text_model") else ""  # the name peft sees
        for name, f in factors.items():
            layer_name = names.get(name)
            if layer_name is None:
                unmatched.append(_display(lora, file_comp, name))
                continue
            layer = layers[layer_name]
            problem = (lycoris.shape_problem(f, layer) if isinstance(f, lycoris.LycorisFactor)
                       else _shape_problem(f, layer))
            if problem:
                bad.append(f"{_display(lora, file_comp, name)}: {problem}")
            matched.setdefault(comp, {})[real + layer_name] = f
    total = lora.count()
    if unmatched or bad:
        other = _family_mismatch(lora, family, source)
        if other:
            raise GenError(other)
    if no_t5:
        raise GenError(f"{source} adapts {no_t5} layers of a T5 encoder ({KOHYA_T5}), which this {family.title} "
                       "model has none of; load the model with its T5 encoder")
    if unmatched:
        n = total - len(unmatched)
        what = "none" if n == 0 else f"only {n}"
        raise GenError(f"{source} matches {what} of its {total} layers in this model ({len(unmatched)} unmatched, "
                       f"e.g. {', '.join(unmatched[:MAX_LISTED])}); it was made for another model "
                       f"(recorded base: {base_of(lora.metadata)})")
    if bad:
        raise GenError(f"{source} was made for a model of other shapes: {len(bad)} of {total} layers differ, "
                       f"e.g. {bad[0]}")
    return matched


def _display(lora: LoraFile, comp: str, name: str) -> str:
    prefix = lora.prefixes.get(comp)
    if lora.layout == "kohya":
        return prefix + name
    return f"{prefix}.{name}" if prefix else name


# ---- peft adapters in models ------------------------------------------------------------------------------
def inject(model: nn.Module, factors: dict[str, Factor], adapter_name: str) -> None:
    """Adds `factors` ({layer name as in the model: Factor}) to `model` as peft adapter `adapter_name`,
    as diffusers' load_lora_adapter does: inject_adapter_in_model, then set_peft_model_state_dict."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if any(isinstance(f, lycoris.LycorisFactor) for f in factors.values()):
        return lycoris.inject(model, factors, adapter_name)
    config = LoraConfig(**config_fields(factors, anchor="^"))
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    state = {}
    for name, f in factors.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = f.down, f.up
        if f.magnitude is not None:  # DoRA: shaped as this peft version keeps it
            shape = model.get_submodule(name).lora_magnitude_vector[adapter_name].weight.shape
            state[f"{name}.lora_magnitude_vector"] = f.magnitude.reshape(shape)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missed = [k for k in (*result.unexpected_keys, *result.missing_keys) if f".{adapter_name}." in k]
    if [k for k in result.unexpected_keys if "lora_" in k] or missed:
        raise GenError(f"LoRA weights did not load into {type(model).__name__}: {', '.join(missed[:MAX_LISTED])}")


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _adapters(layer: nn.Module) -> set[str]:
    """The adapters a peft layer holds (LoRA or LyCORIS)."""
    return set(layer.lora_A) if hasattr(layer, "lora_A") else set(layer._available_adapters)


def _replace_with_base(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer.get_base_layer())


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes one adapter from `model`; layers left with none go back to their plain base layer."""
    for name, m in _tuner_layers(model):
        if adapter_name in _adapters(m):
            m.delete_adapter(adapter_name)
        if not _adapters(m):
            _replace_with_base(model, name, m)
    getattr(model, "peft_config", {}).pop(adapter_name, None)


def remove_adapters(model: nn.Module) -> None:
    """Removes every adapter layer from `model` (fused weights stay fused, as in diffusers)."""
    for name, m in _tuner_layers(model):
        _replace_with_base(model, name, m)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):  # diffusers' and transformers' own bookkeeping
        model._hf_peft_config_loaded = False


def activate(model: nn.Module, names: list[str], weights: list[float]) -> None:
    """Makes `names` the active adapters with these weights: each layer computes base + sum over adapters of
    weight * alpha / rank * B @ A (diffusers' set_weights_and_activate_adapters)."""
    for _, m in _tuner_layers(model):
        m.set_adapter(names)
        for name, w in zip(names, weights):
            m.set_scale(name, w)
        m.requires_grad_(False)


class Adapters:
    """The LoRA adapters of one Pipeline: loaded names with weights, the active ones, and the fused state."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.weights: dict[str, float] = {}  # every loaded adapter -> its weight
        self.active: list[str] = []
        self.metadata: dict[str, dict] = {}
        self._backup: dict | None = None  # layer -> its base weight before fuse_lora, for an exact unfuse

    @staticmethod
    def of(pipe) -> "Adapters":
        if "_loras" not in pipe.__dict__:
            pipe._loras = Adapters(pipe)
        return pipe._loras

    @property
    def models(self) -> dict[str, nn.Module]:
        return {DENOISER: self.pipe.denoiser, **self.pipe.text_parts}

    def _unfused(self, what: str) -> None:
        if self._backup is not None:
            raise GenError(f"{what} is not possible while a LoRA is fused; call unfuse_lora() first")

    def _name(self, adapter_name: str | None, path: Path) -> str:
        if adapter_name is not None:
            if not isinstance(adapter_name, str) or not re.fullmatch(r"[\w-]+", adapter_name):
                raise GenError(f"adapter_name must be letters, digits, '_' or '-', not {adapter_name!r}")
            if adapter_name in self.weights:
                raise GenError(f"an adapter named {adapter_name!r} is already loaded; pick another adapter_name")
            return adapter_name
        base = re.sub(r"[^\w-]", "_", path.stem) or "lora"
        name, k = base, 2
        while name in self.weights:
            name, k = f"{base}_{k}", k + 1
        return name

    def load(self, path: str | Path, scale: float = 1.0, adapter_name: str | None = None,
             allow_pickle: bool = False) -> str:
        self._unfused("load_lora")
        _check_weight(scale)
        path = Path(path)
        name = self._name(adapter_name, path)
        lora = read(path, allow_pickle=allow_pickle)
        matched = match(lora, self.models, self.pipe.family, source=str(path))  # raises before anything changes
        try:
            for comp, factors in matched.items():
                inject(self.models[comp], factors, name)
        except Exception:
            for model in self.models.values():
                delete_adapter(model, name)
            self._apply()
            raise
        self.weights[name], self.metadata[name] = float(scale), lora.metadata
        self.active.append(name)
        self._apply()
        return name

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        self._unfused("set_adapters")
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.weights]
        if unknown:
            raise GenError(f"no LoRA adapter named {', '.join(map(repr, unknown))}; loaded: "
                           f"{', '.join(self.weights) or 'none'}")
        if weights is None or isinstance(weights, (int, float)):
            weights = [1.0 if weights is None else weights] * len(names)
        if len(weights) != len(names):
            raise GenError(f"set_adapters got {len(names)} names but {len(weights)} weights")
        for n, w in zip(names, weights):
            _check_weight(w)
            self.weights[n] = float(w)
        self.active = names
        self._apply()

    def _apply(self) -> None:
        for model in self.models.values():
            activate(model, self.active, [self.weights[n] for n in self.active])

    def fuse(self) -> None:
        """Merges the active adapters, at their weights, into the base weights; keeps the base weights (on the
        CPU) so that unfuse restores them bit for bit."""
        self._unfused("fuse_lora")
        if not self.active:
            raise GenError("no active LoRA to fuse; load_lora() first")
        from gen import quant

        quant.refuse(self.models.values(), "fuse_lora")
        backup = {}
        for model in self.models.values():
            for _, m in _tuner_layers(model):
                names = [n for n in self.active if n in _adapters(m)]
                if names:
                    backup[m] = m.get_base_layer().weight.detach().to("cpu", copy=True)
                    m.merge(adapter_names=names)
        self._backup = backup

    def unfuse(self) -> None:
        if self._backup is None:
            raise GenError("no LoRA is fused; nothing to unfuse")
        with torch.no_grad():
            for m, weight in self._backup.items():
                m.unmerge()
                m.get_base_layer().weight.copy_(weight)
        self._backup = None

    def unload(self) -> None:
        """Removes every adapter; weights fused by fuse_lora stay fused (diffusers' unload_lora_weights)."""
        for model in self.models.values():
            remove_adapters(model)
        self.weights, self.active, self.metadata, self._backup = {}, [], {}, None

    def save(self, path: str | Path, adapter_name: str | None = None, format: str = "diffusers") -> Path:
        if adapter_name is None:
            if len(self.weights) != 1:
                raise GenError(f"{len(self.weights)} LoRA adapters are loaded; say which to save (adapter_name)")
            adapter_name = next(iter(self.weights))
        meta = self.metadata.get(adapter_name, {})
        recipe = json.loads(meta["gen.recipe"]) if meta.get("gen.recipe") else None
        return save_lora(path, self.pipe.denoiser, self.pipe.text_parts, adapter_name, format=format,
                         recipe=recipe, base_model=meta.get("gen.base_model") or self.pipe.name,
                         formulation=self.pipe.formulation, family=self.pipe.family)


def _check_weight(w) -> None:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise GenError(f"a LoRA weight must be a finite number, not {w!r}")


# ---- writing files ----------------------------------------------------------------------------------------
def extract(model: nn.Module, component: str, adapter_name: str = "default") -> dict[str, Factor]:
    """The adapter's layers in a peft-injected model (plain or wrapped in a PeftModel), alpha as stored."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if lycoris.is_layer(m) and (f := lycoris.extract_layer(m, adapter_name)) is not None:
            name = name.removeprefix(PEFT_WRAPPER)
            out[neutral(name) if is_text(component) else name] = f
            continue
        if not isinstance(m, LoraLayer) or adapter_name not in m.lora_A:
            continue
        r, alpha = m.r[adapter_name], float(m.lora_alpha[adapter_name])
        if m.use_rslora.get(adapter_name):  # rsLoRA scales by alpha / sqrt(r): store the equivalent alpha
            alpha *= math.sqrt(r)
        magnitude = m.lora_magnitude_vector[adapter_name].weight.detach() if m.use_dora.get(adapter_name) else None
        name = name.removeprefix(PEFT_WRAPPER)
        out[neutral(name) if is_text(component) else name] = Factor(
            m.lora_A[adapter_name].weight.detach(), m.lora_B[adapter_name].weight.detach(), alpha, magnitude)
    return out


def save_lora(path: str | Path, denoiser: nn.Module, text_encoder: nn.Module | dict[str, nn.Module] | None = None,
              adapter_name: str = "default", format: str = "diffusers", recipe: dict | None = None,
              base_model: str | None = None, dtype: torch.dtype | None = None, formulation=None,
              family: families.Family | None = None) -> Path:
    """Writes adapter `adapter_name` of peft-injected models as one .safetensors LoRA file.

    Args:
        denoiser: the UNet or DiT, with peft LoRA layers (inject_adapter_in_model, add_adapter or get_peft_model).
        text_encoder: the CLIP text encoder, or {text encoder folder: model} (SDXL: text_encoder and
            text_encoder_2), those with LoRA layers written too.
        format: "diffusers" (keys `unet.<layer>.lora_A.weight`, what diffusers' load_lora_weights reads; rank,
            alpha and per-layer patterns in the `lora_adapter_metadata` header) or "kohya" (`lora_unet_*` /
            `lora_te_*` with `lora_down`/`lora_up`/`alpha` tensors and `ss_*` header, for A1111 and ComfyUI).
        recipe: the training recipe, stored as JSON in the `gen.recipe` header field.
        base_model: the base model's name or path, stored in `gen.base_model`.
        dtype: cast the LoRA matrices (e.g. torch.float16); default: as trained.
        formulation: the base model's objective (gen.formulations), for kohya's ss_base_model_version
            (sd_v2 or sd_v2_v, ...); None: epsilon prediction.
        family: the model's family (gen.families), which names the files' keys and kohya's base version;
            default: recognised from the models.
    """
    texts = text_encoder if isinstance(text_encoder, dict) else {TEXT: text_encoder} if text_encoder else {}
    factors = {c: f for c, m in ((DENOISER, denoiser), *texts.items())
               if m is not None and (f := extract(m, c, adapter_name))}
    if not factors:
        raise GenError(f"these models have no LoRA adapter named {adapter_name!r}")
    family = family or families.detect_models(denoiser, list(texts.values()))
    if format == "kohya" and DENOISER in factors:  # SD3/Flux: kohya files name the original layout's layers
        check_kohya(factors)
        factors[DENOISER] = family.lora_to_file(factors[DENOISER], denoiser)
    return write(path, factors, format, denoiser_prefix=family.denoiser_part,
                 base_version=family.kohya_version(denoiser, formulation), recipe=recipe, base_model=base_model,
                 dtype=dtype, text_prefixes=family.kohya_text, family=family.name)
