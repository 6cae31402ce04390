"""stage=controlnet: a ControlNet (Zhang et al. 2023) trained through the one loop on image + control image pairs.

ControlNetTask is DenoiserTask (train/task.py) with model.base's denoiser frozen and a zero-initialised ControlNet
made from it (Family.new_controlnet: diffusers' ControlNetModel.from_unet for SD-1.x/2.x and SDXL,
SD3ControlNetModel / FluxControlNetModel.from_transformer for SD3 and Flux) as the only trained module; the loss is
the base's own loss (eps / v, or rectified flow) with the ControlNet's residuals added to the denoiser's call, as
diffusers' train_controlnet.py, train_controlnet_sd3.py and train_controlnet_flux.py compute it; SD3 and Flux take
the hint as VAE latents (Family.control_train_hint). Data: an image folder whose images carry control images
(train/data/controls.py). Checkpoints hold the ControlNet and its optimizer state (the loop's exact resume covers
them); validation grids show, per seed, each prompt's hint and the image it steers. The run exports `controlnet/`
(a diffusers folder: from_pretrained, gen sample --control) and `controlnet.safetensors`: a UNet ControlNet in the
original layout (`control_model.*`, what A1111's extension, ComfyUI and diffusers' from_single_file read;
gen/control/files.py), an SD3 or Flux one in diffusers' keys (what ComfyUI's loaders read; gen/control/keyed.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from gen.errors import GenError
from train.config import Config
from train.task import DenoiserTask, Shared, align_objective, signature

log = logging.getLogger("gen")

HINT_WIDTHS = (16, 32, 96, 256)  # diffusers' conditioning_embedding_out_channels


class ControlledDenoiser(nn.Module):
    """What the loop trains: the ControlNet, steering the frozen denoiser that runs beside it (not in its state, so
    checkpoints and EMA hold the ControlNet alone). Called with the family's conditioning and the batch's hints
    (control_train_hint's); the ControlNet's residuals go into the denoiser's call as the family's sampling adds
    them (Family.control_call, at weight 1, then Family.predict)."""

    def __init__(self, controlnet: nn.Module, denoiser: nn.Module, family):
        super().__init__()
        self.controlnet, self.family = controlnet, family
        self.base = Shared(denoiser=denoiser)

    @property
    def config(self):
        return self.controlnet.config

    def enable_gradient_checkpointing(self) -> None:
        self.controlnet.enable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, hint: torch.Tensor) -> torch.Tensor:
        residuals = self.family.control_call(self.controlnet, x, t, cond, hint, 1.0)
        return self.family.predict(self.base["denoiser"], x, t, cond, **residuals)


def hint_widths(cfg: Config, vae_factor: int) -> tuple[int, ...]:
    """controlnet.hint_channels, or diffusers' widths cut to the levels that make the VAE's factor."""
    levels = int(math.log2(vae_factor)) + 1
    widths = tuple(cfg.controlnet.hint_channels) or (HINT_WIDTHS + (HINT_WIDTHS[-1],) * levels)[:levels]
    if len(widths) != levels or 2 ** (levels - 1) != vae_factor:
        raise GenError(f"config key 'controlnet.hint_channels': this VAE shrinks images {vae_factor}x, so the hint "
                       f"encoder needs {levels} widths (each level after the first halves the hint), not "
                       f"{len(widths)}")
    return widths


class ControlNetTask(DenoiserTask):
    """A ControlNet on model.base's frozen UNet: see the module docstring."""

    export_name = "controlnet"

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        if cfg.model.train_text_encoder:
            raise GenError("config key 'model.train_text_encoder': a ControlNet trains alone, the base stays frozen; "
                           "set model.train_text_encoder=false")
        if cfg.data.cache:
            raise GenError("config key 'data.cache': the cache holds no control images; set data.cache=false")
        cfg.model.init_from_base = True  # the ControlNet is a copy of the base's UNet encoder
        align_objective(cfg)  # it trains with the objective its base samples with
        super().__init__(cfg, device, weight_dtype)
        denoiser = self.model.requires_grad_(False)
        net = self.family.new_controlnet(denoiser, **self._options())
        self.frozen["denoiser"] = signature(denoiser)
        if weight_dtype != denoiser.dtype:  # (diffusers warns on any cast, even to the dtype it has)
            denoiser.to(dtype=weight_dtype)
        self.model = ControlledDenoiser(net.float().to(device).requires_grad_(True), denoiser, self.family)
        self.hints = self._validation_hints()
        self.grid_cols = 2 * len(cfg.validation.prompts)

    def _check_kind(self) -> None:
        f = self.family
        if not f.control_classes:
            raise GenError(f"stage=controlnet: model.base {self.cfg.model.base} is a {f.title} model, which takes no "
                           "ControlNet; ControlNets train on SD-1.x/2.x, SDXL, SD3 and Flux bases")

    def _options(self) -> dict:
        """The controlnet.* keys the family's new_controlnet takes (hint_channels: UNet ControlNets; num_layers:
        SD3 and Flux; num_single_layers: Flux); a key set for a family that does not take it is an error."""
        o, takes = self.cfg.controlnet, inspect.signature(self.family.new_controlnet).parameters
        given = {k: v for k, v in (("hint_channels", tuple(o.hint_channels)), ("num_layers", o.num_layers),
                                   ("num_single_layers", o.num_single_layers)) if v not in (None, ())}
        for key in sorted(given.keys() - takes.keys()):
            raise GenError(f"config key 'controlnet.{key}': ControlNets for {self.family.title} models have no such "
                           f"setting; remove it (they take {', '.join(f'controlnet.{k}' for k in takes if k != 'denoiser')})")
        for key in ("num_layers", "num_single_layers"):
            if given.get(key, 1) < 1:
                raise GenError(f"config key 'controlnet.{key}': {given[key]} blocks; give 1 or more (or null)")
        if "hint_channels" in takes:
            given["hint_channels"] = hint_widths(self.cfg, self.vae_scale_factor)
        return given

    def _validation_hints(self) -> list:
        """One hint image a validation prompt: validation.control_images, else the first training images'."""
        from gen.control.hints import hint_image

        v = self.cfg.validation
        if not v.prompts:
            return []
        files = list(v.control_images)
        if not files:
            from train.data import first_hints

            files = first_hints(self.cfg.data, len(v.prompts))
        if len(files) == 1:
            files = files * len(v.prompts)
        if len(files) != len(v.prompts):
            raise GenError(f"config key 'validation.control_images': {len(files)} images for {len(v.prompts)} "
                           "prompts; give one for all, or one a prompt")
        return [hint_image(f) for f in files]

    def fingerprint(self) -> dict:
        return {"controlnet": {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")},
                "objective": super().fingerprint()["objective"]}

    def model_inputs(self, batch: dict, g: torch.Generator) -> dict:
        return {"hint": self.family.control_train_hint(self.vae, self.model.controlnet,
                                                       batch["control"].to(self.vae.device), g)}

    def predict(self, model: ControlledDenoiser, x, t, cond: dict, inputs: dict) -> torch.Tensor:
        return model(x, t, cond, inputs["hint"])

    def samples(self, model: ControlledDenoiser) -> list:
        """Per seed, each prompt's hint and the image the ControlNet steers with it, at data.resolution."""
        from gen.control import Control

        v, size = self.cfg.validation, self.cfg.data.resolution  # the size the hints were trained at
        pipe = self.pipeline(model.base["denoiser"])
        net = model.controlnet
        if net.dtype != pipe.dtype:  # the pipeline would cast the trained weights in place
            net = copy.deepcopy(net)
        out = []
        for seed in v.seeds:
            for prompt, hint in zip(v.prompts, self.hints):
                image = pipe(prompt, seed=seed, control=[Control(net, hint)], height=size, width=size).images[0]
                out += [hint.resize(image.size), image]
        return out

    def export(self, model: ControlledDenoiser, path, recipe: dict) -> None:
        """`path` (a diffusers ControlNet folder) and `path`.safetensors: a UNet ControlNet in the original layout,
        an SD3 or Flux one in diffusers' keys (gen.control.keyed; what ComfyUI's loaders read)."""
        from gen.control import keyed
        from gen.control.files import to_original
        from gen.folder import GEN_CONFIG

        path, net = Path(path), model.controlnet
        net.save_pretrained(path, safe_serialization=True)
        (path / GEN_CONFIG).write_text(json.dumps({"recipe": recipe}, indent=2, default=str))
        if type(net).__name__ == "ControlNetModel":
            to_original(net, path.with_suffix(".safetensors"))
        else:
            keyed.write(net, path.with_suffix(".safetensors"), model.base["denoiser"])
