"""The original (SAI MMDiT / BFL Flux) layout of SD3 and Flux transformers <-> diffusers' names, as one table per
model that serves single files (whole tensors) and LoRA files (low-rank factors) alike.

A `Link` is one module of the original layout and where its output rows go in diffusers' model: the fused
`qkv` of an attention is diffusers' to_q, to_k and to_v stacked on rows (Flux's single-block `linear1` adds
proj_mlp), and the final adaLN's (shift, scale) rows are diffusers' (scale, shift). The tables follow diffusers'
convert_sd3_transformer_checkpoint_to_diffusers / convert_flux_transformer_checkpoint_to_diffusers
(loaders/single_file_utils.py) and ComfyUI's comfy/utils.py mmdit_to_diffusers / flux_to_diffusers, and are
built from a diffusers config, so any width and depth works (diffusers' Flux converter assumes 3072).

LoRA: a fused original layer (kohya's `lora_unet_double_blocks_0_img_attn_qkv`) reads as one LoRA per diffusers
layer with the down matrix shared and the up matrix split by rows (what diffusers' _convert_kohya_flux_lora_to_
diffusers does), then narrowed to the rank columns each part uses, so a block-diagonal file reads back at its
own rank. Written: the parts' downs stacked (rank r_q + r_k + r_v) and a block-diagonal up, whose product is
exactly the fused layer's delta W, which is what ComfyUI and diffusers apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gen.errors import GenError
from gen.lora_formats import Factor

LINEAR = (("weight", "weight"), ("bias", "bias"))  # (original parameter, diffusers parameter)
NORM = (("scale", "weight"),)  # Flux's RMSNorm scale
WEIGHT = (("weight", "weight"),)  # SD3's qk RMSNorm


@dataclass(frozen=True)
class Link:
    """Original module -> the diffusers modules its rows fill: pieces of (module, first diffusers row, rows),
    in original row order; rows None: the whole tensor."""
    original: str
    pieces: tuple[tuple[str, int, int | None], ...]
    params: tuple[tuple[str, str], ...] = LINEAR

    @property
    def lora(self) -> bool:
        return self.params != NORM and self.params != WEIGHT and self.original != "pos_embed"


def _key(module: str, param: str) -> str:
    return f"{module}.{param}" if param else module


def whole(original: str, diffusers: str, params=LINEAR) -> Link:
    return Link(original, ((diffusers, 0, None),), params)


def split(original: str, parts: list[str], sizes: list[int]) -> Link:
    return Link(original, tuple((p, 0, n) for p, n in zip(parts, sizes)))


def swapped(original: str, diffusers: str, dim: int) -> Link:
    """The final adaLN: original rows (shift, scale) are diffusers' (scale, shift)."""
    return Link(original, ((diffusers, dim, dim), (diffusers, 0, dim)))


def _mlp(o: str, d: str) -> list[Link]:
    return [whole(f"{o}.0", f"{d}.linear_1"), whole(f"{o}.2", f"{d}.linear_2")]


