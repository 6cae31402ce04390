"""Typed training config: YAML + `key=value` overrides (dotted keys, e.g. `optim.lr=1e-4`).

Every key maps onto a dataclass field; an unknown key or a value of the wrong type is a GenError
naming the key. A string field takes a value as it was written where YAML 1.1 would type it (`no`, `off`,
`1e-4`: not False or a number), so `train.mixed_precision=no` works unquoted. The resolved config is what
the run folder, checkpoints and the model's recipe hold.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gen.errors import GenError
from train.resolution import fit_resolution


@dataclass
class ModelConfig:
    base: str = ""                          # model folder giving the frozen text encoder, tokenizer and VAE
    denoiser: Literal["dit", "unet"] = "dit"
    preset: str = "DiT-T/2"                 # gen.models.dit.DIT_PRESETS or gen.models.unet.UNET_PRESETS
    options: dict = field(default_factory=dict)  # extra constructor arguments for the denoiser
    init_from_base: bool = False            # start from the base folder's denoiser instead of random weights
    family: str = ""                        # without model.base: a new denoiser of this family's architecture
    #                                         (sd3, sdxl; gen.families) on model.text_encoder + model.vae (gen's stages)
    text_encoder: str = ""                  # a folder with text_encoder/ + tokenizer/ (a `clip` stage's output)
    vae: str = ""                           # a folder with vae/ (a `vae` stage's output); both override base's;
    #                                         or, with a single-file base, a VAE file (ae.safetensors), as --vae
    text_encoders: list[str] = field(default_factory=list)  # a single-file base's component files, as --text-encoder
    train_text_encoder: bool = False        # the text encoder trains with the denoiser (as in GLIDE) and is exported


@dataclass
class ObjectiveConfig:
    type: Literal["ddpm", "flow"] = "flow"
    # ddpm
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None      # Hang et al. 2023; 5.0 is the paper's choice
    offset_noise: float = 0.0               # adds offset * N(0, 1) per (sample, channel)
    # flow
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0


@dataclass
class CaptionConfig:
    """data.caption: per-sample caption augmentation of comma-separated tags (train/captions.py)."""
    shuffle: bool = False                   # shuffle the tags after the first keep_tokens
    keep_tokens: int = 0                    # the first N tags stay in place (and are never dropped)
    tag_dropout: float = 0.0                # each other tag is dropped with this probability
    prefix: str = ""                        # put before every caption, as written (e.g. "sks, ")
    suffix: str = ""                        # put after every caption
    variants: bool = False                  # a caption's non-empty lines are variants; one is drawn per epoch


@dataclass
class DataConfig:
    source: Literal["folder", "shapes", "shards"] = "folder"
    path: str = ""                          # image folder (folder); folder, glob or URL of .tar shards (shards)
    resolution: int = 64                    # unset with a model.base: the base's native size (train/recipes.py)
    crop: Literal["center", "random"] = "center"
    flip: bool = False                      # off by default: it would falsify "left of" captions
    num_images: int = 10000                 # size of the synthetic shapes world (source=shapes)
    seed: int = 0                           # shapes world seed (the data order uses train.seed)
    color_weights: dict[str, float] | None = None  # shapes world: how often each color is drawn, relative (1 if unnamed)
    num_workers: int = 0
    buckets: bool = False                   # aspect-ratio buckets of about resolution^2 pixels
    bucket_step: int = 64                   # bucket sides are multiples of this (VAE factor x patch size or more)
    max_aspect: float = 2.0                 # the widest bucket is at most this much wider than tall (and v.v.)
    cache: bool = False                     # encode latents + text embeddings once to disk; skip VAE/CLIP in training
    cache_dir: str = ""                     # "" = <train.output_dir>/cache; share one between runs to reuse it
    cache_latents: Literal["sample", "mean"] = "sample"  # sample: store the VAE's moments, draw per step
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    masked_loss: bool = True                # weight the loss by image masks (NAME.mask.png or alpha) where there are any


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "sgd"] = "adamw"  # see train/optim.py
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    options: dict = field(default_factory=dict)  # more optimizer arguments, e.g. {momentum: 0.9} for sgd
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear", "cosine_with_restarts"] = "constant"
    min_lr_ratio: float = 0.0               # cosine and linear decay to lr * min_lr_ratio
    cycles: int = 1                         # cosine_with_restarts: the number of cosine decays
    grad_clip: float = 1.0                  # 0 disables clipping


@dataclass
class TrainOptions:
    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 1000                   # optimizer steps; also the length of the LR schedule
    stop_at_step: int | None = None         # pause here with a checkpoint (a time-limited job); resume later
    batch_size: int = 16                    # per process, per micro-batch
    grad_accum: int = 1
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "no"  # auto: what the device runs fast (loop.py)
    gradient_checkpointing: bool = False
    blocks_to_swap: int = 0                 # LoRA: the frozen base's last N blocks live in host memory (train/swap.py)
    activation_offload: bool = False        # with gradient_checkpointing: saved activations wait in host memory
    distributed: Literal["ddp", "fsdp"] = "ddp"  # fsdp: shard the model by block over the processes
    ema_decay: float = 0.999                # 0 disables EMA
    ema_warmup: bool = True                 # decay ramps as (1 + n) / (10 + n)
    cond_dropout: float = 0.1               # fraction of captions replaced by "" (trains for CFG)
    guidance: float | None = None           # a guidance-distilled model's guidance input (Flux dev); None: 1.0
    checkpoint_every: int = 500
    checkpoint_minutes: float | None = None  # also a checkpoint at least every N minutes of wall time
    time_limit: float | None = None         # minutes this run may take; it stops with a checkpoint before
    keep_checkpoints: int = 2
    resume: str = "auto"                    # auto | none | path to a checkpoint folder
    max_bad_steps: int = 10                 # stop after this many consecutive steps with a NaN/inf loss


@dataclass
class ValidationConfig:
    every: int = 500                        # 0: only at the end
    prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square left of a green triangle"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    use_ema: bool = True
    loss_path: str = ""                     # a held-out image folder: its loss is logged with the train loss
    loss_images: int = 16                   # how many of its images (fixed timesteps and noise; train/heldout.py)
    # stage=controlnet: the hint of each prompt (one for all, or one a prompt); empty: the first training images'
    control_images: list[str] = field(default_factory=list)


@dataclass
class SamplingConfig:
    """Sampling defaults recorded in the output model folder (None: the formulation's default)."""
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    guidance_interval: list[float] | None = None  # [start, end] fractions of the run where guidance applies
    #                                               (Kynkaanniemi et al. 2024): outside it only the conditional pass runs

@dataclass
class VAEStage:
    """stage=vae: an AutoencoderKL trained from scratch (reconstruction + KL)."""
    preset: str = "small"                   # gen.models.vae.VAE_PRESETS
    options: dict = field(default_factory=dict)
    kl_weight: float = 1e-6                 # per pixel, as SD's autoencoder (1e-6 of the summed KL)
    recon: Literal["l1", "mse", "l1+mse"] = "l1+mse"
    eval_images: int = 256                  # held-out images for PSNR


@dataclass
class CLIPStage:
    """stage=clip: a small CLIP (text + vision towers) trained contrastively on image-caption pairs."""
    text_preset: str = "small"              # gen.models.text.TEXT_PRESETS
    text_options: dict = field(default_factory=dict)
    vision: dict = field(default_factory=lambda: dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                                      num_attention_heads=4, patch_size=8))
    projection_dim: int = 128
    tokenizer: str = ""                     # a folder with a CLIP tokenizer; "" trains a BPE on the captions
    vocab_size: int = 1000
    eval_images: int = 512                  # held-out pairs for text->image retrieval
    # Hard negatives (NegCLIP, Yuksekgonul et al. 2023): word groups whose swap makes a caption false, e.g.
    # [[left, right], [above, below], [red, blue, ...]]: a caption's one word of a 2-word group becomes the
    # other ("left of" -> "right of"), two different words of a group trade places (colors bound to the
    # other object). The batch's false captions join the image->text softmax, so relations and attribute
    # binding are no longer bags of words to the text tower.
    negative_words: list = field(default_factory=list)
    # Caption reconstruction (a sentence-autoencoder term): the pooled text state must predict every token
    # of its caption at its position, so word order and relations stay distinct in what the denoiser
    # reads. 0 is off; the loss adds this weight times the mean token cross-entropy.
    reconstruct: float = 0.0


