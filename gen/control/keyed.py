"""Lone ControlNet files in diffusers' key layout (ControlNetModel, ControlNetUnionModel, FluxControlNetModel,
SD3ControlNetModel): a ControlNet folder's `diffusion_pytorch_model.safetensors` shared without its config.json, as
diffusers' SDXL ControlNets, xinsir's union files and InstantX's / Shakker-Labs' Flux and SD3 ControlNets are
shared; and Stability's SD3.5 ControlNets in their own layout (gen.control.sd35), renamed first. The class is told by
the keys, the config by the tensor shapes; what shapes cannot tell (a UNet's attention heads, a Flux ControlNet's
rotary axes) is the base model's, as diffusers' from_unet / from_transformer copy it. XLabs' Flux ControlNets
(`double_blocks.*` keys, pixel hints) are recognised and refused in one line, as gen does not run them yet."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from gen.errors import GenError

FLUX_KEY = "controlnet_x_embedder.weight"  # InstantX's layout: the hint's packed latents embedded
XLABS_KEY = "double_blocks.0.img_attn.qkv.weight"
UNET_KEY = "controlnet_cond_embedding.conv_in.weight"  # a UNet ControlNet's hint encoder, diffusers-named
SD3_KEY = "pos_embed_input.proj.weight"  # an SD3 ControlNet's hint latents embedded


def kind(keys: set) -> str | None:
    """The diffusers class of a lone ControlNet file's keys, "xlabs" for XLabs' Flux layout, or None (another
    layout: the original LDM one, or not a ControlNet)."""
    if UNET_KEY in keys and "time_embedding.linear_1.weight" in keys:
        return "ControlNetUnionModel" if "task_embedding" in keys else "ControlNetModel"
    if FLUX_KEY in keys and any(k.startswith("controlnet_single_blocks.") for k in keys):
        return "FluxControlNetModel"
    if XLABS_KEY in keys and any(k.startswith("controlnet_blocks.") for k in keys):
        return "xlabs"
    if SD3_KEY in keys and "controlnet_blocks.0.weight" in keys:
        from gen.control import sd35

        return "sd35" if sd35.is_sd35(keys) else "SD3ControlNetModel"
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


def sd3_config(shapes: dict, base) -> dict:
    """SD3ControlNetModel's config from its shapes: widths, depth, hint channels, text widths, qk norm and dual
    attention blocks; the head width from the qk norm where there is one, else (with the sample size and, when the
    file holds none, the position grid) from the base transformer, as from_transformer copies them. Without a text embedder it is an SD3.5 large ControlNet: it
    borrows the base's patch embedding and takes the real pooled text and shifted hint latents; with one (InstantX's)
    it takes zeros for the pooled text and unshifted latents (force_zeros_for_pooled_projection), as diffusers'
    pipeline treats each."""
    keys, bc = set(shapes), (base.config if base is not None else {})
    inner, hint, patch = shapes[SD3_KEY][:3]
    layers = _count(keys, "transformer_blocks")
    norm = next((v[0] for k, v in shapes.items() if k.endswith("attn.norm_q.weight")), None)  # the head width
    head = norm or (bc.get("attention_head_dim", 64) if "context_embedder.weight" in keys else 64)
    cfg = dict(patch_size=patch, num_layers=layers, attention_head_dim=head, num_attention_heads=inner // head,
               pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1])
    if "context_embedder.weight" not in keys:  # Stability's SD3.5 large layout, diffusers-named
        return cfg | dict(in_channels=hint, out_channels=hint, joint_attention_dim=None, pos_embed_max_size=None,
                          pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False)
    channels, grid = shapes["pos_embed.proj.weight"][1], shapes.get("pos_embed.pos_embed")
    return cfg | dict(in_channels=channels, out_channels=channels, extra_conditioning_channels=hint - channels,
                      joint_attention_dim=shapes["context_embedder.weight"][1],
                      caption_projection_dim=shapes["context_embedder.weight"][0],
                      sample_size=bc.get("sample_size", 128),
                      pos_embed_max_size=round(grid[1] ** 0.5) if grid else bc.get("pos_embed_max_size", 96),
                      qk_norm="rms_norm" if norm else None,
                      dual_attention_layers=tuple(i for i in range(layers)
                                                  if f"transformer_blocks.{i}.attn2.to_q.weight" in keys),
                      force_zeros_for_pooled_projection=True)


def unet_config(shapes: dict, base) -> dict:
    """ControlNetModel's (or ControlNetUnionModel's) config: the base UNet's, as diffusers' from_unet copies it, with
    what the shapes tell (levels and widths, layers per level, transformer depths, text width, hint encoder, the
    pooled-and-time-ids embedding, a union's modes and transformer); the attention heads are the base's."""
    keys = set(shapes)
    levels = _count(keys, "down_blocks")
    depths = [_count(keys, f"down_blocks.{i}.attentions.0.transformer_blocks") for i in range(levels)]
    attn2 = next(v for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in shapes.items() if k.endswith("proj_in.weight"))
    hint = [shapes[UNET_KEY][0]] + [shapes[f"controlnet_cond_embedding.blocks.{j}.weight"][0]
                                    for j in range(1, _count(keys, "controlnet_cond_embedding.blocks"), 2)]
    cfg = {k: v for k, v in (base.config.items() if base is not None else ()) if not k.startswith("_")}
    cfg |= dict(in_channels=shapes["conv_in.weight"][1], conditioning_channels=shapes[UNET_KEY][1],
                block_out_channels=[shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)],
                down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
                layers_per_block=_count(keys, "down_blocks.0.resnets"),
                transformer_layers_per_block=[max(d, 1) for d in depths], cross_attention_dim=attn2[1],
                use_linear_projection=len(proj_in) == 2, conditioning_embedding_out_channels=hint,
                mid_block_type="UNetMidBlock2DCrossAttn" if _count(keys, "mid_block.attentions") else
                "UNetMidBlock2D")
    if "add_embedding.linear_1.weight" in shapes:
        cfg |= dict(addition_embed_type="text_time",
                    projection_class_embeddings_input_dim=shapes["add_embedding.linear_1.weight"][1])
    else:
        cfg |= dict(addition_embed_type=None, projection_class_embeddings_input_dim=None)
    if "task_embedding" in shapes:  # xinsir's union: its transformer's heads are diffusers' default (8)
        cfg |= dict(num_control_type=shapes["task_embedding"][0], num_trans_channel=shapes["task_embedding"][1],
                    num_trans_layer=_count(keys, "transformer_layes"),
                    num_proj_channel=shapes["spatial_ch_projs.weight"][0])
    return cfg


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
    if name == "sd35":
        from gen.control import sd35

        state, name = sd35.to_diffusers(state, path), "SD3ControlNetModel"
    cls = getattr(diffusers, name)
    configs = {"FluxControlNetModel": flux_config, "SD3ControlNetModel": sd3_config}
    try:
        config = configs.get(name, unet_config)({k: list(v.shape) for k, v in state.items()}, base)
    except (KeyError, StopIteration, IndexError) as e:
        raise GenError(f"{path} is not a {name} gen can read: it lacks {e}") from None
    except GenError as e:
        raise GenError(f"the ControlNet {path}: {e}") from None
    takes = inspect.signature(cls.__init__).parameters
    net = cls.from_config({k: v for k, v in config.items() if k in takes})
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GenError(f"{path} is not a {name} gen can read: {len(missing)} weights missing, {len(unexpected)} "
                       f"unknown ({(missing or unexpected)[0]})")
    return net


def write(net, path: str | Path, base=None) -> None:
    """Writes a ControlNet as a lone file in diffusers' keys (its state dict); read back through `load` for `base`
    (the denoiser it steers) and compared before it is kept, so that the file alone gives the same net."""
    import torch

    from gen.io import write_safetensors

    path, state = Path(path), {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    write_safetensors(path, state, {})
    back = load(path, header_keys(path), base)
    same = all(json.dumps(back.config[k]) == json.dumps(v) for k, v in net.config.items()
               if not k.startswith("_") and k in back.config)  # (a from_transformer config keeps unused keys)
    if not same or any(not torch.equal(back.state_dict()[k], v) for k, v in state.items()):
        path.unlink()
        raise GenError(f"could not write {type(net).__name__} as a lone diffusers-keyed file: it does not read back")
