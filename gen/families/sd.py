"""Stable Diffusion 1.x and 2.x: one CLIP text encoder (last hidden states), a UNet2DConditionModel, the 4-channel
VAE; DDPM with epsilon (1.x, 2.x-base) or v prediction (2.x 768)."""

from __future__ import annotations

from gen.families import Family, ldm, register
from gen.families.ldm import UNET, VAE


def _plain_unet(index: dict, configs: dict) -> bool:
    """A text-conditioned UNet with one text encoder and no added embeddings (SDXL's time ids, ...); 4 input
    channels, or 9 for an inpainting UNet (latents, mask, masked image latents: gen.img2img)."""
    unet = configs.get("unet")
    return (unet is not None and index.get("text_encoder", [None])[0] is not None
            and not any(index.get(k, [None])[0] for k in ("text_encoder_2", "text_encoder_3", "prior"))
            and not unet.get("addition_embed_type") and not unet.get("class_embed_type")
            and unet.get("in_channels", 4) in (4, 9))


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
    # ComfyUI and A1111 read kohya names for every layer but skip the attention layers of a diffusers-layout
    # SD-1.x file; diffusers reads both
    lora_format = "kohya"
    kohya_width = 768

    def kohya_version(self, denoiser, formulation=None) -> str:
        if getattr(formulation, "kind", "ddpm") != "ddpm" or denoiser.config.cross_attention_dim != self.kohya_width:
            return "gen_unet"
        v = getattr(formulation, "prediction_type", "epsilon") == "v_prediction"
        return self.kohya_base + ("_v" if v else "")

    file_texts = (("text_encoder", "tokenizer", "cond_stage_model.transformer.", "hf"),)
    file_roles = {"text_encoder": "CLIP-L"}

    @staticmethod
    def file_text_widths(config) -> dict:
        return {"text_encoder": config.cross_attention_dim}

    def lora_from_file(self, factors: dict, kohya: bool, denoiser) -> dict:
        return ldm.lora_from_ldm(factors, kohya, denoiser)  # sd-scripts' original-block names

    @classmethod
    def recognises(cls, index: dict, configs: dict) -> bool:
        return _plain_unet(index, configs)

    file_vae = "vae-ft-mse-840000-ema-pruned.safetensors"  # the VAE file shared beside SD-1.x/2.x UNets
    file_linear = False  # a UNet-only file is SD-2.x's where its transformers project linearly (1024-wide context)

    @classmethod
    def recognises_file(cls, keys: set, shapes: dict) -> bool:
        if f"{UNET}label_emb.0.0.weight" in keys:
            return False
        if unet_only(keys):  # no text tower to tell: SD-2.x's UNet has linear projections and a 1024-wide context
            ctx = [v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")]
            linear = any(len(v) == 2 for k, v in shapes.items() if k.endswith(".proj_in.weight"))
            return (linear or ctx[:1] == [1024]) == cls.file_linear
        return ldm_unet(keys) and any(k.startswith(cls.file_texts[0][2]) for k in keys)

    @classmethod
    def file_convention(cls, prediction_type: str) -> dict:
        return dict(heads=8, sample_size=64, vae_scale=0.18215)  # CompVis v1-inference.yaml: num_heads 8


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

    file_texts = (("text_encoder", "tokenizer", "cond_stage_model.model.", "openclip"),)
    file_roles = {"text_encoder": "OpenCLIP-H"}
    file_pad_zero = ("tokenizer",)
    file_linear = True
    file_penultimate = True  # FrozenOpenCLIPEmbedder(layer="penultimate"), as diffusers drops resblocks.23

    @classmethod
    def file_prediction(cls, src) -> tuple[str, str] | None:
        """ComfyUI's test (comfy/supported_models.py SD20.model_type): a 4-channel SD-2.x UNet whose last output
        block's first norm has a bias spread (std) over 0.09 was trained for v prediction (2.x-768); the 2.x-base
        and inpainting models are epsilon. (diffusers assumes v for every 2.x file without a global_step.)"""
        key = f"{UNET}output_blocks.11.1.transformer_blocks.0.norm1.bias"
        if src.shapes.get(f"{UNET}input_blocks.0.0.weight", [0, 0])[1] != 4 or key not in src.shapes:
            return None
        if src.tensor(key).float().std(unbiased=False) > 0.09:
            return "v_prediction", "guessed from the weights, as ComfyUI does (--prediction-type epsilon overrides)"
        return None

    @classmethod
    def file_convention(cls, prediction_type: str) -> dict:
        # v2-inference(-v).yaml: num_head_channels 64; 768 px for the v-prediction model, 512 px for base
        return dict(head_dim=64, sample_size=96 if prediction_type == "v_prediction" else 64, vae_scale=0.18215)


def ldm_unet(keys: set) -> bool:
    """An LDM UNet with its VAE (the original layout's model.diffusion_model.* and first_stage_model.*)."""
    return f"{UNET}input_blocks.0.0.weight" in keys and f"{VAE}decoder.conv_in.weight" in keys


def unet_only(keys: set) -> bool:
    """An LDM UNet with no VAE and no text tower beside it (ComfyUI's models/unet files, a UNet GGUF): the other
    parts come as component files or from --base (gen/single_file.py)."""
    return f"{UNET}input_blocks.0.0.weight" in keys and not any(
        k.startswith((VAE, "cond_stage_model.", "conditioner.")) for k in keys)
