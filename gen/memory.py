"""Memory options that change where and in what pieces the work runs, never the maths: VAE tiling/slicing and
streamed (group) offload. Each is a switch on the modules as diffusers has it (AutoencoderKL.enable_tiling,
diffusers.hooks.apply_group_offloading), so the models' code stays as it is. Weight storage is gen/quant.
"""

from __future__ import annotations

import torch

from gen.errors import GenError

VAE_TILE = 512  # pixels: the tile a 2048 px SDXL or 2 MP Flux image is decoded in, memory as a 512 px decode


def vae_tiling(vae, tile_size: int | None = None) -> int:
    """Decodes (and encodes) images larger than `tile_size` pixels (default 512, or the VAE's own config.sample_size
    where that is smaller) in overlapping tiles blended at the seams, and a batch one image at a time: diffusers'
    AutoencoderKL.enable_tiling() + enable_slicing(), with the tile set for every family alike (diffusers reads it
    from config.sample_size: 1024 for SDXL, SD3 and Flux, which bounds little). Returns the tile size in pixels."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    own = vae.config.sample_size
    own = own[0] if isinstance(own, (list, tuple)) else own
    tile = min(VAE_TILE, own) if tile_size is None else tile_size
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 4 * f or tile % (4 * f):
        # a tile of whole latent cells whose quarter (the blended overlap) is whole too, as diffusers' maths needs
        raise GenError(f"the VAE tile size must be a multiple of {4 * f} pixels (4 x the VAE factor {f}), "
                       f"not {tile_size!r}")
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // f
    vae.tile_overlap_factor = 0.25
    vae.enable_tiling()
    vae.enable_slicing()
    return tile


def no_vae_tiling(vae) -> None:
    """Ends vae_tiling: whole-image decode and encode."""
    vae.disable_tiling()
    vae.disable_slicing()
