"""Presets for diffusers' UNet2DConditionModel; any SD-1.x/2.x UNet folder loads as-is."""

from __future__ import annotations

from diffusers import UNet2DConditionModel

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

UNET_PRESETS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
    "small": dict(block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=16,
                  down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
                  cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32),
    # ~81M parameters: the SD-1.5 layout at 3/10 width.
    "base": dict(block_out_channels=(96, 192, 384, 384), layers_per_block=2, sample_size=32,
                 down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                 cross_attention_dim=768, attention_head_dim=8),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
                 down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                 cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=96,
                down_block_types=_SD_DOWN, up_block_types=_SD_UP, cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
}


def build_unet(preset: str = "tiny", **overrides) -> UNet2DConditionModel:
    """A randomly initialised UNet2DConditionModel from a named preset."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose from {sorted(UNET_PRESETS)}")
    return UNet2DConditionModel(**{**UNET_PRESETS[preset], **overrides})
