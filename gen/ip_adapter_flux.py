"""IP-Adapter for Flux (gen.ip_adapter does the loading): XLabs' files, their fit to a FluxTransformer2DModel.

XLabs' `ip_adapter.safetensors` holds the image projection (ip_adapter_proj_model.proj / .norm: the CLIP image
embedding -> 4 tokens of the text width) and, for each double-stream block N, biased k/v projections of those
tokens (double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj). diffusers' FluxIPAdapterAttnProcessor
attends the image stream's queries (before RoPE) to them and adds the result at `scale`; the single-stream blocks
are untouched. FluxPipeline's negative (true CFG) sees a black image's embedding.
"""

from __future__ import annotations

from pathlib import Path

from gen.errors import GenError


def check(pipe, parts: dict, path: Path, made: str) -> None:
    """A file in XLabs' layout (`made`: gen.ip_adapter.made_for(parts)) whose layers fit this Flux transformer, else
    GenError (before anything changes)."""
    transformer = pipe.denoiser
    if made != "Flux":
        raise GenError(f"{path.name} is an IP-Adapter for {made} UNets (h94's layout), but this is a Flux model; "
                       "use a Flux IP-Adapter (XLabs' ip_adapter.safetensors)")
    if "proj.weight" not in parts["image_proj"]:
        raise GenError(f"{path.name}: a Flux IP-Adapter's image projection is XLabs' (proj + norm); this one has "
                       f"{', '.join(sorted(parts['image_proj'])[:3])}, ..., which diffusers does not load for Flux")
    blocks = len({key.split(".")[0] for key in parts["ip_adapter"]})
    k = parts["ip_adapter"].get("0.to_k_ip.weight")
    want = (transformer.inner_dim, transformer.config.joint_attention_dim)
    if k is None or tuple(k.shape) != want or blocks != transformer.config.num_layers:
        shape = "x".join(map(str, k.shape)) if k is not None else "?"
        raise GenError(f"{path.name} is a Flux IP-Adapter for {blocks} double blocks with {shape} projections, but "
                       f"this Flux transformer has {transformer.config.num_layers} double blocks and takes "
                       f"{want[0]}x{want[1]}")


def plain_processor():
    """The attention processor an unloaded adapter's layers get back."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return FluxAttnProcessor()