@dataclass
class LoraOptions:
    """`gen lora`: peft LoRA adapters on model.base's frozen denoiser (and text encoder); see train/lora.py."""
    rank: int = 16
    alpha: float | None = None              # None = rank (scale alpha/rank = 1)
    dropout: float = 0.0
    targets: Literal["attn", "attn+ff"] = "attn"  # attention projections, or also the feed-forward layers
    text_encoder: bool = False              # also adapt the CLIP text encoder (same rank, alpha and targets)
    dora: bool = False                      # weight-decomposed LoRA (Liu et al. 2024); diffusers layout only
    algo: Literal["lora", "loha", "lokr"] = "lora"  # LyCORIS LoHa / LoKr through peft (gen/lycoris.py); kohya layout
    # the exported file's key layout; auto: kohya for SD-1.x/2.x/SDXL (what A1111, ComfyUI and diffusers all read)
    # and for LoHa/LoKr, diffusers for DoRA and for the SD3/Flux/DiT families
    format: Literal["auto", "diffusers", "kohya"] = "auto"
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # the frozen base's Linear/Conv weights: full (train.mixed_precision's dtype), or fp8 (float8_e4m3fn, upcast per
    # layer as `gen sample --weights fp8` does: gen/quant), or nf4/int8 (QLoRA: its Linear layers quantized by
    # bitsandbytes as `gen sample --weights nf4|int8` does, gen/quant/bnb.py); the adapters train in fp32 either way
    base_weights: Literal["full", "fp8", "nf4", "int8"] = "full"
    instance_prompt: str = ""               # if set, every image's caption (e.g. "a photo of sks dog")
    class_prompt: str = ""                  # DreamBooth prior preservation: class images of this prompt (train/prior.py)
    num_class_images: int = 100             # sampled by the base model before training, cached in the run folder
    prior_loss_weight: float = 1.0          # the class images' loss weight


