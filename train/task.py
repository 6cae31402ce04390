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

import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from gen import families, formulations
from gen.errors import GenError
from gen.models import vae as vae_lib
from gen.models.text import TextEncoder
from gen.pipeline import Pipeline
from train.config import Config

log = logging.getLogger("gen")


def build_formulation(cfg: Config):
    o = cfg.objective
    if o.type == "flow":
        return formulations.Flow(shift=o.shift, logit_mean=o.logit_mean, logit_std=o.logit_std)
    return formulations.DDPM(prediction_type=o.prediction_type, beta_schedule=o.beta_schedule,
                             zero_terminal_snr=o.zero_terminal_snr)


class WithText(nn.Module):
    """A denoiser and its text encoder as one module (model.train_text_encoder), so that the optimizer, EMA,
    gradient clipping, distributed sync and checkpoints cover both; forward runs the text tower on token ids."""

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module, family: families.Family):
        super().__init__()
        self.denoiser, self.text_encoder, self.family = denoiser, text_encoder, family

    @property
    def config(self):
        return self.denoiser.config

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor, **kwargs):
        out = self.text_encoder(input_ids)
        cond = self.family.denoiser_kwargs({"hidden": out.last_hidden_state, "pooled": out.pooler_output})
        return self.denoiser(sample, timestep, **cond, **kwargs)


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(denoiser, trained text encoder or None) of a task's model."""
    return (model.denoiser, model.text_encoder) if isinstance(model, WithText) else (model, None)


