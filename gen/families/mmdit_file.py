"""SD3/3.5 and Flux single files in the original layout, read offline and written.

A whole-model file (SD3.5's release files, ComfyUI's checkpoints) holds the transformer under
`model.diffusion_model.` (SAI's MMDiT or BFL's Flux names, gen/families/mmdit_keys.py), the text encoders in
Hugging Face naming under `text_encoders.clip_l.transformer.`, `text_encoders.clip_g.transformer.` and
`text_encoders.t5xxl.transformer.`, and the VAE under `first_stage_model.` (the LDM names, gen/families/ldm.py).
A transformer-only file (how Flux finetunes are shared: bare `double_blocks.0...` keys, or under
`model.diffusion_model.`) takes every part it lacks -- text encoders, tokenizers, VAE, scheduler -- from `base`,
a diffusers folder of the same family (`gen sample ... --model flux-ft.safetensors --base FLUX.1-dev/`).

Configs come from tensor shapes; what shapes cannot tell (rotary axes, attention heads where no qk-norm shows the
head width, activations) comes from gen's metadata when gen wrote the file, else the base folder's configs, else
the family's convention for its released checkpoints (`Family.file_convention`).
"""

from __future__ import annotations

from pathlib import Path

from gen.components import lacking_hint, slot_kind
from gen.errors import GenError
from gen.families import ldm
from gen.families.mmdit_keys import to_diffusers, to_original
from gen.file_source import empty, fill, tokenizers
from gen.io import read_json

TRANSFORMER = ldm.UNET  # "model.diffusion_model."


def transformer_prefix(keys) -> str:
    return TRANSFORMER if any(k.startswith(TRANSFORMER) for k in keys) else ""


