"""Training throughput (images/s) of `gen train` for a small DiT and a small UNet, next to the inner loop of
diffusers' examples/text_to_image/train_text_to_image.py on the same UNet, frozen VAE/CLIP and data.

    python bench/train_throughput.py [--steps 20] [--warmup 4] [--batch 16] [--repeats 2] [--device cpu]

The peer loop below reimplements, step for step, the loop of `main()` in
huggingface/diffusers examples/text_to_image/train_text_to_image.py (read at commit
000280f56a6a81e355313e77ec831575ad571d8b): vae.encode(...).latent_dist.sample() * scaling_factor,
torch.randn_like noise, torch.randint timesteps, noise_scheduler.add_noise, text_encoder(input_ids)[0],
unet(...).sample, F.mse_loss, accelerator.gather(loss.repeat(bs)).mean().item() for logging,
accelerator.backward, clip_grad_norm_ (max_grad_norm 1.0), optimizer.step, lr_scheduler.step,
optimizer.zero_grad, EMAModel.step, progress_bar.set_postfix(step_loss=loss.detach().item()), with the
script's defaults (AdamW, weight decay 1e-2, constant LR, tokenization in the dataloader, shuffle=True).
gen's side is the real `train.loop.train` with the same batch, EMA, clipping and weight decay; its
figure is the loop's own images/s over the logged windows after the warmup window. A further row turns on
data.cache (latents and text embeddings encoded once to disk, before the timing; not in the peer script).
Runs alternate (gen, peer, gen, peer, ...) so both see the same machine load; the median is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RES = 64
TEXT, VAE = "small", dict(preset="small", block_out_channels=(16, 32, 64), norm_num_groups=8)  # factor 4
DIT = ("DiT-S/2", dict(depth=6, hidden_size=256, num_heads=4))  # the default model's denoiser size
UNET = "small"


def make_base(folder: Path) -> Path:
    """A base folder: small random CLIP text tower + factor-4 VAE (throughput does not need trained ones)."""
    from gen.formulations import DDPM
    from gen.models.text import build_text_encoder, byte_level_tokenizer
    from gen.models.unet import build_unet
    from gen.models.vae import build_vae
    from gen.pipeline import Pipeline

    torch.manual_seed(0)
    tok = byte_level_tokenizer()
    text = build_text_encoder(TEXT, vocab_size=len(tok))
    vae = build_vae(VAE["preset"], **{k: v for k, v in VAE.items() if k != "preset"})
    unet = build_unet(UNET, sample_size=RES // 4, cross_attention_dim=text.config.hidden_size)
    Pipeline(text, tok, vae, unet, formulation=DDPM()).save_pretrained(folder)
    return folder


def settings(base: Path, out: Path, denoiser: str, batch: int, steps: int, warmup: int) -> dict:
    s = {"model.base": str(base), "data.source": "shapes", "data.resolution": RES, "data.num_images": 1024,
         "train.output_dir": str(out), "train.batch_size": batch, "train.max_steps": warmup + steps,
         "train.checkpoint_every": 0, "train.ema_decay": 0.9999, "train.ema_warmup": False,
         "train.cond_dropout": 0.0, "optim.lr": 1e-4, "optim.weight_decay": 1e-2, "optim.grad_clip": 1.0,
         "validation.prompts": [], "log.every": warmup, "log.tracker": "none", "log.progress": False}
    if denoiser == "dit":
        s |= {"model.denoiser": "dit", "model.preset": DIT[0], "model.options": DIT[1], "objective.type": "flow",
              "model.base": "", "model.text_encoder": str(base), "model.vae": str(base)}  # base's CLIP and VAE
    else:
        s |= {"model.denoiser": "unet", "model.preset": UNET, "objective.type": "ddpm"}
    return s


def gen_images_per_s(base: Path, denoiser: str, batch: int, steps: int, warmup: int, tmp: Path,
                     cache: bool = False, extra: dict | None = None, task_class=None) -> float:
    """`train.loop.train` with settings() (+ `extra` keys; `task_class`, e.g. LoraTask for `gen lora`)."""
    from train.config import load_config
    from train.loop import train

    out = Path(tempfile.mkdtemp(dir=tmp))
    extra = dict(extra or {})
    if cache:  # built once, outside the timing
        extra |= {"data.cache": True, "data.cache_dir": str(tmp / "cache")}
    train(load_config(None, extra={**settings(base, out, denoiser, batch, steps, warmup), **extra}),
          task_class=task_class)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()][1:]  # after warmup
    images = sum(warmup * batch for _ in rows)
    return images / sum(warmup * batch / r["images_per_s"] for r in rows)


def diffusers_images_per_s(base: Path, batch: int, steps: int, warmup: int, device: str,
                           lora_rank: int | None = None, on_start=None) -> float:
    """The inner loop of diffusers' train_text_to_image.py (see the module docstring), on `base`. With
    `lora_rank`, train_text_to_image_lora.py's instead (bench/lora_cost.py): the UNet frozen with a peft LoRA
    on to_k/to_q/to_v/to_out.0, trainable parameters in fp32, AdamW and clipping over those, no EMA.
    `on_start()` is called once everything is built, before the first step."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    from train.config import load_config
    from train.data import TrainData

    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no", cpu=device == "cpu")
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    vae = AutoencoderKL.from_pretrained(base / "vae")
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    if lora_rank:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        cast_training_params(unet, dtype=torch.float32)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        ema_unet = None
    else:
        trainable = list(unet.parameters())
        ema_unet = EMAModel(copy.deepcopy(unet).parameters(), model_cls=UNet2DConditionModel,
                            model_config=unet.config)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    data = TrainData(load_config(None, extra=settings(base, Path("."), "unet", batch, steps, warmup)).data, 0)

    class Dataset(torch.utils.data.Dataset):  # the script's preprocess_train: pixels + input_ids per example
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            ex = data[(i, i)]
            ids = tokenizer(ex["text"], max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids[0]
            return {"pixel_values": ex["pixel_values"], "input_ids": ids}

    def collate_fn(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).to(memory_format=torch.contiguous_format)
        return {"pixel_values": pixel_values.float(), "input_ids": torch.stack([e["input_ids"] for e in examples])}

    train_dataloader = torch.utils.data.DataLoader(Dataset(), shuffle=True, collate_fn=collate_fn, batch_size=batch)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=warmup + steps)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    if ema_unet is not None:
        ema_unet.to(accelerator.device)
    weight_dtype = torch.float32
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    progress_bar = tqdm(range(0, warmup + steps), desc="Steps", disable=True)

    global_step, t0 = 0, None
    if on_start:
        on_start()
    for batch_ in train_dataloader:
        if global_step == warmup:
            t0 = time.perf_counter()
        with accelerator.accumulate(unet):
            latents = vae.encode(batch_["pixel_values"].to(weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            timesteps = timesteps.long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch_["input_ids"], return_dict=False)[0]
            target = noise
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            avg_loss = accelerator.gather(loss.repeat(batch)).mean()
            train_loss = avg_loss.item()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            if ema_unet is not None:
                ema_unet.step(unet.parameters())
            progress_bar.update(1)
            global_step += 1
            accelerator.log({"train_loss": train_loss}, step=global_step)
        progress_bar.set_postfix(step_loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
        if global_step >= warmup + steps:
            break
    return steps * batch / (time.perf_counter() - t0)


def cpu_name() -> str:
    """The CPU's model name (for the results' header)."""
    if os.path.exists("/proc/cpuinfo"):
        return next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return platform.processor()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (after the warmup)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.steps % a.warmup:
        ap.error("--steps must be a multiple of --warmup (gen's loop logs every --warmup steps)")
    import logging

    from gen.cli import _quiet_libraries

    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="gen-throughput-"))
    base = make_base(tmp / "base")
    cpu = cpu_name()
    print(f"# training throughput, {RES}x{RES} shapes world, batch {a.batch}, fp32, {a.steps} timed steps after "
          f"{a.warmup} warmup, median of {a.repeats} alternating runs")
    print(f"# {cpu}; {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {a.device}; load average at start {os.getloadavg()[0]:.1f}")
    print("# no GPU was lent for this run: CPU figures only")
    peer = "diffusers train_text_to_image loop, same UNet"
    runners = {"gen DiT flow": lambda: gen_images_per_s(base, "dit", a.batch, a.steps, a.warmup, tmp),
               "gen UNet ddpm": lambda: gen_images_per_s(base, "unet", a.batch, a.steps, a.warmup, tmp),
               "gen UNet ddpm, data.cache (no VAE/CLIP per step)":
                   lambda: gen_images_per_s(base, "unet", a.batch, a.steps, a.warmup, tmp, cache=True),
               peer: lambda: diffusers_images_per_s(base, a.batch, a.steps, a.warmup, a.device)}
    order = list(runners)
    results = {name: [] for name in order}
    for r in range(a.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            results[name].append(runners[name]())
            print(f"#   run {r + 1}: {name}: {results[name][-1]:.2f} images/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    from gen.models.dit import build_dit
    from gen.models.unet import build_unet

    params = {"gen DiT flow": sum(p.numel() for p in build_dit(DIT[0], sample_size=RES // 4, cross_attention_dim=256,
                                                               pooled_projection_dim=256, **DIT[1]).parameters()),
              "gen UNet ddpm": sum(p.numel() for p in build_unet(UNET, sample_size=RES // 4,
                                                                 cross_attention_dim=256).parameters())}
    params[peer] = params[order[2]] = params["gen UNet ddpm"]
    print(f"\n{'loop':<54}{'params':>9}{'images/s':>11}{'vs diffusers':>14}")
    for name in order:
        ratio = med[name] / med[peer] if "UNet" in name else None
        print(f"{name:<54}{params[name] / 1e6:>8.1f}M{med[name]:>11.2f}"
              f"{f'{ratio:.2f}x' if ratio else '-':>14}")
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
