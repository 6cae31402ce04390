"""The `gen` command: `gen sample` and the parser of every subcommand (the others in gen/commands.py, gen serve's in
gen/serve). Training-only code is imported only by the commands that need it, so `gen sample` starts fast."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from gen import commands, control
from gen.commands import DOCS, component_args, single_file_flags
from gen.errors import GenError, Stopped
from gen.recipe import lora_arg as _lora_arg

log = logging.getLogger("gen")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a prompt, a PNG's recipe or a file of prompts")
    p.add_argument("prompt", nargs="?", help="the prompt (optional with --from or --prompts)")
    p.add_argument("--from", dest="recipe", metavar="IMAGE.png",
                   help="make an image again from the recipe in a PNG written by gen or AUTOMATIC1111: its prompt, "
                        "settings, model and LoRAs; the flags given override it")
    p.add_argument("--prompts", metavar="FILE",
                   help="one prompt a line, or a .jsonl file with a JSON object a line: prompt and any of "
                        "negative_prompt, seed, width, height, steps, guidance; the model loads once")
    p.add_argument("--model", default=None, help="model folder or single .safetensors file (default: the bundled "
                   "model)")
    single_file_flags(p)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--guidance-rescale", type=float, default=None)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="apply guidance only over this fraction of the steps (default 0 1: all); the steps "
                        "outside skip the unconditional pass (Kynkaanniemi et al. 2024)")
    p.add_argument("--sampler", default=None, help="gen's, A1111's or ComfyUI's name (euler, \"DPM++ 2M SDE\", "
                   "dpmpp_2m_sde, ...; --list-samplers lists them)")
    p.add_argument("--scheduler", dest="schedule", default=None, metavar="NAME",
                   help="the sigma schedule: karras, exponential, normal, simple, beta, trailing, ... (A1111's or "
                        "ComfyUI's names too; default: the model's own)")
    p.add_argument("--list-samplers", action="store_true", help="print the samplers and schedules, with their "
                   "A1111 and ComfyUI names and the formulations (ddpm: epsilon/v, flow) each serves, and exit")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-images", type=int, default=None, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images of a prompt made per pipeline call (default 1; more uses a GPU better); each "
                        "image is the same whatever the batch, and each batch is written as soon as it is made")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--attention", default=None, choices=("triton", "xformers", "sdpa", "math", "auto"),
                   help="attention backend (default: auto, which logs what it picks)")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (slow first image)")
    p.add_argument("--channels-last", action="store_true", help="channels-last convolution weights")
    p.add_argument("--cache-interval", type=int, default=None, metavar="K",
                   help="approximate fast mode: run the whole denoiser every K-th step only and reuse its deep "
                        "features between (DeepCache); 1 = exact (default)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--weights", default=None, choices=("auto", "fp8", "nf4", "fp4", "int8", "full"),
                   help="weight storage: fp8 keeps the denoiser's and text encoders' Linear/Conv weights in "
                        "float8_e4m3fn, upcast per layer; nf4/fp4/int8 quantize their Linear layers with "
                        "bitsandbytes (auto: a file's fp8/GGUF weights stay so; full: upcast them on load)")
    p.add_argument("--offload", nargs="?", const="model", default=None, metavar="MODE",
                   help="keep the weights on the CPU, moved to the device only while they run (less device memory): "
                        "model (the default) each component whole; group the denoiser's and text encoders' blocks, "
                        "--offload-blocks at a time, the next prefetched on a CUDA stream; sequential one layer at a "
                        "time (least memory, slowest)")
    p.add_argument("--offload-blocks", type=int, default=1, metavar="N", help="blocks per group under --offload group")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="device memory budget (e.g. 12GiB): pick the fastest --weights/--offload setting whose "
                        "predicted peak fits (gen info --memory), or refuse when none does")
    p.add_argument("--vae-tiling", nargs="?", type=int, const=True, default=None, metavar="PX",
                   help="decode and encode in overlapping tiles of PX pixels (default 512), one image at a time: "
                        "large images in bounded memory (seams blended; the tile is in the PNG recipe)")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="the T5 encoder's token length (SD3: 256, Flux: 512 by default)")
    p.add_argument("--slg-layers", type=_layers_arg, default=None, metavar="I,J,...",
                   help="skip-layer guidance (SD3.5): transformer blocks left out of its third pass, e.g. 7,8,9")
    p.add_argument("--slg-scale", type=float, default=2.8, help="skip-layer guidance scale (default 2.8)")
    p.add_argument("--slg-start", type=float, default=0.01, help="fraction of the steps where it starts (0.01)")
    p.add_argument("--slg-stop", type=float, default=0.2, help="fraction of the steps where it stops (0.2)")
    p.add_argument("--out", default="outputs", help="a .png file, or a folder (default: outputs/)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle-based weight files (unsafe)")
    p.add_argument("--lora", action="append", default=None, type=_lora_arg, metavar="PATH[:SCALE]",
                   help="apply a LoRA file at SCALE (default 1); repeat to stack several")
    p.add_argument("--embedding", action="append", default=None, metavar="FILE",
                   help="a textual-inversion embedding (A1111, diffusers or SDXL file) the prompts use by its name; "
                        "repeatable")
    p.add_argument("--embeddings", action="append", default=None, metavar="FOLDER",
                   help="a folder of embeddings, each used by its file name in a prompt (or as embedding:NAME)")
    p.add_argument("--no-progress", action="store_true")
    _workflow_flags(p)
    p.set_defaults(func=cmd_sample)


def _layers_arg(text: str) -> list[int]:
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers separated by commas, e.g. 7,8,9, not {text!r}")


def _workflow_flags(p) -> None:
    """img2img, inpainting, hires fix and prompt reading (gen.img2img, gen.hires, gen.prompt_weights)."""
    p.add_argument("--init-image", default=None, metavar="FILE", help="start from this image (img2img); the output "
                   "has its size unless --height/--width are given")
    p.add_argument("--strength", type=float, default=None, metavar="S", help="how much of the schedule runs from "
                   "the image, in [0, 1] (default 0.8; 1.0 with --mask)")
    p.add_argument("--mask", default=None, metavar="FILE", help="inpaint: repaint where this image is white "
                   "(same size as --init-image)")
    p.add_argument("--mask-blur", type=float, default=None, metavar="PX", help="blur the mask by this radius and "
                   "paste the result over the image through it (default 0)")
    p.add_argument("--inpaint-full-res", action="store_true", help="repaint only the mask's box (grown by "
                   "--inpaint-padding) at --height x --width, then paste it back (A1111's 'only masked')")
    p.add_argument("--inpaint-padding", type=int, default=None, metavar="PX", help="pixels around the mask's box "
                   "with --inpaint-full-res (default 32)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N", help="end the CLIP text towers N - 1 layers "
                   "early (A1111's Clip skip; default 1)")
    p.add_argument("--no-weighting", action="store_true", default=None,
                   help="read (word:1.3) / (word) / [word] / BREAK as plain text")
    p.add_argument("--hires", type=float, default=None, metavar="SCALE", help="hires fix: sample, upscale by SCALE, "
                   "then img2img at the larger size")
    p.add_argument("--hires-strength", type=float, default=None, metavar="S", help="the hires pass's strength "
                   "(default 0.7)")
    p.add_argument("--hires-steps", type=int, default=None, metavar="N", help="the hires pass's steps (default: "
                   "--steps)")
    p.add_argument("--hires-upscaler", default=None, choices=("latent", "image"),
                   help="upscale the latents (default) or the decoded image")
    p.add_argument("--ip-adapter", default=None, metavar="FILE", help="an IP-Adapter file in h94's layout "
                   "(ip-adapter_sd15.safetensors; SD-1.x/2.x, SDXL) or XLabs' (Flux): --ip-image becomes a prompt")
    p.add_argument("--ip-image", default=None, metavar="IMAGE", help="the IP-Adapter's image prompt")
    p.add_argument("--ip-scale", type=float, default=None, metavar="S", help="the weight of the image prompt "
                   "(default 1.0; 0: none)")
    p.add_argument("--image-encoder", default=None, metavar="FOLDER", help="the IP-Adapter's CLIP vision encoder "
                   "folder (default: image_encoder/ beside the --ip-adapter file)")
    control.add_flags(p)


def _workflow(args) -> dict:
    """The pipeline arguments of the workflow flags, checked before any model loads."""
    from gen import hires
    from gen.img2img import check_strength
    from gen.io import load_image

    for flag, value in (("--strength", args.strength), ("--mask", args.mask), ("--mask-blur", args.mask_blur),
                        ("--inpaint-full-res", args.inpaint_full_res or None)):
        if value is not None and args.init_image is None:
            raise GenError(f"{flag} needs --init-image")
    if args.inpaint_full_res and args.mask is None:
        raise GenError("--inpaint-full-res needs --mask")
    if args.strength is not None:
        try:
            check_strength(args.strength)
        except GenError:
            raise GenError(f"--strength must be in [0, 1], not {args.strength:g}") from None
    if args.mask_blur is not None and not args.mask_blur >= 0:
        raise GenError(f"--mask-blur must be >= 0, not {args.mask_blur:g}")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise GenError(f"--clip-skip must be >= 1, not {args.clip_skip}")
    if args.hires is not None:
        if args.init_image is not None:
            raise GenError("--hires is for text-to-image (A1111's hires fix); not with --init-image")
        hires.check(args.hires, _first(args.hires_strength, 0.7), args.hires_steps, args.hires_upscaler or "latent")
    given = {"--ip-adapter": args.ip_adapter, "--ip-image": args.ip_image}
    for flag, value in (("--ip-scale", args.ip_scale), ("--image-encoder", args.image_encoder), *given.items()):
        if value is not None and None in given.values():
            raise GenError(f"{flag} needs " + " and ".join(f for f, v in given.items() if v is None))
    ip_image = load_image(args.ip_image, "--ip-image") if args.ip_image else None
    image = load_image(args.init_image, "--init-image") if args.init_image else None
    mask = load_image(args.mask, "--mask") if args.mask else None
    if mask is not None and mask.size != image.size:
        raise GenError(f"--mask is {mask.size[0]}x{mask.size[1]} but --init-image is {image.size[0]}x{image.size[1]}; "
                       "they must be the same size")
    return dict(image=image, mask_image=mask, strength=args.strength, mask_blur=_first(args.mask_blur, 0),
                padding_mask_crop=_first(args.inpaint_padding, 32) if args.inpaint_full_res else None,
                clip_skip=_first(args.clip_skip, 1), prompt_weighting=not args.no_weighting,
                hires_scale=args.hires, hires_strength=_first(args.hires_strength, 0.7), hires_steps=args.hires_steps,
                hires_upscaler=args.hires_upscaler or "latent", ip_adapter_image=ip_image,
                ip_adapter_scale=_first(args.ip_scale, 1.0), **control.from_args(args))


class _Outputs:
    """Where each image goes: a .png path (PATH-i.png for several images), or a folder of NAME.png files
    that never overwrites an existing image."""

    def __init__(self, out: str, total: int):
        self.out, self.total = Path(out), total
        self.file = self.out.suffix.lower() == ".png"
        if not self.file and self.out.exists() and not self.out.is_dir():
            raise GenError(f"--out {self.out} exists and is not a folder; give a folder or a .png path")

    def next(self, name: str, index: int) -> Path:
        """The path of image `index` (counted over every process's images), to be named `name`."""
        if self.file:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            return self.out if self.total == 1 else self.out.with_name(f"{self.out.stem}-{index}.png")
        self.out.mkdir(parents=True, exist_ok=True)
        p, k = self.out / f"{name}.png", 1
        while p.exists():
            p, k = self.out / f"{name}-{k}.png", k + 1
        return p


def _apply_recipe(r, args) -> None:
    """Fills what the command line left unset from a --from recipe; a model or LoRA file it names must exist."""
    if args.negative_prompt is None and r.negative_prompt:  # none recorded is none given: SDXL's zero negative
        args.negative_prompt = r.negative_prompt
    for key in ("steps", "guidance", "seed", "width", "height", "sampler", "schedule", "guidance_rescale",
                "guidance_interval", "cache_interval", "weights"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(r, key))
    hires = r.hires_scale is not None
    for key, value in (("vae_tiling", r.vae_tile), ("init_image", r.init_image), ("mask", r.mask),
                       ("clip_skip", r.clip_skip), ("no_weighting", not r.weighting),
                       ("mask_blur", r.mask_blur if r.mask else None),
                       ("hires", r.hires_scale), ("hires_steps", r.hires_steps),
                       ("hires_upscaler", r.hires_upscaler if hires else None),
                       ("hires_strength", r.strength if hires else None),
                       ("strength", r.strength if args.init_image or r.init_image else None),
                       ("ip_adapter", r.ip_adapter), ("ip_image", r.ip_image), ("ip_scale", r.ip_scale),
                       ("image_encoder", r.image_encoder)):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if r.inpaint_padding is not None and not args.inpaint_full_res:
        args.inpaint_full_res, args.inpaint_padding = True, _first(args.inpaint_padding, r.inpaint_padding)
    if r.strength is not None and not hires and args.init_image is None:
        log.warning("%s was made from an image (Denoising strength %s) that the recipe does not name; pass "
                    "--init-image FILE", args.recipe, r.strength)
    if args.prompt is None and not args.prompts:
        args.prompt = r.prompt
    if args.model is None:
        if not r.by_gen:
            raise GenError(f"{args.recipe} names the model {r.model_name!r} (hash {r.model_hash}), which gen cannot "
                           "find by name; pass --model PATH")
        if r.model is not None and not Path(r.model).exists():
            raise GenError(f"{args.recipe} was made with the model {r.model}, which is not there; pass --model PATH")
        args.model = r.model
    if args.lora is None:
        if r.lora_tags:
            name, scale = r.lora_tags[0]
            raise GenError(f"{args.recipe} uses the LoRA {name!r} (<lora:{name}:{scale:g}>), which gen cannot find "
                           "by name; pass --lora PATH[:SCALE] for each of its LoRAs")
        missing = [p for p, _ in r.loras if not Path(p).exists()]  # a file, or a LoRA folder
        if missing:
            raise GenError(f"{args.recipe} was made with the LoRA {missing[0]}, which is not there; pass "
                           "--lora PATH[:SCALE] for each of its LoRAs")
        args.lora = r.loras
    control.apply_recipe(r, args)
    if args.embedding is None and args.embeddings is None and r.ti_hashes:
        missing = [p for p in r.embeddings if not Path(p).is_file()]
        if not r.embeddings or missing:
            raise GenError(f"{args.recipe} uses the embeddings {', '.join(r.ti_hashes)}, and "
                           f"{missing[0] + ' is not there' if missing else 'gen cannot find them by name'}; pass "
                           "--embeddings FOLDER (or --embedding FILE for each)")
        args.embedding = list(zip(r.embeddings, r.ti_hashes))  # each file under the name it was used by


def _check_against_recipe(r, args, pipe, model_hash: str | None, lora_hashes: dict[str, str]) -> None:
    """Warns where the model, a LoRA or an embedding differs from the one the recipe recorded; takes an A1111
    recipe's sampler and schedule."""
    from gen.sampling.names import from_a1111

    if r.model_hash and model_hash and r.model_hash != model_hash:
        log.warning("%s was made with model hash %s; this model's is %s, so the image will differ",
                    args.recipe, r.model_hash, model_hash)
    for name, now in lora_hashes.items():
        if r.lora_hashes.get(name, now) != now:
            log.warning("%s was made with LoRA hash %s for %s; this file's is %s", args.recipe, r.lora_hashes[name],
                        name, now)
    for e in pipe.embeddings_used([r.prompt, r.negative_prompt]):
        if r.ti_hashes.get(e.name, e.short_hash()) != e.short_hash():
            log.warning("%s was made with the embedding %s of hash %s; %s's is %s", args.recipe, e.name,
                        r.ti_hashes[e.name], e.path, e.short_hash())
    if args.sampler is None and r.a1111_sampler:
        args.sampler, schedule = from_a1111(*r.a1111_sampler, pipe.formulation.kind)
        args.schedule = args.schedule or schedule


def _jobs(args) -> list[tuple[int, dict]]:
    from gen.recipe import read_prompts

    if args.prompts and args.prompt is not None:
        raise GenError("give a PROMPT or --prompts FILE, not both")
    for flag, value in (("--steps", args.steps), ("--num-images", args.num_images),
                        ("--batch-size", args.batch_size)):  # fail before loading anything
        if value is not None and value < 1:
            raise GenError(f"{flag} must be >= 1, not {value}")
    if args.guidance is not None and args.guidance < 0:
        raise GenError(f"--guidance must be >= 0, not {args.guidance}")
    if args.prompts:
        return read_prompts(args.prompts)
    if args.prompt is None:
        raise GenError("gen sample needs a PROMPT (or --from IMAGE.png, or --prompts FILE)")
    return [(0, {"prompt": args.prompt})]


def _runs(args, jobs, pipe) -> list[tuple[int, dict]]:
    """The pipeline call of each job: its line's settings, else the flags (and recipe), else the model's
    defaults; every --prompts line is checked against the model before the first image."""
    from gen.samplers import own_schedule

    d = pipe.defaults
    shared = dict(sampler=_first(args.sampler, d["sampler"]), schedule=_first(args.schedule, own_schedule(d, args.sampler)),
                  guidance_rescale=_first(args.guidance_rescale, d.get("guidance_rescale", 0.0)),
                  guidance_interval=tuple(_first(args.guidance_interval, pipe.guidance_interval)),
                  cache_interval=_first(args.cache_interval, 1), num_images_per_prompt=_first(args.num_images, 1),
                  max_sequence_length=args.max_sequence_length)
    if args.slg_layers is not None:
        shared |= dict(skip_guidance_layers=args.slg_layers, skip_layer_guidance_scale=args.slg_scale,
                       skip_layer_guidance_start=args.slg_start, skip_layer_guidance_stop=args.slg_stop)
    runs = []
    sized = args.init_image is None or args.inpaint_full_res  # else an img2img image has its source's size
    for line, job in jobs:
        run = dict(prompt=job["prompt"], negative_prompt=_first(job.get("negative_prompt"), args.negative_prompt),
                   num_inference_steps=_first(job.get("steps"), args.steps, d["steps"]),
                   guidance_scale=_first(job.get("guidance"), args.guidance, d["guidance"]),
                   height=_first(job.get("height"), args.height, d["height"] if sized else None, None),
                   width=_first(job.get("width"), args.width, d["width"] if sized else None, None),
                   seed=job.get("seed"), **shared)
        bad = [side for side in ("width", "height") if run[side] is not None and run[side] % pipe.size_multiple]
        if args.prompts and bad:
            raise GenError(f"{Path(args.prompts).name} line {line}: {bad[0]} {run[bad[0]]} is not a multiple of "
                           f"{pipe.size_multiple}, as this model needs")
        runs.append((line, run))
    return runs


def _recorded(args, workflow: dict) -> dict:
    """The recipe fields of the workflow flags."""
    source = args.init_image is not None
    out = dict(clip_skip=workflow["clip_skip"], weighting=workflow["prompt_weighting"],
               init_image=str(Path(args.init_image).resolve()) if source else None,
               mask=str(Path(args.mask).resolve()) if args.mask else None, mask_blur=workflow["mask_blur"],
               inpaint_padding=workflow["padding_mask_crop"], hires_scale=workflow["hires_scale"],
               hires_steps=workflow["hires_steps"], hires_upscaler=workflow["hires_upscaler"],
               **control.recorded(workflow))
    if args.ip_adapter is not None:
        out |= dict(ip_adapter=str(Path(args.ip_adapter).resolve()), ip_image=str(Path(args.ip_image).resolve()),
                    ip_scale=workflow["ip_adapter_scale"],
                    image_encoder=str(Path(args.image_encoder).resolve()) if args.image_encoder else None)
    if source:
        default = 1.0 if args.mask else 0.8
        out["strength"] = _first(workflow["strength"], default)
    elif workflow["hires_scale"] is not None:
        out["strength"] = workflow["hires_strength"]
    return out


def _first(*values):
    return next((v for v in values if v is not None), None)


def cmd_sample(args) -> int:
    import random

    from tqdm.auto import tqdm

    from gen import recipe
    from gen.pipeline import DEFAULT_MODEL, Pipeline
    from gen.sampling import names

    if args.list_samplers:
        print(names.table())
        return 0
    base = recipe.read_png(args.recipe) if args.recipe else None
    if base is not None:
        _apply_recipe(base, args)
    jobs = _jobs(args)
    rank, world = _processes(args, jobs)
    if args.sampler is not None:  # unknown names fail before the model loads
        names.sampler(args.sampler, args.schedule)
    names.schedule(args.schedule)
    workflow = _workflow(args)
    if workflow["prompt_weighting"]:  # a malformed (word:weight) fails before the model loads
        from gen.prompt_weights import parse

        for _, job in jobs:
            parse(job["prompt"]), parse(_first(job.get("negative_prompt"), args.negative_prompt, ""))
    if args.max_memory is not None:
        _fit_memory(args)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    attention=args.attention, allow_pickle=args.allow_pickle,
                                    compile=args.compile, channels_last=args.channels_last,
                                    tokenizer=args.tokenizer, prediction_type=args.prediction_type,
                                    base=args.base, offload=args.offload or False,
                                    offload_blocks=args.offload_blocks, weights=args.weights,
                                    vae_tiling=_first(args.vae_tiling, False), ip_adapter=args.ip_adapter,
                                    image_encoder=args.image_encoder,
                                    **component_args(args))
    model_path = Path(args.model) if args.model else DEFAULT_MODEL
    model_hash = recipe.HashInBackground(model_path)  # hashed while sampling
    loras = [(str(Path(p).resolve()), s) for p, s in args.lora or []]
    for path, scale in loras:
        pipe.load_lora(path, scale=scale, allow_pickle=args.allow_pickle)
    lora_hashes = {recipe.lora_alias(p): recipe.lora_hash(p) for p, _ in loras}
    for path in args.embeddings or []:
        pipe.load_textual_inversion(path, allow_pickle=args.allow_pickle)
    for item in args.embedding or []:  # a path, or (path, name) from a --from recipe
        path, token = item if isinstance(item, tuple) else (item, None)
        pipe.load_textual_inversion(path, token, allow_pickle=args.allow_pickle)
    if base is not None:
        _check_against_recipe(base, args, pipe, model_hash.result(), lora_hashes)
    runs = _runs(args, jobs, pipe)
    sampler, schedule = runs[0][1]["sampler"], runs[0][1]["schedule"]
    sampler, schedule, sampler_fields = names.recorded(sampler, schedule, pipe.formulation, pipe.scheduler_config)
    written = dict(sampler=sampler, schedule=schedule, model=str(model_path.resolve()) if args.model else None,
                   model_name=model_path.name if args.model else "gen-default", loras=loras, lora_hashes=lora_hashes,
                   weights=pipe.weights, vae_tile=pipe.vae_tiling)
    seed = _first(args.seed, random.randrange(2 ** 32))  # lines without a seed take the next ones
    total = sum(run["num_images_per_prompt"] for _, run in runs)
    outputs = _Outputs(args.out, total)
    pipe.set_progress_bar_config(disable=args.no_progress or total > 1)  # a batch has one bar, over images
    bar = tqdm(total=total, unit="img", desc="images", disable=args.no_progress or total == 1)
    calls = []  # --batch-size images of a prompt per pipeline call (image k of a batch is that image made alone,
    for line, run in runs:  # see DESIGN.md, so the batch size changes no image)
        if run["seed"] is None:
            run["seed"], seed = seed, seed + run["num_images_per_prompt"]
        n, b = run["num_images_per_prompt"], args.batch_size
        calls += [(line, {**run, "seed": run["seed"] + i, "num_images_per_prompt": min(b, n - i)})
                  for i in range(0, n, b)]
    first = [0]  # the index of each call's first image among all the calls' images
    for _, run in calls:
        first.append(first[-1] + run["num_images_per_prompt"])
    calls = [(line, run, index) for (line, run), index in zip(calls, first)][rank::world]  # this process's share
    bar.total = sum(run["num_images_per_prompt"] for _, run, _ in calls)
    if world > 1:
        log.info("process %d of %d: %d of the %d images", rank + 1, world, bar.total, total)
    previous, made = signal.signal(signal.SIGTERM, _terminated), 0  # SIGTERM ends it as Ctrl-C does
    try:
        for line, run, index in calls:  # written as soon as they are made: an interrupted batch keeps what was done
            out = pipe(**run, **workflow)
            for k, (image, image_seed) in enumerate(zip(out.images, out.seeds)):
                fields = dict(prompt=run["prompt"], negative_prompt=run["negative_prompt"] or "",
                              steps=run["num_inference_steps"], guidance=run["guidance_scale"], seed=image_seed,
                              width=_first(run["width"], image.width), height=_first(run["height"], image.height),
                              guidance_rescale=run["guidance_rescale"], guidance_interval=run["guidance_interval"],
                              cache_interval=run["cache_interval"], model_hash=model_hash.result(), **written)
                used = pipe.embeddings_used([fields["prompt"], fields["negative_prompt"]])
                r = recipe.Recipe(**fields | _recorded(args, workflow), embeddings=[str(e.path.resolve()) for e in used],
                                  ti_hashes={e.name: e.short_hash() for e in used})
                path = outputs.next(f"{line:04d}-{image_seed}" if args.prompts else str(image_seed), index + k)
                recipe.write_png(image, path, recipe.infotext(r, sampler_fields))
                made += 1
                bar.update()
                # the path and its newline in one write (tqdm.write's own end= is a second one), flushed at once:
                # processes sharing an unbuffered pipe then never split each other's lines
                tqdm.write(f"{path}\n", file=sys.stdout, end="")
                sys.stdout.flush()
    except (KeyboardInterrupt, Stopped) as e:
        bar.close()
        raise Stopped(f"interrupted: wrote {made} of {total} images ({args.out})",
                      e.code if isinstance(e, Stopped) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    return 0


def _processes(args, jobs) -> tuple[int, int]:
    """(rank, number of processes) under `accelerate launch` / torchrun (their RANK and WORLD_SIZE), else (0, 1).
    Each process makes every WORLD_SIZE-th pipeline call, so each image is made once, with the seed and file name
    one process gives it; every process must then pick the same seeds, so a random one is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.seed is None and any(job.get("seed") is None for _, job in jobs):
        raise GenError(f"{world} processes (accelerate launch) need --seed (or a seed on every --prompts line), so "
                       "that they agree on each image's seed")
    if world > 1 and args.device in (None, "cuda"):  # each process its own GPU, as accelerate places them
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return int(os.environ.get("RANK", "0")), world


def _terminated(signum, frame):
    raise Stopped("", 143)


def _fit_memory(args) -> None:
    """--max-memory: sets args.weights / args.offload to the fastest setting predicted to fit (gen.memory_plan)."""
    from gen import memory_plan
    from gen.memory import resolve_device, resolve_dtype
    from gen.pipeline import DEFAULT_MODEL

    if args.weights not in (None, "auto") or args.offload is not None:
        raise GenError("--max-memory picks --weights and --offload itself; leave those out")
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    size = f"{args.width}x{args.height}" if args.width and args.height else None
    row, line = memory_plan.fit(str(args.model or DEFAULT_MODEL), args.max_memory, size, dtype)
    args.weights, args.offload = row.weights or args.weights, row.offload
    print(line, file=sys.stderr)


class _Versions(argparse.Action):
    """`gen --version`: the versions report, printed before any subcommand is required."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from gen.info import versions

        print(versions())
        parser.exit()


def _point_to_docs(parser: argparse.ArgumentParser, page: str) -> None:
    """`Docs: PAGE` as the last line of the parser's --help, and of its subcommands' (those of eval, data)."""
    parser.epilog = f"Docs: {page}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _point_to_docs(sub, DOCS.get(name, page))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gen", description="Train, fine-tune and sample text-to-image models.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--version", action=_Versions, help="print gen's and its key dependencies' versions")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_sample(sub)
    commands.add_info(sub)
    commands.add_convert(sub)
    commands.add_train(sub)
    commands.add_lora(sub)
    commands.add_eval(sub)
    commands.add_data(sub)
    from gen.serve import add_parser as _add_serve  # the server's modules import only when it runs

    _add_serve(sub)
    _point_to_docs(ap, DOCS["gen"])
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
    except Stopped as e:
        if str(e):
            print(f"gen: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("gen: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal bug: one line unless --debug
        if args.debug:
            raise
        print(f"gen: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
