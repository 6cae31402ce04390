"""Peak training memory of every shipped recipe (configs/*.yaml) at its real size, from a formula, and the
formula against peaks measured on small sizes.

    .venv/bin/python bench/train_memory.py            # the recipes' table, then the check (CPU, ~2 min)

The formula (bytes, one optimizer step: weights, gradients, optimizer, EMA, activations, peak) is
gen/memory_train.py's; its docstring says what each term counts.
AdamW's temporaries (its foreach implementation on CUDA) are one more fp32 copy of the trainable weights.
The check runs real fp32 steps on CPU at small sizes under torch's MemTracker (every live tensor, by kind).
The frozen VAE and text encoder run under no_grad: their transient activations are not counted.
The SD3/Flux recipes leave model.base to the user: their rows are the released Flux-dev, SD3.5-large and
SD3.5-medium (gen.memory_plan's FAMILIES), with CLIP(s) + T5-XXL + VAE resident (data.cache off, as shipped),
the step's inputs built by the family (gen/families/sd3.py, flux.py) and the LoRA targets the family's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from gen.memory_train import Memory, denoiser_inputs, estimate, family_setup  # noqa: E402  (the formula: gen/memory_train.py)

diffusers_logging.set_verbosity_error()  # .to(bf16) on meta models warns about fp32 modules that these have none of

ROOT = Path(__file__).resolve().parents[1]
SD15 = "an SD-1.5 folder"
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)


def dit_step_estimate(preset: str, latent: int, batch: int, dtype: torch.dtype, checkpointing: bool,
                      device_type: str = "cuda") -> int:
    """The formula's peak for bench/dit_train.py's step (no EMA, no frozen parts)."""
    from gen.models.dit import build_dit

    def build():
        return build_dit(preset, sample_size=latent, cross_attention_dim=768, pooled_projection_dim=768)

    compute = "no" if dtype == torch.float32 else "bf16"
    return estimate(build, batch, latent, compute, checkpointing, ema=False, device_type=device_type).peak


# ---- the shipped recipes ----------------------------------------------------------------------------------------
def _frozen_sd15() -> int:
    """CLIP-L text tower + SD's VAE (what model.base gives for an SD-1.5 folder), parameters."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return sum(p.numel() for m in (CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), AutoencoderKL(**SD15_VAE))
                   for p in m.parameters())


