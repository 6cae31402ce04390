"""Peak sampling memory per model family at its real size, from parameter counts, with and without offload.

    .venv/bin/python bench/memory.py [--no-check] [--presets sd15 ...]   # the tables, the check on a model here

The second table is gen.memory_plan's (gen info --memory): the predicted peak per memory option, with the running
phase's transient tensors, and LoRA training, each family at its native size in bf16.

Each family's components are built on the `meta` device (no weights allocated) from the configs of the released
models (gen/memory_plan.py's FAMILIES, from their diffusers config.json files), and their parameters counted.
Sampling holds
  without offload:  every component's weights at once;
  with offload:     the largest of (all text encoders, the denoiser, the VAE), which are on the device one group at a
                    time (Pipeline.enable_offload, gen sample --offload);
plus the activations of the running component, which the table leaves out (measured below on a model that runs here:
small beside the weights at these sizes, and dependent on image size and batch).

The formula is checked on a random SD3-architecture model of ~0.3B parameters: the process's resident memory (Linux
VmRSS, and VmHWM for the peak, reset before sampling) grows by its weights' bytes when it is built, and by the
activations while it samples. CPU only: with no GPU the offload case cannot be measured here (on the CPU it moves
nothing).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import AutoencoderKL, SD3Transformer2DModel  # noqa: E402
from transformers import CLIPTextModelWithProjection, T5EncoderModel  # noqa: E402

from gen.memory_plan import CLIP_L, FAMILIES, SD35_MEDIUM, T5_XXL, VAE_16, count  # noqa: E402
from gen.memory_train import TEXT, build  # noqa: E402


def peaks(params: dict[str, int], bytes_per_param: int) -> tuple[float, float]:
    """(peak weight bytes without offload, with offload): all at once, or the largest group at a time."""
    text = sum(n for name, n in params.items() if name in TEXT)
    groups = [text] + [n for name, n in params.items() if name not in TEXT]
    return sum(params.values()) * bytes_per_param, max(groups) * bytes_per_param


def table() -> str:
    gb = 1024 ** 3
    rows = ["| family | weights (M values: parameters and buffers), from the released configs | "
            "peak, bf16/fp16 (all weights) | peak with --offload (largest group) |", "| --- | --- | --- | --- |"]
    for family, parts in FAMILIES.items():
        params = {name: count(cls, config) for name, (cls, config) in parts.items()}
        whole, offloaded = peaks(params, 2)
        counts = ", ".join(f"{name} {n / 1e6:,.1f}" for name, n in params.items())
        rows.append(f"| {family} | {counts} (total {sum(params.values()) / 1e9:.2f} B) | {whole / gb:.1f} GiB | "
                    f"{offloaded / gb:.1f} GiB |")
    return "\n".join(rows)


def plan_table(presets=None) -> str:
    """gen.memory_plan's predicted peaks (GiB, bf16, each family at its native size) per option, and LoRA training."""
    from gen.memory_plan import OPTIONS, PRESETS, plan

    labels = [label for label, _, _ in OPTIONS]
    rows = ["| family, size | " + " | ".join(labels) + " | LoRA train (ckpt off / on / on + fp8 base) |",
            "| --- " * (len(labels) + 2) + "|"]
    for preset in presets or PRESETS:
        p = plan(preset, dtype=torch.bfloat16)
        peaks = " | ".join(f"{r.peak / 2 ** 30:.2f}" for r in p.rows)
        train = " / ".join(f"{m.peak / 2 ** 30:.2f}" for _, m in p.training)
        rows.append(f"| {PRESETS[preset]}, {p.width} px | {peaks} | {train} |")
    return "\n".join(rows)


# ---- the check: resident memory of a process that builds and samples a model -------------------------------------
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit("needs Linux /proc/self/status")


def check() -> str:
    from gen.models.text import byte_level_tokenizer
    from gen.pipeline import Pipeline
    from tests.conftest import tiny_t5_tokenizer

    mib = 1024 ** 2
    gc.collect()
    before = _status("VmRSS")
    torch.manual_seed(0)
    clip = dict(CLIP_L, vocab_size=259, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                num_attention_heads=8, projection_dim=512, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    t5_tokenizer = tiny_t5_tokenizer()
    parts = dict(text_encoder=build(CLIPTextModelWithProjection, clip), tokenizer=byte_level_tokenizer(),
                 text_encoder_2=build(CLIPTextModelWithProjection, clip), tokenizer_2=byte_level_tokenizer(),
                 text_encoder_3=build(T5EncoderModel, dict(T5_XXL, vocab_size=len(t5_tokenizer), d_model=1024,
                                                           d_ff=2816, num_heads=16, num_layers=4)),
                 tokenizer_3=t5_tokenizer, vae=build(AutoencoderKL, VAE_16),
                 denoiser=build(SD3Transformer2DModel, SD35_MEDIUM | dict(num_layers=6, num_attention_heads=12,
                                                                          caption_projection_dim=768,
                                                                          joint_attention_dim=1024,
                                                                          pooled_projection_dim=1024,
                                                                          dual_attention_layers=())))
    pipe = Pipeline(**parts, scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    pipe.progress = False
    weights = sum(p.numel() * p.element_size() for m in pipe.models for p in m.parameters())
    weights += sum(b.numel() * b.element_size() for m in pipe.models for b in m.buffers())
    gc.collect()
    built = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak, to the current resident size
    pipe("a red circle", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0, height=256, width=256,
         seed=0, output_type="np")
    peak = _status("VmHWM")
    n = sum(p.numel() for m in pipe.models for p in m.parameters())
    return "\n".join([
        f"check: a random SD3-architecture model, {n / 1e6:.0f}M parameters, fp32, sampled at 256 px, CFG, 2 steps",
        f"  weights, counted (parameters and buffers):   {weights / mib:8.0f} MiB",
        f"  resident memory added by building it:       {(built - before) / mib:8.0f} MiB "
        f"({(built - before) / weights - 1:+.1%} vs the count)",
        f"  peak resident memory while sampling:        {(peak - before) / mib:8.0f} MiB "
        f"(activations and allocator: {(peak - built) / mib:.0f} MiB over the weights)"])


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-check", action="store_true", help="the tables only")
    ap.add_argument("--presets", nargs="+", default=None, help="the planner's rows for these presets only")
    a = ap.parse_args()
    print(table())
    print()
    print(plan_table(a.presets))
    if not a.no_check:
        print()
        print(check())


if __name__ == "__main__":
    main()
