"""Low-memory LoRA training: block swapping of the frozen base (`train.blocks_to_swap`, as kohya sd-scripts'
--blocks_to_swap) and activation offload (`train.activation_offload`).

Block swap: the frozen weights of the denoiser's last N blocks (in the order they run: the blocks of the ModuleLists
gen.memory.blocks finds, UNet down + up blocks, DiT/MMDiT blocks, Flux double then single blocks) live in
(pinned) host memory. A hook copies a block's weights to the device just before its forward and drops the copy right
after; autograd keeps, for the backward, a reference to the host weight instead of the device copy (a saved-tensors
hook around the block), and the backward copies it back for the one node that needs it. Everything else autograd
saves goes to whatever saved-tensors hook is outside (gradient checkpointing's, save_on_cpu's), so the swap composes
with both. Trainable weights (the adapters) stay on the device. The values are copied, never changed: on a CPU, where
the "device" copies are real .to() copies too, gradients equal the run without swapping bitwise.

Activation offload: the forward runs under torch.autograd.graph.save_on_cpu, so what autograd keeps for the backward
(with gradient checkpointing: the checkpointed blocks' inputs and the layers outside them) waits in pinned host
memory; inside a checkpointed block the checkpoint's own hook stays innermost (nothing is kept, it is recomputed).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from gen.errors import GenError
from gen.memory import blocks

log = logging.getLogger("gen")


class _Hooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of one swapped block's forward: a view of a swapped weight's device copy is kept as (host
    weight, view geometry) and rebuilt on the device when the backward unpacks it; the rest goes to the hook that was
    innermost before (checkpointing's, save_on_cpu's) or is kept as is."""

    def __init__(self, swap: "BlockSwap", block: int):
        outer = torch._C._autograd._top_saved_tensors_default_hooks(True)  # (pack, unpack) or None
        owners = swap.copies[block]  # device copy storage -> host weight

        def pack(t: torch.Tensor):
            host = owners.get(t.untyped_storage().data_ptr()) if t.device.type == swap.device.type else None
            if host is not None and t.dtype == host.dtype:
                return (True, host, t.shape, t.stride(), t.storage_offset())
            return (False, outer[0](t) if outer else t)

        def unpack(packed):
            if packed[0]:
                _, host, shape, stride, offset = packed
                return swap.fetch(host).as_strided(shape, stride, offset)
            return outer[1](packed[1]) if outer else packed[1]

        super().__init__(pack, unpack)


class BlockSwap:
    """The frozen weights of `model`'s last `n` blocks in host memory, visiting `device` one block at a time in the
    forward, one saved weight at a time in the backward."""

    def __init__(self, model: nn.Module, n: int, device: torch.device):
        found = [b for _, b in blocks(model)]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(found):
            raise GenError(f"config key 'train.blocks_to_swap': the {type(model).__name__} has {len(found)} blocks; "
                           f"give 0 (off) to {len(found)}, not {n!r}")
        self.device, self.blocks = torch.device(device), found[len(found) - n:]
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current one, as .to() reads it
            self.device = torch.device("cuda", torch.cuda.current_device())
        pin = self.device.type == "cuda"
        self.host: list[list[nn.Parameter]] = []  # per block: its frozen parameters, whose .data is the host copy
        for b in self.blocks:
            frozen = [p for p in b.parameters() if not p.requires_grad and p.numel()]  # (an empty one has no storage)
            for p in frozen:
                p.data = p.data.to("cpu").pin_memory() if pin else p.data.to("cpu")
            self.host.append(frozen)
        # everything else on the device: the other blocks, the layers around them, the adapters of these
        kept = {id(p) for ps in self.host for p in ps}
        for m in model.modules():
            for _, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is not None and id(t) not in kept:
                    t.data = t.data.to(self.device)
        self.copies: list[dict[int, torch.Tensor]] = [{} for _ in self.blocks]
        self.fetches = 0  # host -> device copies so far (forward and backward): what a test can count
        self._contexts: dict[int, _Hooks] = {}
        for i, b in enumerate(self.blocks):
            b.register_forward_pre_hook(lambda m, a, i=i: self._load(i))
            b.register_forward_hook(lambda m, a, o, i=i: self._drop(i), always_call=True)
        log.info("train.blocks_to_swap=%d: the frozen weights of %d of %d blocks (%.2fM values) live in host memory",
                 n, n, len(found), sum(p.numel() for ps in self.host for p in ps) / 1e6)

    def fetch(self, host: torch.Tensor) -> torch.Tensor:
        self.fetches += 1
        return host.to(self.device, non_blocking=True, copy=True)

    def _load(self, i: int) -> None:
        copies = self.copies[i]
        for p in self.host[i]:
            host = p.data
            p.data = self.fetch(host)
            copies[p.data.untyped_storage().data_ptr()] = host
        if torch.is_grad_enabled():
            self._contexts[i] = _Hooks(self, i)
            self._contexts[i].__enter__()

    def _drop(self, i: int) -> None:
        context = self._contexts.pop(i, None)
        if context is not None:
            context.__exit__(None, None, None)
        copies = self.copies[i]
        for p in self.host[i]:
            p.data = copies.pop(p.data.untyped_storage().data_ptr(), p.data)

    @property
    def resident(self) -> int:
        """Swapped blocks whose weights are on the device now (0 between steps)."""
        return sum(bool(c) for c in self.copies)


def check(cfg, task, num_processes: int) -> None:
    """Where block swapping and activation offload cannot apply: a one-line GenError naming the key."""
    t = cfg.train
    if t.activation_offload and not t.gradient_checkpointing:
        raise GenError("config key 'train.activation_offload' offloads what gradient checkpointing keeps; set "
                       "train.gradient_checkpointing=true too")
    if not t.blocks_to_swap:
        return
    if not getattr(task, "frozen_base", False):  # a task class (None: a whole denoiser)
        raise GenError("config key 'train.blocks_to_swap' swaps the frozen base's blocks: it applies to LoRA "
                       "training (gen lora), not to a full fine-tune, whose blocks train; set train.blocks_to_swap=0")
    if t.distributed == "fsdp" or num_processes > 1:
        raise GenError("config key 'train.blocks_to_swap' runs in one process (the blocks' host copies are not "
                       "sharded or replicated); set train.blocks_to_swap=0 or run one process")


def offload_context(on: bool, device: torch.device):
    """The context the loss's forward runs in: save_on_cpu with train.activation_offload (`on`), else nothing."""
    if not on:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
