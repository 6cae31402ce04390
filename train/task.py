"""Training tasks: what is trained, its loss, how it samples and what a run exports.

The loop (train/loop.py) is the same for every task; a new stage (a VAE, a CLIP tower, LoRA adapters)
is a small class with this surface, never a copy of the loop:

    model                      the nn.Module whose trainable parameters the optimizer updates
    fingerprint() -> dict      what must not change across a resume (architecture, objective, ...)
    loss(model, batch, g)      scalar loss of one micro-batch; all randomness drawn from generator g
    validate(model, cfg)       images for the periodic validation grid (or None)
    export(model, path, recipe) writes the run's product (a model folder, a LoRA file, ...)
    export_name (optional)     the product's name in the run folder (default "model")
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from gen import families, formulations
from gen.errors import GenError
from gen.folder import GEN_CONFIG
from gen.io import read_json
from gen.models import vae as vae_lib
from gen.models.text import TextEncoder
from gen.pipeline import Pipeline
from train.config import Config
from train.data import masks

log = logging.getLogger("gen")


def base_formulation(base: str | Path):
    """The objective the base folder was trained with (gen_config.json, else its scheduler config); for a single
    file, the one it samples with (gen/single_file.py recorded_formulation), else None (the config's objective.*
    keys stand: an SD3/Flux file without gen's record cannot tell)."""
    base = Path(base)
    if base.is_file():
        from gen.single_file import recorded_formulation

        return recorded_formulation(base)
    if (base / GEN_CONFIG).is_file() and "formulation" in read_json(base / GEN_CONFIG):
        return formulations.from_dict(read_json(base / GEN_CONFIG)["formulation"])
    sched = base / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise GenError(f"config key 'model.base': {base} is not a model folder (no scheduler/scheduler_config.json)")
    return formulations.from_scheduler_config(read_json(sched))


def align_objective(cfg: Config) -> None:
    """A LoRA trains with its base model's objective: the objective.* keys the base fixes are set from it."""
    f = base_formulation(cfg.model.base)
    if f is None:
        log.info("model.base %s records no objective; training with the config's objective.*", cfg.model.base)
        return
    f = formulations.to_dict(f)
    o = cfg.objective
    for key in ("type", "prediction_type", "beta_schedule", "zero_terminal_snr", "shift", "logit_mean", "logit_std"):
        if key in f and hasattr(o, key):
            setattr(o, key, f[key])


def build_formulation(cfg: Config):
    o = cfg.objective
    if o.type == "flow":
        return formulations.Flow(shift=o.shift, logit_mean=o.logit_mean, logit_std=o.logit_std)
    return formulations.DDPM(prediction_type=o.prediction_type, beta_schedule=o.beta_schedule,
                             zero_terminal_snr=o.zero_terminal_snr)


def signature(module: nn.Module) -> str:
    """A cheap content signature of frozen weights (what a resume checks): each tensor's name, shape and a strided
    sample of 256 of its values in fp32."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat[::max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]



def _component_files(m) -> dict:
    """model.vae given as a file and model.text_encoders: Pipeline.from_pretrained's `vae` / `text_encoders` for a
    single-file model.base (a folder's parts are its subfolders)."""
    files = {"vae": m.vae} if m.vae and Path(m.vae).is_file() else {}
    if m.text_encoders:
        files["text_encoders"] = list(m.text_encoders)
    return files  # train/config.py's validate checked that model.base is a file

class Shared(dict):
    """Frozen text encoders a WithText runs but does not own: shared by its copies (EMA), never in its state."""

    def __deepcopy__(self, memo):
        return self


class WithText(nn.Module):
    """A denoiser and the text encoders that train with it (model.train_text_encoder, or their LoRA adapters)
    as one module, so that the optimizer, EMA, gradient clipping, distributed sync and checkpoints cover them
    all. The trained text encoders are submodules named by their folders (text_encoder, text_encoder_2); the
    family's others (T5) run frozen beside them. forward encodes the captions through the family with gradients.
    With no trained text encoders it is the denoiser alone."""

    def __init__(self, denoiser: nn.Module, texts: dict[str, TextEncoder], family: families.Family,
                 trained: tuple[str, ...] = ()):
        super().__init__()
        self.denoiser, self.family = denoiser, family
        self.folders = [f for f in texts if f in trained]
        for folder in self.folders:
            self.add_module(folder, texts[folder].model)
        self.texts = Shared(texts)  # every text encoder, in the family's order

    @property
    def config(self):
        return self.denoiser.config

    @property
    def text_parts(self) -> dict[str, nn.Module]:
        return {f: getattr(self, f) for f in self.folders}

    def encoders(self) -> list[TextEncoder]:
        """The family's text encoders; those that train run with gradients."""
        return [TextEncoder(getattr(self, f), t.tokenizer, grad=True, max_length=t.max_length)
                if f in self.folders else t for f, t in self.texts.items()]

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()
        for m in self.text_parts.values():
            m.gradient_checkpointing_enable()

    def forward(self, *args, text: dict | None = None, extra: dict | None = None, **kwargs):
        """With `text` (Family.train_conditioning's arguments but the encoders): the family's prediction for x_t at
        t (args), the captions encoded here so that the text encoders get gradients, `extra` conditioning besides
        the text's. Without: the denoiser's forward (no text encoder trains)."""
        if text is None:
            return self.denoiser(*args, **kwargs)
        cond = self.family.train_conditioning(self.encoders(), **text) | extra
        return self.family.predict(self.denoiser, *args, cond)


def parts(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(denoiser, {folder: trained text encoder}) of a task's model."""
    return (model.denoiser, model.text_parts) if isinstance(model, WithText) else (model, {})


class DenoiserTask:
    """A text-conditioned UNet or DiT denoiser, trained with DDPM or rectified flow in a frozen VAE's
    latent space, conditioned by a frozen CLIP text encoder (both from `model.base`)."""

    frozen_base = False  # whether the denoiser's own weights stay frozen (train.blocks_to_swap needs that)

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.formulation = build_formulation(cfg)
        base = self._base()
        self.texts, self.vae = base.texts, base.vae
        self.family = base.family if isinstance(base, Pipeline) else families.get(
            cfg.model.family or ("dit" if cfg.model.denoiser == "dit" else "sd1"))
        if cfg.model.family:  # a new model of a family's architecture: its text encoders from the clip stage's
            self.texts = self.family.stage_texts(self.texts[0], cfg.model.text_encoder)
        self.frozen = {"vae": signature(self.vae), **{part: signature(t.model) for part, t in self.text_parts.items()}}
        for t in self.texts:
            t.model.to(device, weight_dtype).requires_grad_(False)
        self.vae.to(device, weight_dtype).requires_grad_(False)
        # The task decides what trains, whatever froze the module before: a base folder's denoiser (init_from_base)
        # comes out of Pipeline, which freezes what it samples with.
        self.model = self._denoiser(base).requires_grad_(True)
        if not (cfg.train.blocks_to_swap and self.frozen_base):  # else LoraTask places it (train/swap.py)
            self.model.to(device)
        self.family.train_inputs(self.model, cfg.train.guidance, 1)  # train.guidance fits the model
        if cfg.data.cache:  # cached batches are dropped to this, so that the text encoder never runs again
            with torch.no_grad():
                r = cfg.data.resolution
                self.empty = self.family.encode_negative(self.texts, [""], False, r, r)
        if cfg.model.train_text_encoder:
            if cfg.data.cache:
                raise GenError("config keys 'data.cache' and 'model.train_text_encoder': a cache holds text "
                               "embeddings, which go stale while the text encoder trains; turn one of them off")
            trained = self.family.trained_texts()
            for folder in trained:
                self.text_parts[folder].model.float().requires_grad_(True)
            self.model = WithText(self.model, self.text_parts, self.family, trained)

    @property
    def text(self) -> TextEncoder:
        """The first text encoder (the one data caches encode with)."""
        return self.texts[0]

    @property
    def text_parts(self) -> dict[str, TextEncoder]:
        return {enc: t for (enc, _), t in zip(self.family.text_parts, self.texts)}

    def _base(self):
        """The base folder's parts, with model.text_encoder / model.vae (earlier stages' outputs) swapped in;
        without a base, just those two parts."""
        from transformers import CLIPTextModel, CLIPTokenizer
        from diffusers import AutoencoderKL

        from gen.io import load_model

        m = self.cfg.model
        text = vae = None

        def load(key, loader, folder):
            try:
                return loader(folder)
            except Exception as e:  # noqa: BLE001 - a folder the user named; say which and why
                raise GenError(f"config key 'model.{key}': cannot load {folder}: {str(e).splitlines()[0]}") from None
        if m.text_encoder:
            folder = Path(m.text_encoder)
            text = (load("text_encoder", lambda f: load_model(CLIPTextModel, f), folder / "text_encoder"),
                    load("text_encoder", CLIPTokenizer.from_pretrained, folder / "tokenizer"))
        files = _component_files(m)  # a single-file base's VAE and text encoder files (gen sample's --vae, ...)
        if m.vae and not files.get("vae"):
            vae = load("vae", lambda f: load_model(AutoencoderKL, f), Path(m.vae) / "vae")  # via gen.io: no pickles
        if m.base:
            # a single-file base without a tokenizer takes model.text_encoder's folder's
            base = Pipeline.from_pretrained(m.base, device="cpu", dtype=torch.float32, tokenizer=m.text_encoder or None,
                                            **files)
            if text:
                base.text = TextEncoder(*text)
            if vae is not None:
                base.vae = vae
            return base
        if m.init_from_base:
            raise GenError("config key 'model.init_from_base' needs model.base (the folder whose denoiser to start from)")
        return SimpleNamespace(texts=[TextEncoder(*text)], vae=vae)

    def _denoiser(self, base: Pipeline) -> nn.Module:
        from gen.models.dit import build_dit
        from gen.models.unet import build_unet

        m, res, f = self.cfg.model, self.cfg.data.resolution, self.vae_scale_factor
        self.scheduler_config = None  # a base's denoiser samples with the base's scheduler (Flux: dynamic shift)
        self._check_kind()
        if m.init_from_base:
            self._check_objective(base.formulation)
            self.scheduler_config = base.scheduler_config
            return base.denoiser.float()
        if res % f:
            raise GenError(f"config key 'data.resolution': {res} is not a multiple of the VAE factor {f}")
        hidden = self.text.model.config.hidden_size
        common = dict(sample_size=res // f, in_channels=self.vae.config.latent_channels)
        own = self.family.new_denoiser(self.texts, m.preset, m.options, common["in_channels"], common["sample_size"])
        if own is not None:
            return own
        try:
            if m.denoiser == "dit":
                model = build_dit(m.preset, **common, cross_attention_dim=hidden, pooled_projection_dim=hidden,
                                  **m.options)
                if common["sample_size"] % model.config.patch_size:
                    raise GenError(f"config key 'data.resolution': {res} is not a multiple of "
                                   f"{f * model.config.patch_size} (VAE factor x DiT patch size)")
                return model
            return build_unet(m.preset, **common, out_channels=common["in_channels"],
                              **self.family.denoiser_options(self.texts) | m.options)
        except (ValueError, TypeError) as e:
            if isinstance(e, GenError):
                raise
            raise GenError(f"config key 'model.preset' / 'model.options': {e}") from None

    def _check_kind(self) -> None:
        """model.denoiser must be the kind the family (model.base's) exports: a UNet in an SD folder, a transformer in
        a DiT/SD3/Flux one; otherwise the model folder would not load."""
        m, family = self.cfg.model, self.family
        kind = "dit" if family.denoiser_part == "transformer" else "unet"
        if kind == m.denoiser:
            return
        folder = m.base and Path(m.base).is_dir() and not m.init_from_base
        hint = (f"; to train a {m.denoiser} with its text encoder and VAE, set model.base='' "
                f"model.text_encoder={m.base} model.vae={m.base}" if folder else "")
        which = f"model.base {m.base} is" if m.base else f"model.family {m.family!r} builds"
        raise GenError(f"config key 'model.denoiser': {which} a {family.title} model, whose denoiser "
                       f"is a {family.denoiser_part}, but model.denoiser is {m.denoiser!r}: set "
                       f"model.denoiser={kind}{hint}")

    def _check_objective(self, theirs) -> None:
        """Fine-tuning with another objective than the base was trained with is allowed, never silent."""
        mine, theirs = formulations.to_dict(self.formulation), formulations.to_dict(theirs)
        differ = [k for k in ("type", "prediction_type", "beta_schedule", "beta_start", "beta_end",
                              "zero_terminal_snr", "shift") if mine.get(k) != theirs.get(k)]
        if differ:
            log.warning("model.init_from_base: %s was trained with %s, but the objective.* keys say %s; training "
                        "with the latter", self.cfg.model.base, {k: theirs.get(k) for k in differ},
                        {k: mine.get(k) for k in differ})

    @property
    def vae_scale_factor(self) -> int:
        return vae_lib.scale_factor(self.vae)

    def fingerprint(self) -> dict:
        return {"denoiser": {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")},
                "objective": formulations.to_dict(self.formulation),
                **({"train_text_encoder": True} if isinstance(self.model, WithText) else {})}

    def loss(self, model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        """Denoising loss of one micro-batch (DDPM: eps or v target, min-SNR-gamma; flow: velocity)."""
        device = self.vae.device
        with torch.no_grad():
            if "latents" in batch:  # a cached batch (train/data/cache.py): the VAE and text encoder do not run
                from train.data.cache import latents
                x0 = latents(self.vae, batch, g).float()  # (N, C, h, w)
            else:
                x0 = vae_lib.encode(self.vae, batch["pixel_values"].to(device), generator=g).float()  # (N, C, h, w)
            drop = torch.rand(x0.shape[0], generator=g) < self.cfg.train.cond_dropout
        f = self.vae_scale_factor
        text = dict(prompts=list(batch["text"]), drop=drop, original=batch.get("original_size"),
                    crop=batch.get("crop_top_left"), target=(x0.shape[2] * f, x0.shape[3] * f))
        mask = batch.get("mask")  # (N, 1, H, W) loss masks (train/data/masks.py), when the data has any
        if isinstance(self.model, WithText) and self.model.folders:  # text encoders that train run in forward
            return self._denoising_loss(model, x0, g, mask, text=text)
        with torch.no_grad():
            if "latents" in batch:
                cond = {k.removeprefix("cond."): v.to(device) for k, v in batch.items() if k.startswith("cond.")}
                cond = self.family.sized(families.where(~drop.to(device), cond, self.empty), text["original"],
                                         text["crop"], text["target"])
            else:
                cond = self.family.train_conditioning(self.texts, **text)
            inputs = self.model_inputs(batch, g)
        return self._denoising_loss(model, x0, g, mask, cond=cond, inputs=inputs)

    def model_inputs(self, batch: dict, g: torch.Generator) -> dict:
        """What the trained model's call takes from the batch besides the family's conditioning (a ControlNet's
        hint), made without gradients; randomness from `g`."""
        return {}

    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict, inputs: dict) -> torch.Tensor:
        """The trained model's prediction for x_t at t (the family's layout and timestep convention)."""
        return self.family.predict(model, x, t, cond, **inputs)

    def _denoising_loss(self, model: nn.Module, x0: torch.Tensor, g: torch.Generator, mask: torch.Tensor | None = None,
                        cond: dict | None = None, text: dict | None = None, inputs: dict | None = None) -> torch.Tensor:
        """The loss of one batch of latents x0 (N, C, h, w), conditioned by `cond` or, through a WithText, by
        encoding `text`, weighted per latent pixel by `mask` (N, 1, H, W) where given; `inputs`: model_inputs. The
        denoiser sees x_t in the family's layout (Flux: packed 2x2 patches with their position ids) and the
        family's timestep convention; the loss compares in the latents' layout."""
        o, f, device, n = self.cfg.objective, self.formulation, x0.device, x0.shape[0]
        noise = torch.randn(x0.shape, generator=g).to(device)
        if o.type == "ddpm" and o.offset_noise:  # Guttenberg 2023: learn to shift the mean brightness
            noise = noise + o.offset_noise * torch.randn((n, x0.shape[1], 1, 1), generator=g).to(device)
        t = f.sample_timesteps(n, generator=g, device=device)
        x_t, extra = self.family.pack(f.add_noise(x0, noise, t))
        extra |= self.family.train_inputs(parts(self.model)[0], self.cfg.train.guidance, n)
        extra = {k: v.to(device) for k, v in extra.items()}
        if text is not None:
            pred = model(x_t, f.model_timestep(t), text=text, extra=extra)
        else:
            pred = self.predict(model, x_t, f.model_timestep(t), cond | extra, inputs or {})
        pred = self.family.unpack(pred, *x0.shape[2:])
        err = (pred.float() - f.target(x0, noise, t)).pow(2)  # (N, C, h, w)
        if mask is not None:
            err = err * masks.to_latent(mask, err.shape[-2:]).to(device)
        per_sample = err.mean(dim=(1, 2, 3))
        weight = f.loss_weight(t, o.min_snr_gamma if o.type == "ddpm" else None)
        return (per_sample * weight).mean()

    def pipeline(self, model: nn.Module, recipe: dict | None = None) -> Pipeline:
        """A sampling Pipeline around the live text encoder, VAE and `model` (Pipeline freezes `model`)."""
        s = self.cfg.sampling
        defaults = {k: v for k, v in dict(steps=s.steps, guidance=s.guidance, sampler=s.sampler,
                                          guidance_interval=s.guidance_interval).items()
                    if v is not None}
        denoiser, trained = parts(model)
        texts = {enc: t.model for enc, t in self.text_parts.items()} | trained
        more = {k: v for (enc, tok), t in zip(self.family.text_parts[1:], self.texts[1:])
                for k, v in ((enc, texts[enc]), (tok, t.tokenizer))}
        pipe = Pipeline(texts["text_encoder"], self.text.tokenizer, self.vae, denoiser, formulation=self.formulation,
                        scheduler_config=self.scheduler_config, defaults=defaults, recipe=recipe, name="validation",
                        family=self.family, **more)
        pipe.progress = False
        return pipe

    @torch.no_grad()
    def validate(self, model: nn.Module) -> list | None:
        """Validation images (PIL), rows = seeds, columns = prompts."""
        v = self.cfg.validation
        if not v.prompts:
            return None
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        try:
            return self.samples(model)
        finally:  # Pipeline put the model in eval mode and froze it
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)

    def samples(self, model: nn.Module) -> list:
        """validate's images (which may freeze `model`: validate restores it)."""
        v = self.cfg.validation
        pipe = self.pipeline(model)
        return [im for seed in v.seeds for im in pipe(list(v.prompts), seed=seed).images]

    def export(self, model: nn.Module, path, recipe: dict) -> None:
        self.pipeline(model, recipe).save_pretrained(path)
