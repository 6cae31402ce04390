"""`gen lora CONFIG.yaml [key=value ...]`: LoRA fine-tuning of a base model folder through the one loop.

LoraTask is DenoiserTask (train/task.py) with the base folder's denoiser as the starting point (always: the
`model.init_from_base` semantics) and the base's own objective, frozen, plus peft LoRA adapters (lora.* keys)
on the denoiser and, with lora.text_encoder, on the family's trained text encoders (SDXL, SD3: both CLIPs; Flux:
CLIP; never T5). Only the adapters train: checkpoints
hold the adapter weights and their optimizer state (the loop's exact resume covers them), validation grids
show each seed without and with the LoRA, and the run exports one .safetensors LoRA file (gen/lora.py) that
diffusers' `load_lora_weights`, A1111/ComfyUI (lora.format=kohya) and `gen sample --lora` read.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from torch import nn

from gen import formulations, quant
from gen import lora as lora_lib
from gen.errors import GenError
from train.config import Config
from train.swap import BlockSwap
from train.task import DenoiserTask, WithText, align_objective, signature

log = logging.getLogger("gen")

ADAPTER = "default"
ADAPTER_PARAMS = (".lora_", ".hada_", ".lokr_")  # peft's LoRA, LoHa and LoKr parameter names
SAVE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class LoraModel(WithText):
    """What the loop trains: the denoiser and (with lora.text_encoder) every text encoder, all peft-injected.
    Its state dict is the adapter weights only, so checkpoints and EMA hold just those."""

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if any(a in k for a in ADAPTER_PARAMS)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        want = set(self.state_dict())
        missing, unexpected = sorted(want - set(state_dict)), sorted(set(state_dict) - want)
        if strict and (missing or unexpected):
            raise GenError(f"the checkpoint's LoRA adapters do not fit this model: {len(missing)} missing "
                           f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class LoraTask(DenoiserTask):
    """LoRA adapters on a base folder's frozen denoiser (and text encoder): see the module docstring."""

    frozen_base = True

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        if not cfg.model.base:
            raise GenError("config key 'model.base' is empty: give the model folder to train a LoRA for")
        o = cfg.lora
        if cfg.model.train_text_encoder:  # a LoRA file holds adapters only: a fully trained text encoder is lost
            raise GenError("config key 'model.train_text_encoder': a LoRA holds adapters only; set "
                           "lora.text_encoder=true for text-encoder adapters, or fine-tune fully with gen train")
        if cfg.data.cache and (o.text_encoder or o.instance_prompt):
            what = "lora.text_encoder=true" if o.text_encoder else "lora.instance_prompt"
            raise GenError(f"data.cache stores the captions' text embeddings, so it cannot be used with {what}; "
                           "set data.cache=false")
        if o.dora and o.format == "kohya":
            raise GenError("config key 'lora.format': DoRA adapters are written in the diffusers layout only; "
                           "set lora.format=diffusers or lora.dora=false")
        if o.base_weights != "full":
            if o.base_weights == "fp8":
                quant.need_fp8("lora.base_weights=fp8")
            else:
                quant.bnb.package(f"lora.base_weights={o.base_weights}")
            if o.dora:  # DoRA reads the base weight's norm itself, past the hooks that upcast it
                raise GenError("config key 'lora.base_weights': DoRA needs the full-precision base; set "
                               "lora.base_weights=full or lora.dora=false")
        if o.algo != "lora" and o.format == "diffusers":
            raise GenError(f"config key 'lora.format': {o.algo} adapters are written in the LyCORIS/kohya layout "
                           "(what ComfyUI and A1111 read); set lora.format=kohya")
        align_objective(cfg)
        super().__init__(cfg, device, weight_dtype)
        denoiser = self.model.requires_grad_(False)
        self.frozen["denoiser"] = signature(denoiser)  # the base the adapters are trained on
        if weight_dtype != torch.float32:  # the frozen base in the autocast dtype; the adapters stay fp32
            denoiser.to(dtype=weight_dtype)
        for m in (denoiser, *(t.model for t in self.text_parts.values())) if o.base_weights != "full" else ():
            if o.base_weights == "fp8":  # before the adapters: peft wraps the stored layers, whose hooks upcast them
                quant.store_fp8(m)
            else:  # QLoRA: peft wraps bitsandbytes' layers with its own bnb LoRA layers
                quant.bnb.quantize(m, o.base_weights, weight_dtype)
        kind = self.family.denoiser_part
        options = dict(rank=o.rank, alpha=o.alpha, parts=o.targets, dropout=o.dropout, use_dora=o.dora, algo=o.algo)
        self._add(denoiser, kind, self.family.lora_targets, options)
        texts = self.family.trained_texts() if o.text_encoder else ()
        for name in texts:
            self._add(self.text_parts[name].model, name, lora_lib.TEXT_TARGETS, options)
            self.text_parts[name].model.train()
        self.model = LoraModel(denoiser, self.text_parts, self.family, texts)
        # train.blocks_to_swap: the base's last blocks to host memory, the rest (adapters too) onto the device
        self.swap = BlockSwap(denoiser, cfg.train.blocks_to_swap, device) if cfg.train.blocks_to_swap else None
        if o.instance_prompt:
            log.info("lora.instance_prompt: every image trains with the caption %r (caption files are not used)",
                     o.instance_prompt)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("LoRA rank %d, alpha %s on %s (%s)%s: %.2fM trainable parameters", o.rank,
                 o.alpha if o.alpha is not None else o.rank, kind, o.targets,
                 f" and {', '.join(texts)}" if texts else "", trainable / 1e6)

    @staticmethod
    def _add(model: nn.Module, kind: str, presets: dict, options: dict) -> None:
        """Injects the trainable adapter; its weights train in fp32 whatever the frozen base's dtype."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_lib.lora_config(presets, **options), model, adapter_name=ADAPTER)
        model.requires_grad_(False)
        n = 0
        for name, p in model.named_parameters():
            if any(a in name for a in ADAPTER_PARAMS):
                p.data = p.data.float()
                p.requires_grad_(True)
                n += 1
        if not n:
            raise GenError(f"config key 'lora.targets': {options['parts']!r} matches no layer of the {kind}")

    def _denoiser(self, base) -> nn.Module:
        """Always the base folder's denoiser, trained with the objective it was trained with."""
        self.formulation, self.scheduler_config = base.formulation, base.scheduler_config
        return base.denoiser.float()

    def fingerprint(self) -> dict:
        o = self.cfg.lora
        denoiser = self.model.denoiser
        return {"denoiser": {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")},
                "objective": formulations.to_dict(self.formulation),
                "lora": dict(rank=o.rank, alpha=o.alpha, dropout=o.dropout, targets=o.targets,
                             **({"algo": o.algo} if o.algo != "lora" else {}),
                             text_encoder=o.text_encoder, dora=o.dora, instance_prompt=o.instance_prompt)}

    def loss(self, model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        if self.cfg.lora.instance_prompt and "text" in batch:  # the subject preset: one caption for every image
            prior = batch.get("prior", [False] * len(batch["text"]))  # class images (train/prior.py) keep theirs
            batch = {**batch, "text": [t if p else self.cfg.lora.instance_prompt for t, p in zip(batch["text"], prior)]}
        return super().loss(model, batch, g)

    @torch.no_grad()
    def validate(self, model: LoraModel) -> list | None:
        """Per seed, a row of the prompts without the LoRA, then a row with it."""
        v = self.cfg.validation
        if not v.prompts:
            return None
        # Pipeline freezes and evals what it samples with; the live text encoder too when `model` is an EMA copy
        modules = [model, *(t.model for t in self.texts)]
        flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        modes = [(m, m.training) for m in modules]
        layers = _tuner_layers(model)
        try:
            pipe = self.pipeline(model)
            images = []
            for seed in v.seeds:
                for enabled in (False, True):
                    for layer in layers:
                        layer.enable_adapters(enabled)
                    images += pipe(list(v.prompts), seed=seed).images
            return images
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.train(mode)

    @property
    def export_name(self) -> str:
        return "lora.safetensors"

    @property
    def file_format(self) -> str:
        """lora.format, or for auto: kohya for LoHa/LoKr, diffusers for DoRA (the only layouts that hold them),
        else the family's (kohya for SD-1.x/2.x and SDXL)."""
        o = self.cfg.lora
        if o.format != "auto":
            return o.format
        return "kohya" if o.algo != "lora" else "diffusers" if o.dora else self.family.lora_format

    def export(self, model: LoraModel, path, recipe: dict) -> None:
        """Writes the adapters as one LoRA file (lora.format layout) with the recipe in its header."""
        o = self.cfg.lora
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / self.export_name
        keep = ("objective", "data", "optim", "train", "lora", "sampling", "trained_steps")
        recipe = {"model": {"base": self.cfg.model.base}, **{k: recipe[k] for k in keep if k in recipe}}
        recipe["lora"] = {**recipe.get("lora", {}), "alpha": o.alpha if o.alpha is not None else o.rank}
        lora_lib.save_lora(path, model.denoiser, model.text_parts, ADAPTER, format=self.file_format, recipe=recipe,
                           base_model=self.cfg.model.base, dtype=SAVE_DTYPES[o.save_dtype],
                           formulation=self.formulation, family=self.family)


def main(config: str, overrides: list[str]) -> int:
    """`gen lora CONFIG [key=value ...]`: trains (or resumes) and writes OUTPUT_DIR/lora.safetensors."""
    from train.config import load_config
    from train.loop import train

    cfg = load_config(config, overrides)
    if not cfg.model.base:
        raise GenError("config key 'model.base' is empty: give the model folder to train a LoRA for")
    align_objective(cfg)
    out = train(cfg, task_class=LoraTask)
    m = cfg.model  # a single-file base's component files, as gen sample takes them
    parts = "".join(f" --text-encoder {f}" for f in m.text_encoders)
    parts += f" --vae {m.vae}" if Path(m.vae).is_file() else ""
    print(f"LoRA: {out}" + (f"\n  use it: gen sample PROMPT --model {cfg.model.base}{parts} --lora {out}"
                            if Path(out).suffix == ".safetensors" else ""), file=sys.stderr)
    return 0
