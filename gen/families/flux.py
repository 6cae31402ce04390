"""Flux.1 (Black Forest Labs), dev-style (guidance-distilled: the guidance scale is an input of the transformer,
`guidance_embeds`) and schnell-style (no guidance input): CLIP-L's pooled output as `pooled_projections`, T5's
last hidden states (padded to 512 tokens) as the token states, a FluxTransformer2DModel over the VAE's latents
packed into 2x2 patches with (0, row, column) position ids, rectified flow with a resolution-dependent timestep
shift. As diffusers' FluxPipeline (pipelines/flux/pipeline_flux.py). Single files and LoRA files in BFL's
original layout read and write through gen/families/mmdit_keys.py. Training and LoRA adapt the transformer and
CLIP (T5 stays frozen, as in diffusers' train_dreambooth_lora_flux.py) on packed latents; a dev model trains with
its guidance input at train.guidance (1.0 unless set, as that script's --guidance_scale).

Guidance: on a dev model guidance_scale is embedded and there is no classifier-free guidance, unless a negative
prompt and true_cfg_scale > 1 are given ("true CFG", batched with the positive pass). A schnell model has no
guidance input: diffusers ignores a guidance_scale, gen refuses one other than 0 or 1 (its default is 0).
"""

from __future__ import annotations

import numpy as np
import torch

from gen.errors import GenError
from gen.families import Family, new_model, register
from gen.families.mmdit_keys import OriginalLayout, flux_links, lora_to_diffusers, xlabs_links
from gen.formulations.flow import scheduler_mu
from gen.samplers import check_schedule

T5_LENGTH = 512  # FluxPipeline's max_sequence_length


