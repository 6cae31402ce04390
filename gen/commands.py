"""The `gen` commands beside sample and serve: convert, info, train, lora (and lora merge), eval, data; the flags a
single file's parts take (sample's too); and the docs page of each command. Training-only code is imported only
when its command runs, so `gen sample` starts fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from gen.errors import GenError
from gen.recipe import lora_arg as _lora_arg

# The page of README.md / docs/ that documents each command, named at the end of its --help.
DOCS = {"gen": "README.md, then docs/ (`gen COMMAND --help` names its page)", "sample": "docs/sampling.md",
        "info": "docs/files.md", "convert": "docs/files.md#single-files-a1111--comfyui--model-sharing-sites",
        "train": "docs/training.md", "lora": "docs/lora.md", "lora merge": "docs/lora.md",
        "eval": "docs/training.md#prompt-adherence-evaluation", "data": "docs/training.md#data-at-scale",
        "serve": "docs/serve.md"}


def single_file_flags(p) -> None:
    p.add_argument("--tokenizer", default=None, metavar="FOLDER",
                   help="for a single file: a diffusers folder whose tokenizer/ (tokenizer_2/) to use instead of "
                        "gen's bundled CLIP/T5 tokenizers")
    p.add_argument("--base", default=None, metavar="FOLDER",
                   help="for an SD3/Flux single file lacking parts (a transformer-only Flux finetune): a diffusers "
                        "folder of the same family whose text encoders, tokenizers, VAE and scheduler to use")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="for a single file: what its denoiser predicts, which weights cannot tell (SD-2.x 768 "
                        "models: v_prediction); default: what the file records, else a guess (gen info FILE)")
    p.add_argument("--vae", default=None, metavar="FILE", help="a VAE file (ae.safetensors, sdxl_vae.safetensors) "
                   "used instead of the file's own, or where it has none")
    p.add_argument("--text-encoder", action="append", default=None, metavar="FILE", dest="text_encoders",
                   help="a text encoder file (clip_l / clip_g / t5xxl.safetensors), recognised by its keys; "
                        "repeatable")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a checkpoint holding both")


def component_args(args) -> dict:
    return dict(vae=args.vae, text_encoders=args.text_encoders or (), ema=args.ema)


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="model folder -> single .safetensors file (original LDM/A1111 layout), "
                       "or single file -> diffusers folder")
    p.add_argument("src", help="a model folder or a single .safetensors file")
    p.add_argument("dst", help="a .safetensors path (write a single file) or a folder path (write a folder)")
    single_file_flags(p)
    p.add_argument("--allow-pickle", action="store_true", help="allow reading a pickle-based .ckpt source")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="weights' dtype written")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from gen.pipeline import Pipeline

    src, dst = Path(args.src), Path(args.dst)
    if src.resolve() == dst.resolve():
        raise GenError("gen convert: SRC and DST are the same path")
    pipe = Pipeline.from_pretrained(src, device="cpu", dtype=args.dtype, allow_pickle=args.allow_pickle,
                                    tokenizer=args.tokenizer, prediction_type=args.prediction_type, base=args.base,
                                    weights="full", **component_args(args))  # fp8/GGUF weights written upcast
    pipe.save_pretrained(dst, single_file=dst.suffix == ".safetensors")
    print(f"wrote {dst} ({'single file' if dst.suffix == '.safetensors' else 'diffusers folder'}, "
          f"{pipe.family.title})")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a model folder or a .safetensors file (default: the bundled "
                       "model); --versions for bug reports")
    p.add_argument("path", nargs="?")
    p.add_argument("--versions", action="store_true", help="print gen's and its key dependencies' versions")
    p.add_argument("--memory", action="store_true",
                   help="the predicted peak device memory of sampling with each memory option and of LoRA training; "
                        "PATH may also be a preset: " + ", ".join(("sd15", "sdxl", "sd3.5-medium", "sd3.5-large",
                                                                  "flux-dev")))
    p.add_argument("--size", default=None, metavar="WxH", help="with --memory: the image size (default: native)")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"), help="with --memory: compute dtype")
    p.add_argument("--weights", default=None, choices=("full", "fp8", "nf4", "int8", "gguf-q4"), help="with --memory: only these rows")
    p.add_argument("--offload", default=None, choices=("none", "model", "group", "sequential"),
                   help="with --memory: only these rows")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from gen.info import describe, versions

    if args.versions:
        print(versions())
    if args.memory:
        return _info_memory(args)
    if args.path is not None or not args.versions:  # no path: the bundled model, as `gen sample` uses
        from gen.pipeline import DEFAULT_MODEL

        print(describe(args.path or DEFAULT_MODEL))
    return 0


def _info_memory(args) -> int:
    from gen import memory_plan
    from gen.memory import DTYPES
    from gen.pipeline import DEFAULT_MODEL

    print(memory_plan.info(str(args.path or DEFAULT_MODEL), args.size, DTYPES[args.dtype], args.weights, args.offload))
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a denoiser from a YAML recipe (also under `accelerate launch`)")
    p.add_argument("config", nargs="?", help="a recipe name (`gen train --list`) or a YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    _recipe_flags(p)
    p.set_defaults(func=cmd_train)


def _recipe_flags(p) -> None:
    p.add_argument("--list", action="store_true", help="name the shipped recipes, with a line about each")
    p.add_argument("--print-config", action="store_true", help="print the recipe resolved with the overrides, as "
                   "YAML to start your own from (`... --print-config > my.yaml`), and exit")


def cmd_train(args) -> int:
    import train  # training-only code loads only here
    from train import recipes

    done = recipes.command(args, "train")
    return done if done is not None else train.main(args.config, args.overrides)


def add_lora(sub) -> None:
    p = sub.add_parser("lora", help="LoRA fine-tune a model folder from a YAML recipe (also under `accelerate "
                                    "launch`); `gen lora merge BASE LORA[:SCALE]... --out OUT` bakes LoRAs in")
    p.add_argument("config", nargs="?", help="a recipe name (`gen lora --list`) or a YAML config file, or `merge`")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",  # REMAINDER: merge's own options
                   help="config overrides, e.g. lora.rank=16")
    _recipe_flags(p)
    p.set_defaults(func=cmd_lora)


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gen lora merge", description="fuse LoRA files into a base model and save it")
    p.add_argument("base", help="the base model (folder)")
    p.add_argument("loras", nargs="+", type=_lora_arg, metavar="LORA[:SCALE]", help="LoRA files, each at SCALE")
    p.add_argument("--out", required=True, help="the merged model: a folder, or a single .safetensors file "
                                                 "(original LDM/A1111 layout)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle-based weight files (unsafe)")
    p.epilog = f"Docs: {DOCS['lora merge']}"
    return p


def cmd_lora(args) -> int:
    if args.config == "merge":
        return lora_merge(_merge_parser().parse_args(args.overrides))
    from train import recipes
    from train.lora import main as lora_main

    done = recipes.command(args, "lora")
    return done if done is not None else lora_main(args.config, args.overrides)


def lora_merge(args) -> int:
    """`gen lora merge`: the base with each LoRA at its scale fused into its weights, saved as a model of its own
    (what kohya's merge scripts and ComfyUI's save-checkpoint node do); its images equal the base's with the
    LoRAs loaded."""
    from gen.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.base, device="cpu", dtype="fp32", allow_pickle=args.allow_pickle)
    for path, scale in args.loras:
        pipe.load_lora(path, scale=scale, allow_pickle=args.allow_pickle)
    pipe.fuse_lora()
    pipe.unload_lora()  # the fused weights stay
    pipe.recipe["merged_loras"] = [{"file": str(path), "scale": scale} for path, scale in args.loras]
    pipe.save_pretrained(args.out, single_file=Path(args.out).suffix == ".safetensors")
    print(f"merged {len(args.loras)} LoRA(s) into {args.base}: {args.out}")
    return 0


def add_eval(sub) -> None:
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
    a.add_argument("--diversity", action="store_true",
                   help="also report diversity (mean pairwise distance per prompt / the world's) and a copying check "
                        "(nearest-training-image distances vs held-out images'); needs --n 2 or more")
    a.add_argument("--json", default=None, help="write per-image scores and the summary here")
    a.add_argument("--save-images", default=None, help="also save the scored images in this folder")
    a.add_argument("--device", default=None)
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_eval_adherence)


def cmd_eval_adherence(args) -> int:
    from train.evaluate import main as eval_main

    return eval_main(args)


def add_data(sub) -> None:
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
    from train.loop import build_cache

    return build_cache(args.config, args.overrides)
