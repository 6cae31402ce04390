"""gen's DiT: one CLIP text encoder (token states for cross-attention, its pooled embedding added to the
timestep embedding), gen's DiT denoiser in `transformer/`, the VAE's latents in patches; rectified flow or DDPM."""

from __future__ import annotations

from gen.families import Family, register


@register
class GenDiT(Family):
    name = "dit"
    title = "gen DiT"
    pipeline_class = "GenDiTPipeline"
    denoiser_part = "transformer"
    lora_targets = {"attn": r"(attn|cross_attn)\.(to_q|to_k|to_v|to_out)", "ff": r"blocks\.\d+\.mlp\.(0|2)"}
    objective = "rectified flow or DDPM"
    kohya_base = "gen_dit"  # no kohya tool trains it: gen's own name
    control_classes = ()  # no ControlNet for gen's DiT

    @staticmethod
    def denoiser_class():
        from gen.models.dit import DiT

        return DiT

    @classmethod
    def recognises(cls, index: dict, configs: dict) -> bool:
        return "transformer" in configs and index.get("transformer", [None, None])[1] in ("DiT", None) and \
            not index.get("text_encoder_2", [None])[0]

    @classmethod
    def refuses(cls, index: dict, configs: dict) -> str | None:
        klass = index.get("transformer", [None, None])[1]
        if "transformer" in configs and klass not in ("DiT", None) and not any(
                f.recognises(index, configs) for f in _others()):
            return f"unsupported transformer class {klass!r} (gen loads its DiT and the families in gen/families)"
        return None

    def kohya_version(self, denoiser, formulation=None) -> str:
        return self.kohya_base

    def denoiser_kwargs(self, cond: dict) -> dict:
        return {"encoder_hidden_states": cond["hidden"], "pooled_projections": cond["pooled"]}

    def size_multiple(self, denoiser, vae_factor: int) -> int:
        return vae_factor * denoiser.config.patch_size


def _others():
    from gen.families import families

    return [f for f in families() if f is not GenDiT]
