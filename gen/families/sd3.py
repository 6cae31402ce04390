"""SD3 / SD3.5: CLIP-L and OpenCLIP-bigG (both with projection) and an optional T5-XXL; the CLIPs' penultimate
states concatenated on features, padded to T5's width and followed by T5's states on the sequence axis (zeros
where the folder has no T5, as diffusers does); both CLIPs' projected pooled embeddings concatenated; an
SD3Transformer2DModel (MMDiT) in `transformer/`; the 16-channel VAE with scaling and shift factors; rectified
flow with the folder's shift, or (SD3.5 folders with use_dynamic_shifting) a shift that grows with the image's token
count; skip-layer guidance (SD3.5) runs the transformer a third time without some of its layers. Single files and
LoRA files in the original (SAI MMDiT) layout read and write through gen/families/mmdit_keys.py. Training and LoRA
adapt the transformer and the two CLIPs; T5 stays frozen."""

from __future__ import annotations

import logging

import torch

from gen.errors import GenError
from gen.families import Family, new_model, projected_text, register, sequence_length
from gen.families.dit import GenDiT
from gen.families.mmdit_keys import OriginalLayout, sd3_links
from gen.formulations.flow import scheduler_mu
from gen.samplers import check_schedule

log = logging.getLogger("gen")

CLIPS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5 = ("text_encoder_3", "tokenizer_3")


