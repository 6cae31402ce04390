"""LoRA files: the diffusers/peft and kohya/A1111 key layouts, read into one in-memory form and written back.

A LoRA on layer W adds `weight * (alpha / rank) * B @ A`; the files differ only in naming:

    diffusers  unet.<layer>.lora_A.weight / .lora_B.weight (also `transformer.`, `text_encoder.text_model.`,
               SDXL's `text_encoder_2.text_model.`);
               rank from the shapes, alpha in the `lora_adapter_metadata` header (a peft LoraConfig as JSON,
               with per-layer rank_pattern / alpha_pattern), absent = alpha equals rank.
               DoRA adds <layer>.lora_magnitude_vector.
               Read also in the older spellings diffusers' loaders still read (see DIFFUSERS_PARTS): what its
               training scripts write through convert_state_dict_to_diffusers (UNet `<layer>.lora.down.weight`,
               CLIP `<layer>.lora_linear_layer.down.weight`) and the attention-processor files its scripts
               wrote up to 0.21 (`<attn>.processor.to_q_lora.down.weight`). A folder reads as the weights in it.
    peft       the same with `base_model.model.` in front, or bare layer names (one model's adapter),
               alpha in an adapter_config.json beside the file.
    kohya      lora_unet_<layer with dots as underscores>.lora_down.weight / .lora_up.weight / .alpha
               (text encoders: the family's kohya_text prefix, lora_te_text_model_... for SD, lora_te1_/lora_te2_
               for SDXL as sd-scripts' networks/lora.py names them), `ss_*` header fields; A1111, ComfyUI and
               diffusers read it. LyCORIS' LoHa and LoKr use the same names with their own tensors
               (.hada_w1_a ... / .lokr_w1 ...; gen/lycoris.py), read as LycorisFactor layers; its DoRA adds
               .dora_scale (read as the DoRA magnitude). T5 layers (lora_te3_, SD3/Flux) keep T5EncoderModel's
               names (no text_model_); SD3/Flux denoiser layers may name the original layout (the family maps them).
    xlabs      Flux only: [diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight / .up.weight, ...
               (read; the Flux family maps the layers, gen/families/mmdit_keys.py xlabs_links).

Components are "denoiser" (the UNet or DiT) and the family's text encoder folders ("text_encoder",
"text_encoder_2"). Text-encoder layer names are kept without transformers' optional `text_model.` level and
written with it, which is what every tool reads.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gen import lycoris
from gen.errors import GenError

DIFFUSERS_META = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
TEXT = "text_encoder"  # the first text encoder's folder; every component but "denoiser" is a text encoder
DENOISER = "denoiser"
KOHYA_UNET = "lora_unet_"
PEFT_WRAPPER = "base_model.model."  # what PeftModel puts in front of every key
FORMATS = ("diffusers", "kohya")
MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")  # DoRA, peft >= 0.12 and before
# kohya DoRA (LyCORIS' weight_decompose): `.dora_scale`, the magnitude, (out, 1[, 1, 1]) on the output axis (LyCORIS'
# wd_on_out, its default, and peft's), (1, in[, 1, 1]) on the input axis (wd_on_out false; refused: peft has none)
KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".dora_scale": "magnitude",
               **lycoris.KOHYA_PARTS}
# Every spelling of a LoRA matrix that diffusers' SD loader reads (diffusers 0.42, utils/state_dict_utils.py:
# UNET_TO_DIFFUSERS for the UNet, DIFFUSERS_TO_PEFT for CLIP, both after KEYS_TO_ALWAYS_REPLACE drops
# `.processor.`): peft's lora_A/B (what gen writes); `.lora.down/up` (convert_state_dict_to_diffusers on a
# UNet's to_q/k/v/out.0, the scripts' files since 0.25, and training_utils.unet_lora_state_dict in 0.22-0.24);
# `.lora_linear_layer.down/up` (the same on CLIP's q/k/v/out_proj). `.alpha` is gen's own addition (diffusers
# reads alphas from kohya files only).
DIFFUSERS_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                   ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                   ".lora_linear_layer.up.weight": "up", ".alpha": "alpha", **dict.fromkeys(MAGNITUDE, "magnitude")}
# LoRAAttnProcessor files (diffusers' scripts up to 0.21): `<attn>.processor.to_q_lora.down.weight`, named after
# the processor's to_q/to_k/to_v/to_out, which are these layers (UNET_TO_DIFFUSERS for the UNet,
# DIFFUSERS_OLD_TO_PEFT for CLIP).
ATTN_PROCESSOR = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
ATTN_PROCESSOR_LAYERS = {False: {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                         True: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
TEXT_FOLDER = re.compile(r"text_encoder(_\d+)?")  # text_encoder, text_encoder_2, ...
# XLabs' Flux LoRAs (x-flux): `[diffusion_model.]double_blocks.0.processor.qkv_lora1.down.weight`, qkv_lora2,
# proj_lora1/2, single blocks' qkv_lora / proj_lora; no alpha (scale 1); the Flux family maps the layers
XLABS = re.compile(r"^((?:diffusion_model\.)?(?:double|single)_blocks\.\d+)\.(?:processor\.)?((?:qkv|proj)_lora[12]?)"
                   r"\.(down|up)\.weight$")
KOHYA_T5 = "lora_te3_"  # sd-scripts' T5-XXL layers (networks/lora_sd3.py, lora_flux.py with --train_t5xxl): SD3's
# text_encoder_3, Flux's text_encoder_2, each family's kohya_text


def is_text(component: str) -> bool:
    return component != DENOISER


@dataclass
class Factor:
    """One adapted layer: down (A) is (rank, in[, kh, kw]), up (B) is (out, rank[, 1, 1])."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None  # None: alpha = rank (the diffusers/peft convention when nothing is stored)
    magnitude: torch.Tensor | None = None  # DoRA: one magnitude per output channel (a kohya file's dora_scale)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@dataclass