class DenoiserTask:
    """A text-conditioned UNet or DiT denoiser, trained with DDPM or rectified flow in a frozen VAE's
    latent space, conditioned by a frozen CLIP text encoder (both from `model.base`)."""

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.formulation = build_formulation(cfg)
        base = self._base()
        self.text, self.vae = base.text, base.vae
        self.text.model.to(device, weight_dtype).requires_grad_(False)
        self.vae.to(device, weight_dtype).requires_grad_(False)
        # The task decides what trains, whatever froze the module before: a base folder's denoiser (init_from_base)
        # comes out of Pipeline, which freezes what it samples with.
        self.model = self._denoiser(base).to(device).requires_grad_(True)
        self.family = base.family if isinstance(base, Pipeline) else families.get(
            "dit" if cfg.model.denoiser == "dit" else "sd1")
        self.empty = self.text([""])  # conditioning dropout target: the empty prompt, as CFG's negative
        if cfg.model.train_text_encoder:
            if cfg.data.cache:
                raise GenError("config keys 'data.cache' and 'model.train_text_encoder': a cache holds text "
                               "embeddings, which go stale while the text encoder trains; turn one of them off")
            self.model = WithText(self.model, self.text.model.float().requires_grad_(True), self.family)

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
        if m.vae:
            vae = load("vae", lambda f: load_model(AutoencoderKL, f), Path(m.vae) / "vae")  # via gen.io: no pickles
        if m.base:
            # a single-file base without a tokenizer takes model.text_encoder's folder's
            base = Pipeline.from_pretrained(m.base, device="cpu", dtype=torch.float32, tokenizer=m.text_encoder or None)
            if text:
                base.text = TextEncoder(*text)
            if vae is not None:
                base.vae = vae
            return base
        if m.init_from_base:
            raise GenError("config key 'model.init_from_base' needs model.base (the folder whose denoiser to start from)")
        return SimpleNamespace(text=TextEncoder(*text), vae=vae)

    def _denoiser(self, base: Pipeline) -> nn.Module:
        from gen.models.dit import build_dit
        from gen.models.unet import build_unet

        m, res, f = self.cfg.model, self.cfg.data.resolution, self.vae_scale_factor
        if m.init_from_base:
            kind = "dit" if base.family.denoiser_part == "transformer" else "unet"
            if kind != m.denoiser:
                raise GenError(f"config key 'model.init_from_base': {m.base} holds a "
                               f"{kind} denoiser, but model.denoiser is {m.denoiser!r}")
            self._check_objective(base.formulation)
            return base.denoiser.float()
        if res % f:
            raise GenError(f"config key 'data.resolution': {res} is not a multiple of the VAE factor {f}")
        hidden = self.text.model.config.hidden_size
        common = dict(sample_size=res // f, in_channels=self.vae.config.latent_channels)
        try:
            if m.denoiser == "dit":
                model = build_dit(m.preset, **common, cross_attention_dim=hidden, pooled_projection_dim=hidden,
                                  **m.options)
                if common["sample_size"] % model.config.patch_size:
                    raise GenError(f"config key 'data.resolution': {res} is not a multiple of "
                                   f"{f * model.config.patch_size} (VAE factor x DiT patch size)")
                return model
            return build_unet(m.preset, **common, out_channels=common["in_channels"], cross_attention_dim=hidden,
                              **m.options)
        except (ValueError, TypeError) as e:
            if isinstance(e, GenError):
                raise
            raise GenError(f"config key 'model.preset' / 'model.options': {e}") from None

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
        if isinstance(self.model, WithText):
            return self._loss_with_text(model, batch, g)
        device = self.vae.device
        with torch.no_grad():
            if "latents" in batch:  # a cached batch (train/data/cache.py): the VAE and text encoder do not run
                from train.data.cache import latents
                x0 = latents(self.vae, batch, g).float()  # (N, C, h, w)
                hidden, pooled = batch["hidden"].to(device), batch["pooled"].to(device)
            else:
                x0 = vae_lib.encode(self.vae, batch["pixel_values"].to(device), generator=g).float()  # (N, C, h, w)
                hidden, pooled = self.text(batch["text"])
            n = x0.shape[0]
            drop = (torch.rand(n, generator=g) < self.cfg.train.cond_dropout).to(device)
            hidden = torch.where(drop[:, None, None], self.empty[0], hidden)
            pooled = torch.where(drop[:, None], self.empty[1], pooled)
        return self._denoising_loss(model, x0, g, **self.family.denoiser_kwargs({"hidden": hidden, "pooled": pooled}))

    def _loss_with_text(self, model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        """model.train_text_encoder: conditioning dropout replaces the caption by the empty prompt, whose
        embedding then trains too; the text tower runs inside the model's forward, with gradients."""
        device = self.vae.device
        with torch.no_grad():
            x0 = vae_lib.encode(self.vae, batch["pixel_values"].to(device), generator=g).float()
        drop = (torch.rand(x0.shape[0], generator=g) < self.cfg.train.cond_dropout).tolist()
        ids = self.text.tokenize(["" if d else c for c, d in zip(batch["text"], drop)]).to(device)
        return self._denoising_loss(model, x0, g, input_ids=ids)

    def _denoising_loss(self, model: nn.Module, x0: torch.Tensor, g: torch.Generator, **cond) -> torch.Tensor:
        o, f, device, n = self.cfg.objective, self.formulation, x0.device, x0.shape[0]
        noise = torch.randn(x0.shape, generator=g).to(device)
        if o.type == "ddpm" and o.offset_noise:  # Guttenberg 2023: learn to shift the mean brightness
            noise = noise + o.offset_noise * torch.randn((n, x0.shape[1], 1, 1), generator=g).to(device)
        t = f.sample_timesteps(n, generator=g, device=device)
        x_t = f.add_noise(x0, noise, t)
        target = f.target(x0, noise, t)
        pred = model(x_t, f.model_timestep(t), return_dict=False, **cond)[0]
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        weight = f.loss_weight(t, o.min_snr_gamma if o.type == "ddpm" else None)
        return (per_sample * weight).mean()

    def pipeline(self, model: nn.Module, recipe: dict | None = None) -> Pipeline:
        """A sampling Pipeline around the live text encoder, VAE and `model` (Pipeline freezes `model`)."""
        s = self.cfg.sampling
        defaults = {k: v for k, v in dict(steps=s.steps, guidance=s.guidance, sampler=s.sampler).items()
                    if v is not None}
        denoiser, text = parts(model)
        pipe = Pipeline(text or self.text.model, self.text.tokenizer, self.vae, denoiser, formulation=self.formulation,
                        defaults=defaults, recipe=recipe, name="validation")
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
            pipe = self.pipeline(model)
            return [im for seed in v.seeds for im in pipe(list(v.prompts), seed=seed).images]
        finally:  # Pipeline put the model in eval mode and froze it
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)

    def export(self, model: nn.Module, path, recipe: dict) -> None:
        self.pipeline(model, recipe).save_pretrained(path)
