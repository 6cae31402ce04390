"""Stable Diffusion 1.x and 2.x: one CLIP text encoder (last hidden states), a UNet2DConditionModel, the 4-channel
VAE; DDPM with epsilon (1.x, 2.x-base) or v prediction (2.x 768)."""

from __future__ import annotations

from gen.families import Family, register


def _plain_unet(index: dict, configs: dict) -> bool:
    """A text-conditioned UNet with one text encoder and no added embeddings (SDXL's time ids, ...)."""
    unet = configs.get("unet")
    return (unet is not None and index.get("text_encoder", [None])[0] is not None
            and not any(index.get(k, [None])[0] for k in ("text_encoder_2", "text_encoder_3", "prior"))
            and not unet.get("addition_embed_type") and not unet.get("class_embed_type")
            and unet.get("in_channels", 4) == 4)


@register
class SD1(Family):
    name = "sd1"
    title = "SD-1.x"
    pipeline_class = "StableDiffusionPipeline"
    index_extra = {"safety_checker": [None, None], "feature_extractor": [None, None],
                   "image_encoder": [None, None], "requires_safety_checker": False}
    # kohya-ss/sd-scripts (library/model_util.py get_model_version_str_for_sd1_sd2, written by train_network.py):
    # "sd" + "_v1" or "_v2" + "_v" with v-prediction; the real architectures cross-attend to 768 (CLIP ViT-L)
    # and 1024 (OpenCLIP ViT-H) channels
    kohya_base = "sd_v1"
    kohya_width = 768

    def kohya_version(self, denoiser, formulation=None) -> str:
        if getattr(formulation, "kind", "ddpm") != "ddpm" or denoiser.config.cross_attention_dim != self.kohya_width:
            return "gen_unet"
        v = getattr(formulation, "prediction_type", "epsilon") == "v_prediction"
        return self.kohya_base + ("_v" if v else "")

    @classmethod
    def recognises(cls, index: dict, configs: dict) -> bool:
        return _plain_unet(index, configs)


@register
class SD2(SD1):
    """SD-2.x: OpenCLIP-H in CLIPTextModel's form; its UNet's transformers use linear projections."""
    name = "sd2"
    title = "SD-2.x"
    kohya_base = "sd_v2"
    kohya_width = 1024

    @classmethod
    def recognises(cls, index: dict, configs: dict) -> bool:
        unet = configs.get("unet") or {}
        return _plain_unet(index, configs) and (bool(unet.get("use_linear_projection"))
                                                 or unet.get("cross_attention_dim") == 1024)