@register
class SD3(OriginalLayout, Family):
    name = "sd3"
    title = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_part = "transformer"
    sequence_part = T5[0]  # max_sequence_length sets its token length
    # sd-scripts' networks/lora_sd3.py: CLIP-L lora_te1_, CLIP-G lora_te2_, T5 (with --train_t5xxl) lora_te3_
    kohya_text = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
    kohya_base = "sd3"
    denoiser_blocks = ("joint_blocks", "transformer_blocks")  # the original layout's and diffusers' names
    links = staticmethod(sd3_links)  # SAI's MMDiT layout: single files and kohya/ComfyUI LoRA files
    objective = "rectified flow"
    # sizes for model.preset when training from scratch; the inner width (heads x head dim) is the caption's
    presets = {"tiny": dict(patch_size=2, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                            caption_projection_dim=32)}
    t5_length = 256  # StableDiffusion3Pipeline's default max_sequence_length
    text_max_length = {"text_encoder_3": t5_length}
    denoiser_kwargs = GenDiT.denoiser_kwargs  # encoder_hidden_states, pooled_projections
    size_multiple = GenDiT.size_multiple  # the VAE factor times the patch size
    skip_layers = True  # SD3Transformer2DModel runs without chosen layers (skip-layer guidance)
    control_classes = ("SD3ControlNetModel",)
    control_latent_hint = True
    # LoRA targets: "attn" is diffusers' train_dreambooth_lora_sd3.py default (attn.to_q/k/v, to_out.0 and the
    # context stream's add_q/k/v_proj, to_add_out; SD3.5's attn2 is not in it), "ff" adds both streams' MLPs
    lora_targets = {"attn": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                            r"|to_add_out)",
                    "ff": r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)"}

    def __init__(self, index: dict | None = None, configs: dict | None = None):
        index = index or {}
        self.has_t5 = bool(index.get(T5[0], [None])[0])
        self.text_parts = (*CLIPS, T5) if self.has_t5 else CLIPS
        # the width of the zeros that stand in for an absent T5: the transformer's joint attention width
        transformer = (configs or {}).get("transformer") or {}
        self.joint_dim = transformer.get("joint_attention_dim", 4096)
        self.patch_size = transformer.get("patch_size", 2)
        absent = {} if self.has_t5 else {T5[0]: [None, None], T5[1]: [None, None]}
        self.index_extra = absent | {"image_encoder": [None, None], "feature_extractor": [None, None]}

    @staticmethod
    def denoiser_class():
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    @staticmethod
    def text_class(part: str):
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        return T5EncoderModel if part == T5[0] else CLIPTextModelWithProjection

    @staticmethod
    def tokenizer_class(part: str):
        from transformers import CLIPTokenizer, T5TokenizerFast

        return T5TokenizerFast if part == T5[1] else CLIPTokenizer

    @classmethod
    def recognises(cls, index: dict, configs: dict) -> bool:
        return index.get("transformer", [None, None])[1] == "SD3Transformer2DModel"

    # ---- single files (gen/families/mmdit_file.py): SD3.5's release layout ------------------------------------
    file_texts = (("text_encoder", "tokenizer", "text_encoders.clip_l.transformer.", "hf"),
                  ("text_encoder_2", "tokenizer_2", "text_encoders.clip_g.transformer.", "hf"),
                  ("text_encoder_3", "tokenizer_3", "text_encoders.t5xxl.transformer.", "t5"))
    file_pad_zero = ("tokenizer_2",)  # CLIP-G
    file_layout, file_blocks = "SD3 MMDiT", "joint_blocks."
    file_roles = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5"}

    @staticmethod
    def file_text_widths(config) -> dict:
        return {"text_encoder_3": config.joint_attention_dim}  # T5's states are the joint attention's input
    file_optional = ("text_encoder_3",)  # sd3_medium_incl_clips.safetensors: no T5, as a folder without one

    @classmethod
    def recognises_file(cls, keys: set, shapes: dict) -> bool:
        return any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys)

    @classmethod
    def file_convention(cls, prediction_type=None) -> dict:
        """SD3's VAE latents (scale, shift) and OpenCLIP-bigG's gelu (CLIP-L: quick_gelu)."""
        return dict(vae_scale=1.5305, vae_shift=0.0609, text_act={"text_encoder_2": "gelu"})

    @staticmethod
    def file_scheduler(config) -> dict:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

    @staticmethod
    def transformer_config(s: dict, hints: dict) -> dict:
        """SD3Transformer2DModel config from the MMDiT's shapes; the head width from SD3.5's qk norms, else the
        hints, else SD3's 64; sample_size (128 latent rows at 1024 px) from the hints."""
        hidden, cin, p, _ = s["x_embedder.proj.weight"]
        n = len({k.split(".")[1] for k in s if k.startswith("joint_blocks.")})
        norms = "joint_blocks.0.x_block.attn.ln_q.weight" in s
        head = s["joint_blocks.0.x_block.attn.ln_q.weight"][0] if norms else hints.get("attention_head_dim", 64)
        return dict(sample_size=hints.get("sample_size", 128), patch_size=p, in_channels=cin, num_layers=n,
                    attention_head_dim=head, num_attention_heads=hidden // head,
                    joint_attention_dim=s["context_embedder.weight"][1],
                    caption_projection_dim=s["context_embedder.weight"][0],
                    pooled_projection_dim=s["y_embedder.mlp.0.weight"][1],
                    out_channels=s["final_layer.linear.weight"][0] // (p * p),
                    pos_embed_max_size=round(s["pos_embed"][1] ** 0.5), qk_norm="rms_norm" if norms else None,
                    dual_attention_layers=[i for i in range(n) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in s])

    def encode(self, encoders: list, prompts: list[str], height: int, width: int) -> dict:
        """As StableDiffusion3Pipeline.encode_prompt (clip_skip None): hidden_states[-2] of both CLIPs
        concatenated on features and padded (or cut) to T5's width, then T5's last states on the sequence axis;
        the pooled embedding is both CLIPs' projected text_embeds concatenated."""
        states, pooled = [], []
        for enc in encoders[:2]:
            out = enc.outputs(prompts)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        if self.has_t5:
            t5 = encoders[2].outputs(prompts, hidden_states=False)[0]
        else:
            t5 = clip.new_zeros(len(prompts), self.t5_length, self.joint_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"hidden": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict,
                skip_layers: list[int] | None = None, **control) -> torch.Tensor:
        """SD3Transformer2DModel takes keywords (its second positional argument is the text) and a timestep per
        sample, t.expand(batch), as StableDiffusion3Pipeline passes it; `skip_layers`: blocks to leave out."""
        return denoiser(hidden_states=x, timestep=t.expand(x.shape[0]), return_dict=False, skip_layers=skip_layers,
                        **self.denoiser_kwargs(cond), **control)[0]

    # ---- ControlNet (gen/control): StableDiffusion3ControlNetPipeline's --------------------------------------------
    def control_fits(self, net, denoiser) -> str | None:
        for key in ("in_channels", "patch_size", "pooled_projection_dim"):
            if net.config.get(key) != denoiser.config.get(key):
                return f"its {key} is {net.config.get(key)}, this model's {denoiser.config.get(key)}"
        if net.config.get("use_pos_embed") is False and net.inner_dim != denoiser.inner_dim:  # it adds to its tokens
            return f"it is {net.inner_dim} wide, this model's transformer {denoiser.inner_dim}"
        return None

    def control_attach(self, net, denoiser) -> None:
        """SD3.5's large ControlNets (use_pos_embed false) embed the latents with the transformer's own patch
        embedding, as StableDiffusion3ControlNetPipeline hands it over."""
        if net.config.get("use_pos_embed") is False and net.pos_embed is None:
            net.pos_embed = net._get_pos_embed_from_transformer(denoiser).to(denoiser.device, denoiser.dtype)

    def control_hint(self, pipe, net, image, generator, n: int):
        """The VAE posterior's mean (diffusers draws an unseeded sample here), scaled (_hint_latents)."""
        with pipe._on_device(pipe.vae):
            z = pipe.vae.encode(image.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mode()
        return _hint_latents(pipe.vae, net, z).repeat(n, 1, 1, 1)

    def new_controlnet(self, denoiser, num_layers: int | None = None):
        """diffusers' SD3ControlNetModel.from_transformer with train_controlnet_sd3.py's settings (12 blocks, no
        extra hint channels): the embedders and first blocks copied, the hint's patch embedding zeroed. It takes
        zeros for the pooled text and unshifted hint latents (force_zeros_for_pooled_projection, diffusers' default),
        as StableDiffusion3ControlNetPipeline and ComfyUI's load_controlnet_mmdit run such nets. The transformer's
        last block (context_pre_only) has no ControlNet counterpart (from_transformer fails copying it): at most
        depth - 1 blocks; None: 12, or depth - 1 where that is fewer (logged)."""
        from types import SimpleNamespace

        from diffusers import SD3ControlNetModel

        depth = denoiser.config.num_layers
        if depth < 2:
            raise GenError(f"this SD3 transformer has {depth} block; a ControlNet copies its first blocks, not its "
                           "last (context_pre_only), so it needs 2 or more")
        if num_layers is None:
            num_layers = min(12, depth - 1)
            if num_layers < 12:
                log.info("SD3 ControlNet: %d blocks (diffusers' 12, but this transformer has %d)", num_layers, depth)
        elif num_layers > depth - 1:
            raise GenError(f"config key 'controlnet.num_layers': {num_layers} blocks, but a ControlNet copies this "
                           f"transformer's first blocks and not its last (context_pre_only): give at most {depth - 1}")

        # from_transformer writes num_layers into the config it is given: hand it a copy, not the frozen base's
        parts = ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks")
        view = SimpleNamespace(config=dict(denoiser.config), **{k: getattr(denoiser, k) for k in parts})
        return SD3ControlNetModel.from_transformer(view, num_layers=num_layers, num_extra_conditioning_channels=0)

    def control_train_hint(self, vae, net, pixels, generator):
        z = vae.encode((pixels * 2 - 1).to(vae.device, vae.dtype)).latent_dist.sample(generator)
        return _hint_latents(vae, net, z)

    def control_call(self, net, x, t, cond, hint, scale, mode=None) -> dict:
        pooled = torch.zeros_like(cond["pooled"]) if net.config.force_zeros_for_pooled_projection else cond["pooled"]
        hidden = cond["hidden"] if net.config.joint_attention_dim is not None else None  # SD3.5's 8B nets: none
        out = net(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=hidden,
                  pooled_projections=pooled, controlnet_cond=hint, conditioning_scale=scale, return_dict=False)[0]
        return {"block_controlnet_hidden_states": out}

    def scheduler_kwargs(self, scheduler, steps: int, latents: torch.Tensor) -> dict:
        """The folder's fixed shift; with use_dynamic_shifting (SD3.5's option) StableDiffusion3Pipeline's mu for
        this many image tokens (latent size / patch size, squared), with its default max_shift of 1.16."""
        if not scheduler.config.get("use_dynamic_shifting"):
            return {"num_inference_steps": steps}
        check_schedule(scheduler, ("mu",), "this model's dynamic shift (use_dynamic_shifting)")
        tokens = (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
        return {"num_inference_steps": steps, "mu": scheduler_mu(scheduler.config, tokens, max_shift=1.16)}

    def trained_texts(self) -> tuple[str, ...]:
        return tuple(enc for enc, _ in CLIPS)  # as diffusers' SD3 LoRA script: the CLIPs, never T5

    def stage_texts(self, text, folder) -> list:
        """Both CLIP slots from one clip stage (two copies that train apart), no T5: the joint attention then takes
        the CLIPs' concatenated width, with nothing padded, and the CLIPs' tokens alone: no zero tokens stand in
        for a T5 the model never had (max_sequence_length 0 in its defaults, as StableDiffusion3Pipeline takes it;
        the 256 zeros of a released model's would be nine tenths of a tiny model's work)."""
        self.joint_dim = 2 * text.model.config.hidden_size
        self.t5_length = 0
        return [projected_text(text, folder) for _ in CLIPS]

    def use_defaults(self, defaults: dict) -> None:
        """Without T5: a model's max_sequence_length default is the count of zero tokens in its place."""
        n = defaults.get("max_sequence_length")
        if not self.has_t5 and n is not None:
            self.t5_length = sequence_length(n, 0, "the model's default max_sequence_length (gen_config.json)")

    def new_denoiser(self, encoders: list, preset: str, options: dict, latent_channels: int, sample_size: int):
        """An SD3Transformer2DModel of a named size, its text widths from the encoders: T5's (or, without one,
        the zeros' width) for the joint attention, both CLIPs' projections for the pooled embedding."""
        joint = encoders[2].model.config.d_model if self.has_t5 else self.joint_dim
        pooled = sum(e.model.config.projection_dim for e in encoders[:2])
        return new_model(self, preset, dict(sample_size=sample_size, in_channels=latent_channels,
                                            out_channels=latent_channels, joint_attention_dim=joint,
                                            pooled_projection_dim=pooled) | options)

    def default_settings(self, denoiser, vae_factor: int, flow: bool) -> dict:
        # StableDiffusion3Pipeline's defaults: 28 steps, guidance 7.0, sample_size x the VAE factor
        own = {} if self.has_t5 or self.t5_length == SD3.t5_length else {"max_sequence_length": self.t5_length}
        return super().default_settings(denoiser, vae_factor, flow) | {"guidance": 7.0} | own


def _hint_latents(vae, net, z: torch.Tensor) -> torch.Tensor:
    """VAE latents of a hint as an SD3 ControlNet takes them: scaled; InstantX-style nets
    (force_zeros_for_pooled_projection, also what from_transformer makes) take no shift, as the pipeline feeds them."""
    from gen.models import vae as vae_lib

    if net.config.force_zeros_for_pooled_projection:
        return z * vae.config.scaling_factor
    return vae_lib.to_latents(vae, z)
