"""The one training loop: every model, objective and (later) stage runs through `train`.

accelerate gives the processes (DDP over NCCL or gloo), mixed precision with fp32 trainable weights
and gradient accumulation; a Task (train/task.py) says what is trained and how its loss is computed.
Exact resume rests on three facts: the data order is a function of the stream position, the loss's
randomness comes from a generator seeded by (seed, process, micro-step), and a checkpoint holds every
other piece of state (weights, EMA, optimizer, LR schedule, grad scaler, RNG states, step).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gen.errors import GenError, Stopped
from train import swap
from train.checkpoint import Checkpointer, rng_state, set_rng_state
from train.config import Config
from train.data import TrainData, loader
from train.distributed import Sharded, plain
from train.ema import EMA
from train.heldout import HeldOut
from train.lock import hold
from train.optim import apply_changes, build_optimizer, check_regrouping, check_resume, lr_lambda
from train.prior import with_class_images
from train.repeats import Repeats
from train.signals import EXIT_CODES, Guard

log = logging.getLogger("gen")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """The source of all randomness of one micro-batch's loss: a pure function of its coordinates."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0]))


def grid(images: list, cols: int):
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


class Trackers:
    """metrics.jsonl always (the loss curve, truncated to the resumed step); TensorBoard or wandb if asked."""

    def __init__(self, cfg: Config, run_dir: Path, step: int, enabled: bool):
        self.enabled, self.tb, self.wandb = enabled, None, None
        self.path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        if self.path.is_file():  # a resumed run rewrites what came after its checkpoint
            rows = [r for r in self.path.read_text().splitlines() if _step_of(r) <= step]
            self.path.write_text("".join(r + "\n" for r in rows))
        kind = cfg.log.tracker
        if kind in ("auto", "tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "logs"))
            except ImportError:
                if kind == "tensorboard":
                    raise GenError("log.tracker=tensorboard needs TensorBoard: pip install tensorboard") from None
                log.info("TensorBoard is not installed (pip install tensorboard); logging to %s only", self.path)
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise GenError("log.tracker=wandb needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project="gen", dir=str(run_dir), config=cfg.to_dict(), resume="allow")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def image(self, step: int, image) -> None:
        if self.tb:
            self.tb.add_image("validation", np.asarray(image), step, dataformats="HWC")
        if self.wandb:
            import wandb
            self.wandb.log({"validation": wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _step_of(row: str) -> float:
    """The step of a metrics.jsonl line; infinite (dropped) for a line a crash tore mid-write."""
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only, not on biases, norms or embeddings (as minGPT): decay would
    shrink the embeddings of rare or not-yet-useful tokens towards one point, and the text tower could no
    longer tell them apart ("left of" vs "right of")."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": [p for _, p in trainable], "weight_decay": 0.0}]
    skip = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm, nn.GroupNorm))
            for p in m.parameters()}
    decay = [p for _, p in trainable if p.ndim >= 2 and id(p) not in skip]
    rest = [p for _, p in trainable if p.ndim < 2 or id(p) in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def resolve_precision(device_type: str, bf16: bool, fast_cpu_bf16: bool = False) -> str:
    """train.mixed_precision=auto on a device: bf16 where it runs it (Ampere and later, or a CPU with AMX),
    fp16 with loss scaling on older GPUs, else fp32 ("no"): CPU bf16 without AMX is emulated and slower."""
    if device_type == "cpu":
        return "bf16" if fast_cpu_bf16 else "no"
    return "bf16" if bf16 else "fp16"


def auto_precision(cfg: Config) -> None:
    """Replaces train.mixed_precision=auto by what this machine supports (the run's config.yaml records it)."""
    if cfg.train.mixed_precision != "auto":
        return
    if torch.cuda.is_available():
        chosen = resolve_precision("cuda", torch.cuda.is_bf16_supported())
    elif _has_accelerator():
        chosen = resolve_precision("accelerator", True)
    else:
        chosen = resolve_precision("cpu", False, "AMX" in torch.backends.cpu.get_cpu_capability())
    cfg.train.mixed_precision = chosen
    log.info("train.mixed_precision=auto: %s on this machine", chosen)


def weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen parts (VAE, text encoder, a LoRA's base) under train.mixed_precision. accelerate
    runs fp16 (autocast + loss scaling) on accelerators only: on a CPU it would train without autocast while
    those parts sat in fp16, and the first matmul would mix dtypes. bf16 autocast works on CPUs."""
    if mixed_precision == "fp16" and device.type == "cpu":
        raise GenError("config key 'train.mixed_precision': fp16 needs a GPU (accelerate runs fp16 on accelerators "
                       "only); on a CPU set train.mixed_precision=bf16 (or no)")
    return WEIGHT_DTYPES[mixed_precision]


def main_alone(env=os.environ) -> bool:
    """Whether `accelerate launch --num_processes N` (N > 1) without --multi_gpu started one plain process: its
    simple launcher sets a rendezvous address for N > 1 but no WORLD_SIZE (on a CPU, or with one GPU)."""
    return "ACCELERATE_DYNAMO_BACKEND" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env


def accelerator(cfg: Config):
    """This run's Accelerator. accelerate keeps its state process-wide and refuses another mixed precision
    later in the same process; each run here (a chain's stages, runs from one Python session) sets its own,
    so that state is reset first (its process group, in PartialState, stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    # cpu=True on a machine without an accelerator: accelerate then runs several processes launched by
    # `accelerate launch --multi_gpu` / torchrun as MULTI_CPU over gloo (otherwise each thinks it is alone).
    return Accelerator(cpu=not _has_accelerator(), mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.grad_accum)


def train(cfg: Config, task_class=None) -> Path:
    """Runs (or resumes) a training run; returns the exported model folder. One run at a time per
    train.output_dir (train/lock.py); SIGTERM, Ctrl-C and SIGUSR1 save a checkpoint (train/signals.py)."""
    start = time.time()  # the wall-time budget (train.time_limit) counts from here
    auto_precision(cfg)
    acc = accelerator(cfg)
    dtype = weight_dtype(cfg.train.mixed_precision, acc.device)  # before anything is written or loaded
    swap.check(cfg, task_class, acc.num_processes)  # train.blocks_to_swap / activation_offload (train/swap.py)
    if main_alone() and acc.is_main_process:
        log.warning("accelerate launch --num_processes N without --multi_gpu started this one process only; for "
                    "N processes: accelerate launch --multi_gpu --num_processes N -m gen ...")
    launched = int(os.environ.get("WORLD_SIZE", acc.num_processes))
    if launched != acc.num_processes:
        raise GenError(f"launched as {launched} processes, but accelerate runs this one alone (on CPU, launch "
                       "with `accelerate launch --multi_gpu --num_processes N` or torchrun)")
    guard = Guard(cfg.train.checkpoint_minutes, cfg.train.time_limit, start, acc.device, acc.num_processes,
                  acc.is_main_process)
    with hold(Path(cfg.train.output_dir), "train.output_dir", acc), guard, Repeats(cfg.train.output_dir,
                                                                                  acc.is_main_process):
        out = _train(cfg, task_class, acc, dtype, guard)
    # the process group goes last, after DDP's reducer and the optimizer that reference it are freed: torch can hang
    # at exit when a live DDP model outlives its process group (a 2-process run's rank 1 outlived its launcher)
    if acc.num_processes > 1:
        acc.free_memory()
        gc.collect()
    acc.end_training()
    return out


def _train(cfg: Config, task_class, acc, dtype: torch.dtype, guard: Guard) -> Path:
    from train.task import DenoiserTask

    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    run_dir = Path(cfg.train.output_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        print(f"# resolved config (saved to {run_dir / 'config.yaml'})\n{cfg.to_yaml()}", file=sys.stderr)
        t = cfg.train
        log.info("%d process(es) on %s: batch %d x %d accumulation x %d = %d images per step", world,
                 acc.device.type, t.batch_size, t.grad_accum, world, t.batch_size * t.grad_accum * world)
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed((cfg.train.seed + rank) % 2 ** 32)

    # fails on a missing path, zero images or a missing control image (stage=controlnet) before any model loads
    data = TrainData(cfg.data, cfg.train.seed, control=cfg.stage == "controlnet")
    data = with_class_images(cfg, data, acc)  # lora.class_prompt: DreamBooth class images (train/prior.py)
    from train.stages import TASKS

    task_class = task_class or TASKS.get(cfg.stage, DenoiserTask)
    task = task_class(cfg, acc.device, dtype)
    if cfg.data.cache and hasattr(task, "family") and hasattr(task, "vae"):  # latents + conditioning from disk
        from train.data.cache import cached
        data = cached(cfg, data, task, acc, stop=lambda: guard.signal)  # Ctrl-C stops the build too
    held_out = HeldOut(cfg, task)  # validation.loss_path's fixed triples (train/heldout.py)
    model = task.model
    model.train()
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay > 0 else None
    sharded = Sharded(acc, cfg.train.mixed_precision, dtype) if cfg.train.distributed == "fsdp" else None
    if sharded:  # before the optimizer, which then holds the shards (train/distributed.py)
        sharded.shard(model, ema)
    o = cfg.optim
    optimizer = build_optimizer(o, param_groups(model, o.weight_decay))  # optim.name (train/optim.py)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))  # stepped by us, once per step
    if sharded or cfg.train.blocks_to_swap:  # a swapped block's weights stay in host memory: no device placement
        model = model if sharded else acc.prepare_model(model, device_placement=False)
        optimizer = acc.prepare(optimizer)
    else:
        model, optimizer = acc.prepare(model, optimizer)
    fingerprint = json.loads(json.dumps({**task.fingerprint(), "data": data.fingerprint()}))
    weights = acc.unwrap_model(model).parameters()
    guard.expect_save(sum(p.numel() * (p.element_size() + 8 * p.requires_grad) for p in weights))  # + Adam's two

    if cfg.train.resume == "none":
        _set_aside(run_dir / "checkpoints", main, acc.wait_for_everyone)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints, rank, acc.wait_for_everyone)
    step, position = 0, 0
    found = ckpt.find(cfg.train.resume)
    if found:
        shared, local, state = ckpt.load(found)
        _check_fingerprint(state["fingerprint"], fingerprint, found)
        check_resume(state.get("config", {}), o, found)
        check_regrouping(state.get("config", {}), o, found)
        _check_frozen(state.get("frozen"), getattr(task, "frozen", None), found, cfg)
        if sharded:
            sharded.load(local, state, model, optimizer, ema)
        elif "model" not in shared:
            raise GenError(f"cannot resume from {found}: it was saved sharded; set train.distributed=fsdp")
        else:
            acc.unwrap_model(model).load_state_dict(shared["model"])
            if ema is not None and "ema" in shared:
                ema.load_state_dict(shared["ema"], state["ema_updates"])
            optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        apply_changes(state.get("config", {}), o, optimizer, scheduler)
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        step, position = state["step"], state["position"]
        if main:
            log.info("resumed from %s (step %d)", found, step)

    def save() -> None:
        nonlocal saved
        began = time.monotonic()
        shared, local = {}, {"rng": rng_state()}
        if sharded:  # each process's shards (train/distributed.py)
            local |= sharded.state(model, optimizer, ema)
        else:
            shared = {"model": acc.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict()}
            if ema is not None:
                shared["ema"] = ema.state_dict()
        state = {"position": position, "scheduler": scheduler.state_dict(), "fingerprint": fingerprint,
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                 "ema_updates": ema.num_updates if ema else 0, "config": cfg.to_dict(),
                 "frozen": getattr(task, "frozen", None),
                 "sharded_over": acc.num_processes if sharded else None}
        ckpt.save(step, shared, local, state)
        saved = step
        guard.saved(time.monotonic() - began)

    def sampling_model():
        """The model to sample from, on the main process; every process calls it (FSDP gathers shards)."""
        chosen = ema.model if ema is not None and cfg.validation.use_ema else acc.unwrap_model(model)
        return sharded.full(chosen) if sharded else chosen

    def validate() -> None:
        sampler = sampling_model()
        images = task.validate(sampler) if main else None
        if main and hasattr(task, "metrics"):  # held-out quality of a stage (PSNR, retrieval)
            metrics = task.metrics(sampler)
            trackers.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        if images:
            image = grid(images, cols=getattr(task, "grid_cols", None) or len(cfg.validation.prompts))
            (run_dir / "samples").mkdir(exist_ok=True)
            image.save(run_dir / "samples" / f"step-{step:08d}.png")
            trackers.image(step, image)
        acc.wait_for_everyone()

    trackers = Trackers(cfg, run_dir, step, main)
    batches = iter(loader(data, cfg.train.batch_size, position, world, rank, cfg.data.num_workers))
    if found and "rng" in local:  # after the iterator, which draws its seed from torch's RNG (as a new run's did)
        set_rng_state(local["rng"])
    accum, per_step = cfg.train.grad_accum, cfg.train.batch_size * world * cfg.train.grad_accum
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not (main and cfg.log.progress),
               desc="train", dynamic_ncols=True)
    loss_sum, n_logged, t0 = torch.zeros((), device=acc.device), 0, time.perf_counter()
    waited, windows = 0.0, 0  # seconds this process spent blocked on the data loader in this log window
    stop = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
    bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient
    saved = step if found else -1  # a stop before the first step of a new run still leaves a checkpoint
    while True:
        act = guard.poll()  # a step boundary: signals and clocks, the same answer in every process
        if act.save and saved != step:
            save()
        if act.stop or step >= stop:
            break
        bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        step_loss, skip = torch.zeros((), device=acc.device), False
        for micro in range(accum):
            asked = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - asked
            with acc.accumulate(model):
                with swap.offload_context(cfg.train.activation_offload, acc.device):  # train.activation_offload
                    loss = task.loss(model, batch, step_generator(cfg.train.seed, rank, step * accum + micro))
                bad |= ~torch.isfinite(loss.detach())
                acc.backward(loss)
                if acc.sync_gradients:
                    # max_norm=inf measures the norm without clipping; under fp16 the grad scaler itself
                    # skips steps whose (scaled) gradients overflow, so only the loss counts there
                    norm = plain(acc.clip_grad_norm_(model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf))
                    if acc.scaler is None:
                        bad |= ~torch.isfinite(norm)
                    skip = acc.reduce(bad.float(), "sum").item() > 0  # one host sync per step; every process agrees
                    if not skip:
                        optimizer.step()
                    elif acc.scaler is not None:  # clip_grad_norm_ unscaled: without update() the next unscale_ raises
                        acc.scaler.update()  # and the scale backs off, as after an overflow the scaler skips itself
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accum
        if skip:  # the data is consumed, nothing else moves: no update, no LR or EMA step
            position, bad_steps = position + per_step, bad_steps + 1
            if main:
                log.warning("step %d: non-finite loss or gradients; update skipped (%d in a row, the run stops at "
                            "train.max_bad_steps=%d)", step + 1, bad_steps, cfg.train.max_bad_steps)
            if bad_steps >= cfg.train.max_bad_steps:
                raise GenError(f"stopped at step {step + 1}: {bad_steps} steps in a row had a non-finite loss or "
                               "gradients (diverged, or bad data); the last checkpoint holds finite weights. "
                               "Lower optim.lr or check the data, then resume")
            continue
        bad_steps, loss_sum = 0, loss_sum + step_loss
        scheduler.step()
        if ema is not None:
            ema.update(acc.unwrap_model(model))
        step, position, n_logged = step + 1, position + per_step, n_logged + 1
        bar.update(1)
        if step % cfg.log.every == 0 or step == cfg.train.max_steps:
            loss_value = acc.reduce(loss_sum, "mean").item() / n_logged  # a host sync every log.every
            elapsed = time.perf_counter() - t0
            data_wait = min(1.0, waited / elapsed)  # fraction of the window's wall time spent waiting for data
            trackers.scalars(step, {"loss": loss_value, "lr": scheduler.get_last_lr()[0],
                                    "images_per_s": n_logged * per_step / elapsed, "data_wait": data_wait,
                                    **held_out(model)})
            bar.set_postfix(loss=f"{loss_value:.4f}", data_wait=f"{data_wait:.0%}")
            if main and windows == 1 and data_wait > 0.25:  # once, past the start-up window (workers, caches)
                log.warning("training waited for data %.0f%% of the time: raise data.num_workers (now %d)%s",
                            100 * data_wait, cfg.data.num_workers, "" if cfg.data.cache else " or use data.cache")
            loss_sum.zero_()
            n_logged, t0, waited, windows = 0, time.perf_counter(), 0.0, windows + 1
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            save()
        if cfg.validation.every and step % cfg.validation.every == 0 and step < cfg.train.max_steps:
            validate()
    bar.close()
    if saved != step:
        save()  # the end of a run is always resumable (e.g. to train it further)
    if step < cfg.train.max_steps or guard.signal:  # paused (stop_at_step, a signal, a deadline): no export
        trackers.close()
        acc.wait_for_everyone()
        where = run_dir / "checkpoints" / f"step-{step:08d}"
        line = (f"stopped at step {step} of {cfg.train.max_steps} ({guard.reason or 'train.stop_at_step'}): "
                f"checkpoint {where}; run the same command again to resume (train.resume=auto)")
        if guard.signal:
            raise Stopped(line if main else "", EXIT_CODES.get(guard.signal, 143))
        if main:
            log.info(line)
        return where
    validate()
    out = run_dir / getattr(task, "export_name", "model")  # a model folder, or a task's file (a LoRA)
    sampler = sampling_model()
    if main:
        recipe = {**cfg.to_dict(), "trained_steps": step}
        task.export(sampler, out, recipe)
        print(f"wrote {out}", file=sys.stderr)
    trackers.close()
    acc.wait_for_everyone()
    return out


def build_cache(config: str, overrides: list[str]) -> int:
    """`gen data cache CONFIG [key=value ...]`: build a training config's cache ahead of training
    (under `accelerate launch` to split it across processes)."""
    from train.config import load_config
    from train.data.cache import build
    from train.task import DenoiserTask

    cfg = load_config(config, list(overrides) + ["data.cache=true"])
    auto_precision(cfg)
    acc = accelerator(cfg)  # as training's: without cpu=True on a CPU, each process of a launch thought it was alone
    dtype = weight_dtype(cfg.train.mixed_precision, acc.device)
    data = TrainData(cfg.data, cfg.train.seed)
    task = DenoiserTask(cfg, acc.device, dtype)
    with Guard(None, None, 0.0, acc.device, acc.num_processes, acc.is_main_process) as guard:  # Ctrl-C, SIGTERM
        build(cfg, data, task, acc.process_index, acc.num_processes, acc.wait_for_everyone,
              progress=cfg.log.progress, stop=lambda: guard.signal)
    return 0


def _set_aside(folder: Path, main: bool, barrier) -> None:
    """train.resume=none where an earlier run left checkpoints: they move to a folder of their own, so that this run's
    are the only ones pruned, resumed (train.resume=auto) and named by `latest`."""
    if main and folder.is_dir() and any(folder.iterdir()):
        stamp, n = f"{folder.name}-before-{time.strftime('%Y%m%d-%H%M%S')}", 1
        aside = folder.with_name(stamp)
        while aside.exists():  # an earlier run set aside in the same second
            n += 1
            aside = folder.with_name(f"{stamp}-{n}")
        folder.rename(aside)
        log.warning("train.resume=none: the earlier run's checkpoints in %s moved to %s; this run starts afresh",
                    folder, aside)
    barrier()


def _check_frozen(saved: dict | None, now: dict | None, path: Path, cfg: Config) -> None:
    """The frozen parts (VAE, text encoders, a LoRA's base denoiser) must be the ones the checkpoint trained with."""
    differ = sorted(k for k in (saved or {}) if k in (now or {}) and saved[k] != now[k])
    if differ:
        m = cfg.model
        where = ", ".join(f"model.{k}={v}" for k, v in (("base", m.base), ("vae", m.vae), ("text_encoder", m.text_encoder))
                          if v)
        raise GenError(f"cannot resume from {path}: the frozen {', '.join(differ)} differ from the ones it was trained "
                       f"with (now {where}); give the same model files, or start afresh (train.resume=none or a new "
                       "train.output_dir)")


def _check_fingerprint(saved: dict, now: dict, path: Path) -> None:
    """A resume must continue the same model on the same data."""
    for part in now:
        if saved.get(part) != now[part]:
            a, b = saved.get(part) or {}, now[part]
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if isinstance(a, dict) else []
            what = "dataset" if part == "data" else part
            raise GenError(f"cannot resume from {path}: the {what} changed since that checkpoint "
                           f"({', '.join(keys) or 'differs'}); use train.resume=none or a new train.output_dir")
