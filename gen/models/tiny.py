"""Builds a small randomly initialised model folder: `python -m gen.models.tiny OUT [--denoiser dit|unet]`.

Used by `make demo` until the bundled default model exists, and by tests."""

from __future__ import annotations

import argparse

import torch

from gen.formulations import DDPM, Flow
from gen.models.dit import build_dit
from gen.models.text import build_text_encoder, byte_level_tokenizer
from gen.models.unet import build_unet
from gen.models.vae import build_vae


def tiny_pipeline(denoiser: str = "dit", seed: int = 0, sample_size: int = 16):
    """A tiny random Pipeline: DiT + rectified flow, or UNet + DDPM (epsilon)."""
    from gen.pipeline import Pipeline

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    text = build_text_encoder("tiny", vocab_size=len(tokenizer))
    vae = build_vae("tiny")
    if denoiser == "dit":
        model = build_dit("DiT-T/2", sample_size=sample_size, cross_attention_dim=32, pooled_projection_dim=32)
        formulation = Flow(shift=1.0)
    elif denoiser == "unet":
        model = build_unet("tiny", sample_size=sample_size)
        formulation = DDPM()
    else:
        raise ValueError(f"denoiser must be 'dit' or 'unet', not {denoiser!r}")
    return Pipeline(text, tokenizer, vae, model, formulation=formulation,
                    defaults={"steps": 20}, recipe={"note": "random weights (gen.models.tiny)"})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--denoiser", choices=("dit", "unet"), default="dit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tiny_pipeline(args.denoiser, args.seed).save_pretrained(args.out)
    print(f"wrote a tiny random {args.denoiser} model to {args.out}")


if __name__ == "__main__":
    main()
