"""The original LDM / A1111 / SGM single-file layout, shared by the UNet families (SD-1.x, SD-2.x, SDXL).

Reading: each component's diffusers config is derived from the state dict's tensor shapes (what shapes cannot
say -- attention heads, activation, latent scale -- comes from `hints`: gen's metadata, else the family's
convention), then the weights are renamed by diffusers' own conversion functions (single_file_utils).
Writing: the inverse renaming, built per model from its config and checked against diffusers' forward
conversion on shape-only (meta) tensors before anything is written, so a written file always reads back.

Prefixes: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE); text towers in the family's prefix,
either in Hugging Face CLIP form ("hf": SD-1.x cond_stage_model.transformer., SDXL conditioner.embedders.0.
transformer.) or in OpenCLIP form ("openclip": SD-2.x cond_stage_model.model., SDXL conditioner.embedders.1.
model.: fused in_proj q/k/v, text_projection transposed).
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders import single_file_utils as sfu

from gen.errors import GenError

UNET = sfu.LDM_UNET_KEY  # "model.diffusion_model."
VAE = sfu.LDM_VAE_KEYS[0]  # "first_stage_model."
# Config fields that tensor shapes cannot tell; gen records them in the file's metadata (`hints`).
HIDDEN = {"unet": ("attention_head_dim", "sample_size", "norm_num_groups", "upcast_attention"),
          "vae": ("scaling_factor", "shift_factor", "norm_num_groups", "sample_size", "force_upcast"),
          "text": ("num_attention_heads", "hidden_act", "num_hidden_layers", "layer_norm_eps")}
_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))


def strip(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _count(shapes: dict, pattern: str) -> int:
    """How many distinct indices fill `{}` in keys matching `pattern` (e.g. 'encoder.down.{}.')."""
    rx = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def unet_names(shapes) -> dict[str, str]:
    """A UNet-only file's keys -> their `model.diffusion_model.` names (new -> old): bare LDM keys (ComfyUI's
    models/unet files) gain the prefix; a diffusers-layout UNet (UNet2DConditionModel's saved weights) is renamed by
    the writer's table (`_unet_key`), which reads back through diffusers' converter. {} for any other file."""
    if "input_blocks.0.0.weight" in shapes:
        return {UNET + k: k for k in shapes}
    if {"conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight"} <= set(shapes):  # not a ControlNet
        ups = range(_count(shapes, "up_blocks.{}."))
        cfg = {"layers_per_block": _count(shapes, "down_blocks.0.resnets.{}."),
               "up_block_types": ["CrossAttnUpBlock2D" if any(k.startswith(f"up_blocks.{i}.attentions.")
                                                              for k in shapes) else "UpBlock2D" for i in ups]}
        return {UNET + _unet_key(k, cfg): k for k in shapes}
    return {}


def as_ldm(shapes: dict) -> dict:
    """A file's shapes under the single-file names (`unet_names`)."""
    names = unet_names(shapes)
    return {new: shapes[old] for new, old in names.items()} if names else shapes


# ---- configs from shapes ----------------------------------------------------------------------------------
def unet_config(shapes: dict, hints: dict, convention: dict) -> dict:
    """UNet2DConditionModel config from the `model.diffusion_model.*` shapes (ComfyUI's model_detection.py
    reads the same keys): levels are split at the `op` downsamplers, channels are each level's resnet
    outputs, the transformer depth is the count of transformer_blocks, linear projection is a 2-D proj_in."""
    s = strip(shapes, UNET)
    levels: list[list[int]] = [[]]
    for i in range(1, _count(s, "input_blocks.{}.")):
        if f"input_blocks.{i}.0.op.weight" in s:
            levels.append([])
        else:
            levels[-1].append(i)
    depth = [_count(s, f"input_blocks.{lvl[0]}.1.transformer_blocks.{{}}.") for lvl in levels]
    channels = [s[f"input_blocks.{lvl[0]}.0.out_layers.3.weight"][0] for lvl in levels]
    attn = [k for k in s if k.endswith("attn2.to_k.weight")]
    if not attn:
        raise GenError("the UNet has no cross-attention layers; not a text-to-image UNet gen knows")
    cfg = dict(sample_size=convention["sample_size"], in_channels=s["input_blocks.0.0.weight"][1],
               out_channels=s["out.2.weight"][0], layers_per_block=len(levels[0]),
               block_out_channels=channels, cross_attention_dim=s[attn[0]][1],
               down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
               up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
               transformer_layers_per_block=[max(d, 1) for d in depth],
               use_linear_projection=any(len(s[k]) == 2 for k in s if k.endswith(".proj_in.weight")))
    head_dim = convention.get("head_dim")  # SD-2.x, SDXL: 64 channels a head; SD-1.x: 8 heads everywhere
    cfg["attention_head_dim"] = [max(c // head_dim, 1) for c in channels] if head_dim else convention["heads"]
    if "label_emb.0.0.weight" in s:  # SDXL: the pooled text embedding + N Fourier-embedded time ids
        adm = s["label_emb.0.0.weight"][1]
        cfg |= dict(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm,
                    addition_time_embed_dim=(adm - convention["pooled_dim"]) // convention["time_ids"])
    return cfg | {k: v for k, v in hints.items() if k in HIDDEN["unet"]}


def vae_config(shapes: dict, hints: dict, convention: dict) -> dict:
    s = strip(shapes, VAE)
    n = _count(s, "encoder.down.{}.")
    cfg = dict(in_channels=s["encoder.conv_in.weight"][1], out_channels=s["decoder.conv_out.weight"][0],
               latent_channels=s["decoder.conv_in.weight"][1], layers_per_block=_count(s, "encoder.down.0.block.{}."),
               block_out_channels=[s[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(n)],
               down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
               scaling_factor=convention["vae_scale"])
    return cfg | {k: v for k, v in hints.items() if k in HIDDEN["vae"]}


def text_config(shapes: dict, prefix: str, kind: str, hints: dict, penultimate: bool, tokenizer) -> dict:
    """CLIPTextConfig fields of a text tower. OpenCLIP towers are QuickGELU-free (gelu); OpenAI's CLIP-L uses
    quick_gelu. `penultimate`: the family conditions on the next-to-last block (SD-2.x), which diffusers models
    as a tower one block shorter, the last block dropped."""
    s = strip(shapes, prefix)
    if kind == "hf":
        vocab, width = s["text_model.embeddings.token_embedding.weight"]
        cfg = dict(max_position_embeddings=s["text_model.embeddings.position_embedding.weight"][0],
                   num_hidden_layers=_count(s, "text_model.encoder.layers.{}."),
                   intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0], hidden_act="quick_gelu")
        if "text_projection.weight" in s:
            cfg["projection_dim"] = s["text_projection.weight"][0]
    else:
        vocab, width = s["token_embedding.weight"]
        cfg = dict(max_position_embeddings=s["positional_embedding"][0], hidden_act="gelu",
                   num_hidden_layers=_count(s, "transformer.resblocks.{}.") - int(penultimate),
                   intermediate_size=s["transformer.resblocks.0.mlp.c_fc.weight"][0])
        if "text_projection" in s:
            cfg["projection_dim"] = s["text_projection"][1]
    cfg |= dict(vocab_size=vocab, hidden_size=width, num_attention_heads=max(width // 64, 1),
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return cfg | {k: v for k, v in hints.items() if k in HIDDEN["text"]}


# ---- reading: diffusers' conversion functions ----------------------------------------------------------------
def to_diffusers(part: str, state: dict, config: dict, prefix: str = "", kind: str = "", model=None) -> dict:
    """LDM-layout tensors of one component -> its diffusers state dict, by diffusers' own converters."""
    if part == "unet":
        return sfu.convert_ldm_unet_checkpoint(state, config)
    if part == "vae":
        return sfu.convert_ldm_vae_checkpoint(state, config)
    if kind == "hf":
        out = sfu.convert_ldm_clip_checkpoint(state, remove_prefix=prefix)
    else:
        out = sfu.convert_open_clip_checkpoint(model, state, prefix=prefix)
    # onto the tower's own names: those absent from it (SD-2.x's projection and dropped last block) are left out
    return {k: out[_hf_name(k)] for k in model.state_dict() if _hf_name(k) in out}


def _hf_name(k: str) -> str:
    """A CLIP text tower's weight name as transformers 4 and the original layout spell it (transformers 5's
    CLIPTextModel drops the `text_model.` prefix from its own names)."""
    return k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k


# ---- writing: the inverse renaming ------------------------------------------------------------------------------
def _unet_key(k: str, cfg: dict) -> str:
    n = cfg["layers_per_block"] + 1
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
    if m:
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "resnets":
            rest = _resnet(rest)
        if side == "down":
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.* -> input_blocks.N.0.op.*
                return f"input_blocks.{(b + 1) * n}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{b * n + j + 1}.{int(kind == 'attentions')}.{rest}"
        if kind == "upsamplers":
            has_attn = cfg["up_block_types"][b].startswith("CrossAttn")
            return f"output_blocks.{b * n + n - 1}.{2 if has_attn else 1}.{rest}"
        return f"output_blocks.{b * n + j}.{int(kind == 'attentions')}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        j, rest = int(m.group(2)), m.group(3)
        return f"middle_block.{2 * j}.{_resnet(rest)}" if m.group(1) == "resnets" else f"middle_block.1.{rest}"
    return _UNET_TOP.get(k, k)


def lora_from_ldm(factors: dict, kohya: bool, unet) -> dict:
    """A kohya LoRA's UNet layers named by the original layout's blocks, as sd-scripts' sdxl_train_network.py
    names them (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q; LoCon's ..._0_in_layers_2,
    ..._0_op, time_embed_0) -> the diffusers UNet's flat names; diffusers-style names pass through. The table is
    the UNet's own layers through the writer's renaming (`_unet_key`, checked against diffusers' reader)."""
    if not kohya:
        return factors
    table = {}
    for name, _ in unet.named_modules():
        name = name.removeprefix("base_model.model.")
        if name and ".base_layer" not in name and ".lora_" not in name:
            table[_unet_key(name + ".weight", unet.config).removesuffix(".weight").replace(".", "_")] = \
                name.replace(".", "_")
    return {table.get(n, n): f for n, f in factors.items()}


def _resnet(rest: str) -> str:
    for ldm, hf in _RESNET:
        rest = rest.replace(hf, ldm)
    return rest


_UNET_TOP = {d: ldm for table in ("layers", "addition_embed_type")
             for d, ldm in sfu.DIFFUSERS_TO_LDM_MAPPING["unet"][table].items()}
_VAE_TOP = {d: ldm for d, ldm in sfu.DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _vae_key(k: str, cfg: dict) -> str:
    if k in _VAE_TOP:
        return _VAE_TOP[k]
    n = len(cfg["block_out_channels"])
    k = k.replace("conv_shortcut", "nin_shortcut")
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
    if m:
        side, way, i, kind, j, rest = m.groups()
        i = int(i) if way == "down" else n - 1 - int(i)  # diffusers counts the decoder's levels top-down
        return f"{side}.{way}.{i}.{'block.' + j if kind == 'resnets' else way + 'sample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        side, kind, j, rest = m.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(j) + 1}.{rest}"
        for hf, ldm in _VAE_ATTN:
            rest = rest.replace(hf, ldm)
        return f"{side}.mid.attn_1.{rest}"
    raise GenError(f"the VAE has a weight gen cannot place in the original layout: {k}")


def _openclip(state: dict, prefix: str) -> dict:
    """A CLIPTextModel state dict -> OpenCLIP names; q/k/v fused into in_proj, the projection transposed."""
    out, qkv = {}, {}
    table = [(hf, ldm) for hf, ldm in sfu.DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items()
             if not hf.startswith("transformer.")]
    top = sfu.DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    for k, v in state.items():
        if k in top:
            out[prefix + top[k]] = v.T.contiguous() if k == "text_projection.weight" else v
            continue
        if k == "text_model.embeddings.position_ids":
            continue
        m = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        for hf, ldm in table:
            k = k.replace(hf, ldm)
        out[prefix + "transformer." + k] = v
    for (layer, what), parts in qkv.items():
        for hf, ldm in table:
            layer = layer.replace(hf, ldm)
        out[f"{prefix}transformer.{layer}.attn.in_proj_{what}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def to_ldm(part: str, model, prefix: str = "", kind: str = "") -> dict:
    """One diffusers/transformers model -> its tensors in the original layout (references, not copies, except
    OpenCLIP's fused q/k/v). Checked against diffusers' forward conversion on meta tensors first."""
    state = model.state_dict()
    if part == "unet":
        out = {UNET + _unet_key(k, model.config): v for k, v in state.items()}
    elif part == "vae":  # the mid-block attention's linear layers are 1x1 convolutions there
        keys = {k: _vae_key(k, model.config) for k in state}
        out = {VAE + keys[k]: v[..., None, None] if ".attn_1." in keys[k] and v.ndim == 2 else v for k, v in state.items()}
    elif kind == "hf":
        out = {prefix + _hf_name(k): v for k, v in state.items() if not k.endswith("position_ids")}
    else:
        out = _openclip({_hf_name(k): v for k, v in state.items()}, prefix)
    _check_inverse(part, out, state, dict(model.config) if part in ("unet", "vae") else {}, prefix, kind, model)
    return out


def _check_inverse(part, ldm: dict, state: dict, config: dict, prefix: str, kind: str, model) -> None:
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in ldm.items()}
    back = to_diffusers(part, meta, config, prefix, kind, model)
    want = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in back.items()}
    if got != want:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise GenError(f"gen's {part} conversion to the original layout does not invert diffusers' ({diff}); "
                       "please report this model's config")