@register
class Flux(OriginalLayout, Family):
    name = "flux"
    title = "Flux"
    pipeline_class = "FluxPipeline"
    denoiser_part = "transformer"
    sequence_part = "text_encoder_2"  # max_sequence_length sets its token length
    text_parts = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    text_max_length = {"text_encoder_2": T5_LENGTH}
    # sd-scripts' networks/lora_flux.py: CLIP-L is lora_te1_, T5 (with --train_t5xxl) lora_te3_
    kohya_text = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
    kohya_base = "flux1"  # sd-scripts' flux_utils.MODEL_VERSION_FLUX_V1
    denoiser_blocks = ("double_blocks", "single_blocks", "transformer_blocks", "single_transformer_blocks")
    links = staticmethod(flux_links)  # BFL's layout: single files and kohya/ComfyUI LoRA files
    objective = "rectified flow"
    fast_mode = False
    # LoRA targets. "attn": the double blocks' attn.to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out and the single
    # blocks' attn.to_q/k/v; "ff": both streams' MLPs (ff.net.0.proj, ff.net.2, ff_context.*) and the single
    # blocks' proj_mlp / proj_out. diffusers' train_dreambooth_lora_flux.py targets attn + the double blocks' ff
    # by default; the single blocks' MLP layers are in ai-toolkit's and SimpleTuner's "all" sets.
    lora_targets = {"attn": r"(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
                            r"|add_v_proj|to_add_out)",
                    "ff": r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)"
                          r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"}
    # sizes for model.preset when training from scratch; the rotary axes add up to the head dim
    presets = {"tiny": dict(patch_size=1, num_layers=1, num_single_layers=1, attention_head_dim=16,
                            num_attention_heads=2, axes_dims_rope=[4, 4, 8], guidance_embeds=False)}
    index_extra = {"image_encoder": [None, None], "feature_extractor": [None, None]}

    @staticmethod
    def denoiser_class():
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    @staticmethod
    def text_class(part: str):
        from transformers import CLIPTextModel, T5EncoderModel

        return T5EncoderModel if part == "text_encoder_2" else CLIPTextModel

    @staticmethod
    def tokenizer_class(part: str):
        from transformers import CLIPTokenizer, T5TokenizerFast

        return T5TokenizerFast if part == "tokenizer_2" else CLIPTokenizer

    @classmethod
    def recognises(cls, index: dict, configs: dict) -> bool:
        return index.get("transformer", [None, None])[1] == "FluxTransformer2DModel"

    # ---- single files (gen/families/mmdit_file.py): ComfyUI's whole checkpoints, BFL's transformer files ----------
    file_texts = (("text_encoder", "tokenizer", "text_encoders.clip_l.transformer.", "hf"),
                  ("text_encoder_2", "tokenizer_2", "text_encoders.t5xxl.transformer.", "t5"))
    file_layout, file_blocks = "BFL Flux", "double_blocks."
    file_roles = {"text_encoder": "CLIP-L", "text_encoder_2": "T5"}
    file_vae = "ae.safetensors"  # BFL's VAE file, as shared beside flux1-dev.safetensors

    @staticmethod
    def file_text_widths(config) -> dict:
        """CLIP-L's pooled output is the pooled projection's input; T5's states the token stream's."""
        return {"text_encoder": config.pooled_projection_dim, "text_encoder_2": config.joint_attention_dim}

    @classmethod
    def recognises_file(cls, keys: set, shapes: dict) -> bool:
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    @classmethod
    def file_convention(cls, prediction_type=None) -> dict:
        return dict(vae_scale=0.3611, vae_shift=0.1159)  # ae.safetensors' latent scale and shift

    @staticmethod
    def file_scheduler(config) -> dict:
        """FLUX.1-dev's scheduler_config.json (resolution-dependent shift); schnell's: shift 1, none."""
        dev = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
               "max_image_seq_len": 4096, "shift": 3.0}
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000} | (
            dev if config["guidance_embeds"] else {"use_dynamic_shifting": False, "shift": 1.0})

    @staticmethod
    def transformer_config(s: dict, hints: dict) -> dict:
        """FluxTransformer2DModel config from BFL's shapes (the head width from the qk norm's scale); the rotary
        axes from the hints, else Flux.1's (16, 56, 56) for 128-wide heads."""
        hidden, cin = s["img_in.weight"]
        head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        axes = hints.get("axes_dims_rope") or ([16, 56, 56] if head == 128 else None)
        if axes is None:
            raise GenError(f"a Flux file with {head}-wide attention heads: its rotary axes are not Flux.1's; "
                           "pass --base FOLDER with a diffusers folder of this model")
        out = s["final_layer.linear.weight"][0]
        return dict(patch_size=1, in_channels=cin, out_channels=None if out == cin else out,
                    num_layers=len({k.split(".")[1] for k in s if k.startswith("double_blocks.")}),
                    num_single_layers=len({k.split(".")[1] for k in s if k.startswith("single_blocks.")}),
                    attention_head_dim=head, num_attention_heads=hidden // head, joint_attention_dim=s["txt_in.weight"][1],
                    pooled_projection_dim=s["vector_in.in_layer.weight"][1], axes_dims_rope=list(axes),
                    guidance_embeds="guidance_in.in_layer.weight" in s)

    def lora_from_file(self, factors: dict, kohya: bool, denoiser) -> dict:
        """Also XLabs' layout (`double_blocks.0.processor.qkv_lora1`, ...), besides BFL's and diffusers' names."""
        if not kohya:
            factors = lora_to_diffusers(xlabs_links(denoiser.config), factors, kohya=False)
        return super().lora_from_file(factors, kohya, denoiser)

    # ---- conditioning ------------------------------------------------------------------------------
    def encode(self, encoders: list, prompts: list[str], height: int, width: int) -> dict:
        """As FluxPipeline.encode_prompt: CLIP's pooler_output, T5's last hidden states, zero text ids."""
        pooled = encoders[0].outputs(prompts, hidden_states=False).pooler_output
        hidden = encoders[1].outputs(prompts, hidden_states=False).last_hidden_state
        return {"hidden": hidden, "pooled": pooled, "txt_ids": hidden.new_zeros(*hidden.shape[:2], 3)}

    def trained_texts(self) -> tuple[str, ...]:
        return ("text_encoder",)  # CLIP; T5 stays frozen

    def train_inputs(self, denoiser, guidance: float | None, n: int) -> dict:
        """A dev model trains with its guidance input at train.guidance (default 1.0, diffusers' script's)."""
        if not denoiser.config.guidance_embeds:
            return super().train_inputs(denoiser, guidance, n)
        return {"guidance": torch.full((n,), 1.0 if guidance is None else float(guidance), dtype=torch.float32)}

    def new_denoiser(self, encoders: list, preset: str, options: dict, latent_channels: int, sample_size: int):
        """A FluxTransformer2DModel of a named size over 2x2 patches; T5's width for the token states, CLIP's for
        the pooled embedding."""
        widths = dict(joint_attention_dim=encoders[1].model.config.d_model,
                      pooled_projection_dim=encoders[0].model.config.hidden_size)
        return new_model(self, preset, dict(in_channels=latent_channels * 4, **widths) | options)

    def guidance(self, denoiser, scale: float, true_cfg: float | None, negative_given: bool,
                 n: int) -> tuple[float, dict]:
        cfg = (true_cfg or 1.0) if negative_given else 1.0  # true CFG: FluxPipeline's true_cfg_scale
        if not denoiser.config.guidance_embeds:  # schnell: diffusers ignores guidance_scale silently; gen says so
            if scale not in (0.0, 1.0):
                raise GenError(f"this Flux model (schnell-style) has no guidance input, so guidance {scale:g} would "
                               "change nothing; leave --guidance out (for classifier-free guidance give a negative "
                               "prompt and true_cfg_scale)")
            return cfg, {}
        return cfg, {"guidance": torch.full((n,), float(scale), dtype=torch.float32)}

    def denoiser_kwargs(self, cond: dict) -> dict:
        # the ids are the same for every image: FluxTransformer2DModel takes them unbatched, (L, 3)
        return {"encoder_hidden_states": cond["hidden"], "pooled_projections": cond["pooled"],
                "txt_ids": cond["txt_ids"][0], "img_ids": cond["img_ids"][0], "guidance": cond.get("guidance")}

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict, **control) -> torch.Tensor:
        timestep = t.expand(x.shape[0]).to(x.dtype)  # FluxPipeline: t / 1000, a sigma in [0, 1]
        if "ip_embeds" in cond:  # an IP-Adapter's image embeddings (gen.ip_adapter_flux), as FluxPipeline passes them
            control = control | {"joint_attention_kwargs": {"ip_adapter_image_embeds": [cond["ip_embeds"]]}}
        return denoiser(hidden_states=x, timestep=timestep / 1000, return_dict=False,
                        **self.denoiser_kwargs(cond), **control)[0]

    control_classes = ("FluxControlNetModel",)
    control_latent_hint = True  # InstantX's layout (no input_hint_block): packed VAE latents

    def control_fits(self, net, denoiser) -> str | None:
        if net.input_hint_block is not None:
            return "it is an XLabs-style ControlNet (pixel hints, input_hint_block), which gen does not run yet"
        for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim"):
            if net.config.get(key) != denoiser.config.get(key):
                return f"its {key} is {net.config.get(key)}, this model's {denoiser.config.get(key)}"
        return None

    def control_hint(self, pipe, net, image, generator, n: int):
        """FluxControlNetPipeline's: a VAE posterior sample per image from its generator, before the noise, packed."""
        from gen.img2img import _sample

        with pipe._on_device(pipe.vae):
            return self.pack(_sample(pipe, image, generator, n))[0]

    def new_controlnet(self, denoiser, num_layers: int = 4, num_single_layers: int = 4):
        """diffusers' FluxControlNetModel.from_transformer as train_controlnet_flux.py calls it (4 double and 4
        single blocks, the transformer's heads): the embedders and first blocks copied, the hint embedding zeroed."""
        from diffusers import FluxControlNetModel

        c = denoiser.config
        return FluxControlNetModel.from_transformer(denoiser, num_layers=num_layers, num_single_layers=num_single_layers,
                                                    attention_head_dim=c.attention_head_dim,
                                                    num_attention_heads=c.num_attention_heads)

    def control_train_hint(self, vae, net, pixels, generator):
        """train_controlnet_flux.py's: a posterior sample of the hint in [-1, 1], shifted, scaled, packed."""
        from gen.models import vae as vae_lib

        return self.pack(vae_lib.encode(vae, pixels * 2 - 1, generator=generator))[0]

    # InstantX's FLUX.1-dev-Controlnet-Union (and Shakker-Labs' Union-Pro) model card: the modes by index
    UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")

    def control_modes(self, net) -> tuple[str, ...] | None:
        """A union FluxControlNetModel (num_mode set) has num_mode modes, the unnamed ones by number."""
        n = net.config.get("num_mode")
        return None if n is None else tuple(self.UNION_MODES[i] if i < len(self.UNION_MODES) else str(i)
                                            for i in range(n))

    def control_call(self, net, x, t, cond, hint, scale, mode=None) -> dict:
        """FluxControlNetPipeline's call: the embedded guidance only where the ControlNet embeds it; a union
        model's mode index per image."""
        kwargs = self.denoiser_kwargs(cond) | {"guidance": cond.get("guidance") if net.config.guidance_embeds
                                               else None}
        if mode is not None:
            kwargs["controlnet_mode"] = torch.full((x.shape[0], 1), mode, dtype=torch.long, device=x.device)
        block, single = net(hidden_states=x, controlnet_cond=hint, conditioning_scale=scale, return_dict=False,
                            timestep=t.expand(x.shape[0]).to(x.dtype) / 1000, **kwargs)
        return {"controlnet_block_samples": block, "controlnet_single_block_samples": single}

    # ---- latents and timesteps ---------------------------------------------------------------------
    def size_multiple(self, denoiser, vae_factor: int) -> int:
        return vae_factor * 2  # 2x2 latent patches

    def latent_shape(self, denoiser, n: int, height: int, width: int) -> tuple[int, ...]:
        return (n, denoiser.config.in_channels // 4, height, width)

    def pack(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B, C, H, W) -> (B, H/2 * W/2, 4C) 2x2 patches, row-major, with their (0, row, column) ids."""
        b, c, h, w = latents.shape
        packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        ids = ids.reshape(1, -1, 3).to(latents.device, latents.dtype).expand(b, -1, -1)
        return packed, {"img_ids": ids}

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, _, c = latents.shape
        out = latents.view(b, height // 2, width // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c // 4, height, width)

    def scheduler_kwargs(self, scheduler, steps: int, latents: torch.Tensor) -> dict:
        """FluxPipeline's schedule: sigmas linspace(1, 1/steps), shifted by mu for this many image tokens."""
        check_schedule(scheduler, ("sigmas", "mu"), "Flux's shifted sigmas (FluxPipeline cannot run it either)")
        mu = scheduler_mu(scheduler.config, latents.shape[1])
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        return {"sigmas": sigmas, "mu": mu} if sigmas is not None else {"num_inference_steps": steps, "mu": mu}

    def default_settings(self, denoiser, vae_factor: int, flow: bool) -> dict:
        """FluxPipeline's 1024 px (128 latent rows); dev: 28 steps at guidance 3.5, schnell: 4 steps, none."""
        dev = bool(denoiser.config.guidance_embeds)
        return dict(steps=28 if dev else 4, guidance=3.5 if dev else 0.0, height=128 * vae_factor,
                    width=128 * vae_factor)