@dataclass
class ControlNetOptions:
    """stage=controlnet: a ControlNet made from model.base's denoiser (diffusers' ControlNetModel.from_unet,
    SD3ControlNetModel / FluxControlNetModel.from_transformer) trains on image + control image pairs, the base
    frozen; see train/controlnet.py."""
    # UNet ControlNets: the hint encoder's widths, one a level, each level but the first halving the hint: as many
    # levels as make the VAE's factor (SD: 4 -> 8x); empty: diffusers' (16, 32, 96, 256), cut to that many
    hint_channels: list[int] = field(default_factory=list)
    # SD3 and Flux ControlNets: their (double) transformer blocks; None: diffusers' training scripts' (SD3 12, Flux 4)
    num_layers: int | None = None
    num_single_layers: int | None = None  # Flux's single blocks; None: train_controlnet_flux.py's 4


@dataclass
class LogConfig:
    every: int = 10
    tracker: Literal["auto", "tensorboard", "wandb", "none"] = "auto"
    progress: bool = True


@dataclass
class Config:
    stage: Literal["denoiser", "vae", "clip", "controlnet"] = "denoiser"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainOptions = field(default_factory=TrainOptions)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    log: LogConfig = field(default_factory=LogConfig)
    vae: VAEStage = field(default_factory=VAEStage)
    clip: CLIPStage = field(default_factory=CLIPStage)
    lora: LoraOptions = field(default_factory=LoraOptions)
    controlnet: ControlNetOptions = field(default_factory=ControlNetOptions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


def _plain(x):
    """Tuples -> lists, for YAML/JSON."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            try:
                return _coerce(value, a, key)
            except GenError as e:
                errors.append(e)
        raise GenError(f"config key {key!r}: expected {_name(tp)}, got {value!r}") from None
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in args:
            return value
        raise GenError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, args))}")
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and len(args) != len(value):
                raise GenError(f"config key {key!r}: expected {len(args)} values, got {len(value)}")
            items = [_coerce(v, args[i if origin is tuple else 0], f"{key}[{i}]") if args else v
                     for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int or tp is bool or tp is str:
        if type(value) is tp:
            return value
    raise GenError(f"config key {key!r}: expected {_name(tp)}, got {value!r}")


_NAMES = {int: "integer", float: "number", bool: "boolean (true/false)", str: "string", dict: "mapping",
          list: "list", type(None): "null"}


def _name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple):
        return "list"
    return _NAMES.get(tp, str(tp).replace("typing.", ""))


def _as_written(value: Any, written: Any) -> Any:
    """`value` as YAML typed it, each boolean or number replaced by its text in `written` (the same YAML read
    untyped): False -> 'no', 0.0001 -> '1e-4'; unchanged where the two do not line up."""
    if isinstance(value, (bool, int, float)) and isinstance(written, str):
        return written
    if isinstance(value, list) and isinstance(written, list) and len(value) == len(written):
        return [_as_written(v, w) for v, w in zip(value, written)]
    return value


def _field(value: Any, written: Any, tp: Any, key: str) -> Any:
    """A field's value as YAML typed it or, where only the text fits (a string field given `no`), as written."""
    try:
        return _coerce(value, tp, key)
    except GenError as error:
        text = _as_written(value, written)
        if text == value:
            raise
        try:
            return _coerce(text, tp, key)
        except GenError:
            raise error from None


def _build(cls, data: dict, prefix: str, written: dict):
    if not isinstance(data, dict):
        raise GenError(f"config key {prefix.rstrip('.') or '<root>'!r} must be a mapping, not {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise GenError(f"unknown config key {prefix + str(unknown[0])!r}; valid keys under "
                       f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    written = written if isinstance(written, dict) else {}
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.", written.get(k))
        else:
            kwargs[k] = _field(v, written.get(k), tp, prefix + k)
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for i, p in enumerate(parents):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise GenError(f"config key {'.'.join(parents[:i + 1])!r} is not a section; cannot set {dotted!r}")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any, Any]]:
    """`a.b=value` strings -> (key, YAML-parsed value, the value as written: the same YAML read untyped)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GenError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw else ""
            written = yaml.load(raw, Loader=yaml.BaseLoader) if raw else ""
        except yaml.YAMLError:
            value = written = raw
        if isinstance(value, str) and _looks_like_float(raw):  # YAML 1.1 reads 1e-4 as a string
            value = float(raw)
        elif isinstance(value, dict):  # a section or mapping given whole: optim={lr: 1e-4}
            _fix_floats(value)
        out.append((key.strip(), value, written))
    return out


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_yaml(path: str | Path, as_written: bool = False) -> dict:
    """A YAML file holding a mapping, with `1e-4`-style strings read as floats (as_written: every scalar a
    string, as in the file)."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise GenError(f"config file not found: {path}")
    try:
        tree = yaml.load(path.read_text(), Loader=yaml.BaseLoader if as_written else yaml.SafeLoader) or {}
    except yaml.YAMLError as e:
        raise GenError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise GenError(f"{path} must hold a mapping of config sections")
    if not as_written:
        _fix_floats(tree)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] = (), extra: dict | None = None,
                check_paths: bool = True) -> Config:
    """YAML file (optional) + overrides -> a checked Config (check_paths=False: empty model.base / data.path are
    let through, for `--print-config`). model.base `default` is the bundled model (unless ./default exists)."""
    tree: dict = read_yaml(path) if path is not None else {}
    written: dict = read_yaml(path, as_written=True) if path is not None else {}  # the same tree, as written
    for k, v in (extra or {}).items():
        _set(tree, k, v)
        _set(written, k, v)
    for k, v, text in parse_overrides(list(overrides)):
        _set(tree, k, v)
        _set(written, k, text)
    cfg = _build(Config, tree, "", written)
    if cfg.model.base == "default" and not Path("default").exists():
        from gen.pipeline import DEFAULT_MODEL
        cfg.model.base = str(DEFAULT_MODEL)
    fit_resolution(cfg, "resolution" in (tree.get("data") or {}))  # unset: the base's native size
    return validate(cfg) if check_paths else cfg


