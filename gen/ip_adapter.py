"""IP-Adapter (Ye et al. 2023): an image as a prompt for SD-1.x/2.x and SDXL UNets, and for Flux.

A CLIP vision encoder (transformers' CLIPVisionModelWithProjection) embeds the image; the adapter's image projection
turns that into a few extra tokens, which decoupled cross-attention layers (their own to_k_ip / to_v_ip) attend to
beside the text, added at `scale`. Files are loaded in h94's layout (`ip-adapter_sd15.safetensors`: image_proj.*
and ip_adapter.* keys; the encoder an `image_encoder/` folder beside it) with diffusers' own loading code
(UNet2DConditionModel._load_ip_adapter_weights, IPAdapterAttnProcessor2_0), whose attention gen.attention then
routes through gen's backend. The negative of classifier-free guidance sees zero image embeddings (the plus
models: the encoder's states for a zero image), as diffusers' encode_image gives it.

Flux (gen.ip_adapter_flux): XLabs' files (`ip_adapter.safetensors`: ip_adapter_proj_model.* and
double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*), loaded by FluxTransformer2DModel's own
_load_ip_adapter_weights into FluxIPAdapterAttnProcessor; the tokens enter through joint_attention_kwargs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from gen import attention as attn
from gen.errors import GenError
from gen.io import load_image, load_model, load_object

KEY = "ip_embeds"  # the conditioning entry (gen.families) that carries the image embeddings to the UNet
WIDTHS = {768: "SD-1.x", 1024: "SD-2.x", 2048: "SDXL"}  # cross-attention width -> the family it belongs to


def _xlabs_key(key: str) -> str:
    """XLabs' Flux key -> h94's, as diffusers' FluxIPAdapterMixin.load_ip_adapter renames them."""
    head, _, rest = key.partition(".")
    if head == "ip_adapter_proj_model":
        return "image_proj." + rest
    if head == "double_blocks":
        rest = rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip").replace("ip_adapter_double_stream_v_proj",
                                                                                 "to_v_ip").replace("processor.", "")
        return "ip_adapter." + rest
    return key


