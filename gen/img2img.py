"""Sampling from an image (img2img) and repainting a masked region of it (inpainting), for every family.

img2img follows diffusers' pipelines step for step, so that the same seed gives their image: the source is
encoded by the VAE (a posterior sample drawn from image i's generator, before its noise), the schedule is set
for all `steps` and only its last ones run, noise is added at the first of those (`add_noise` on DDPM
schedulers, `scale_noise` on flow ones). How many steps run: int(steps * strength) for DDPM models
(StableDiffusionImg2ImgPipeline.get_timesteps), steps - int(steps - steps * strength) for flow models
(StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline), floating point included.

Inpainting with any model (StableDiffusionInpaintPipeline with a regular UNet): the mask is binarized (white =
repaint) and resized to the latents; after every step the unmasked region is replaced by the source latents
noised to the next step's level. A denoiser with 2C + 1 input channels (SD-1.5-inpainting's 9) instead takes
the mask and the masked image's latents beside its input and is not blended. `mask_blur` blurs the mask (a
Gaussian of that radius, as A1111's "Mask blur"); `padding_mask_crop` repaints only the mask's bounding box
grown by that many pixels, at the sampling size (A1111's "Inpaint area: Only masked", diffusers'
padding_mask_crop). With either, the result is pasted over the source through the (blurred) mask, as both do.

Where gen differs from diffusers: each image of a batch encodes the source with its own generator (diffusers'
inpaint pipeline uses the first generator's sample for all), so image k of a batch equals it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from gen.errors import GenError
from gen.models import vae as vae_lib

DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # diffusers' defaults


def inpainting_model(pipe) -> bool:
    """A denoiser that takes the mask and the masked image's latents beside its input (SD-1.5-inpainting's
    4 + 1 + 4 channels)."""
    return getattr(pipe.denoiser.config, "in_channels", 0) == 2 * pipe.vae.config.latent_channels + 1


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise GenError(f"strength must be a number in [0, 1], not {strength!r}")
    return float(strength)


def check_side(side: str, value, multiple: int) -> None:
    """A sampling height or width: a positive multiple of the model's size multiple, or a one-line GenError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
        raise GenError(f"{side} must be a positive multiple of {multiple} for this model, not {value!r}")


def _check_size(pil, height, width, multiple: int) -> None:
    """The size an image is sampled at (its own where height/width are not given) is refused as text-to-image
    refuses it, where diffusers' image processor would round it down to the multiple without a word."""
    for side, given, own in (("height", height, pil.height), ("width", width, pil.width)):
        if given is not None:
            check_side(side, given, multiple)
        elif own % multiple:
            near = lambda v: max(multiple, round(v / multiple) * multiple)  # noqa: E731
            raise GenError(f"the init image is {pil.width}x{pil.height}, and this model samples sizes that are "
                           f"multiples of {multiple}: pass --width {near(pil.width)} --height {near(pil.height)} "
                           "(width=, height=) to resize it, or crop it")


