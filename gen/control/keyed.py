"""Lone ControlNet files in diffusers' key layout: the `diffusion_pytorch_model.safetensors` of a ControlNet folder
shared without its config.json, as InstantX and Shakker-Labs share their Flux ControlNets (union ones included).
The class is told by the keys, the config by the tensor shapes; what shapes cannot tell (the rotary axes of a Flux
ControlNet) is the base model's, as diffusers' from_transformer copies it. XLabs' Flux ControlNets (`double_blocks.*`
keys, pixel hints) are recognised and refused in one line, as gen does not run them yet."""

from __future__ import annotations

import re
from pathlib import Path

from gen.errors import GenError

FLUX_KEY = "controlnet_x_embedder.weight"  # InstantX's layout: the hint's packed latents embedded
XLABS_KEY = "double_blocks.0.img_attn.qkv.weight"


def kind(keys: set) -> str | None:
    """The diffusers class of a lone ControlNet file's keys, "xlabs" for XLabs' Flux layout, or None (another
    layout: the original LDM one, or not a ControlNet)."""
    if FLUX_KEY in keys and any(k.startswith("controlnet_single_blocks.") for k in keys):
        return "FluxControlNetModel"
    if XLABS_KEY in keys and any(k.startswith("controlnet_blocks.") for k in keys):
        return "xlabs"
    return None


def header_keys(path: Path) -> set:
    """The tensor names of a safetensors file, from its header (no tensor read)."""
    from safetensors import safe_open

    from gen.io import check_safetensors

    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as e:  # safetensors raises several types for malformed files
        raise GenError(f"{path} is not a valid safetensors file ({e})") from None


def _count(keys: set, prefix: str) -> int:
    """How many numbered blocks `prefix.N.` the keys hold."""
    return len({m[1] for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))})


def flux_config(shapes: dict, base) -> dict:
    """FluxControlNetModel's config from its shapes: widths, depths, the union's number of modes, whether it embeds
    guidance; the rotary axes from the base transformer (`base`; FLUX.1's (16, 56, 56) without one)."""
    inner, in_channels = shapes["x_embedder.weight"]
    head = next(v[0] for k, v in shapes.items() if k.endswith("attn.norm_q.weight"))
    axes = base.config.get("axes_dims_rope") if base is not None else (16, 56, 56)
    if axes is None:  # the base is no Flux transformer: the family check refuses the net before it runs
        axes = (head, 0, 0)
    if sum(axes) != head:
        raise GenError(f"its attention heads are {head} wide, but the rotary axes {list(axes)} sum to {sum(axes)}: "
                       "load it for the Flux model it was made for")
    keys = set(shapes)
    return dict(in_channels=in_channels, num_layers=_count(keys, "transformer_blocks"),
                num_single_layers=_count(keys, "single_transformer_blocks"), attention_head_dim=head,
                num_attention_heads=inner // head, joint_attention_dim=shapes["context_embedder.weight"][1],
                pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
                guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in keys),
                axes_dims_rope=list(axes), num_mode=shapes.get("controlnet_mode_embedder.weight", [None])[0],
                conditioning_embedding_channels=shapes.get("input_hint_block.0.weight", [None])[0])


def load(path: Path, keys: set, base=None):
    """The ControlNet of a lone diffusers-keyed file (kind(keys) names its class), its config from the shapes and
    `base` (the denoiser it will steer, or None)."""
    import diffusers

    from gen.io import load_state_dict

    name = kind(keys)
    if name == "xlabs":
        raise GenError(f"{path} is an XLabs Flux ControlNet (double_blocks, pixel hints), which gen does not run yet; "
                       "InstantX-layout Flux ControlNets (controlnet_x_embedder) load")
    state = load_state_dict(path)
    try:
        config = flux_config({k: list(v.shape) for k, v in state.items()}, base)
    except (KeyError, StopIteration, IndexError) as e:
        raise GenError(f"{path} is not a {name} gen can read: it lacks {e}") from None
    except GenError as e:
        raise GenError(f"the ControlNet {path}: {e}") from None
    net = getattr(diffusers, name).from_config(config)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GenError(f"{path} is not a {name} gen can read: {len(missing)} weights missing, {len(unexpected)} "
                       f"unknown ({(missing or unexpected)[0]})")
    return net