def _frozen_folder(folder: Path) -> tuple[int, int, int]:
    """(frozen parameters, text width, VAE factor) of a model folder's text encoder and VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    text_cfg = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        n = sum(p.numel() for m in (CLIPTextModel(text_cfg), vae) for p in m.parameters())
    return n, text_cfg.hidden_size, 2 ** (len(vae.config.block_out_channels) - 1)


# the SD3/Flux recipes leave model.base to the user: rows for these released models (bench/memory.py's configs)
MMDIT_RECIPES = ("lora-sd3-flux.yaml", "finetune-sd3-flux.yaml")
MMDIT_MODELS = ("Flux-dev", "SD3.5-large", "SD3.5-medium")


def recipe_rows(checkpointing_both: bool = True, mmdit_models: tuple[str, ...] = MMDIT_MODELS) -> list[tuple]:
    """(recipe, model, batch x size, precision, checkpointing, chosen, Memory) for each configs/*.yaml denoiser
    run; the SD3/Flux recipes once per `mmdit_models` entry."""
    from gen.memory_plan import FAMILIES
    from gen.families import get
    from gen.models.dit import build_dit
    from gen.models.unet import build_unet
    from train.config import load_config
    from train.loop import resolve_precision

    rows = []
    paths = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if "chain" not in p.read_text()]
    paths.insert(0, ROOT / "configs" / "default" / "dit.yaml")  # the default model's denoiser stage
    for path in paths:
        # model.base: the recipe's (the default model's stage trains on the default model's VAE and text tower),
        # or where it leaves it to the user, an SD-1.5 folder (SD3/Flux recipes: the released models).
        # data.path: any, nothing is read.
        tree = yaml.safe_load(path.read_text())
        base = tree.get("model", {}).get("base") or ("default" if path.parent.name == "default" else SD15)
        base = "gen/assets/default" if base == "default" else base  # the bundled model
        size = {} if "resolution" in tree.get("data", {}) or base != SD15 else {"data.resolution": 512}  # SD-1.5's
        cfg = load_config(path, extra={"data.path": ".", "model.base": base, **size})
        t, m = cfg.train, cfg.model
        if t.mixed_precision == "auto":  # on one GPU of today: bf16 (train/loop.py resolve_precision)
            t.mixed_precision = resolve_precision("cuda", True)
        lora_opts = dict(rank=cfg.lora.rank, alpha=cfg.lora.alpha, parts=cfg.lora.targets) if (
            hasattr(cfg, "lora") and path.name.startswith("lora")) else None
        runs = []  # (name, builder, inputs, frozen, VAE factor, LoRA presets)
        if path.name in MMDIT_RECIPES:  # frozen: CLIPs + T5-XXL + VAE, resident (data.cache false)
            for model in mmdit_models:
                build, inputs, frozen, factor, family = family_setup(
                    FAMILIES[model], torch.float32 if t.mixed_precision == "no" else torch.bfloat16)
                runs.append((f"{model} transformer" + (" + LoRA" if lora_opts else ""), build, inputs, frozen,
                             factor, family.lora_targets))
        else:
            if base != SD15:
                frozen, width, factor = _frozen_folder(ROOT / base)
            else:  # model.base is the user's: an SD-1.5 folder, as the recipe's comment says
                frozen, width, factor = _frozen_sd15(), 768, 8
            latent = cfg.data.resolution // factor
            if lora_opts:
                build, name = (lambda: build_unet("sd15", cross_attention_dim=width)), "SD-1.5 UNet + LoRA"
            elif m.denoiser == "dit":
                build = (lambda m=m, latent=latent, width=width: build_dit(
                    m.preset, sample_size=latent, cross_attention_dim=width, pooled_projection_dim=width,
                    **m.options))
                name = m.preset + "".join(f", {k} {v}" for k, v in m.options.items()
                                          if k in ("depth", "hidden_size"))
            else:
                preset = "sd15" if m.init_from_base else m.preset
                build, name = (lambda p=preset: build_unet(p, cross_attention_dim=width)), f"UNet {preset}"
            runs.append((name, build, None, frozen, factor, get("sd1").lora_targets))
        for name, build, inputs, frozen, factor, presets in runs:
            lora = dict(presets=presets, **lora_opts) if lora_opts else None
            for ckpt in ((False, True) if checkpointing_both else (t.gradient_checkpointing,)):
                mem = estimate(build, t.batch_size, cfg.data.resolution // factor, t.mixed_precision, ckpt,
                               t.ema_decay > 0, frozen_params=frozen, lora=lora, inputs=inputs)
                rows.append((path.relative_to(ROOT).as_posix(), name, f"{t.batch_size} x {cfg.data.resolution} px",
                             t.mixed_precision, ckpt, ckpt == t.gradient_checkpointing, mem))
    return rows


# ---- low-memory LoRA training (train/swap.py, lora.base_weights) ----------------------------------------------------
LOW_MEMORY_SWAPS = (28, 42)  # the number kohya's 8 GB setting names; gen's count that fits 8 GB (blocks as they run)


def low_memory_rows(model: str = "Flux-dev", swaps: tuple[int, ...] = LOW_MEMORY_SWAPS) -> list[tuple[str, Memory]]:
    """(setting, Memory) for configs/lora-sd3-flux.yaml on `model` at its 512 px, checkpointed, with data.cache (the
    text encoders and VAE off the GPU), each row adding one option: the fp8 base (lora.base_weights=fp8: the
    Linear weights gen.quant.store_fp8 stores take 1 byte), train.blocks_to_swap=N (the last N blocks' frozen
    weights, gen.memory.blocks, leave the GPU; the largest of them visits it), train.activation_offload (what
    checkpointing keeps waits in host memory; the GPU holds one block's recompute)."""
    from gen import quant
    from gen.memory_plan import FAMILIES
    from train.config import load_config
    from gen.memory import blocks

    cfg = load_config(ROOT / "configs" / MMDIT_RECIPES[0], extra={"data.path": ".", "model.base": SD15})
    t, o = cfg.train, cfg.lora
    build, inputs, _, factor, family = family_setup(FAMILIES[model], torch.bfloat16)
    lora = dict(presets=family.lora_targets, rank=o.rank, alpha=o.alpha, parts=o.targets)
    base = estimate(build, t.batch_size, cfg.data.resolution // factor, t.mixed_precision, True, t.ema_decay > 0,
                    lora=lora, inputs=inputs)
    with torch.device("meta"):
        m = build().to(torch.bfloat16)

    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    full = nbytes(m)
    quant.store_fp8(m)
    fp8 = dataclasses.replace(base, weights=base.weights - full + nbytes(m))
    rows = [("bf16 base, data.cache", base), ("fp8 base", fp8)]
    for i, n in enumerate(swaps):
        per_block = [nbytes(b) for _, b in blocks(m)[-n:]]
        swapped = dataclasses.replace(fp8, weights=fp8.weights - sum(per_block) + max(per_block))
        if not i:
            rows.append((f"fp8 base + blocks_to_swap {n}", swapped))
        rows.append((f"fp8 base + blocks_to_swap {n} + activation_offload",
                     dataclasses.replace(swapped, activations=swapped.recompute)))
    return rows


# ---- the check: the formula against measured peaks ---------------------------------------------------------------
def measured_peak(build, batch: int, latent: int, checkpointing: bool, inputs=None) -> int:
    """Peak bytes of a real fp32 training step on CPU (the second: the optimizer state exists), MemTracker;
    `inputs`: as estimate's."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = build().train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters())
    kw = denoiser_inputs(model, batch, latent, "cpu", torch.float32) if inputs is None else None
    run = inputs(model, batch, latent, torch.float32) if inputs else (lambda: model(**kw)[0])

    def step():
        run().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def check_builds() -> dict:
    """name -> (builder, batch, latent): small instances of the recipes' two architectures."""
    from gen.models.dit import build_dit
    from gen.models.unet import build_unet

    return {"DiT d128 x 2 blocks": (lambda: build_dit("DiT-T/2", hidden_size=128, depth=2, sample_size=16,
                                                      cross_attention_dim=32, pooled_projection_dim=32), 4, 16),
            "UNet tiny": (lambda: build_unet("tiny", sample_size=16, cross_attention_dim=32), 4, 16)}


def tiny_flux(device: str) -> tuple:
    """(builder, family_forward) of a small Flux-dev architecture (FLUX_DEV's layout, d128, 2 + 2 blocks) with
    small CLIP-L / T5 towers on `device`: the SD3/Flux rows' path (the family's inputs) on a real step."""
    from gen.memory_plan import CLIP_L, FAMILIES, FLUX_DEV, T5_XXL

    parts = FAMILIES["Flux-dev"] | {
        "CLIP-L": (FAMILIES["Flux-dev"]["CLIP-L"][0], CLIP_L | dict(hidden_size=32, intermediate_size=64,
                                                                    num_hidden_layers=1, num_attention_heads=2)),
        "T5-XXL": (FAMILIES["Flux-dev"]["T5-XXL"][0], T5_XXL | dict(d_model=32, d_ff=64, d_kv=16, num_heads=2,
                                                                    num_layers=1)),
        "MMDiT": (FAMILIES["Flux-dev"]["MMDiT"][0], FLUX_DEV | dict(
            in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
            axes_dims_rope=(8, 12, 12), joint_attention_dim=32, pooled_projection_dim=32))}
    build, inputs, *_ = family_setup(parts, torch.float32, device)
    return build, inputs


def check_rows() -> list[tuple]:
    """(model, checkpointing, formula bytes, measured bytes) for CHECKS on CPU in fp32."""
    rows = []
    cases = {name: (build, batch, latent, None, None) for name, (build, batch, latent) in check_builds().items()}
    build, meta_inputs = tiny_flux("meta")
    cases["Flux d128 x 2+2"] = (build, 2, 16, meta_inputs, tiny_flux("cpu")[1])
    for name, (build, batch, latent, meta_inputs, cpu_inputs) in cases.items():
        for ckpt in (False, True):
            est = estimate(build, batch, latent, "no", ckpt, ema=False, device_type="cpu", inputs=meta_inputs).peak
            rows.append((name, ckpt, est, measured_peak(build, batch, latent, ckpt, inputs=cpu_inputs)))
    return rows


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-check", action="store_true", help="the recipes' table only")
    a = ap.parse_args(argv)
    print("Peak training memory per recipe (GiB; one GPU, AdamW, formula above; activations with and without "
          "gradient checkpointing, * = the recipe's setting)")
    print(f"{'recipe':<34}{'denoiser':<36}{'batch':>14}{'prec':>6}{'ckpt':>6}{'weights':>9}{'grads':>7}{'adam':>7}"
          f"{'ema':>6}{'activ.':>8}{'peak':>8}")
    for recipe, name, batch, prec, ckpt, chosen, m in recipe_rows():
        mark = ("on" if ckpt else "off") + ("*" if chosen else " ")
        print(f"{recipe:<34}{name[:35]:<36}{batch:>14}{prec:>6}{mark:>6}"
              f"{gib(m.weights):>9}{gib(m.gradients):>7}{gib(m.optimizer):>7}{gib(m.ema):>6}{gib(m.activations):>8}"
              f"{gib(m.peak):>8}")
    print(f"\nLow-memory LoRA training (configs/{MMDIT_RECIPES[0]}, Flux-dev at 512 px, checkpointed, data.cache):")
    for setting, m in low_memory_rows():
        print(f"  {setting:<52} weights {gib(m.weights):>6}  activ. {gib(m.activations):>5}  peak {gib(m.peak):>6}")
    if a.no_check:
        return 0
    print("\nThe formula against measured peaks (real fp32 steps on CPU, torch MemTracker):")
    for name, ckpt, est, got in check_rows():
        print(f"  {name:<18} checkpointing {'on ' if ckpt else 'off'}  formula {est / 2**20:7.1f} MiB  "
              f"measured {got / 2**20:7.1f} MiB  ({100 * (est / got - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