def _pil(value, what: str):
    """A PIL image from a path, a PIL image, an (H, W, 3) array or a (3, H, W) / (1, 3, H, W) tensor in [0, 1]."""
    from PIL import Image

    if isinstance(value, (str, Path)):
        from gen.io import load_image

        return load_image(value, what)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().squeeze(0).permute(1, 2, 0).numpy() if value.ndim in (3, 4) else None
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[-1] in (1, 3, 4):
        array = value if value.dtype == np.uint8 else (value.clip(0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    raise GenError(f"{what} must be a file path, a PIL image, an (H, W, 3) array or a (3, H, W) tensor in [0, 1]")


@dataclass
class Source:
    """What a call starts from, at its sampling size: the image in [-1, 1] (1, 3, H, W), or given latents
    (1, C, h, w) in model space; the binary mask (1, 1, H, W), 1 = repaint; and what the result is pasted on."""

    strength: float
    height: int
    width: int
    image: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    overlay: tuple | None = None  # (blurred mask, source image, crop box or None), PIL

    @property
    def inpaint(self) -> bool:
        return self.mask is not None


def prepare(pipe, image, mask_image, strength, height, width, mask_blur: float = 0,
            padding_mask_crop: int | None = None) -> Source | None:
    """The Source of a call (None: text-to-image); checks every input, before anything is sampled."""
    from diffusers.image_processor import VaeImageProcessor

    nine = inpainting_model(pipe)
    if image is None:
        if mask_image is not None or strength is not None:
            raise GenError("mask_image and strength need an image to start from (image=, --init-image)")
        if not nine:
            return None
    if strength is not None:
        strength = check_strength(strength)
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, (int, float)) or not 0 <= mask_blur < math.inf:
        raise GenError(f"mask_blur must be a number >= 0, not {mask_blur!r}")
    if padding_mask_crop is not None and (isinstance(padding_mask_crop, bool) or not isinstance(padding_mask_crop, int)
                                          or padding_mask_crop < 0):
        raise GenError(f"the inpaint padding must be an integer >= 0, not {padding_mask_crop!r}")
    if padding_mask_crop is not None and mask_image is None:
        raise GenError("inpainting only the masked area (padding_mask_crop, --inpaint-full-res) needs a mask")
    m = pipe.size_multiple
    processor = VaeImageProcessor(vae_scale_factor=m)
    latent_c = pipe.vae.config.latent_channels
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == latent_c and mask_image is None:
        f = pipe.vae_scale_factor  # latents, as diffusers takes them (the hires pass)
        s = Source(DEFAULT_STRENGTH["img2img"] if strength is None else strength, image.shape[2] * f,
                   image.shape[3] * f, latents=image[:1])
        if nine:  # all repainted, the masked image gray
            s.image, s.mask = torch.zeros(1, 3, s.height, s.width), torch.ones(1, 1, s.height, s.width)
        return s
    if image is None:  # text-to-image with an inpainting model: all masked, a gray source (A1111's way)
        h, w = height or pipe.defaults["height"], width or pipe.defaults["width"]
        return Source(1.0, h, w, image=torch.zeros(1, 3, h, w), mask=torch.ones(1, 1, h, w))
    pil = _pil(image, "the init image").convert("RGB")
    kind = "img2img" if mask_image is None else "inpaint"
    strength = DEFAULT_STRENGTH[kind] if strength is None else strength
    if mask_image is None:
        s = _source(processor, pil, None, strength, height, width, None, None)
        if nine:  # the whole image is repainted (A1111's img2img with an inpainting model)
            s.mask = torch.ones(1, 1, s.height, s.width)
        return s
    mask = _pil(mask_image, "the mask").convert("L")
    if mask.size != pil.size:
        raise GenError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {pil.size[0]}x{pil.size[1]}; "
                       "they must be the same size")
    if mask.getextrema()[1] == 0:
        raise GenError("the mask is all black: nothing to repaint (white marks what is repainted)")
    if mask_blur:
        mask = VaeImageProcessor.blur(mask, mask_blur)
    crop = None
    if padding_mask_crop is not None:  # the masked area, at the sampling size (default: the model's)
        height, width = height or pipe.defaults["height"], width or pipe.defaults["width"]
        crop = VaeImageProcessor.get_crop_region(mask, width, height, pad=padding_mask_crop)
    return _source(processor, pil, mask, strength, height, width, crop, mask_blur or crop is not None)


def _source(processor, pil, mask, strength, height, width, crop, overlay) -> Source:
    from diffusers.image_processor import VaeImageProcessor

    _check_size(pil, height, width, processor.config.vae_scale_factor)
    mode = "fill" if crop is not None else "default"
    image = processor.preprocess(pil, height=height, width=width, crops_coords=crop, resize_mode=mode).float()
    s = Source(strength, image.shape[2], image.shape[3], image=image)
    if mask is not None:
        masks = VaeImageProcessor(vae_scale_factor=processor.config.vae_scale_factor, do_normalize=False,
                                  do_binarize=True, do_convert_grayscale=True)
        s.mask = masks.preprocess(mask, height=s.height, width=s.width, crops_coords=crop, resize_mode=mode)
        if overlay:
            s.overlay = (mask, pil, crop)
    return s


