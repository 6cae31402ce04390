"""gen vs diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline / StableDiffusion3Pipeline / FluxPipeline on
the same random SD-, SDXL-, SD3- or Flux-architecture weights, scheduler, steps, guidance, size and dtype: seconds per
image, the ratio (measured in the same run), and the images' max abs diff.

    .venv/bin/python bench/sample_vs_diffusers.py                      # CPU: tiny @ 64 px, base @ 256 px
    .venv/bin/python bench/sample_vs_diffusers.py --preset sdxl-small --variants default fast3
    .venv/bin/python bench/sample_vs_diffusers.py --preset base --variants default fast3
    .venv/bin/python bench/sample_vs_diffusers.py --device cuda --preset sd15 --size 512 --dtype fp16
    .venv/bin/python bench/sample_vs_diffusers.py --preset sd3-small --variants default   # or flux-small

Both pipelines load one folder, written here by diffusers; progress bars are off in both; runs alternate
between the pipelines so that a change in machine load hits both alike. gen variants:
  default       gen as it loads (attention auto)
  channels_last --channels-last
  compile       --compile (torch.compile of the denoiser; compile time printed separately)
  fastK         --cache-interval K, the approximate fast mode: its deviation from gen's exact images is
                printed as max abs and PSNR (images in [0, 1])
  giA-B         guidance only over the fraction [A, B) of the steps (guidance_interval; approximate too)
  triton        --attention triton (CUDA)
  a+b           both, e.g. compile+fast3
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,  # noqa: E402
                          T5EncoderModel)

from gen.models.text import byte_level_tokenizer  # noqa: E402
from gen.models.unet import build_unet  # noqa: E402
from gen.pipeline import Pipeline  # noqa: E402
from tests.conftest import tiny_t5_tokenizer  # noqa: E402

PROMPT, NEGATIVE = "a red circle left of a blue square", "blurry"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# preset -> (text width, text layers, VAE widths, default size, default steps)
PRESETS = {
    "tiny": (32, 2, (32, 32, 64, 64), 64, 20),
    "base": (768, 4, (32, 64, 128, 128), 256, 20),
    "sd15": (768, 12, (128, 256, 512, 512), 512, 50),
    "sdxl-tiny": (32, 2, (32, 32, 64, 64), 64, 20),
    "sdxl-small": (256, 4, (32, 64, 128, 128), 256, 20),
    "sdxl": (768, 12, (128, 256, 512, 512), 1024, 30),  # text towers narrower than SDXL's (768 + 1280)
    "sd3-small": (256, 4, (32, 64, 128, 128), 256, 10),  # MMDiT 4 blocks, width 384; CLIP-L/G stand-ins, a T5
    "flux-small": (256, 4, (32, 64, 128, 128), 256, 10),  # 2 double + 4 single blocks, width 384; CLIP, a T5
}
# per pipeline class: the guidance gen and diffusers are given, and the sampler (the folder's scheduler)
SETTINGS = {"sd": (7.5, "dpm++2m"), "sd3": (7.0, "flow-euler"), "flux": (3.5, "flow-euler, guidance embedded")}
CPU_DEFAULT = ["tiny", "base"]
# SDXL's UNet layout (no attention at the first level, 2 and 10 transformer layers below), scaled in width and
# depth for presets that fit a CPU; "sdxl" is the real one (2.6B parameters).
SDXL_UNETS = {
    "sdxl-tiny": dict(block_out_channels=(32, 64), transformer_layers_per_block=(0, 1), attention_head_dim=(2, 4)),
    "sdxl-small": dict(block_out_channels=(64, 128, 256), transformer_layers_per_block=(0, 1, 2),
                       attention_head_dim=(2, 4, 8)),
    "sdxl": dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(0, 2, 10),
                 attention_head_dim=(5, 10, 20)),
}


def sdxl_unet(preset: str, sample_size: int, text_width: int) -> UNet2DConditionModel:
    u = SDXL_UNETS[preset]
    levels = len(u["block_out_channels"])
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1)
    return UNet2DConditionModel(**u, sample_size=sample_size, layers_per_block=2, down_block_types=down,
                                up_block_types=[t.replace("Down", "Up") for t in reversed(down)],
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=256, cross_attention_dim=2 * text_width,
                                projection_class_embeddings_input_dim=6 * 256 + text_width, norm_num_groups=32)


def mmdit_folder(preset: str, size: int, path: Path, config: CLIPTextConfig, vae_widths) -> None:
    """A random SD3- or Flux-architecture model: 16-channel 8x VAE, CLIP tower(s), a 2-layer T5 512 wide, the MMDiT."""
    tokenizer, t5_tokenizer = byte_level_tokenizer(), tiny_t5_tokenizer(path.parent / f"{preset}-t5-tokenizer")
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=512, d_ff=1024, d_kv=64, num_layers=2,
                                 num_heads=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(block_out_channels=vae_widths, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                        norm_num_groups=32, sample_size=size, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    if preset.startswith("sd3"):
        transformer = SD3Transformer2DModel(sample_size=size // 8, patch_size=2, in_channels=16, out_channels=16,
                                            num_layers=4, attention_head_dim=64, num_attention_heads=6,
                                            joint_attention_dim=512, caption_projection_dim=384,
                                            pooled_projection_dim=2 * config.projection_dim, pos_embed_max_size=96)
        StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=CLIPTextModelWithProjection(config),
                                 tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(config),
                                 tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer,
                                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(path)
        return
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                         attention_head_dim=64, num_attention_heads=6, joint_attention_dim=512,
                                         pooled_projection_dim=config.hidden_size, axes_dims_rope=(16, 24, 24),
                                         guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer,
                 text_encoder_2=t5, tokenizer_2=t5_tokenizer, scheduler=scheduler).save_pretrained(path)


def build_folder(preset: str, size: int, path: Path) -> None:
    """A random SD-, SDXL-, SD3- or Flux-architecture model (8x VAE, CLIP text tower(s)), saved by diffusers."""
    width, layers, vae_widths, *_ = PRESETS[preset]
    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=max(1, width // 64), max_position_embeddings=77, projection_dim=width)
    if preset.startswith(("sd3", "flux")):
        return mmdit_folder(preset, size, path, config, vae_widths)
    vae = AutoencoderKL(block_out_channels=vae_widths, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        norm_num_groups=32, sample_size=size)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading")
    if preset.startswith("sdxl"):
        StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer,
                                  text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tokenizer,
                                  unet=sdxl_unet(preset, size // 8, width), scheduler=scheduler).save_pretrained(path)
        return
    unet = build_unet(preset, sample_size=size // 8, cross_attention_dim=width)
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def variant_options(name: str) -> tuple[dict, dict]:
    """(from_pretrained options, call options) of a variant name; "a+b" combines variants."""
    if "+" in name:
        parts = [variant_options(n) for n in name.split("+")]
        return {k: v for load, _ in parts for k, v in load.items()}, {k: v for _, c in parts for k, v in c.items()}
    if name == "default":
        return {}, {}
    if name == "channels_last":
        return {"channels_last": True}, {}
    if name == "compile":
        return {"compile": True}, {}
    if name == "triton":
        return {"attention": "triton"}, {}
    if name.startswith("fast") and name[4:].isdigit():
        return {}, {"cache_interval": int(name[4:])}
    if name.startswith("gi") and name[2:].count("-") == 1:
        try:
            return {}, {"guidance_interval": tuple(float(v) for v in name[2:].split("-"))}
        except ValueError:
            pass
    raise SystemExit(f"unknown variant {name!r}")


def bench(preset: str, folder: Path, size: int, steps: int, dtype: str, device: str, repeats: int,
          variants: list[str], stat: str = "median") -> None:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    family = next((f for f in ("sdxl", "sd3", "flux") if preset.startswith(f)), "sd")
    klass = dict(sd=StableDiffusionPipeline, sdxl=StableDiffusionXLPipeline, sd3=StableDiffusion3Pipeline,
                 flux=FluxPipeline)[family]
    guidance, sampler = SETTINGS.get(family, SETTINGS["sd"])
    settings = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type="np")
    theirs = klass.from_pretrained(folder, torch_dtype=DTYPES[dtype]).to(device)
    theirs.set_progress_bar_config(disable=True)
    runs = {"diffusers": lambda: theirs(PROMPT, negative_prompt=NEGATIVE, **settings,
                                        generator=[torch.Generator("cpu").manual_seed(0)]).images}
    warmup = {}
    for name in variants:
        load, call = variant_options(name)
        pipe = Pipeline.from_pretrained(folder, device=device, dtype=dtype, **load)
        pipe.progress = False
        runs[name] = (lambda p, c: lambda: p(PROMPT, negative_prompt=NEGATIVE, seed=0, **settings, **c).images)(pipe, call)
    outs, times, cpu = {}, {name: [] for name in runs}, {name: [] for name in runs}
    for name, run in runs.items():  # warm-up (compiles where asked)
        t = time.perf_counter()
        outs[name] = run()
        sync()
        warmup[name] = time.perf_counter() - t
    for _ in range(repeats):
        for name, run in runs.items():
            t, c = time.perf_counter(), time.process_time()
            outs[name] = run()
            sync()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {name: getattr(statistics, stat, min)(ts) for name, ts in times.items()}
    used = {name: getattr(statistics, stat, min)(ts) for name, ts in cpu.items()}  # CPU seconds: robust to load
    syncs = ""
    if device.startswith("cuda") and "default" in runs:  # host syncs in one whole gen call (steps: {steps})
        import warnings
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs["default"]()
        torch.cuda.set_sync_debug_mode(0)
        syncs = f", host syncs in one gen call: {len(caught)}"
    denoiser = getattr(theirs, "unet", None) or theirs.transformer
    n_params = sum(p.numel() for p in denoiser.parameters()) / 1e6
    print(f"\n{preset}: {type(denoiser).__name__} {n_params:.0f}M params, {size} px, {steps} steps, guidance "
          f"{guidance}, {sampler}, {dtype}, {device}, {stat} of {repeats}{syncs}")
    print(f"  {'diffusers':<16} {med['diffusers']:8.3f} s/img  (process CPU time {used['diffusers']:.3f} s/img)")
    ref, exact = outs["diffusers"], outs.get("default")
    for name in variants:
        line = (f"  {'gen ' + name:<16} {med[name]:8.3f} s/img  {med['diffusers'] / med[name]:5.2f}x diffusers  "
                f"max|diff| vs diffusers {np.abs(outs[name] - ref).max():.1e}; process CPU time {used[name]:.3f} s/img, "
                f"gen/diffusers {used[name] / used['diffusers']:.2f}")
        approximate = any(part.startswith(("fast", "gi")) for part in name.split("+"))
        if approximate and exact is not None:
            line += (f"; vs gen exact: max|diff| {np.abs(outs[name] - exact).max():.3f}, "
                     f"PSNR {psnr(outs[name], exact):.1f} dB, {med['default'] / med[name]:.2f}x gen exact")
        if "compile" in name:
            line += f"; first call (compiling) {warmup[name]:.0f} s"
        print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=None, choices=sorted(PRESETS),
                    help="UNet preset(s) (default: tiny base on CPU, sd15 on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, fp16 on CUDA")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stat", default="median", choices=("median", "min"),
                    help="time per image over the repeats (min: on a machine shared with other jobs)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="default channels_last compile fastK triton (default: default channels_last compile fast3; "
                         "on CUDA also triton)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    presets = args.preset or (["sd15"] if cuda else CPU_DEFAULT)
    dtype = args.dtype or ("fp16" if cuda else "fp32")
    variants = args.variants or (["default", "channels_last", "compile", "fast3"] + (["triton"] if cuda else []))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            size = args.size or PRESETS[preset][3]
            folder = Path(tmp) / preset
            build_folder(preset, size, folder)
            bench(preset, folder, size, args.steps or PRESETS[preset][4], dtype, args.device, args.repeats, variants,
                  args.stat)


if __name__ == "__main__":
    main()
