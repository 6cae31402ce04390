"""SDXL (base): two CLIP text encoders (CLIP-L and OpenCLIP-bigG with projection) whose penultimate hidden states
are concatenated, the second's projected pooled embedding and the micro-conditioning `time_ids` (original size,
crop top-left, target size) added to the timestep embedding; a UNet2DConditionModel with
addition_embed_type="text_time"; the 4-channel VAE (fp16 overflow handled by gen.models.vae.decode); DDPM."""

from __future__ import annotations

import torch

from gen.families import Family, ldm, projected_text, register
from gen.families.ldm import UNET
from gen.families.sd import ldm_unet, unet_only


@register
class SDXL(Family):
    name = "sdxl"
    title = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_parts = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    # kohya-ss/sd-scripts networks/lora.py: LORA_PREFIX_TEXT_ENCODER1/2 for SDXL
    kohya_text = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    # sd-scripts sdxl_train_network.py: model_version = sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0
    kohya_base = "sdxl_base_v1-0"
    lora_format = "kohya"  # as SD-1.x's: what A1111, ComfyUI and diffusers all read
    time_embed_dim = 256  # SDXL base's addition_time_embed_dim, for UNets built from scratch

    def __init__(self, index: dict | None = None, configs: dict | None = None):
        # diffusers' StableDiffusionXLPipeline: no negative prompt -> zero embeddings (base model's setting)
        self.zeros_for_empty = bool((index or {}).get("force_zeros_for_empty_prompt", True))
        self.index_extra = {"force_zeros_for_empty_prompt": self.zeros_for_empty, "image_encoder": [None, None],
                            "feature_extractor": [None, None]}

    def kohya_version(self, denoiser, formulation=None) -> str:
        return self.kohya_base

    @staticmethod
    def text_class(part: str):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel

    @classmethod
    def recognises(cls, index: dict, configs: dict) -> bool:
        unet = configs.get("unet") or {}
        return unet.get("addition_embed_type") == "text_time" and index.get("text_encoder", [None])[0] is not None \
            and index.get("text_encoder_2", [None])[0] is not None

    # SGM's conditioner: embedders.0 is CLIP-L in transformers' form, embedders.1 OpenCLIP-bigG
    file_texts = (("text_encoder", "tokenizer", "conditioner.embedders.0.transformer.", "hf"),
                  ("text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", "openclip"))
    file_pad_zero = ("tokenizer_2",)
    file_roles = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G"}
    file_vae = "sdxl_vae.safetensors"

    def lora_from_file(self, factors: dict, kohya: bool, denoiser) -> dict:
        return ldm.lora_from_ldm(factors, kohya, denoiser)  # sd-scripts' original-block names

    @classmethod
    def recognises_file(cls, keys: set, shapes: dict) -> bool:
        return f"{UNET}label_emb.0.0.weight" in keys and (unet_only(keys) or ldm_unet(keys) and all(
            any(k.startswith(prefix) for k in keys) for _, _, prefix, _ in cls.file_texts))

    @classmethod
    def refuses_file(cls, keys: set, shapes: dict) -> str | None:
        if ldm_unet(keys) and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            return ("an SDXL refiner single file (OpenCLIP-bigG only, aesthetic-score time ids) cannot be used as a "
                    "base; gen samples and trains SDXL base models")
        return None

    @classmethod
    def file_convention(cls, prediction_type: str) -> dict:
        # sd_xl_base.yaml: num_head_channels 64, 1024 px, adm_in_channels = pooled + 6 time ids x 256
        return dict(head_dim=64, sample_size=128, vae_scale=0.13025, time_ids=6)

    @classmethod
    def refuses(cls, index: dict, configs: dict) -> str | None:
        unet = configs.get("unet") or {}
        if unet.get("addition_embed_type") == "text_time" and not index.get("text_encoder", [None])[0]:
            return ("an SDXL refiner folder (text_encoder_2 only, aesthetic-score time ids) cannot be used as a base; "
                    "gen samples and trains SDXL base models (StableDiffusionXLPipeline folders)")
        return None

    def encode(self, encoders: list, prompts: list[str], height: int, width: int) -> dict:
        """As StableDiffusionXLPipeline.encode_prompt: hidden_states[-2] of both towers concatenated; the pooled
        embedding is the second tower's projected text_embeds."""
        states, pooled = [], None
        for enc in encoders:
            out = enc.outputs(prompts)
            states.append(out.hidden_states[-2])
            pooled = out[0] if out[0].ndim == 2 else pooled
        hidden = torch.cat(states, dim=-1)
        return {"hidden": hidden, "pooled": pooled, "time_ids": self.time_ids(len(prompts), height, width, hidden)}

    def encode_negative(self, encoders: list, prompts: list[str], given: bool, height: int, width: int) -> dict:
        cond = self.encode(encoders, prompts, height, width)
        if not given and self.zeros_for_empty:
            cond = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.items()}
        return cond

    @staticmethod
    def time_ids(n: int, height: int, width: int, like: torch.Tensor, original: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """(n, 6): original size, crop top-left, target size (SDXL paper, section 2.2); original = target
        unless given (training passes each image's own)."""
        ids = [*(original or (height, width)), *crop, height, width]
        return torch.tensor([ids], dtype=like.dtype, device=like.device).repeat(n, 1)

    def sized(self, cond: dict, original, crop, target) -> dict:
        """time_ids per image: its original size and crop top-left, the size it trains at (SDXL paper, sec 2.2;
        diffusers' train_text_to_image_sdxl.py compute_time_ids)."""
        hidden = cond["hidden"]
        size = torch.tensor([target], dtype=hidden.dtype, device=hidden.device).expand(hidden.shape[0], 2)
        ids = torch.cat([original.to(hidden.device, hidden.dtype), crop.to(hidden.device, hidden.dtype), size], 1)
        return {**cond, "time_ids": ids}

    def stage_texts(self, text, folder) -> list:
        """CLIP-L's slot takes a clip stage's text tower as it is, OpenCLIP-bigG's a copy with its projection."""
        return [text, projected_text(text, folder)]

    def denoiser_options(self, encoders: list) -> dict:
        """A text_time UNet: cross-attention over both towers' concatenated states; the time-id and pooled
        embeddings (6 ids x addition_time_embed_dim + the second tower's projection) added to the time embedding."""
        pooled = encoders[-1].model.config.projection_dim
        return {"cross_attention_dim": sum(e.model.config.hidden_size for e in encoders),
                "addition_embed_type": "text_time", "addition_time_embed_dim": self.time_embed_dim,
                "projection_class_embeddings_input_dim": 6 * self.time_embed_dim + pooled}

    def denoiser_kwargs(self, cond: dict) -> dict:
        return {"encoder_hidden_states": cond["hidden"],
                "added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}}

    # ---- ControlNet (gen/control): ControlNetModel, and the union model of StableDiffusionXLControlNetUnionPipeline
    control_classes = ("ControlNetModel", "ControlNetUnionModel")
    # xinsir's controlnet-union-sdxl-1.0 model card (ProMax adds tile and repaint): the modes by index
    UNION_MODES = ("openpose", "depth", "hed", "canny", "normal", "segment", "tile", "repaint")

    def control_modes(self, net) -> tuple[str, ...] | None:
        if type(net).__name__ != "ControlNetUnionModel":
            return None
        n = net.config.num_control_type
        return tuple(self.UNION_MODES[i] if i < len(self.UNION_MODES) else str(i) for i in range(n))

    def control_call(self, net, x, t, cond, hint, scale, mode=None) -> dict:
        """A union model takes its hint in a list, the one-hot of its mode (control_type) per image and the mode's
        index, as StableDiffusionXLControlNetUnionPipeline calls it with one hint."""
        if mode is None:
            return super().control_call(net, x, t, cond, hint, scale)
        kwargs = self.denoiser_kwargs(cond)
        one_hot = torch.zeros(x.shape[0], net.config.num_control_type, dtype=kwargs["encoder_hidden_states"].dtype,
                              device=x.device)
        one_hot[:, mode] = 1
        down, mid = net(x, t, controlnet_cond=[hint], control_type=one_hot, control_type_idx=[mode],
                        conditioning_scale=scale, return_dict=False, **kwargs)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def default_settings(self, denoiser, vae_factor: int, flow: bool) -> dict:
        return super().default_settings(denoiser, vae_factor, flow) | {"guidance": 5.0}