def flux_links(config) -> list[Link]:
    """FluxTransformer2DModel <-> BFL's flux (double_blocks / single_blocks) for this config."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    qkv = [h, h, h]
    links = [whole("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
             whole("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
             whole("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
             whole("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
             whole("txt_in", "context_embedder"), whole("img_in", "x_embedder"),
             whole("final_layer.linear", "proj_out"), swapped("final_layer.adaLN_modulation.1", "norm_out.linear", h)]
    if config.get("guidance_embeds"):
        links += [whole("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                  whole("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]
    for i in range(config["num_layers"]):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        links += [whole(f"{o}.img_mod.lin", f"{d}.norm1.linear"), whole(f"{o}.txt_mod.lin", f"{d}.norm1_context.linear"),
                  split(f"{o}.img_attn.qkv", [f"{d}.attn.to_{x}" for x in "qkv"], qkv),
                  split(f"{o}.txt_attn.qkv", [f"{d}.attn.add_{x}_proj" for x in "qkv"], qkv),
                  whole(f"{o}.img_attn.proj", f"{d}.attn.to_out.0"), whole(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out"),
                  whole(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj"), whole(f"{o}.img_mlp.2", f"{d}.ff.net.2"),
                  whole(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj"), whole(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2"),
                  whole(f"{o}.img_attn.norm.query_norm", f"{d}.attn.norm_q", NORM),
                  whole(f"{o}.img_attn.norm.key_norm", f"{d}.attn.norm_k", NORM),
                  whole(f"{o}.txt_attn.norm.query_norm", f"{d}.attn.norm_added_q", NORM),
                  whole(f"{o}.txt_attn.norm.key_norm", f"{d}.attn.norm_added_k", NORM)]
    for i in range(config["num_single_layers"]):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        links += [whole(f"{o}.modulation.lin", f"{d}.norm.linear"),
                  split(f"{o}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"],
                        qkv + [4 * h]),  # FluxSingleTransformerBlock's mlp_ratio 4
                  whole(f"{o}.linear2", f"{d}.proj_out"),
                  whole(f"{o}.norm.query_norm", f"{d}.attn.norm_q", NORM),
                  whole(f"{o}.norm.key_norm", f"{d}.attn.norm_k", NORM)]
    return links


def xlabs_links(config) -> list[Link]:
    """XLabs' Flux LoRA layers (x-flux's attention processors; `.processor.` is dropped on reading) -> diffusers'
    modules, as diffusers' _convert_xlabs_flux_lora_to_diffusers maps them: a double block's qkv_lora1 / proj_lora1
    on the image stream's q, k, v / output, qkv_lora2 / proj_lora2 on the text stream's; a single block's qkv_lora
    on its q, k, v and proj_lora on proj_out (x-flux applies it to linear2's input)."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    links = []
    for i in range(config["num_layers"]):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        links += [split(f"{o}.qkv_lora1", [f"{d}.to_{x}" for x in "qkv"], [h] * 3),
                  split(f"{o}.qkv_lora2", [f"{d}.add_{x}_proj" for x in "qkv"], [h] * 3),
                  whole(f"{o}.proj_lora1", f"{d}.to_out.0"), whole(f"{o}.proj_lora2", f"{d}.to_add_out")]
    for i in range(config["num_single_layers"]):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        links += [split(f"{o}.qkv_lora", [f"{d}.attn.to_{x}" for x in "qkv"], [h] * 3),
                  whole(f"{o}.proj_lora", f"{d}.proj_out")]
    return links


def sd3_links(config) -> list[Link]:
    """SD3Transformer2DModel <-> SAI's MMDiT (joint_blocks; SD3.5's qk norms and dual attention) for this config."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    qkv, n = [h, h, h], config["num_layers"]
    links = [whole("pos_embed", "pos_embed", (("", "pos_embed"),)), whole("x_embedder.proj", "pos_embed.proj"),
             *_mlp("t_embedder.mlp", "time_text_embed.timestep_embedder"),
             *_mlp("y_embedder.mlp", "time_text_embed.text_embedder"), whole("context_embedder", "context_embedder"),
             whole("final_layer.linear", "proj_out"), swapped("final_layer.adaLN_modulation.1", "norm_out.linear", h)]
    norms = bool(config.get("qk_norm"))
    for i in range(n):
        x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        last = i == n - 1  # its context block only feeds the last joint attention: no output, no mlp
        links += [whole(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear"),
                  split(f"{x}.attn.qkv", [f"{d}.attn.to_{q}" for q in "qkv"], qkv),
                  split(f"{c}.attn.qkv", [f"{d}.attn.add_{q}_proj" for q in "qkv"], qkv),
                  whole(f"{x}.attn.proj", f"{d}.attn.to_out.0"),
                  whole(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj"), whole(f"{x}.mlp.fc2", f"{d}.ff.net.2")]
        links.append(swapped(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear", h) if last else
                     whole(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear"))
        if not last:
            links += [whole(f"{c}.attn.proj", f"{d}.attn.to_add_out"), whole(f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj"),
                      whole(f"{c}.mlp.fc2", f"{d}.ff_context.net.2")]
        if norms:
            links += [whole(f"{x}.attn.ln_q", f"{d}.attn.norm_q", WEIGHT), whole(f"{x}.attn.ln_k", f"{d}.attn.norm_k", WEIGHT),
                      whole(f"{c}.attn.ln_q", f"{d}.attn.norm_added_q", WEIGHT),
                      whole(f"{c}.attn.ln_k", f"{d}.attn.norm_added_k", WEIGHT)]
        if i in tuple(config.get("dual_attention_layers") or ()):
            links += [split(f"{x}.attn2.qkv", [f"{d}.attn2.to_{q}" for q in "qkv"], qkv),
                      whole(f"{x}.attn2.proj", f"{d}.attn2.to_out.0")]
            if norms:
                links += [whole(f"{x}.attn2.ln_q", f"{d}.attn2.norm_q", WEIGHT),
                          whole(f"{x}.attn2.ln_k", f"{d}.attn2.norm_k", WEIGHT)]
    return links


# ---- whole tensors (single files) ---------------------------------------------------------------------------
def to_diffusers(links: list[Link], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout tensors (no prefix) -> the diffusers state dict; parameters absent from `state` are
    skipped (the model's load then names what is missing)."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for link in links:
        for op, dp in link.params:
            t = state.get(_key(link.original, op))
            if t is None:
                continue
            row = 0
            for module, start, rows in link.pieces:
                rows = t.shape[0] if rows is None else rows
                out.setdefault(_key(module, dp), []).append((start, t[row:row + rows]))
                row += rows
    return {k: torch.cat([t for _, t in sorted(v, key=lambda p: p[0])]) if len(v) > 1 else v[0][1]
            for k, v in out.items()}


def to_original(links: list[Link], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers state dict -> the original layout (no prefix); a tensor no link covers is a GenError."""
    out, used = {}, set()
    for link in links:
        for op, dp in link.params:
            keys = [_key(m, dp) for m, _, _ in link.pieces]
            if not all(k in state for k in keys):
                continue
            out[_key(link.original, op)] = torch.cat([state[_key(m, dp)][s:None if n is None else s + n]
                                                      for m, s, n in link.pieces])
            used.update(keys)
    left = sorted(set(state) - used)
    if left:
        raise GenError(f"{len(left)} transformer weights have no place in the original layout, e.g. {left[0]}")
    return out


# ---- LoRA factors -------------------------------------------------------------------------------------------
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI's and others' dotted LoRA keys


def lora_to_diffusers(links: list[Link], factors: dict[str, Factor], kohya: bool) -> dict[str, Factor]:
    """LoRA layers named in the original layout (kohya's flat `double_blocks_0_img_attn_qkv`, or dotted with or
    without `diffusion_model.`) -> diffusers' layer names, flat for a kohya file (as gen.lora.match compares
    them); layers already named as diffusers names them pass through."""
    by_name = {(link.original.replace(".", "_") if kohya else link.original): link for link in links if link.lora}
    out: dict[str, Factor] = {}
    for name, f in factors.items():
        bare = next((name[len(p):] for p in ORIGINAL_PREFIXES if name.startswith(p)), name)
        link = by_name.get(bare)
        if link is None:
            out[name] = f
            continue
        if len(link.pieces) == 1:  # one module, whole: the factor as it is
            out[link.pieces[0][0].replace(".", "_") if kohya else link.pieces[0][0]] = f
            continue
        for module, factor in _split_factor(link, f).items():
            out[module.replace(".", "_") if kohya else module] = factor
    return out


def _split_factor(link: Link, f: Factor) -> dict[str, Factor]:
    """The up rows (and a DoRA magnitude's, one per output row, so the split is exact) of each diffusers module."""
    ups: dict[str, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
    row = 0
    for module, start, rows in link.pieces:
        rows = f.up.shape[0] if rows is None else rows
        m = None if f.magnitude is None else f.magnitude[row:row + rows]
        ups.setdefault(module, []).append((start, f.up[row:row + rows], m))
        row += rows
    if row != f.up.shape[0]:
        raise GenError(f"LoRA layer {link.original} has {f.up.shape[0]} output rows; this model's has {row}")
    out = {}
    for module, parts in ups.items():
        parts = sorted(parts, key=lambda p: p[0])
        up, down = torch.cat([t for _, t, _ in parts]), f.down
        magnitude = None if f.magnitude is None else torch.cat([m for _, _, m in parts])
        used = up.flatten(2).abs().sum(dim=(0, 2)) != 0 if up.ndim > 2 else up.abs().sum(0) != 0
        if len(ups) > 1 and bool(used.any()) and not bool(used.all()):  # this part's own rank columns only
            up, down = up[:, used], down[used]
        out[module] = Factor(down, up, f.scale * down.shape[0], magnitude)
    return out


def lora_to_original(links: list[Link], factors: dict[str, Factor]) -> dict[str, Factor]:
    """LoRA layers named as diffusers names them -> the original layout's (dotted) layers: each fused layer's
    parts' downs stacked and their ups block-diagonal, so up @ down is the fused delta W; a part the adapter
    does not train is zero rows. Scales differing between the parts are folded into their ups."""
    owner = {m: link for link in links if link.lora for m, _, _ in link.pieces}
    missing = sorted(n for n in factors if n not in owner)
    if missing:
        raise GenError(f"{len(missing)} LoRA layers have no counterpart in the original layout, e.g. {missing[0]}; "
                       "write this LoRA in the diffusers format")
    out = {}
    for link in dict.fromkeys(owner[n] for n in factors):
        modules = [m for m in dict.fromkeys(m for m, _, _ in link.pieces) if m in factors]
        scale = factors[modules[0]].scale
        cols, col = {}, 0
        for m in modules:
            cols[m] = (col, col + factors[m].rank)
            col += factors[m].rank
        down = torch.cat([factors[m].down for m in modules])
        first = factors[modules[0]].up
        blocks = []
        for m, start, rows in link.pieces:
            if m not in factors:
                blocks.append(first.new_zeros(rows, col, *first.shape[2:]))
                continue
            f = factors[m]
            piece = f.up[start:None if rows is None else start + rows] * (f.scale / scale)
            block = first.new_zeros(piece.shape[0], col, *first.shape[2:])
            block[:, cols[m][0]:cols[m][1]] = piece
            blocks.append(block)
        out[link.original] = Factor(down, torch.cat(blocks), scale * col)
    return out


class OriginalLayout:
    """For a family whose denoiser has an original layout (SD3, Flux): LoRA files named in it read and write
    through `links(denoiser config)`."""
    links = staticmethod(lambda config: [])

    def lora_from_file(self, factors: dict[str, Factor], kohya: bool, denoiser) -> dict[str, Factor]:
        return lora_to_diffusers(self.links(denoiser.config), factors, kohya)

    def lora_to_file(self, factors: dict[str, Factor], denoiser) -> dict[str, Factor]:
        return lora_to_original(self.links(denoiser.config), factors)

    def kohya_version(self, denoiser, formulation=None) -> str:
        return self.kohya_base
