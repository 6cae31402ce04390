"""Memory options that change where and in what pieces the work runs, never the maths: VAE tiling/slicing and
streamed (group) offload. Each is a switch on the modules as diffusers has it (AutoencoderKL.enable_tiling,
diffusers.hooks.apply_group_offloading), so the models' code stays as it is. Weight storage is gen/quant. Also the
device and dtype a pipeline runs in (resolve_device, resolve_dtype).
"""

from __future__ import annotations

import torch

from gen.errors import GenError
from gen.models import vae as vae_lib

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise GenError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenError("device 'cuda' was asked for, but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GenError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                       f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU by default, fp16 on CUDA."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GenError(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16")
    return DTYPES[dtype]


VAE_TILE = 512  # pixels: the tile a 2048 px SDXL or 2 MP Flux image is decoded in, memory as a 512 px decode


def vae_tiling(vae, tile_size: int | None = None) -> int:
    """Decodes (and encodes) images larger than `tile_size` pixels (default 512, or the VAE's own config.sample_size
    where that is smaller) in overlapping tiles blended at the seams, and a batch one image at a time: diffusers'
    AutoencoderKL.enable_tiling() + enable_slicing(), with the tile set for every family alike (diffusers reads it
    from config.sample_size: 1024 for SDXL, SD3 and Flux, which bounds little). Returns the tile size in pixels."""
    f = vae_lib.scale_factor(vae)
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


OFFLOAD_MODES = ("model", "group", "sequential")  # per component; blocks of the denoiser / text encoders; leaves


def check_offload(mode: str, blocks: int = 1) -> None:
    if mode not in OFFLOAD_MODES:
        raise GenError(f"unknown offload mode {mode!r}; choose {', '.join(OFFLOAD_MODES)}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise GenError(f"the offload block count must be an integer >= 1, not {blocks!r}")
    if blocks != 1 and mode != "group":
        raise GenError(f"the offload block count (--offload-blocks) applies to offload 'group', not {mode!r}")


def block_path(module: torch.nn.Module) -> list[str]:
    """The names that lead from `module` to its largest ModuleList of blocks (CLIP: encoder.layers ->
    ["encoder"]; a UNet's or transformer's own blocks: []), which diffusers' block-level offload takes
    as `block_modules` to reach nested blocks instead of moving a text encoder as one group."""
    lists = [(sum(p.numel() for p in m.parameters()), -name.count("."), name) for name, m in module.named_modules()
             if isinstance(m, torch.nn.ModuleList) and name]  # the outermost of equals (T5: block, not block.0.layer)
    return max(lists)[2].split(".")[:-1] if lists else []


def blocks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) for `module`'s blocks in the order they run: the items of the ModuleLists (and Sequentials)
    directly under the module block_path leads to, the groups diffusers' block-level offload makes (Flux:
    transformer_blocks then single_transformer_blocks; a UNet: down_blocks then up_blocks)."""
    path = ".".join(block_path(module))
    owner, prefix = module.get_submodule(path), path + "." if path else ""
    return [(f"{prefix}{name}.{i}", b) for name, c in owner.named_children()
            if isinstance(c, (torch.nn.ModuleList, torch.nn.Sequential)) for i, b in enumerate(c)]


class Streamed:
    """Streamed offload of the denoiser and the T5 text encoder (Pipeline) with diffusers' group-offloading hooks
    (diffusers.hooks.apply_group_offloading): their weights stay on the CPU and each group of `blocks` blocks
    ("group") or each layer ("sequential") visits `device` only while it runs. On CUDA the next group is
    prefetched on a side stream from pinned host memory (diffusers' streams take groups of one block: with
    blocks > 1 the groups move synchronously). The hooks are (re)installed at a call's start whenever a module's
    weights changed since (LoRAs loaded, fused or unloaded), as diffusers' own LoRA loaders re-apply them."""

    def __init__(self, mode: str, device: torch.device, blocks: int = 1):
        check_offload(mode, blocks)
        self.mode, self.device, self.blocks = mode, device, blocks
        self._installed: dict[int, tuple] = {}  # id(module) -> the weights it was hooked with

    @staticmethod
    def _weights(module: torch.nn.Module) -> tuple:
        return tuple((id(t), t.data_ptr()) for t in (*module.parameters(), *module.buffers()))

    def install(self, *modules: torch.nn.Module) -> None:
        from diffusers.hooks import apply_group_offloading

        stream = self.device.type == "cuda" and (self.mode == "sequential" or self.blocks == 1)
        for m in modules:
            if self._installed.get(id(m)) == self._weights(m):
                continue
            self.remove(m)
            kind = "leaf_level" if self.mode == "sequential" else "block_level"
            blocks = self.blocks if kind == "block_level" else None
            apply_group_offloading(m, onload_device=self.device, offload_device=torch.device("cpu"), offload_type=kind,
                                   num_blocks_per_group=blocks, use_stream=stream, block_modules=block_path(m) or None)
            self._installed[id(m)] = self._weights(m)

    def holds(self, module: torch.nn.Module) -> bool:
        return id(module) in self._installed

    def remove(self, module: torch.nn.Module) -> None:
        """Ends the streaming of `module` (its weights stay where the hooks left them: the CPU)."""
        from diffusers.hooks import HookRegistry
        from diffusers.hooks import group_offloading as go

        if self._installed.pop(id(module), None) is None:
            return
        registry = HookRegistry.check_if_exists_or_initialize(module)
        for name in (go._GROUP_OFFLOADING, go._LAYER_EXECUTION_TRACKER, go._LAZY_PREFETCH_GROUP_OFFLOADING):
            registry.remove_hook(name, recurse=True)