class LoraFile:
    factors: dict[str, dict[str, Factor]]  # component ("denoiser" | a text encoder folder) -> layer -> Factor
    layout: str  # "diffusers", "peft", "xlabs" or "kohya"; kohya layer names are flat (dots as underscores)
    metadata: dict[str, str] = field(default_factory=dict)
    prefixes: dict[str, str] = field(default_factory=dict)  # component -> the prefix the file used

    def count(self) -> int:
        return sum(len(f) for f in self.factors.values())


def neutral(name: str) -> str:
    return name.removeprefix("text_model.")


def flat(component: str, name: str, prefix: str = "") -> str:
    """The kohya/A1111 layer name without its `prefix` (lora_unet_, lora_te_, ...): dots become underscores, CLIP
    layers under `text_model_`; T5's (lora_te3_) as T5EncoderModel names them (`encoder_block_0_layer_0_...`)."""
    return ("text_model_" if is_text(component) and prefix != KOHYA_T5 else "") + name.replace(".", "_")


def num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _pattern_value(patterns: dict, name: str, default):
    """peft's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): first key matching the end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name) or re.match(rf"(.*\.)?({key})$", "text_model." + name):
            return value
    return default


# ---- reading ------------------------------------------------------------------------------------------
def _component(name: str) -> tuple[str, str, str, str | None]:
    """A diffusers/peft key without its part -> (component, file prefix, layer name, layout if not diffusers)."""
    layout = None
    if name.startswith(PEFT_WRAPPER):
        name, layout = name[len(PEFT_WRAPPER):], "peft"
    prefix, _, rest = name.partition(".")
    if prefix in ("unet", "transformer"):
        return DENOISER, prefix, rest, layout
    if TEXT_FOLDER.fullmatch(prefix):
        return prefix, prefix, rest, layout
    return DENOISER, "", name, "peft"  # a bare peft adapter of one model: the denoiser


def _split(key: str, kohya: dict[str, str] | None) -> tuple[str, str, str, str, str | None] | None:
    """One key -> (component, file prefix, layer name, part: down | up | alpha | magnitude, layout), or None."""
    if kohya:
        suffix = next((s for s in KOHYA_PARTS if key.endswith(s)), None)
        if suffix is None:
            return None
        name = key[: -len(suffix)]
        prefix = next(p for p in kohya if name.startswith(p))
        return kohya[prefix], prefix, name[len(prefix):], KOHYA_PARTS[suffix], "kohya"
    xlabs = XLABS.match(key)
    if xlabs:
        return DENOISER, "", f"{xlabs.group(1)}.{xlabs.group(2)}", xlabs.group(3), "xlabs"
    key = key.replace(".processor.", ".")
    old = ATTN_PROCESSOR.search(key)
    if old:
        comp, prefix, name, layout = _component(key[: old.start()])
        name += "." + ATTN_PROCESSOR_LAYERS[is_text(comp)][old.group(1)]
        part = old.group(2)
    else:
        suffix = next((s for s in DIFFUSERS_PARTS if key.endswith(s)), None)
        if suffix is None:
            return None
        comp, prefix, name, layout = _component(key[: -len(suffix)])
        part = DIFFUSERS_PARTS[suffix]
    return comp, prefix, (neutral(name) if is_text(comp) else name), part, layout or "diffusers"


def parse(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
          peft_config: dict | None = None, source: str = "LoRA") -> LoraFile:
    """A LoRA state dict in the diffusers (any spelling diffusers reads), peft (`base_model.model.` keys) or
    kohya layout -> LoraFile."""
    from gen.families import kohya_prefixes

    metadata = dict(metadata or {})
    prefixes = kohya_prefixes()
    kohya = prefixes if state_dict and all(k.startswith(tuple(prefixes)) for k in state_dict) else None
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    prefixes, unknown, layouts = {}, [], set()
    for key, tensor in state_dict.items():
        split = _split(key, kohya)
        if split is None:
            unknown.append(key)
            continue
        comp, prefix, name, part, layout = split
        prefixes[comp] = prefix
        layouts.add(layout)
        if part in parts.setdefault((comp, name), {}):
            raise GenError(f"{source}: layer {name!r} has its LoRA {part} matrix twice, in two spellings")
        parts[(comp, name)][part] = tensor
    if unknown:
        raise GenError(f"{source}: {len(unknown)} keys gen cannot read ({', '.join(unknown[:3])}); {_hint(unknown)}")
    if not parts:
        raise GenError(f"{source} has no LoRA weights")

    configs = _header_configs(metadata, peft_config, prefixes)
    factors: dict[str, dict[str, Factor]] = {}
    for (comp, name), t in parts.items():
        if set(t) & set(lycoris.KOHYA_PARTS.values()):  # a LoHa/LoKr layer
            if "magnitude" in t:
                raise GenError(f"{source}: layer {name!r} is a LoHa/LoKr with DoRA (dora_scale), which gen does not "
                               "load; DoRA loads on LoRA layers")
            f = lycoris.LycorisFactor({k: v for k, v in t.items() if k != "alpha"},
                                      t["alpha"].item() if "alpha" in t else None)
            f.check(source, name)
            factors.setdefault(comp, {})[name] = f
            continue
        down, up = t.get("down"), t.get("up")
        if down is None or up is None:
            raise GenError(f"{source}: layer {name!r} has only one of its two LoRA matrices")
        alpha = t["alpha"].item() if "alpha" in t else None
        cfg = configs.get(comp)
        if alpha is None and cfg is not None and "lora_alpha" in cfg:
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"]))
            if cfg.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r): the same as alpha' = alpha * sqrt(r)
                alpha *= math.sqrt(down.shape[0])
        factors.setdefault(comp, {})[name] = Factor(down, up, alpha, _magnitude(t.get("magnitude"), up, source, name))
    layout = "kohya" if kohya is not None else next((x for x in ("peft", "xlabs") if x in layouts), "diffusers")
    return LoraFile(factors, layout, metadata, prefixes)


def _magnitude(m: torch.Tensor | None, up: torch.Tensor, source: str, name: str) -> torch.Tensor | None:
    """A DoRA magnitude as one value per output channel: a kohya dora_scale (out, 1[, 1, 1]) flattened; one on the
    input axis, (1, in[, 1, 1]), is refused (peft's DoRA has none)."""
    if m is None or m.ndim == 1:
        return m
    if m.shape[0] != up.shape[0] and m.shape[0] == 1:
        raise GenError(f"{source}: layer {name!r} is DoRA on the input axis (dora_scale {tuple(m.shape)}, LyCORIS' "
                       "wd_on_out=false), which gen does not load: it loads DoRA per output channel, as peft and "
                       "LyCORIS' default (wd_on_out=true) make it")
    return m.flatten()


def _hint(unknown: list[str]) -> str:
    if any(k.endswith(".lora_B.bias") for k in unknown):
        return "LoRAs with a bias on lora_B (peft's lora_bias=True) are not supported"
    return ("LyCORIS variants other than LoHa and LoKr (IA3, GLoRA, full diff, ...) are not supported; expected "
            "lora_A/lora_B, lora_down/lora_up, hada_* or lokr_*")


def _header_configs(metadata: dict, peft_config: dict | None, prefixes: dict[str, str]) -> dict[str, dict]:
    """Per-component LoraConfig fields from diffusers' header JSON (or a peft adapter_config.json)."""
    if peft_config is not None:
        return {DENOISER: peft_config}
    raw = metadata.get(DIFFUSERS_META)
    if not raw:
        return {}
    try:
        whole = json.loads(raw)
    except json.JSONDecodeError:
        raise GenError(f"the {DIFFUSERS_META} header of this LoRA is not valid JSON") from None
    return {comp: {k[len(prefix) + 1:]: v for k, v in whole.items() if k.startswith(prefix + ".")}
            for comp, prefix in prefixes.items()}


# What diffusers' training scripts (save_lora_weights: LORA_WEIGHT_NAME_SAFE / LORA_WEIGHT_NAME) and peft's
# save_pretrained name the weights in the folder they write.
FOLDER_WEIGHTS = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                  "adapter_model.bin")


