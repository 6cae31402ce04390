"""A1111's hires fix: sample at the asked size, upscale, then img2img at the larger size to add detail.

The upscale is of the latents (bilinear, A1111's "Latent" upscaler) or of the decoded image (Lanczos, then
encoded again: A1111's "Lanczos"); the second pass is gen.img2img at `hires_strength` over `hires_steps` (default:
the first pass's steps, of which int(steps * strength) run, as diffusers' img2img counts them). The larger size is
the asked one times the scale, rounded down to the model's size multiple, as A1111 rounds it to 8. Both passes
draw from the same per-image generators in turn, so image k of a batch still equals it alone.
"""

from __future__ import annotations

import inspect

import torch

from gen.errors import GenError
from gen.output import PipelineOutput

UPSCALERS = ("latent", "image")


def check(scale, strength, steps, upscaler) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 <= scale <= 8:
        raise GenError(f"the hires scale must be a number in [1, 8], not {scale!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise GenError(f"the hires strength must be a number in [0, 1], not {strength!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise GenError(f"the hires steps must be an integer >= 1, not {steps!r}")
    if upscaler not in UPSCALERS:
        raise GenError(f"the hires upscaler must be one of {', '.join(UPSCALERS)}, not {upscaler!r}")


def run(pipe, call: dict):
    """`pipe(**call)` with call["hires_scale"] set: the first pass, the upscale and the img2img pass."""
    call = {k: call[k] for k in inspect.signature(type(pipe).__call__).parameters if k != "self"}
    check(call["hires_scale"], call["hires_strength"], call["hires_steps"], call["hires_upscaler"])
    if call["image"] is not None or call["mask_image"] is not None:
        raise GenError("the hires fix is for text-to-image, as A1111's; img2img and inpainting take the size they "
                       "are given")
    prompts = call["prompt"] if isinstance(call["prompt"], (list, tuple)) else [call["prompt"]]
    n = len(prompts) * call["num_images_per_prompt"] if isinstance(call["num_images_per_prompt"], int) else 1
    seeds, generator = pipe._generators(call["seed"], call["generator"], n)
    first = dict(call, hires_scale=None, seed=None, generator=generator, output_type="latent")
    latents = pipe(**first).images
    m = pipe.size_multiple
    height = call["height"] or pipe.defaults["height"]
    width = call["width"] or pipe.defaults["width"]
    big = (int(height * call["hires_scale"]) // m * m, int(width * call["hires_scale"]) // m * m)
    f = pipe.vae_scale_factor
    if call["hires_upscaler"] == "latent":
        image = torch.nn.functional.interpolate(latents, size=(big[0] // f, big[1] // f), mode="bilinear")
    else:
        from gen.models import vae as vae_lib

        with pipe._on_device(pipe.vae):  # under offload, the VAE visits the device as the pipeline's decode does
            decoded = vae_lib.decode(pipe.vae, latents)
        image = torch.nn.functional.interpolate(decoded, size=big, mode="bicubic", antialias=True).clamp(0, 1)
        image = [img for img in image]  # one source per image: each is encoded on its own
    second = dict(call, hires_scale=None, seed=None, generator=generator, height=None, width=None,
                  strength=call["hires_strength"], num_inference_steps=call["hires_steps"] or call[
                      "num_inference_steps"])
    out = _second(pipe, second, image, prompts, generator)
    out.seeds = seeds
    return out


def _second(pipe, call: dict, image, prompts: list[str], generator):
    """The img2img pass, image by image where each has its own source (gen.img2img takes one source a call)."""
    if isinstance(image, torch.Tensor) and image.shape[0] == 1:
        return pipe(**dict(call, image=image))
    negs = call["negative_prompt"]
    per = call["num_images_per_prompt"]
    results = []
    for i in range(len(image)):
        one = dict(call, prompt=prompts[i // per], num_images_per_prompt=1,
                   negative_prompt=negs[i // per] if isinstance(negs, list) else negs,
                   generator=[generator[i]] if isinstance(generator, list) else generator)
        one["image"] = image[i:i + 1] if isinstance(image, torch.Tensor) else image[i]
        results.append(pipe(**one))
    return PipelineOutput.concat(results, [])