def _fix_floats(node):
    """PyYAML (YAML 1.1) reads `1e-4` as a string; read such strings as floats."""
    for k, v in list(node.items()):
        if isinstance(v, dict):
            _fix_floats(v)
        elif isinstance(v, str) and _looks_like_float(v) and not v.strip().isdigit():
            node[k] = float(v)


def validate(cfg: Config) -> Config:
    """Checks values the types cannot express, naming the key."""
    checks = [("vae.eval_images", cfg.vae.eval_images >= 1), ("clip.eval_images", cfg.clip.eval_images >= 2),
              ("clip.reconstruct", cfg.clip.reconstruct >= 0),
              ("lora.rank", cfg.lora.rank >= 1), ("lora.alpha", cfg.lora.alpha is None or cfg.lora.alpha > 0),
              ("lora.dropout", 0 <= cfg.lora.dropout < 1), ("lora.num_class_images", cfg.lora.num_class_images >= 1),
              ("lora.prior_loss_weight", cfg.lora.prior_loss_weight >= 0),
              ("train.max_steps", cfg.train.max_steps >= 1), ("train.batch_size", cfg.train.batch_size >= 1),
              ("train.grad_accum", cfg.train.grad_accum >= 1), ("optim.lr", cfg.optim.lr > 0),
              ("train.ema_decay", 0 <= cfg.train.ema_decay < 1), ("train.cond_dropout", 0 <= cfg.train.cond_dropout <= 1),
              ("train.checkpoint_every", cfg.train.checkpoint_every >= 0),
              ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1),
              ("train.max_bad_steps", cfg.train.max_bad_steps >= 1),
              ("train.blocks_to_swap", cfg.train.blocks_to_swap >= 0),
              ("train.stop_at_step", cfg.train.stop_at_step is None or cfg.train.stop_at_step >= 1),
              ("train.checkpoint_minutes", cfg.train.checkpoint_minutes is None or cfg.train.checkpoint_minutes > 0),
              ("train.time_limit", cfg.train.time_limit is None or cfg.train.time_limit > 0),
              ("data.resolution", cfg.data.resolution >= 8), ("data.caption.keep_tokens", cfg.data.caption.keep_tokens >= 0),
              ("data.caption.tag_dropout", 0 <= cfg.data.caption.tag_dropout < 1), ("data.num_images", cfg.data.num_images >= 1),
              ("optim.warmup_steps", cfg.optim.warmup_steps >= 0), ("optim.cycles", cfg.optim.cycles >= 1),
              ("validation.loss_images", cfg.validation.loss_images >= 1), ("objective.logit_std", cfg.objective.logit_std > 0),
              ("objective.shift", cfg.objective.shift > 0), ("log.every", cfg.log.every >= 1)]
    o, ob, t, d, sa = cfg.optim, cfg.objective, cfg.train, cfg.data, cfg.sampling
    ranged = [("objective.min_snr_gamma", ob.min_snr_gamma is None or ob.min_snr_gamma > 0, "> 0 (or null: off)"),
              ("objective.offset_noise", ob.offset_noise >= 0, ">= 0"),
              ("optim.weight_decay", o.weight_decay >= 0, ">= 0"), ("optim.eps", o.eps > 0, "> 0"),
              ("optim.betas", all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
              ("optim.min_lr_ratio", 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
              ("optim.grad_clip", o.grad_clip >= 0, ">= 0 (0: no clipping)"),
              ("train.guidance", t.guidance is None or t.guidance > 0, "> 0 (or null)"),
              ("data.num_workers", d.num_workers >= 0, ">= 0"), ("data.bucket_step", d.bucket_step >= 1, ">= 1"),
              ("data.max_aspect", d.max_aspect >= 1, ">= 1"), ("vae.kl_weight", cfg.vae.kl_weight >= 0, ">= 0"),
              ("clip.projection_dim", cfg.clip.projection_dim >= 1, ">= 1"),
              ("clip.vocab_size", cfg.clip.vocab_size >= 1, ">= 1"),
              ("validation.every", cfg.validation.every >= 0, ">= 0 (0: only at the end)"),
              ("sampling.steps", sa.steps is None or sa.steps >= 1, ">= 1 (or null)"),
              ("sampling.guidance", sa.guidance is None or sa.guidance >= 0, ">= 0 (or null)"),
              ("sampling.guidance_interval", sa.guidance_interval is None or (
                  isinstance(sa.guidance_interval, list) and len(sa.guidance_interval) == 2
                  and 0 <= sa.guidance_interval[0] <= sa.guidance_interval[1] <= 1), "[start, end], 0 <= start <= end <= 1")]
    for key, ok, *rule in checks + ranged:
        if not ok:
            value = cfg
            for name in key.split("."):
                value = getattr(value, name)
            must = f"; it must be {rule[0]}" if rule else ""
            raise GenError(f"config key {key!r} has an invalid value {value!r}{must}")
    if cfg.stage == "controlnet" and not cfg.model.base:
        raise GenError("config key 'model.base' is empty: give the SD model (folder or file) whose UNet the "
                       "ControlNet starts from and steers")
    if cfg.stage == "denoiser" and not cfg.model.base and not (cfg.model.text_encoder and cfg.model.vae):
        raise GenError("config key 'model.base' is empty: give a model folder holding the text encoder, "
                       "tokenizer and VAE to train with (or set model.text_encoder and model.vae)")
    m = cfg.model
    if m.family:
        from gen import families

        if m.base:
            raise GenError("config key 'model.family' builds a new model on model.text_encoder and model.vae; with "
                           "model.base the family is the base's: leave one of them out")
        if m.family not in {f.name for f in families.families()}:
            raise GenError(f"config key 'model.family': unknown family {m.family!r}; known: "
                           f"{', '.join(sorted(f.name for f in families.families()))}")
    given = "vae" if m.vae and Path(m.vae).is_file() else "text_encoders" if m.text_encoders else None
    if given and not (m.base and Path(m.base).is_file()):
        raise GenError(f"config key 'model.{given}': component files go with a single-file model.base (a .safetensors "
                       "checkpoint or transformer); for a model folder leave it out (model.vae: a folder with vae/)")
    if cfg.data.source in ("folder", "shards") and not cfg.data.path:
        what = "an image folder" if cfg.data.source == "folder" else "a folder, glob or URL of .tar shards"
        raise GenError(f"config key 'data.path' is empty: give {what} (or set data.source=shapes)")
    if len(cfg.validation.seeds) == 0 and cfg.validation.prompts:
        raise GenError("config key 'validation.seeds' is empty: give at least one seed")
    return cfg