def t5_config(shapes: dict, prefix: str, hints: dict) -> dict:
    """T5Config of an encoder from its shapes: widths, depth, heads (the relative attention bias has one column
    per head), gated (v1.1: wi_0/wi_1) or plain (wi) feed-forward."""
    s = ldm.strip(shapes, prefix)
    vocab, d_model = s["shared.weight" if "shared.weight" in s else "encoder.embed_tokens.weight"]
    buckets, heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in s
    d_ff = s[f"encoder.block.0.layer.1.DenseReluDense.wi{'_0' if gated else ''}.weight"][0]
    cfg = dict(vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_heads=heads, relative_attention_num_buckets=buckets,
               d_kv=s["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
               num_layers=ldm._count(s, "encoder.block.{}."), feed_forward_proj="gated-gelu" if gated else "relu",
               is_encoder_decoder=False, use_cache=False)
    return cfg | {k: v for k, v in hints.items() if k in ("layer_norm_epsilon", "relative_attention_max_distance",
                                                          "dense_act_fn", "pad_token_id", "eos_token_id")}


def base_config(base: Path | None, part: str) -> dict:
    if base is None or not (base / part / "config.json").is_file():
        return {}
    return read_json(base / part / "config.json")


def base_folder(base) -> Path | None:
    """The --base folder a file takes its missing parts from, checked to be a diffusers model folder."""
    base = Path(base) if base else None
    if base is not None and not (base / "model_index.json").is_file():
        raise GenError(f"--base {base} is not a diffusers model folder (no model_index.json)")
    return base


def missing_parts(family, keys: set, base: Path | None) -> tuple[list[str], list[str]]:
    """(the parts a file lacks that the model needs: text encoder folders, "vae"; the optional towers it lacks --
    SD3's T5 -- that neither it nor the base folder has, which the model goes without)."""
    lacking = [enc for enc, _, prefix, _ in family.file_texts if not any(k.startswith(prefix) for k in keys)]
    if not any(k.startswith(ldm.VAE) for k in keys):
        lacking.append("vae")
    skip = [enc for enc in lacking if enc in family.file_optional and (base is None or not (base / enc).is_dir())]
    return [enc for enc in lacking if enc not in skip], skip


def missing_message(path: Path, family, lacking: list[str], skip: list[str]) -> str:
    """One line naming the component files that complete a file: '... holds only the transformer (UNet): add
    --text-encoder clip_l.safetensors --text-encoder t5xxl.safetensors --vae ae.safetensors, or --base FOLDER'."""
    whole = len(lacking) + len(skip) == len(family.file_texts) + 1
    denoiser = "UNet" if family.file_layout == "LDM" else "transformer"
    what = f"holds only the {denoiser}" if whole else f"lacks {lacking_hint(family, lacking, flags=False)}"
    optional = f" (optionally {lacking_hint(family, skip)})" if skip else ""
    return (f"{path} {what}: add {lacking_hint(family, lacking)}{optional}, or --base FOLDER (a diffusers "
            f"{family.title} folder whose other parts gen uses)")


def load(path: Path, src, family, tokenizer, base, gm: dict) -> dict:
    """A single file of an original-layout family (its `_Source`, gen's metadata `gm`) -> Pipeline kwargs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, T5Config

    from gen import formulations
    from gen.io import load_model

    base = base_folder(base)
    hints, convention = gm.get("hints", {}), family.file_convention()
    keys = set(src.shapes)
    lacking, skip = missing_parts(family, keys, base)
    if lacking and base is None:
        raise GenError(missing_message(path, family, lacking, skip))
    texts = [t for t in family.file_texts if t[0] not in skip]
    parts = tokenizers(path, texts, family, tokenizer or base, src.meta, src.shapes)
    for enc, tok, prefix, kind in texts:
        if enc in lacking:
            parts[enc] = load_model(family.text_class(enc), base / enc)
            continue
        h = base_config(base, enc) | hints.get(enc, {})
        kind = slot_kind(src, prefix, kind)
        if kind == "t5":
            model = empty(lambda: family.text_class(enc)(T5Config(**t5_config(src.shapes, prefix, h))))
            state = {k[len(prefix):]: v for k, v in src.take(prefix).items()}
            state.setdefault("encoder.embed_tokens.weight", state.get("shared.weight"))
            state.setdefault("shared.weight", state["encoder.embed_tokens.weight"])
        else:
            h = {"hidden_act": convention.get("text_act", {}).get(enc, "quick_gelu")} | h
            cfg = ldm.text_config(src.shapes, prefix, kind, h, False, parts[tok])
            model = empty(lambda: family.text_class(enc)(CLIPTextConfig(**cfg)))
            state = ldm.to_diffusers(enc, src.take(prefix), None, prefix, kind, model)
        parts[enc] = fill(model, state, enc)
    prefix = transformer_prefix(keys)
    config = family.transformer_config(ldm.strip(src.shapes, prefix), base_config(base, "transformer") |
                                       hints.get("transformer", {}))
    denoiser = empty(lambda: family.denoiser_class().from_config(config))
    state = to_diffusers(family.links(denoiser.config), {k[len(prefix):]: v for k, v in src.take(prefix).items()
                                                         if not k.startswith(("text_encoders.", ldm.VAE))})
    denoiser = fill(denoiser, state, "transformer")
    if "vae" in lacking:
        vae = load_model(AutoencoderKL, base / "vae")
    else:
        vae_cfg = ldm.vae_config(src.shapes, hints.get("vae", {}), convention) | dict(
            use_quant_conv=f"{ldm.VAE}quant_conv.weight" in keys,
            use_post_quant_conv=f"{ldm.VAE}post_quant_conv.weight" in keys)
        vae_cfg = {"shift_factor": convention["vae_shift"]} | base_config(base, "vae") | vae_cfg | hints.get("vae", {})
        vae = fill(empty(lambda: AutoencoderKL.from_config(vae_cfg)),
                    ldm.to_diffusers("vae", src.take(ldm.VAE), vae_cfg), "VAE")
    sched = gm.get("scheduler") or (read_json(base / "scheduler" / "scheduler_config.json") if base else
                                    family.file_scheduler(denoiser.config))
    formulation = formulations.from_dict(gm["formulation"]) if "formulation" in gm else None
    index = {enc: ["transformers", type(parts[enc]).__name__] for enc, _, _, _ in texts}
    return dict(parts, vae=vae, denoiser=denoiser, scheduler_config=sched, formulation=formulation,
                defaults=gm.get("sampling"), recipe=gm.get("recipe"), name=path.stem,
                family=family(index, {"transformer": dict(denoiser.config)}))


def tensors(pipe) -> tuple[dict, dict]:
    """A pipeline of an original-layout family -> (its tensors in the original layout, hints for gen's
    metadata: every part's config, so the file reads back exactly)."""
    family = pipe.family
    out = {TRANSFORMER + k: v for k, v in to_original(family.links(pipe.denoiser.config),
                                                      pipe.denoiser.state_dict()).items()}
    hints = {"transformer": _plain(pipe.denoiser.config), "vae": _plain(pipe.vae.config)}
    for (enc, _, prefix, kind), text in zip(family.file_texts, pipe.texts):
        if kind == "t5":  # `shared` only: the encoder's embed_tokens is the same (tied) tensor
            out |= {prefix + k: v for k, v in text.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
        else:
            out |= ldm.to_ldm(enc, text.model, prefix, kind)
        hints[enc] = {k: v for k, v in text.model.config.to_dict().items() if isinstance(v, (int, float, str))}
    out |= ldm.to_ldm("vae", pipe.vae)
    return out, hints


def _plain(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def describe(path: Path, family, shapes: dict) -> list[str]:
    from math import prod

    prefix = transformer_prefix(shapes)
    prefixes = {enc: p for enc, _, p, _ in family.file_texts} | {"vae": ldm.VAE}
    lines = [f"  family: {family.title}", f"  layout: single file (original {family.file_layout} layout)"]
    n = sum(prod(s) for k, s in shapes.items() if k.startswith(prefix) and not k.startswith(tuple(prefixes.values())))
    lines.append(f"  transformer: {n / 1e6:.2f}M parameters ({prefix or 'no prefix, '}{family.file_blocks}*)")
    for part, p in prefixes.items():
        n = sum(prod(s) for k, s in shapes.items() if k.startswith(p))
        lines.append(f"  {part}: {n / 1e6:.2f}M parameters ({p}*)" if n else f"  {part}: not in the file (--base FOLDER)")
    lacking, skip = missing_parts(family, set(shapes), None)
    if lacking:
        lines.append(f"  missing: {missing_message(path, family, lacking, skip)}")
    return lines