def weights_file(path: Path) -> Path:
    """`path`, or for a folder the LoRA weights file in it (what diffusers' load_lora_weights(folder) picks)."""
    if not path.is_dir():
        return path
    known = [path / n for n in FOLDER_WEIGHTS if (path / n).is_file()]
    if known:
        return known[0]
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise GenError(f"{path} is a folder with {len(found)} .safetensors files and no {FOLDER_WEIGHTS[0]}; "
                       "give the LoRA file itself")
    return found[0]


def read(path: str | Path, allow_pickle: bool = False) -> LoraFile:
    """Reads a LoRA file (.safetensors; pickle formats only with allow_pickle) in any supported layout; for a
    folder (what diffusers' training scripts and peft write), the weights file in it."""
    from gen.io import check_safetensors, load_state_dict, read_json, read_metadata

    path = weights_file(Path(path))
    if not path.is_file():
        raise GenError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":  # from the header: a whole checkpoint is not read only to be refused
        header = check_safetensors(path)
        refuse_other(path, {k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    state_dict = load_state_dict(path, allow_pickle=allow_pickle)
    if path.suffix != ".safetensors":
        refuse_other(path, {k: list(v.shape) for k, v in state_dict.items()})
    metadata = read_metadata(path) if path.suffix == ".safetensors" else {}
    sidecar = path.with_name("adapter_config.json")  # peft's save_pretrained writes it beside the weights
    peft_config = read_json(sidecar) if sidecar.is_file() and DIFFUSERS_META not in metadata else None
    return parse(state_dict, metadata, peft_config, source=str(path))


def refuse_other(path: Path, shapes: dict[str, list[int]]) -> None:
    """A one-line GenError saying what a file given as a LoRA is where it is a whole model checkpoint."""
    if is_lora(shapes):
        return
    from gen import single_file

    if single_file.is_checkpoint(shapes):
        try:
            what = f"a whole {single_file.detect(path, shapes).title} checkpoint"
        except GenError:
            what = "a whole model checkpoint"
        raise GenError(f"{path} is {what}, not a LoRA: pass it as --model (Pipeline.from_pretrained), not as "
                       "--lora (load_lora)")


# ---- writing ------------------------------------------------------------------------------------------
def config_fields(factors: dict[str, Factor], anchor: str = "") -> dict:
    """LoraConfig fields for these layers: the commonest rank and alpha, the others as per-layer patterns
    (what diffusers' get_peft_kwargs derives from a state dict)."""
    ranks = {n: f.rank for n, f in factors.items()}
    alphas = {n: float(f.rank if f.alpha is None else f.alpha) for n, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]
    return dict(r=r, lora_alpha=num(a), target_modules=sorted(ranks),
                use_dora=any(f.magnitude is not None for f in factors.values()),
                rank_pattern={anchor + n: v for n, v in ranks.items() if v != r},
                alpha_pattern={anchor + n: num(v) for n, v in alphas.items() if v != a})


def _diffusers_layout(factors: dict[str, dict[str, Factor]], prefix: str, text_prefixes: dict[str, str]):
    if _algo(factors) != "lora":
        raise GenError("LoHa/LoKr adapters are written in the LyCORIS/kohya layout (what ComfyUI and A1111 read); "
                       "use format kohya")
    tensors, config = {}, {}
    for comp, layers in factors.items():
        p = comp if is_text(comp) else prefix
        keys = f"{p}.text_model." if is_text(comp) and text_prefixes.get(comp) != KOHYA_T5 else f"{p}."
        for name, f in layers.items():
            tensors[f"{keys}{name}.lora_A.weight"], tensors[f"{keys}{name}.lora_B.weight"] = f.down, f.up
            if f.magnitude is not None:
                tensors[f"{keys}{name}.lora_magnitude_vector"] = f.magnitude
        config |= {f"{p}.{k}": v for k, v in config_fields(layers).items()}
    return tensors, {"format": "pt", DIFFUSERS_META: json.dumps(config, indent=2, sort_keys=True)}


def check_kohya(factors: dict[str, dict[str, Factor]]) -> None:
    """Refuses DoRA in the kohya layout: ComfyUI reads a dora_scale on the output axis against the norm of the base
    weight, not of W + delta W as LyCORIS and peft do (comfy/weight_adapter/base.py weight_decompose)."""
    if any(f.magnitude is not None for layers in factors.values() for f in layers.values()):
        raise GenError("a DoRA adapter cannot be written in the kohya layout; use format diffusers")


def _kohya_layout(factors: dict[str, dict[str, Factor]], base_version: str, text_prefixes: dict[str, str]):
    check_kohya(factors)
    tensors, algo = {}, _algo(factors)
    for comp, layers in factors.items():
        prefix = text_prefixes[comp] if is_text(comp) else KOHYA_UNET
        for name, f in layers.items():
            key = prefix + flat(comp, name, prefix)
            if algo != "lora":
                tensors |= {f"{key}.{part}": t for part, t in f.weights.items()}
                if f.alpha is not None:
                    tensors[f"{key}.alpha"] = torch.tensor(float(f.alpha))
                continue
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = f.down, f.up
            tensors[f"{key}.alpha"] = torch.tensor(float(f.rank if f.alpha is None else f.alpha))
    network = ({"ss_network_module": "networks.lora", "ss_network_args": "{}"} if algo == "lora" else
               {"ss_network_module": lycoris.NETWORK_MODULE, "ss_network_args": json.dumps({"algo": algo})})
    return tensors, {**network,
                     # sd-scripts (train_network.py): ss_v2 = str(bool(args.v2)), the version string's "_v2"
                     "ss_base_model_version": base_version, "ss_v2": str(base_version.startswith("sd_v2")),
                     "ss_text_encoder_lr": "" if any(map(is_text, factors)) else "0",
                     "ss_network_train_unet_only": str(not any(map(is_text, factors)))}


def _algo(factors: dict[str, dict]) -> str:
    """"lora", "loha" or "lokr": what the layers are (one kind per file)."""
    algos = {getattr(f, "algo", "lora") for layers in factors.values() for f in layers.values()}
    if len(algos) > 1:
        raise GenError(f"one LoRA file holds one kind of adapter, not {', '.join(sorted(algos))}")
    return algos.pop()


def _kohya_recipe(recipe: dict) -> dict[str, str]:
    """The kohya ss_* training fields a gen recipe (a train Config as a dict) can fill."""
    get = lambda section, key: (recipe.get(section) or {}).get(key)  # noqa: E731
    out = {"ss_learning_rate": get("optim", "lr"), "ss_max_train_steps": recipe.get("trained_steps"),
           "ss_seed": get("train", "seed"), "ss_network_dropout": get("lora", "dropout"),
           "ss_mixed_precision": get("train", "mixed_precision"), "ss_lr_scheduler": get("optim", "schedule")}
    res = get("data", "resolution")
    if res:
        out["ss_resolution"] = f"({res}, {res})"
    return {k: str(v) for k, v in out.items() if v not in (None, "")}


def write(path: str | Path, factors: dict[str, dict[str, Factor]], format: str = "diffusers",
          denoiser_prefix: str = "unet", base_version: str = "sd_v1", recipe: dict | None = None,
          base_model: str | None = None, dtype: torch.dtype | None = None, text_prefixes: dict | None = None,
          family: str | None = None) -> Path:
    """Writes {component: {layer: Factor}} as one .safetensors LoRA file (atomically).

    format "diffusers": `<denoiser_prefix>.<layer>.lora_A.weight` / `<text folder>.text_model.<layer>...` keys,
    rank/alpha/patterns in the `lora_adapter_metadata` header; "kohya": `lora_unet_*` and `text_prefixes`
    (text encoder folder -> kohya prefix, the family's kohya_text; default SD's lora_te_) keys with `.alpha`
    tensors and `ss_*` header fields. Both carry gen.rank, gen.alpha, gen.base_model, gen.family (the model
    family's name) and the recipe (gen.recipe, JSON)."""
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise GenError(f"unknown LoRA format {format!r}; choose from {', '.join(FORMATS)}")
    if format == "diffusers":
        tensors, meta = _diffusers_layout(factors, denoiser_prefix, text_prefixes or {})
    else:
        tensors, meta = _kohya_layout(factors, base_version, text_prefixes or {TEXT: "lora_te_"})
        meta |= _kohya_recipe(recipe or {})
    tensors = {k: v.detach().to("cpu", dtype if dtype is not None and v.ndim else v.dtype).contiguous()
               for k, v in tensors.items()}
    every = [f for layers in factors.values() for f in layers.values()]
    ranks = sorted({f.rank for f in every})
    alphas = sorted({float(f.rank if f.alpha is None else f.alpha) for f in every})
    meta["gen.lora_format"] = "1"
    meta["gen.rank"] = meta["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    meta["gen.alpha"] = meta["ss_network_alpha"] = str(num(alphas[0])) if len(alphas) == 1 else "Dynamic"
    if format == "diffusers":
        del meta["ss_network_dim"], meta["ss_network_alpha"]
    if base_model:
        meta["gen.base_model"] = str(base_model)
        if format == "kohya":
            meta["ss_sd_model_name"] = str(base_model)
    if family:
        meta["gen.family"] = family
    if recipe:
        meta["gen.recipe"] = json.dumps(recipe, default=str)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


# ---- recognising LoRA files ------------------------------------------------------------------------------
def is_lora(keys) -> bool:
    """Whether these are a LoRA file's keys: some key is a LoRA matrix in a spelling `parse` reads."""
    ends = tuple(s for s, part in {**DIFFUSERS_PARTS, **KOHYA_PARTS}.items() if part not in ("alpha", "magnitude"))
    return any(k.endswith(ends) or ATTN_PROCESSOR.search(k) or XLABS.match(k) for k in keys)
