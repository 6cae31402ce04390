"""train.distributed=fsdp: the trained model (and its EMA) sharded by block over the processes.

torch's `fully_shard` (FSDP2) is applied here directly rather than through accelerate's FSDP plugin: accelerate
turns FSDP on for GPU process groups only (never for MULTI_CPU), so its path could not run, nor be tested, on
CPUs over gloo; `fully_shard` itself is what accelerate's FSDP2 path calls, and it runs on both. The blocks are
the classes the model names in `_no_split_modules` (diffusers' and transformers' "keep together" list: a DiT's
or an SD3/Flux transformer's blocks, a UNet's resnet and attention blocks), each its own unit, then the root.

Checkpoints stay in the atomic step folders of train/checkpoint.py, as per-process parts: each process writes
its own shards of the weights, EMA and optimizer moments (safetensors; nothing pickled, unlike the metadata of
torch.distributed.checkpoint), so a resume needs the same number of processes. Sampling and export gather a
full copy on the main process.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gen.errors import GenError


def block_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes of `model`'s submodules named in the `_no_split_modules` of any module inside it."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. a gradient norm over shards); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(obj):
    """Nested state with each DTensor replaced by this process's shard."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_local(v) for v in obj)
    return obj


def _like(shard: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A saved shard as a DTensor laid out as `ref` (a parameter or its optimizer moment) is now."""
    from torch.distributed.tensor import DTensor

    if not isinstance(ref, DTensor):
        return shard
    if shard.shape != ref.to_local().shape:
        raise GenError(f"a sharded checkpoint holds a shard of shape {tuple(shard.shape)} where this run has "
                       f"{tuple(ref.to_local().shape)}: resume with the number of processes that saved it")
    return DTensor.from_local(shard.to(ref.device, ref.dtype), ref.device_mesh, ref.placements,
                              shape=ref.shape, stride=ref.stride())


class Sharded:
    """The FSDP specifics of one run: shard, save and load shards, gather a full model."""

    def __init__(self, acc, mixed_precision: str, dtype: torch.dtype):
        if mixed_precision == "fp16":
            raise GenError("config keys 'train.distributed' and 'train.mixed_precision': fsdp trains in fp32 or "
                           "bf16 (fp16 would need a grad scaler over shards); set train.mixed_precision=bf16")
        if not torch.distributed.is_initialized():
            raise GenError("train.distributed=fsdp shards over a process group: launch with `accelerate launch "
                           "--multi_gpu --num_processes N -m gen train ...` or torchrun (one process is fine)")
        self.acc, self.world = acc, acc.num_processes
        self.compute = dtype if mixed_precision == "bf16" else None
        self.skeleton: nn.Module | None = None

    def shard(self, model: nn.Module, ema=None) -> None:
        """Shards `model` (and the EMA's copy, the same way) in place; before the optimizer is built, since
        `fully_shard` swaps each parameter for a DTensor."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not all(p.requires_grad for p in model.parameters()):  # e.g. LoRA: a few small adapters on a frozen base
            raise GenError("train.distributed=fsdp shards models whose weights all train; this one holds frozen "
                           "weights (LoRA adapters?): use train.distributed=ddp")
        blocks = block_classes(model)
        if not blocks:
            raise GenError(f"train.distributed=fsdp: {type(model).__name__} names no blocks (_no_split_modules) "
                           "to shard by; use train.distributed=ddp")
        models = [model] + ([ema.model] if ema is not None else [])
        with torch.no_grad():  # every process starts from the main process's weights, as DDP makes them
            for t in (t for m in models for t in [*m.parameters(), *m.buffers()]):
                torch.distributed.broadcast(t, src=0)
        # A parameter-free copy (frozen buffers kept) that a gathered full state dict is loaded into.
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
        self.skeleton = copy.deepcopy(model, memo)
        policy = MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32)
        for m in models:
            for sub in reversed(list(m.modules())[1:]):  # inner blocks first (a UNet's up block holds others)
                if isinstance(sub, blocks):
                    fully_shard(sub, mp_policy=policy)
            fully_shard(m, mp_policy=policy)

    def state(self, model: nn.Module, optimizer, ema) -> dict:
        """This process's parts of a checkpoint: its shards of the weights, EMA and optimizer state."""
        parts = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        if ema is not None:
            parts["ema"] = ema.model.state_dict()
        return {k: _local(v) for k, v in parts.items()}

    def load(self, local: dict, state: dict, model: nn.Module, optimizer, ema) -> None:
        """Puts this process's saved shards back (`state`: the checkpoint's state.json)."""
        saved_world = state.get("sharded_over")
        if saved_world != self.world or "model" not in local:
            what = f"sharded over {saved_world} processes" if saved_world else "unsharded"
            raise GenError(f"cannot resume from a checkpoint saved {what} with train.distributed=fsdp over "
                           f"{self.world} processes: resume with the setting and process count that saved it")
        for m, sd in [(model, local["model"])] + ([(ema.model, local["ema"])] if ema is not None else []):
            now = m.state_dict()
            m.load_state_dict({k: _like(v, now[k]) for k, v in sd.items()})
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved = local["optimizer"]
        saved["state"] = {i: {k: _like(v, params[i]) if v.ndim else v for k, v in s.items()}
                          for i, s in saved["state"].items()}
        optimizer.load_state_dict(saved)
        if ema is not None:
            ema.num_updates = state["ema_updates"]

    def full(self, model: nn.Module) -> nn.Module | None:
        """A full, unsharded copy of a sharded model on the main process (None on the others); every
        process must call it, as the shards are gathered."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.acc.is_main_process:
            return None
        out = copy.deepcopy(self.skeleton)
        out.load_state_dict(sd, assign=True)
        return out.to(self.acc.device).eval()