def split(state: dict, path: Path) -> dict:
    """h94's flat `image_proj.* / ip_adapter.*` keys, XLabs' Flux keys (or a pickle's nested dicts) -> diffusers'
    two dicts."""
    if isinstance(state.get("image_proj"), dict):
        parts = {k: state.get(k) or {} for k in ("image_proj", "ip_adapter")}
    else:
        state = {_xlabs_key(k): v for k, v in state.items()}
        parts = {p: {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")}
                 for p in ("image_proj", "ip_adapter")}
    if not all(parts.values()):
        raise GenError(f"{path} is not an IP-Adapter file: it has no image_proj.* and ip_adapter.* weights "
                       "(h94's layout, e.g. ip-adapter_sd15.safetensors, or XLabs' Flux ip_adapter.safetensors)")
    return parts


def projection_input(proj: dict, path: Path) -> tuple[bool, int]:
    """(whether the projection reads the encoder's penultimate hidden states, the width it reads) by its keys, as
    diffusers' _convert_ip_adapter_image_proj_to_diffusers tells the kinds apart."""
    if "perceiver_resampler.proj_in.weight" in proj or ("norm.weight" in proj and "proj.weight" not in proj):
        raise GenError(f"{path} is a FaceID IP-Adapter, which needs face embeddings (insightface) gen does not "
                       "compute; use an image IP-Adapter (ip-adapter_sd15, ip-adapter-plus_sd15, ip-adapter_sdxl, ...)")
    if "proj.weight" in proj:  # IP-Adapter: the projected image embedding -> 4 tokens
        return False, proj["proj.weight"].shape[1]
    if "proj.3.weight" in proj:  # IP-Adapter Full (face): an MLP over the hidden states
        return True, proj["proj.0.weight"].shape[1]
    if "proj_in.weight" in proj:  # IP-Adapter Plus: a perceiver resampler over the hidden states
        return True, proj["proj_in.weight"].shape[1]
    raise GenError(f"{path}: unknown IP-Adapter image projection (keys {', '.join(sorted(proj)[:3])}, ...)")


class IPAdapter:
    """A loaded adapter: its file, the vision encoder and its CLIPImageProcessor, and what the projection reads;
    `zero_image`: the negative is the encoder's embedding of a black image (FluxPipeline's), not zeros."""

    def __init__(self, path: Path, encoder_folder: Path, encoder, processor, hidden_states: bool,
                 zero_image: bool = False):
        self.path, self.encoder_folder = path, encoder_folder
        self.encoder, self.processor, self.hidden_states = encoder, processor, hidden_states
        self.zero_image = zero_image

    def _pixels(self, image, device) -> torch.Tensor:
        return self.processor(image, return_tensors="pt").pixel_values.to(device, self.encoder.dtype)

    @torch.no_grad()
    def embeds(self, image, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings, negative embeddings), each (n, 1, ...) for n images: one image per adapter, as
        diffusers' prepare_ip_adapter_image_embeds lays them out."""
        if isinstance(image, (str, Path)):
            image = load_image(image, "the IP-Adapter image")
        pixels = self._pixels(image, device)
        if self.hidden_states:  # the plus models: penultimate states of the image and of a zero image
            pos, neg = (self.encoder(p, output_hidden_states=True).hidden_states[-2]
                        for p in (pixels, torch.zeros_like(pixels)))
        else:
            pos = self.encoder(pixels).image_embeds
            black = np.zeros((self.encoder.config.image_size,) * 2 + (3,), dtype=np.uint8)
            neg = self.encoder(self._pixels(black, device)).image_embeds if self.zero_image else torch.zeros_like(pos)
        return pos[:, None].repeat_interleave(n, 0), neg[:, None].repeat_interleave(n, 0)


def _cross_attention_layers(unet) -> int:
    return sum(1 for name in unet.attn_processors if not name.endswith("attn1.processor"))


def made_for(parts: dict) -> str:
    """The model a file's adapter layers were made for: Flux (XLabs': biased k/v projections) or a UNet family."""
    if any(k.endswith("to_k_ip.bias") for k in parts["ip_adapter"]):
        return "Flux"
    k = parts["ip_adapter"].get("1.to_k_ip.weight")
    return WIDTHS.get(k.shape[1], f"cross-attention width {k.shape[1]}") if k is not None else "another model"


def _check_unet(pipe, parts: dict, path: Path, made: str) -> None:
    """A file in h94's layout (`made`: made_for(parts)) whose layers fit this UNet's cross-attention layers, else
    GenError."""
    unet = pipe.denoiser
    k = parts["ip_adapter"].get("1.to_k_ip.weight")
    ctx = unet.config.cross_attention_dim
    layers = len({key.split(".")[0] for key in parts["ip_adapter"]})
    if made == "Flux":
        raise GenError(f"{path.name} is a Flux IP-Adapter (XLabs' layout), but this is a {pipe.family.title} model; "
                       "use an IP-Adapter in h94's layout made for it")
    if k is None or k.shape[1] != ctx or layers != _cross_attention_layers(unet):
        raise GenError(f"{path.name} is an IP-Adapter for {made} ({layers} cross-attention layers), but "
                       f"this {pipe.family.title} UNet has width {ctx} and {_cross_attention_layers(unet)} layers")


def _plain_unet_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def _targets() -> dict:
    """denoiser class -> (its file check, the plain processor unload puts back, negative from a black image)."""
    from gen import ip_adapter_flux

    return {"UNet2DConditionModel": (_check_unet, _plain_unet_processor, False),
            "FluxTransformer2DModel": (ip_adapter_flux.check, ip_adapter_flux.plain_processor, True)}


def load(pipe, path: str | Path, image_encoder: str | Path | None = None, allow_pickle: bool = False) -> IPAdapter:
    """Adds the adapter file `path` to `pipe`'s UNet or Flux transformer (checked against it first: a refused file
    changes nothing); `image_encoder`: the CLIP vision encoder folder (default: image_encoder/ beside the file, as
    h94 ships it)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    denoiser = pipe.denoiser
    target = _targets().get(type(denoiser).__name__)
    if target is None or pipe.family.denoiser_part not in ("unet", "transformer"):
        raise GenError(f"IP-Adapter is for SD-1.x/2.x and SDXL UNets and Flux; this is a {pipe.family.title} model")
    if "_ip_adapter" in pipe.__dict__:
        raise GenError("an IP-Adapter is loaded already; unload_ip_adapter() first")
    check, _, zero_image = target
    path = Path(path)
    parts = split(load_object(path, allow_pickle), path)
    hidden_states, width = projection_input(parts["image_proj"], path)
    check(pipe, parts, path, made_for(parts))
    folder = Path(image_encoder) if image_encoder is not None else path.parent / "image_encoder"
    if not (folder / "config.json").is_file():
        raise GenError(f"no CLIP image encoder at {folder}: pass --image-encoder FOLDER (image_encoder=), the "
                       "CLIPVisionModelWithProjection folder that comes with the adapter (h94's image_encoder/)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in ("clip_vision_model", "clip"):  # before transformers half-loads a text tower
        kind = config.get("model_type") or config.get("_class_name") or "unknown"
        raise GenError(f"{folder} is not a CLIP vision encoder (its config.json is a {kind}); pass --image-encoder "
                       "FOLDER, the CLIPVisionModelWithProjection folder the adapter was trained with")
    encoder = load_model(CLIPVisionModelWithProjection, folder, allow_pickle, pipe.dtype).eval().requires_grad_(False)
    got = encoder.config.hidden_size if hidden_states else encoder.config.projection_dim
    if got != width:
        raise GenError(f"the image encoder {folder} gives {got}-wide embeddings, but {path.name} takes {width}; "
                       "pass the encoder the adapter was trained with (--image-encoder)")
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(folder)
    else:  # what diffusers' load_ip_adapter builds when the pipeline has no feature extractor
        size = encoder.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
    try:
        denoiser._load_ip_adapter_weights([parts], low_cpu_mem_usage=False)
    except (RuntimeError, KeyError, ValueError, IndexError) as e:  # shapes or keys diffusers' converter rejects
        unload(denoiser)
        raise GenError(f"{path.name}: not a loadable IP-Adapter ({str(e).strip().splitlines()[0]})") from None
    attn.install_processor(denoiser)  # the IP-Adapter processors' attention through gen's backend too
    denoiser.requires_grad_(False)
    return IPAdapter(path, folder, encoder, processor, hidden_states, zero_image)


def set_scale(denoiser, scale: float) -> None:
    """The weight of the image tokens in every IP-Adapter attention layer (diffusers' set_ip_adapter_scale)."""
    for p in denoiser.attn_processors.values():
        if hasattr(p, "to_k_ip"):  # IPAdapterAttnProcessor(2_0), FluxIPAdapterAttnProcessor
            p.scale = [scale] * len(p.scale)


def unload(denoiser) -> None:
    """Takes the adapter out of the denoiser: its projection, and plain attention processors where its were."""
    plain = _targets()[type(denoiser).__name__][1]
    denoiser.encoder_hid_proj = None
    denoiser.config.encoder_hid_dim_type = None
    denoiser.set_attn_processor({name: plain() if hasattr(p, "to_k_ip") else p
                                 for name, p in denoiser.attn_processors.items()})
    attn.install_processor(denoiser)


def check_call(ip: IPAdapter | None, image, scale, cache_interval: int) -> None:
    """A pipeline call's IP-Adapter arguments, before anything runs."""
    if ip is None and image is not None:
        raise GenError("ip_adapter_image (--ip-image) needs an IP-Adapter: load_ip_adapter(FILE) (--ip-adapter FILE)")
    if ip is not None and image is None:
        raise GenError("an IP-Adapter is loaded: pass ip_adapter_image (--ip-image IMAGE), or unload_ip_adapter()")
    if ip is not None and cache_interval != 1:  # gen.fastmode's cached UNet forward knows no image tokens
        raise GenError("the fast mode (cache_interval) does not combine with an IP-Adapter")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise GenError(f"the IP-Adapter scale must be a finite number, not {scale!r}")


def condition(pipe, image, scale: float, n: int, cond: dict, neg: dict | None) -> None:
    """Adds the image embeddings for n images to the conditioning (zero ones to the negative's)."""
    ip = pipe.ip_adapter
    set_scale(pipe.denoiser, float(scale))
    if pipe._offload is None:
        ip.encoder.to(pipe.device)
    with pipe._on_device(ip.encoder):
        pos, zero = ip.embeds(image, n, pipe.device)
    cond[KEY] = pos.to(pipe.dtype)
    if neg is not None:
        neg[KEY] = zero.to(pipe.dtype)
