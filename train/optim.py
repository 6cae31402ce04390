"""Optimizers (`optim.name`) and learning-rate schedules (`optim.schedule`) for the one loop.

Each optimizer comes from the maintained package kohya's sd-scripts, OneTrainer and SimpleTuner use, imported
only when chosen (a missing one is a GenError saying what to install). Every one takes the loop's parameter
groups (weight decay on matrices only) and `optim.lr`, `optim.betas`, `optim.eps` where it has them; anything
else goes through `optim.options` (e.g. `{momentum: 0.9}` for sgd, `{d_coef: 2}` for prodigy). Its state_dict
is plain tensors and numbers, so checkpoints hold it and resume is exact (tests/train/test_optim.py).
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path

import torch

from gen.errors import GenError
from train.config import Config, OptimConfig

EXTRA = "pip install 'gen[optim]'"


def _package(module: str, pip_name: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GenError(f"optim.name={name} needs {pip_name}: pip install {pip_name} (or {EXTRA})") from None


def _adamw(o: OptimConfig, groups):
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **o.options)


def _adamw8bit(o: OptimConfig, groups):
    """bitsandbytes' 8-bit AdamW (Dettmers et al. 2022): block-wise quantized moments; runs on CPUs too."""
    bnb = _package("bitsandbytes", "bitsandbytes", "adamw8bit")
    return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=o.betas, eps=o.eps, **o.options)


def _prodigy(o: OptimConfig, groups):
    """Prodigy (Mishchenko & Defazio 2023) estimates the step size itself: optim.lr multiplies it (1.0 is usual)."""
    return _package("prodigyopt", "prodigyopt", "prodigy").Prodigy(groups, lr=o.lr, betas=o.betas, eps=o.eps,
                                                                   **o.options)


def _adafactor(o: OptimConfig, groups):
    """transformers' Adafactor (Shazeer & Stern 2018) with an external LR (the schedule's), as kohya runs it."""
    from transformers.optimization import Adafactor

    options = dict(relative_step=False, scale_parameter=False, warmup_init=False) | o.options
    return Adafactor(groups, lr=o.lr, **options)


def _lion(o: OptimConfig, groups):
    """Lion (Chen et al. 2023), lucidrains' lion-pytorch: sign updates; use about 1/3 to 1/10 of AdamW's lr."""
    return _package("lion_pytorch", "lion-pytorch", "lion").Lion(groups, lr=o.lr, betas=o.betas, **o.options)


def _sgd(o: OptimConfig, groups):
    return torch.optim.SGD(groups, lr=o.lr, **o.options)


OPTIMIZERS = {"adamw": _adamw, "adamw8bit": _adamw8bit, "prodigy": _prodigy, "adafactor": _adafactor,
              "lion": _lion, "sgd": _sgd}


def build_optimizer(o: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """optim.name's optimizer over the loop's parameter groups."""
    try:
        return OPTIMIZERS[o.name](o, groups)
    except TypeError as e:  # an optim.options key the optimizer does not take
        raise GenError(f"config key 'optim.options': {o.name} refuses {o.options}: {e}") from None


def check_resume(saved_config: dict, o: OptimConfig, path: Path) -> None:
    """A checkpoint's optimizer state fits only the optimizer that wrote it."""
    saved = (saved_config.get("optim") or {}).get("name", "adamw")  # checkpoints from before optim.name: AdamW
    if saved != o.name:
        raise GenError(f"cannot resume from {path}: it holds {saved} state and optim.name is {o.name}; set "
                       f"optim.name={saved}, or start afresh (train.resume=none or a new train.output_dir)")


HYPER = ("lr", "betas", "weight_decay", "eps", "options", "warmup_steps", "schedule", "min_lr_ratio", "cycles",
         "grad_clip")


def check_regrouping(saved_config: dict, o: OptimConfig, path: Path) -> None:
    """Weight decay on or off changes the parameter groups (train/loop.py), which the saved state cannot follow."""
    was = (saved_config.get("optim") or {}).get("weight_decay", o.weight_decay)
    if bool(was) != bool(o.weight_decay):
        raise GenError(f"cannot resume from {path}: optim.weight_decay was {was} there and is {o.weight_decay} now; "
                       "turning weight decay on or off regroups the parameters: set it to a non-zero value as "
                       f"{'there' if was else 'zero, as there'}, or start afresh (train.resume=none)")


def apply_changes(saved_config: dict, o: OptimConfig, optimizer, scheduler) -> None:
    """A resumed optimizer keeps the hyperparameters it was saved with; the config's changed ones (lr, betas,
    weight decay, ...) replace them here, from the resumed step on, with a log line (sd-scripts and accelerate users
    expect an edited lr to apply on resume). The schedule's shape and grad_clip come from the config anyway."""
    saved = saved_config.get("optim") or {}
    changed = {k: (saved[k], getattr(o, k)) for k in HYPER if k in saved and _plain(saved[k]) != _plain(getattr(o, k))}
    if not changed:
        return
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        new = {"lr": o.lr * factor, "initial_lr": o.lr, "betas": tuple(o.betas), "eps": o.eps,
               "weight_decay": o.weight_decay if group["weight_decay"] else 0.0, **o.options}
        group.update({k: v for k, v in new.items() if k in group and type(group[k]) is type(v)})  # Adafactor: eps pair
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    logging.getLogger("gen").warning("resuming with changed optim settings, applied from step %d on: %s",
                                     scheduler.last_epoch, ", ".join(f"optim.{k} {a} -> {b}"
                                                                     for k, (a, b) in changed.items()))


def _plain(x):
    return list(x) if isinstance(x, (tuple, list)) else x


def lr_lambda(cfg: Config):
    """Linear warmup, then the schedule over the rest of train.max_steps: constant; cosine or linear decay to
    lr * min_lr_ratio; or cosine_with_restarts, `optim.cycles` cosine decays each restarting at full lr
    (Loshchilov & Hutter 2017's SGDR with hard restarts, as diffusers' and kohya's `cosine_with_restarts`)."""
    o, total = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "linear":
            shape = 1 - progress
        elif o.schedule == "cosine_with_restarts":
            shape = 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((o.cycles * progress) % 1.0)))
        else:
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape
    return factor
