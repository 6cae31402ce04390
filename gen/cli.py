"""The `gen` command: sample, info, train, lora, eval, data. Training-only code is imported only by the
commands that need it, so `gen sample` starts fast."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gen.errors import GenError


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a prompt")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--guidance-rescale", type=float, default=None)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("START", "END"),
                   help="apply guidance only over this fraction of the steps (default 0 1: all); the steps "
                        "outside skip the unconditional pass (Kynkaanniemi et al. 2024)")
    p.add_argument("--sampler", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--attention", default=None, choices=("triton", "xformers", "sdpa", "math", "auto"),
                   help="attention backend (default: auto, which logs what it picks)")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (slow first image)")
    p.add_argument("--channels-last", action="store_true", help="channels-last convolution weights")
    p.add_argument("--cache-interval", type=int, default=1, metavar="K",
                   help="approximate fast mode: run the whole denoiser every K-th step only and reuse its deep "
                        "features between (DeepCache); 1 = exact (default)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--out", default="outputs", help="a .png file, or a folder (default: outputs/)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle-based weight files (unsafe)")
    p.add_argument("--lora", action="append", default=[], type=_lora_arg, metavar="PATH[:SCALE]",
                   help="apply a LoRA file at SCALE (default 1); repeat to stack several")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)


def _lora_arg(text: str) -> tuple[str, float]:
    """PATH[:SCALE]: split at the last ':' only when what follows is a number, so C:\\x.safetensors stays a path."""
    path, sep, tail = text.rpartition(":")
    try:
        return (path, float(tail)) if sep and path else (text, 1.0)
    except ValueError:
        return text, 1.0


def _out_paths(out: str, seeds: list[int]) -> list[Path]:
    """A .png path names the file (with -i for several images); otherwise a folder of SEED.png files,
    never overwriting an existing image."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        return [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(len(seeds))]
    if out.exists() and not out.is_dir():
        raise GenError(f"--out {out} exists and is not a folder; give a folder or a .png path")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        p, k = out / f"{s}.png", 1
        while p.exists():
            p, k = out / f"{s}-{k}.png", k + 1
        paths.append(p)
    return paths


def cmd_sample(args) -> int:
    from gen.io import png_parameters, save_png
    from gen.pipeline import Pipeline

    if args.steps is not None and args.steps < 1:  # fail before loading anything
        raise GenError(f"--steps must be >= 1, not {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        raise GenError(f"--guidance must be >= 0, not {args.guidance}")
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    attention=args.attention, allow_pickle=args.allow_pickle,
                                    compile=args.compile, channels_last=args.channels_last)
    pipe.progress = not args.no_progress
    for path, scale in args.lora:
        pipe.load_lora(path, scale=scale, allow_pickle=args.allow_pickle)
    d = pipe.defaults
    pick = lambda value, key: d[key] if value is None else value  # noqa: E731
    settings = dict(num_inference_steps=pick(args.steps, "steps"), guidance_scale=pick(args.guidance, "guidance"),
                    height=pick(args.height, "height"), width=pick(args.width, "width"),
                    sampler=pick(args.sampler, "sampler"))
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
               seed=args.seed, guidance_rescale=args.guidance_rescale, guidance_interval=tuple(args.guidance_interval),
               cache_interval=args.cache_interval, **settings)
    model = Path(args.model).name if args.model else "gen-default"
    for image, seed, path in zip(out.images, out.seeds, _out_paths(args.out, out.seeds)):
        params = png_parameters(args.prompt, args.negative_prompt or "", settings["num_inference_steps"],
                                settings["sampler"], settings["guidance_scale"], seed, settings["width"],
                                settings["height"], model)
        save_png(image, path, params)
        print(path)
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a model folder or a .safetensors file; --versions for bug reports")
    p.add_argument("path", nargs="?")
    p.add_argument("--versions", action="store_true", help="print gen's and its key dependencies' versions")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from gen.info import describe, versions

    if args.versions:
        print(versions())
    if args.path is not None:
        print(describe(args.path))
    elif not args.versions:
        raise GenError("gen info needs a model folder or .safetensors file (or --versions)")
    return 0


class _Versions(argparse.Action):
    """`gen --version`: the versions report, printed before any subcommand is required."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from gen.info import versions

        print(versions())
        parser.exit()


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a denoiser from a YAML recipe (also under `accelerate launch`)")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import train  # training-only code loads only here

    return train.main(args.config, args.overrides)


def _add_lora(sub) -> None:
    p = sub.add_parser("lora", help="LoRA fine-tune a model folder from a YAML recipe (also under `accelerate launch`)")
    p.add_argument("config", help="YAML config (see configs/lora-*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.rank=16")
    p.set_defaults(func=cmd_lora)


def cmd_lora(args) -> int:
    from train.lora import main as lora_main

    return lora_main(args.config, args.overrides)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    kinds = p.add_subparsers(dest="kind", required=True)
    a = kinds.add_parser("adherence", help="prompt adherence on the shapes world, scored by pixel statistics")
    a.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    a.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--steps", type=int, default=None)
    a.add_argument("--guidance", type=float, default=None)
    a.add_argument("--sampler", default=None)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--reference", choices=["ground-truth", "noise"], default=None,
                   help="score the world's own images or noise instead of a model (a check of the scorer)")
    a.add_argument("--json", default=None, help="write per-image scores and the summary here")
    a.add_argument("--save-images", default=None, help="also save the scored images in this folder")
    a.add_argument("--device", default=None)
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_eval_adherence)


def cmd_eval_adherence(args) -> int:
    from train.evaluate import main as eval_main

    return eval_main(args)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare training data")
    kinds = p.add_subparsers(dest="kind", required=True)
    k = kinds.add_parser("pack", help="write WebDataset shards (.tar) from an image folder")
    k.add_argument("src", help="image folder (metadata.jsonl or .txt sidecars)")
    k.add_argument("out", help="output folder for shard-NNNNNN.tar files")
    k.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    k.set_defaults(func=cmd_data_pack)
    c = kinds.add_parser("cache", help="encode a training config's latents and text embeddings to disk "
                                       "(run under `accelerate launch` to split it across processes)")
    c.add_argument("config", help="the training YAML config (its data.* and model.* keys)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.cache_dir=DIR")
    c.set_defaults(func=cmd_data_cache)


def cmd_data_pack(args) -> int:
    from train.data.shards import pack_main

    return pack_main(args)


def cmd_data_cache(args) -> int:
    from train.data.cache import main as cache_main

    return cache_main(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gen", description="Train, fine-tune and sample text-to-image models.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--version", action=_Versions, help="print gen's and its key dependencies' versions")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_sample(sub)
    _add_info(sub)
    _add_train(sub)
    _add_lora(sub)
    _add_eval(sub)
    _add_data(sub)
    return ap


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        _quiet_libraries()
        return args.func(args)
    except GenError as e:
        if args.debug:
            raise
        print(f"gen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gen: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal bug: one line unless --debug
        if args.debug:
            raise
        print(f"gen: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
