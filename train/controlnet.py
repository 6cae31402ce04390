"""stage=controlnet: a ControlNet (Zhang et al. 2023) trained through the one loop on image + control image pairs.

ControlNetTask is DenoiserTask (train/task.py) with model.base's UNet frozen and a ControlNet made from it
(diffusers' ControlNetModel.from_unet: the UNet's encoder copied, zero-initialised output convolutions) as the only
trained module; the loss is the base's denoising loss with the ControlNet's residuals added to the UNet's call, as
diffusers' train_controlnet.py computes it. SD-1.x/2.x and SDXL (whatever family takes a ControlNetModel and has a
UNet). Data: an image folder whose images carry control images (train/data/controls.py). Checkpoints hold the
ControlNet and its optimizer state (the loop's exact resume covers them); validation grids show, per seed, each
prompt's hint and the image it steers. The run exports `controlnet/` (a diffusers folder: ControlNetModel
.from_pretrained, gen sample --control) and `controlnet.safetensors` in the original layout
(`control_model.*`, what A1111's extension, ComfyUI and diffusers' from_single_file read; gen/control/files.py).
"""

from __future__ import annotations

import copy
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


class ControlledUNet(nn.Module):
    """What the loop trains: the ControlNet, steering the frozen UNet that runs beside it (not in its state, so
    checkpoints and EMA hold the ControlNet alone). Called as the UNet is, plus `controlnet_cond` (N, 3, H, W) in
    [0, 1]."""

    def __init__(self, controlnet: nn.Module, unet: nn.Module):
        super().__init__()
        self.controlnet = controlnet
        self.base = Shared(unet=unet)

    @property
    def config(self):
        return self.controlnet.config

    def enable_gradient_checkpointing(self) -> None:
        self.controlnet.enable_gradient_checkpointing()

    def forward(self, x, t, *, controlnet_cond: torch.Tensor, return_dict: bool = False, **kwargs):
        down, mid = self.controlnet(x, t, controlnet_cond=controlnet_cond, return_dict=False, **kwargs)
        return self.base["unet"](x, t, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                 return_dict=return_dict, **kwargs)


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
        from diffusers import ControlNetModel

        if cfg.model.train_text_encoder:
            raise GenError("config key 'model.train_text_encoder': a ControlNet trains alone, the base stays frozen; "
                           "set model.train_text_encoder=false")
        if cfg.data.cache:
            raise GenError("config key 'data.cache': the cache holds no control images; set data.cache=false")
        cfg.model.init_from_base = True  # the ControlNet is a copy of the base's UNet encoder
        align_objective(cfg)  # it trains with the objective its base samples with
        super().__init__(cfg, device, weight_dtype)
        unet = self.model.requires_grad_(False)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_widths(cfg, self.vae_scale_factor))
        self.frozen["denoiser"] = signature(unet)
        if weight_dtype != unet.dtype:  # (diffusers warns on any cast, even to the dtype it has)
            unet.to(dtype=weight_dtype)
        self.model = ControlledUNet(net.float().to(device).requires_grad_(True), unet)
        self.hints = self._validation_hints()
        self.grid_cols = 2 * len(cfg.validation.prompts)

    def _check_kind(self) -> None:
        f = self.family
        if f.denoiser_part != "unet" or "ControlNetModel" not in f.control_classes:
            raise GenError(f"stage=controlnet trains ControlNets for UNet models (SD-1.x/2.x, SDXL); model.base "
                           f"{self.cfg.model.base} is a {f.title} model")

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

    def model_inputs(self, batch: dict) -> dict:
        return {"controlnet_cond": batch["control"].to(self.vae.device)}

    def samples(self, model: ControlledUNet) -> list:
        """Per seed, each prompt's hint and the image the ControlNet steers with it, at data.resolution."""
        from gen.control import Control

        v, size = self.cfg.validation, self.cfg.data.resolution  # the size the hints were trained at
        pipe = self.pipeline(model.base["unet"])
        net = model.controlnet
        if net.dtype != pipe.dtype:  # the pipeline would cast the trained weights in place
            net = copy.deepcopy(net)
        out = []
        for seed in v.seeds:
            for prompt, hint in zip(v.prompts, self.hints):
                image = pipe(prompt, seed=seed, control=[Control(net, hint)], height=size, width=size).images[0]
                out += [hint.resize(image.size), image]
        return out

    def export(self, model: ControlledUNet, path, recipe: dict) -> None:
        """`path` (a diffusers ControlNet folder) and `path`.safetensors in the original layout."""
        from gen.control.files import to_original
        from gen.folder import GEN_CONFIG

        path, net = Path(path), model.controlnet
        net.save_pretrained(path, safe_serialization=True)
        (path / GEN_CONFIG).write_text(json.dumps({"recipe": recipe}, indent=2, default=str))
        to_original(net, path.with_suffix(".safetensors"))
