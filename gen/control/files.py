"""ControlNet files: diffusers folders (ControlNetModel for SD-1.x/2.x and SDXL, SD3ControlNetModel,
FluxControlNetModel), lone diffusers-keyed files and Stability's SD3.5 files (gen.control.keyed, gen.control.sd35)
and SD-1.x/2.x and SDXL single files in the original layout (lllyasviel's control_v11p_sd15_canny.safetensors:
`control_model.*` keys, or bare), the config read from the tensor shapes and the weights renamed by diffusers' converter, offline.
`to_original` writes that layout (the inverse renaming, checked by reading it back)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gen.errors import GenError
from gen.families import ldm

PREFIX = "control_model."  # diffusers' LDM_CONTROLNET_KEY
CLASSES = ("ControlNetModel", "ControlNetUnionModel", "FluxControlNetModel", "SD3ControlNetModel")
META = "gen_controlnet"  # header metadata: config values the shapes cannot tell (attention heads, ...)


def load_file(model, allow_pickle: bool = False, base=None):
    """A ControlNet from a diffusers folder, a single file in the original layout, or a lone diffusers-keyed file
    (gen.control.keyed; `base`: the denoiser it will steer, for the config values its shapes cannot tell)."""
    import diffusers

    from gen.io import load_model, read_json

    path = Path(model)
    if path.is_dir():
        config = path / "config.json"
        name = read_json(config).get("_class_name") if config.is_file() else None
        if name not in CLASSES:
            raise GenError(f"{path} is not a ControlNet folder gen loads (config.json _class_name {name!r}; gen "
                           f"loads {', '.join(CLASSES)})")
        return load_model(getattr(diffusers, name), path, allow_pickle)
    if not path.is_file():
        raise GenError(f"the ControlNet {path}: no such file or folder")
    if path.suffix == ".safetensors":
        from gen.control import keyed

        keys = keyed.header_keys(path)
        if keyed.kind(keys):
            return keyed.load(path, keys, base)
    return _from_original(path, allow_pickle)


def _from_original(path: Path, allow_pickle: bool):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    from gen.io import load_state_dict, read_metadata

    state = load_state_dict(path, allow_pickle)
    if any(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if "input_hint_block.0.weight" not in state or "input_blocks.0.0.weight" not in state:
        raise GenError(f"{path} is not a ControlNet in the original (LDM) layout: it has no input_hint_block "
                       "(SDXL, Flux and SD3 ControlNets also load from lone diffusers-keyed files, SD3.5 "
                       "ones in Stability's release layout)")
    hints = json.loads(read_metadata(path).get(META, "{}")) if path.suffix == ".safetensors" else {}
    config = _config({k: list(v.shape) for k, v in state.items()}, hints)
    # the hint encoder by gen's table: diffusers' converter assumes its 4 levels (input_hint_block.14 = conv_out)
    hint = {ldm_name: name for name, ldm_name in _hint_names(len(config["conditioning_embedding_out_channels"])).items()}
    weights = {k: v for k, v in convert_controlnet_checkpoint({PREFIX + k: v for k, v in state.items()}, config).items()
               if not k.startswith("controlnet_cond_embedding.")}
    table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"] if config.get("addition_embed_type") else {}
    added = {ldm_name: name for name, ldm_name in table.items()}
    for k, v in state.items():
        stem, _, leaf = k.rpartition(".")
        if stem in hint:
            weights[f"{hint[stem]}.{leaf}"] = v
        elif k in added:  # SDXL's pooled-text-and-time-ids embedding, which diffusers' converter leaves out
            weights[added[k]] = v
    net = ControlNetModel(**config)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise GenError(f"{path}: not a ControlNet gen can read: {len(missing)} weights missing "
                       f"({(missing or unexpected)[0]}), {len(unexpected)} unknown")
    return net


def _config(shapes: dict, hints: dict) -> dict:
    """ControlNetModel config from the original layout's shapes: the UNet part as gen reads a UNet's
    (gen.families.ldm.unet_config, SD-1.x's 8 heads where the text width is CLIP-L's, else 64-wide heads), the hint
    encoder's channels from input_hint_block's convolutions (0, 4, 8, ...: each level's width)."""
    cross = next(v for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))[1]
    convention = dict(heads=8) if cross == 768 else dict(head_dim=64)
    if "label_emb.0.0.weight" in shapes:  # SDXL: 6 time ids of addition_time_embed_dim (SDXL's 256) + the pooled
        adm = shapes["label_emb.0.0.weight"][1]
        convention |= dict(time_ids=6, pooled_dim=adm - 6 * hints.get("addition_time_embed_dim", 256))
    unet = {ldm.UNET + k: v for k, v in shapes.items()} | {ldm.UNET + "out.2.weight": [4]}
    cfg = ldm.unet_config(unet, {}, convention | {"sample_size": 64})
    convs = sorted(int(m[1]) for k in shapes if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    return dict(in_channels=cfg["in_channels"], down_block_types=cfg["down_block_types"],
                block_out_channels=cfg["block_out_channels"], layers_per_block=cfg["layers_per_block"],
                cross_attention_dim=cfg["cross_attention_dim"], attention_head_dim=cfg["attention_head_dim"],
                use_linear_projection=cfg["use_linear_projection"],
                transformer_layers_per_block=cfg["transformer_layers_per_block"],
                **{k: cfg[k] for k in ("addition_embed_type", "addition_time_embed_dim",
                                       "projection_class_embeddings_input_dim") if k in cfg},
                conditioning_channels=shapes["input_hint_block.0.weight"][1],
                conditioning_embedding_out_channels=[shapes[f"input_hint_block.{i}.weight"][0]
                                                     for i in convs[:-1] if i % 4 == 0]) | hints


def _hint_names(n: int) -> dict:
    """The hint encoder's convolutions for n levels, diffusers' name -> the original layout's (the Sequential's
    index: a SiLU between each two)."""
    return {"controlnet_cond_embedding.conv_in": "input_hint_block.0",
            "controlnet_cond_embedding.conv_out": f"input_hint_block.{4 * n - 2}",
            **{f"controlnet_cond_embedding.blocks.{j}": f"input_hint_block.{2 * (j + 1)}" for j in range(2 * n - 2)}}


def to_original(net, path: str | Path) -> None:
    """Writes a ControlNetModel as a single file in the original layout (`control_model.*`), the config values the
    shapes cannot tell in its header; read back through _from_original and compared before it is kept."""
    from gen.io import write_safetensors

    cfg = net.config
    hint = _hint_names(len(cfg.conditioning_embedding_out_channels)) | {"controlnet_mid_block": "middle_block_out.0"}
    out = {}
    for k, v in net.state_dict().items():
        m = re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", k)
        stem, _, leaf = k.rpartition(".")
        if m:
            name = f"zero_convs.{m[1]}.0.{m[2]}"
        elif stem in hint:
            name = f"{hint[stem]}.{leaf}"
        else:
            name = ldm._unet_key(k, {"layers_per_block": cfg.layers_per_block})
        out[PREFIX + name] = v.detach().contiguous()
    hidden = {k: cfg[k] for k in ("attention_head_dim", "addition_time_embed_dim") if cfg.get(k) is not None}
    write_safetensors(path, out, {META: json.dumps(hidden)})
    back = _from_original(Path(path), False).state_dict()
    if any(not torch.equal(back[k], v) for k, v in net.state_dict().items()):
        Path(path).unlink()
        raise GenError(f"could not write {net.__class__.__name__} in the original layout: it does not read back")