def _sample(pipe, image: torch.Tensor, generator, n: int) -> torch.Tensor:
    """n model-space latents of one image: a posterior sample each, from image i's generator (or one sample from
    a single generator, repeated, as diffusers does)."""
    dist = pipe.vae.encode(image.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    if isinstance(generator, list):
        z = torch.cat([dist.sample(g) for g in generator])
    else:
        z = dist.sample(generator).repeat(n, 1, 1, 1)
    return vae_lib.to_latents(pipe.vae, z).to(pipe.dtype)


def encode(pipe, source: Source, generator, n: int) -> torch.Tensor | None:
    """The source's latents (n, C, h, w), drawn before the noise as diffusers draws them; None where a 9-channel
    model starts from pure noise and needs none."""
    if source.latents is not None:
        return source.latents.to(pipe.device, pipe.dtype).repeat(n, 1, 1, 1)
    if source.inpaint and inpainting_model(pipe) and source.strength == 1.0:
        return None
    return _sample(pipe, source.image, generator, n)


def first_step(scheduler, steps: int, strength: float, kind: str) -> int:
    """Index of the first timestep an img2img run takes (diffusers' get_timesteps), set as the scheduler's begin
    index."""
    if kind == "flow":
        start = int(max(steps - min(steps * strength, steps), 0))
    else:
        start = max(steps - min(int(steps * strength), steps), 0)
    start *= scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start


def noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 noised to timestep t: scale_noise on flow schedulers, add_noise on the others."""
    t = t.reshape(1).repeat(x0.shape[0])
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)


@dataclass
class Start:
    """How the sampling loop runs from a source: the latents it starts from, the first timestep's index, a
    step hook (inpainting's blend) and a denoiser wrapper (a 9-channel model's extra inputs)."""

    latents: torch.Tensor
    first: int
    after_step: object = None
    wrap: object = None


def start(pipe, source: Source, scheduler, steps: int, noise: torch.Tensor, x0: torch.Tensor | None,
          generator, n: int) -> Start:
    """`noise` is packed (the family's layout), `x0` not: both are packed here alike."""
    fam = pipe.family
    first = first_step(scheduler, steps, source.strength, pipe.formulation.kind)
    timesteps = scheduler.timesteps
    x0p = fam.pack(x0)[0] if x0 is not None else None
    if x0p is not None and first >= len(timesteps):  # strength 0 (or too few steps): nothing to run
        return Start(x0p, first)
    if source.inpaint and source.strength == 1.0:  # the inpaint pipelines start from pure noise at full strength
        latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    else:
        latents = noised(scheduler, x0p, noise, timesteps[first])
    if not source.inpaint:
        return Start(latents, first)
    f = pipe.vae_scale_factor
    mask = torch.nn.functional.interpolate(source.mask, size=(source.height // f, source.width // f))
    mask = mask.to(pipe.device, pipe.dtype)
    masked = source.image * (source.mask < 0.5)
    if inpainting_model(pipe):
        with pipe._on_device(pipe.vae):
            cond = _sample(pipe, masked, generator, n)
        mask = mask.repeat(n, 1, 1, 1)
        return Start(latents, first, wrap=lambda predict: _with_inputs(predict, mask, cond))
    # the unused masked-image sample of diffusers' inpaint pipeline, drawn so that later draws (ancestral
    # samplers) match: one latent-shaped normal draw per generator
    for g in generator if isinstance(generator, list) else [generator]:
        randn_tensor((1, *x0.shape[1:]), generator=g, device=pipe.device, dtype=pipe.vae.dtype)
    mask = fam.pack(mask.expand_as(x0))[0]

    def blend(i: int, latents: torch.Tensor) -> torch.Tensor:
        ts = scheduler.timesteps
        proper = noised(scheduler, x0p, noise, ts[i + 1]) if i + 1 < len(ts) else x0p
        return (1 - mask) * proper + mask * latents

    return Start(latents, first, after_step=blend)


def _with_inputs(predict, mask: torch.Tensor, masked: torch.Tensor):
    """A 9-channel denoiser's call: its input with the mask and the masked image's latents (doubled under CFG)."""
    def call(x, t, cond, **kwargs):
        k = x.shape[0] // mask.shape[0]
        return predict(torch.cat([x, mask.repeat(k, 1, 1, 1), masked.repeat(k, 1, 1, 1)], dim=1), t, cond, **kwargs)
    return call


def finish(source: Source | None, images: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [0, 1] pasted over the source through the blurred mask (and into the
    crop box), A1111's overlay, where mask blur or the masked-area crop asks for it."""
    if source is None or source.overlay is None:
        return images
    from diffusers.image_processor import VaeImageProcessor

    mask, original, crop = source.overlay
    processor = VaeImageProcessor()
    if crop is None and original.size != (source.width, source.height):
        from PIL import Image

        original = original.resize((source.width, source.height), Image.LANCZOS)
        mask = mask.resize((source.width, source.height), Image.LANCZOS)
    out = [processor.apply_overlay(mask, original, im, crop) for im in processor.numpy_to_pil(
        images.cpu().permute(0, 2, 3, 1).float().numpy())]
    return torch.from_numpy(np.stack([np.asarray(o, dtype=np.float32) / 255 for o in out])).permute(0, 3, 1, 2)
