"""Pipeline: prompt -> CLIP text embeddings -> latent sampling loop with CFG -> VAE decode."""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor

from gen import attention as attn
from gen import families, folder, formulations, img2img, ip_adapter
from gen import prompt_weights as pw
from gen.errors import GenError
from gen.guidance import SkipLayers, check_guidance, uses_cfg
from gen.memory import resolve_device, resolve_dtype
from gen.models import vae as vae_lib
from gen.models.text import TextEncoder
from gen.output import PipelineOutput
from gen.samplers import default_sampler, denoise, folder_defaults, make_scheduler, own_schedule
from gen.sampling import run as ksampling

log = logging.getLogger("gen")

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2 ** 64 - 1


class Pipeline:
    """Text-to-image sampling with a UNet or DiT denoiser in a VAE's latent space, for any model family
    (gen/families: SD-1.x/2.x, SDXL, gen's DiT, Flux); the family says how prompts become conditioning, how
    latents are laid out for the denoiser (Flux packs 2x2 patches) and how guidance is applied.

    Args:
        text_encoder: transformers CLIPTextModel (the family's first text encoder).
        tokenizer: its CLIPTokenizer.
        vae: diffusers AutoencoderKL.
        denoiser: diffusers UNet2DConditionModel or gen's DiT.
        scheduler_config: the folder's diffusers scheduler config (step spacing; the maths by default).
        formulation: the training objective; read off `scheduler_config` when None.
        defaults: sampling defaults (steps, guidance, sampler, height, width, guidance_rescale,
            guidance_interval).
        recipe: the training recipe, recorded in saved folders.
        attention: attention backend, triton | xformers | sdpa | math | auto (None = auto); a UNet's
            attention layers are routed through it (gen.attention.install_processor).
        compile: torch.compile the denoiser in place (True, or a dict of torch.compile options); the first
            call then compiles, which takes minutes on a CPU.
        channels_last: keep the UNet's and the VAE's convolution weights in channels-last layout.
        family: a gen.families.Family; recognised from the models when None.
        **more_text: the family's further text encoders and tokenizers by folder name (SDXL: text_encoder_2=,
            tokenizer_2=).
    """

    def __init__(self, text_encoder, tokenizer, vae, denoiser, scheduler_config: dict | None = None,
                 formulation=None, defaults: dict | None = None, recipe: dict | None = None,
                 name: str = "model", attention: str | None = None, compile: bool | dict = False,
                 channels_last: bool = False, family: families.Family | None = None, **more_text):
        parts = {"text_encoder": text_encoder, "tokenizer": tokenizer, **more_text}
        self.family = family or families.detect_models(
            denoiser, [m for k, m in parts.items() if k.startswith("text_encoder") and m is not None])
        missing = [p for pair in self.family.text_parts for p in pair if parts.get(p) is None]
        if missing:
            raise GenError(f"a {self.family.title} pipeline needs {', '.join(missing)}")
        self.texts = [TextEncoder(parts[enc], parts[tok], max_length=self.family.text_max_length.get(enc))
                      for enc, tok in self.family.text_parts]
        self.vae = vae
        self.denoiser = denoiser
        self._offload: torch.device | None = None  # the device components visit while they run (enable_offload)
        self.resident: tuple[torch.nn.Module, ...] = ()  # the components there now, under offload
        self._streamed = None  # gen.memory.Streamed: the group / sequential offload hooks (enable_offload)
        self.formulation = formulation or formulations.from_scheduler_config(scheduler_config or {})
        self.scheduler_config = dict(scheduler_config) if scheduler_config else None
        self.recipe = dict(recipe or {})
        self.name = name
        self.weights = "auto"  # how fp8/GGUF weights are stored (gen/quant; set by from_pretrained)
        self.vae_tiling: int | None = None  # the VAE's tile size in pixels under enable_vae_tiling
        self._progress_bar_config: dict = {}
        self.defaults = self._default_settings() | dict(defaults or {})
        self.family.use_defaults(self.defaults)
        self._warn_unknown_scheduler(defaults or {})
        attn.set_backend(attention)  # checked here, so an unavailable backend fails at load
        self.attention = attention  # and used for this pipeline's sampling (gen.attention.use_backend)
        if hasattr(self.denoiser, "set_attn_processor"):  # diffusers' attention layers run through gen's
            attn.install_processor(self.denoiser)  # backend too (gen's DiT calls it directly)
        for m in self.models:
            m.eval().requires_grad_(False)
        if channels_last:
            for m in (self.vae, self.denoiser) if self.family.denoiser_part == "unet" else (self.vae,):
                m.to(memory_format=torch.channels_last)
        self._compile = (compile if isinstance(compile, dict) else {}) if compile else None
        self._fast_forward = None  # the fast mode's forward, compiled once when compile is on
        if compile:  # in place: the module, its config and its state_dict stay as they are
            self.denoiser.compile(**self._compile)

    # ---- properties -------------------------------------------------------------------------
    @property
    def text(self) -> TextEncoder:
        """The first (or only) text encoder and its tokenizer."""
        return self.texts[0]

    @text.setter
    def text(self, value: TextEncoder) -> None:
        self.texts[0] = value

    @property
    def text_parts(self) -> dict[str, torch.nn.Module]:
        """Text encoder folder name -> model, in the family's order."""
        return {enc: t.model for (enc, _), t in zip(self.family.text_parts, self.texts)}

    @property
    def models(self) -> list[torch.nn.Module]:
        return [*self.text_parts.values(), self.vae, self.denoiser]

    @property
    def device(self) -> torch.device:
        """Where sampling runs: the components' device, or the one they visit under enable_offload."""
        return self._offload or self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def vae_scale_factor(self) -> int:
        return vae_lib.scale_factor(self.vae)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor (times the DiT patch size)."""
        return self.family.size_multiple(self.denoiser, self.vae_scale_factor)

    def _default_settings(self) -> dict:
        flow = self.formulation.kind == "flow"
        folder = folder_defaults(self.scheduler_config, self.formulation) if self.scheduler_config else {}
        return self.family.default_settings(self.denoiser, self.vae_scale_factor, flow) | dict(
            sampler=default_sampler(self.formulation), guidance_rescale=0.0) | folder

    @property
    def guidance_interval(self) -> tuple[float, float]:
        """The default guidance interval: the model folder's (gen_config.json sampling.guidance_interval), else the
        whole run."""
        return tuple(self.defaults.get("guidance_interval", (0.0, 1.0)))

    def _warn_unknown_scheduler(self, given: dict) -> None:
        """A folder whose scheduler gen has no sampler for (an EDMEulerScheduler) is sampled with gen's
        default sampler and steps unless told otherwise: said in one warning at load."""
        if "sampler" in given or not self.scheduler_config or folder_defaults(self.scheduler_config, self.formulation):
            return
        d = self.defaults
        log.warning("%s: gen has no sampler for its scheduler %s (scheduler/scheduler_config.json); it samples with "
                    "%s at %s steps instead unless --sampler/--steps (sampler=, num_inference_steps=) say otherwise",
                    self.name, self.scheduler_config.get("_class_name"), d["sampler"], d["steps"])

    @property
    def progress(self) -> bool:
        """Whether sampling shows its tqdm bar: `pipe.progress = False` is
        `pipe.set_progress_bar_config(disable=True)`."""
        return not self._progress_bar_config.get("disable", False)

    @progress.setter
    def progress(self, on: bool) -> None:
        self._progress_bar_config["disable"] = not on

    def set_progress_bar_config(self, **kwargs) -> None:
        """Keyword arguments for the sampling loop's tqdm bar (`disable=True`, `desc`, `file`, `leave`,
        `position`, ...), replacing those set before, as on a diffusers pipeline."""
        self._progress_bar_config = kwargs

    def to(self, device=None, dtype=None) -> "Pipeline":
        """Moves every component (a device ends enable_offload) and casts its weights to dtype."""
        if device is not None:
            self._offload = None
            self._end_streaming()
        for m in self.models:
            m.to(device=device)
            if dtype is not None and m.dtype != dtype:
                m.to(dtype=dtype)
        return self

    def enable_offload(self, device=None, mode: str = "model", blocks: int = 1) -> "Pipeline":
        """Keeps the components on the CPU and moves them to `device` (default: CUDA where there is one) only
        while they run. `mode` "model": each component group whole, the text encoders while the prompts are
        encoded (once per call), the denoiser for the sampling loop, the VAE for decoding; as diffusers'
        enable_model_cpu_offload. The device then holds the largest of them rather than their sum
        (bench/memory.py). "group": the denoiser and text encoders `blocks` blocks at a time, the next prefetched
        on a side CUDA stream from pinned memory; "sequential": one layer at a time (gen.memory.Streamed,
        diffusers' group offloading); the VAE and the CLIP towers visit whole as in "model". On a CPU-only machine
        nothing moves."""
        from gen import memory, quant

        memory.check_offload(mode, blocks)
        quant.check_offload(self.weights, mode)
        device = resolve_device(device)
        self._end_streaming()
        for m in self.models:
            m.to("cpu")
        self._offload = device if device.type != "cpu" else None
        if mode != "model":  # hooked at each call's start (gen.memory.Streamed.install)
            self._streamed = memory.Streamed(mode, device, blocks)
        return self

    def _end_streaming(self) -> None:
        if self._streamed is not None:
            for m in self.models:
                self._streamed.remove(m)
        self._streamed = None

    def enable_vae_tiling(self, tile_size: int | None = None) -> "Pipeline":
        """Decodes and encodes (img2img, inpainting, hires fix) in overlapping tiles of `tile_size` pixels (default
        512) blended at the seams, a batch one image at a time, so a large image needs the memory of one tile
        (gen.memory.vae_tiling; diffusers' enable_tiling + enable_slicing). The image differs from the untiled one
        only near the seams, by little; gen sample records the tile in the PNG recipe."""
        from gen import memory

        self.vae_tiling = memory.vae_tiling(self.vae, tile_size)
        return self

    def disable_vae_tiling(self) -> "Pipeline":
        from gen import memory

        memory.no_vae_tiling(self.vae)
        self.vae_tiling = None
        return self

    @contextlib.contextmanager
    def _on_device(self, *modules: torch.nn.Module):
        """Runs the block with `modules` on the offload device, and puts them back on the CPU after it."""
        if self._streamed is not None:  # these move block by block under their hooks
            modules = tuple(m for m in modules if not self._streamed.holds(m))
        if self._offload is None or not modules:
            yield
            return
        for m in modules:
            m.to(self._offload)
        self.resident = modules
        try:
            yield
        finally:
            self.resident = ()
            for m in modules:
                m.to("cpu")

    # ---- loading and saving -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device=None, dtype=None,
                        attention: str | None = None, allow_pickle: bool = False, compile: bool | dict = False,
                        channels_last: bool = False, tokenizer: str | Path | None = None,
                        prediction_type: str | None = None, base: str | Path | None = None,
                        offload: bool | str = False, weights: str | None = None, vae: str | Path | None = None,
                        text_encoders=(), ema: bool = False, vae_tiling: bool | int = False,
                        offload_blocks: int = 1, ip_adapter: str | Path | None = None,
                        image_encoder: str | Path | None = None) -> "Pipeline":
        """Loads a diffusers-layout folder of any family gen knows (gen/families), or a single .safetensors file in
        the original layout (SD-1.x, SD-2.x, SDXL: LDM/A1111; SD3/3.5, Flux: SAI's/BFL's; gen/single_file.py); None =
        the bundled default. attention, compile and channels_last are as in Pipeline; `offload`: True ("model"),
        "group" or "sequential" is enable_offload(device, offload, offload_blocks).
        For a single file only: `tokenizer`, a diffusers folder (or tokenizer folder) when the file carries none;
        `prediction_type` ("epsilon" or "v_prediction"), which weights cannot tell (SD-2.x 768 models are
        v_prediction); `base`, a diffusers folder of the same family supplying the parts an SD3/Flux file lacks (a
        transformer-only file takes its text encoders, tokenizers, VAE and scheduler from it); `vae` and
        `text_encoders`, component files (ae.safetensors, clip_l / clip_g / t5xxl.safetensors, ...) that fill what the
        file lacks or replace its own (gen/components.py); `ema`, the EMA weights of a file that holds both.
        `weights`: "auto", "fp8" or "full", how fp8/GGUF weights are stored (gen/quant: kept stored and upcast per
        layer, or upcast on load), or "nf4", "fp4", "int8": the Linear layers quantized by bitsandbytes
        (gen/quant/bnb.py); a .gguf file is a GGUF transformer (with `base`). `vae_tiling`: True, or a tile
        size in pixels, is enable_vae_tiling(...). `ip_adapter` (with `image_encoder`) is load_ip_adapter(...)."""
        from gen import memory, quant

        if offload or offload_blocks != 1:
            memory.check_offload("model" if offload in (True, False) else offload, offload_blocks)
        if path is None:
            path = DEFAULT_MODEL
            if not (path / "model_index.json").is_file():
                raise GenError("this install has no bundled default model; pass --model PATH "
                               "(or build it with `make default-model`)")
        path = Path(path)
        if not path.exists():
            raise GenError(f"model folder not found: {path}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        weights = quant.check(weights)
        quant.check_offload(weights, offload)  # before loading: a refusal need not wait for the weights
        if path.is_file():  # a pickle is opened only if allowed, and then by gen.io's weights-only loader
            from gen import single_file

            parts = single_file.load(path, tokenizer, prediction_type, allow_pickle, base, vae, text_encoders, ema)
            pipe = cls(**parts, attention=attention, compile=compile, channels_last=channels_last)
            pipe = pipe._place(device, dtype, offload, weights, vae_tiling, offload_blocks)
            return pipe._with_ip_adapter(ip_adapter, image_encoder, allow_pickle)
        if vae or text_encoders or ema:
            raise GenError("--vae, --text-encoder and --ema are for a single-file model; a folder's parts are its "
                           "subfolders")
        pipe = cls(**folder.load(path, allow_pickle, dtype), attention=attention, compile=compile,
                   channels_last=channels_last)
        pipe = pipe._place(device, dtype, offload, weights, vae_tiling, offload_blocks)
        return pipe._with_ip_adapter(ip_adapter, image_encoder, allow_pickle)

    def _place(self, device: torch.device, dtype: torch.dtype, offload: bool | str, weights: str = "auto",
               vae_tiling: bool | int = False, offload_blocks: int = 1) -> "Pipeline":
        """A loaded pipeline onto its device in its dtype (its weights stored as `weights` says, gen/quant), or
        kept on the CPU and offloaded to the device."""
        from gen import quant

        if vae_tiling is not False:
            self.enable_vae_tiling(None if vae_tiling is True else vae_tiling)
        quant.apply(self, weights, dtype)
        self.to("cpu" if offload else device, dtype)
        mode = "model" if offload is True else offload
        return self.enable_offload(device, mode, offload_blocks) if offload else self

    def _with_ip_adapter(self, path, image_encoder, allow_pickle: bool) -> "Pipeline":
        if path is not None:
            self.load_ip_adapter(path, image_encoder, allow_pickle)
        elif image_encoder is not None:
            raise GenError("image_encoder (--image-encoder) is for an IP-Adapter; pass ip_adapter (--ip-adapter FILE)")
        return self

    def save_pretrained(self, path: str | Path, single_file: bool = False) -> None:
        """Writes the diffusers layout (safetensors), with sampling defaults and recipe in gen_config.json; or, with
        `single_file`, one .safetensors file in the original LDM/A1111 layout with those settings and the
        tokenizers in its header. Either is written beside the target and renamed into place, so a failed save
        loses nothing."""
        if "_loras" in self.__dict__ and self._loras.weights:
            raise GenError("unload_lora() before save_pretrained (after fuse_lora() to bake the LoRA in)")
        if "_ip_adapter" in self.__dict__:
            raise GenError("unload_ip_adapter() before save_pretrained: an IP-Adapter stays in its own file")
        from gen import quant

        quant.refuse(self.models, "save_pretrained")
        path = Path(path)
        if single_file:
            from gen import single_file as sf

            return sf.save(self, path)
        return folder.save(self, path)

    # ---- LoRA (gen/lora.py does the work) ----------------------------------------------------
    @property
    def loras(self):
        """The loaded LoRA adapters: `.weights` (name -> weight), `.active` (names in use)."""
        from gen.lora import Adapters

        return Adapters.of(self)

    def load_lora(self, path: str | Path, scale: float = 1.0, adapter_name: str | None = None,
                  allow_pickle: bool = False) -> str:
        """Adds a LoRA file (diffusers/peft or kohya/A1111 layout) to the denoiser and text encoder, active
        at weight `scale` beside those already loaded. Returns its adapter name (default: the file's stem).
        A file that does not fit this model raises GenError and changes nothing."""
        return self.loras.load(path, scale, adapter_name, allow_pickle)

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Uses only adapters `names`, with these weights (default 1.0), composed as in diffusers' set_adapters."""
        self.loras.set_adapters(names, weights)

    def fuse_lora(self) -> None:
        """Merges the active adapters at their weights into the base weights (faster sampling)."""
        self.loras.fuse()

    def unfuse_lora(self) -> None:
        """Restores the base weights exactly as they were before fuse_lora."""
        self.loras.unfuse()

    def unload_lora(self) -> None:
        """Removes all adapters (fused weights stay fused, as in diffusers)."""
        self.loras.unload()

    def save_lora(self, path: str | Path, adapter_name: str | None = None, format: str = "diffusers") -> Path:
        """Writes a loaded adapter as a .safetensors LoRA file: format "diffusers" or "kohya"."""
        return self.loras.save(path, adapter_name, format)

    # ---- IP-Adapter (gen/ip_adapter.py does the work) ----------------------------------------
    def load_ip_adapter(self, path: str | Path, image_encoder: str | Path | None = None,
                        allow_pickle: bool = False) -> None:
        """Adds an IP-Adapter file in h94's layout (ip-adapter_sd15.safetensors, ip-adapter_sdxl.safetensors, ...)
        to the UNet, or XLabs' Flux ip_adapter.safetensors to the Flux transformer; `image_encoder`: its CLIP vision encoder folder (default: image_encoder/ beside the file).
        Calls then take ip_adapter_image= and ip_adapter_scale=. A file for another model raises GenError."""
        self._ip_adapter = ip_adapter.load(self, path, image_encoder, allow_pickle)

    def unload_ip_adapter(self) -> None:
        """Removes the IP-Adapter and its image encoder."""
        if self.__dict__.pop("_ip_adapter", None) is not None:
            ip_adapter.unload(self.denoiser)

    @property
    def ip_adapter(self):
        """The loaded gen.ip_adapter.IPAdapter (`.path`, `.encoder_folder`), or None."""
        return self.__dict__.get("_ip_adapter")

    # ---- textual inversion (gen/embeddings.py does the work) ----------------------------------
    def load_textual_inversion(self, path: str | Path, token: str | None = None, allow_pickle: bool = False) -> list[str]:
        """Adds an embedding file (A1111's, diffusers' or SDXL's; named `token`, else by the file) that prompts
        then use by name, or a folder of them (A1111's embeddings folder: each file used by its name, or as
        embedding:NAME). Returns the names. An embedding for other text encoders raises GenError."""
        from gen.embeddings import Embeddings

        return Embeddings.of(self).load(path, self.texts, token, allow_pickle)

    def unload_textual_inversion(self) -> None:
        """Forgets every embedding loaded."""
        self.__dict__.pop("_embeddings", None)

    def embeddings_used(self, prompts: list[str]) -> list:
        """The gen.embeddings.Embedding objects these prompts use (for a recipe's `TI hashes`)."""
        if "_embeddings" not in self.__dict__:
            return []
        return list({id(e): e for e in self._embeddings.used(prompts, self.texts).values()}.values())

    # ---- sampling ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], height: int | None = None, width: int | None = None,
                       texts: list[TextEncoder] | None = None) -> dict:
        """Prompts -> the family's conditioning (a dict of batch-first tensors, gen.families); `texts`: the
        towers to use (default self.texts)."""
        cond = self.family.encode(texts or self.texts, prompts, height or self.defaults["height"],
                                  width or self.defaults["width"])
        return families.to(cond, self.dtype)

    def _texts(self, max_sequence_length: int | None) -> list[TextEncoder]:
        """The text towers for a call: the family's long-sequence tower (a T5) padded to max_sequence_length
        tokens where one is given."""
        if max_sequence_length is None:
            return self.texts
        part = self.family.sequence_part
        names = [enc for enc, _ in self.family.text_parts]
        if part not in names:
            raise GenError(f"max_sequence_length (--max-sequence-length) sets the T5 encoder's token length, but this "
                           f"{self.family.title} model has no T5 encoder ({part or 'none'}); leave it out"
                           + (f" or use a folder with {part}/" if part else ""))
        families.sequence_length(max_sequence_length, 1, "max_sequence_length")
        i = names.index(part)
        texts = list(self.texts)
        texts[i] = TextEncoder(texts[i].model, texts[i].tokenizer, max_length=max_sequence_length)
        return texts

    def _predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        """The denoiser contract: model(x_t, t, encoder_hidden_states, **extra) -> prediction (the family's);
        `kwargs`: skip_layers, for families that take them."""
        return self.family.predict(self.denoiser, x, t, cond, **kwargs)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 seed: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 sampler: str | None = None, output_type: str = "pil", guidance_rescale: float | None = None,
                 guidance_interval: tuple[float, float] | None = None, cache_interval: int = 1,
                 true_cfg_scale: float | None = None, image=None, strength: float | None = None, mask_image=None,
                 mask_blur: float = 0, padding_mask_crop: int | None = None, clip_skip: int = 1,
                 prompt_weighting: bool = True, hires_scale: float | None = None, hires_strength: float = 0.7,
                 hires_steps: int | None = None, hires_upscaler: str = "latent",
                 skip_guidance_layers: list[int] | None = None, skip_layer_guidance_scale: float = 2.8,
                 skip_layer_guidance_start: float = 0.01, skip_layer_guidance_stop: float = 0.2,
                 max_sequence_length: int | None = None, schedule: str | None = None, ip_adapter_image=None,
                 ip_adapter_scale: float = 1.0, control: list | None = None,
                 control_resize: str = "just-resize") -> PipelineOutput:
        """Generates images.

        Args:
            prompt: a prompt or a list of prompts.
            negative_prompt: what to steer away from; one for all prompts, or one per prompt.
            seed: image i of the call starts from noise seeded with seed + i (random when None).
            generator: a torch.Generator or one per image, as in diffusers; overrides `seed`.
            output_type: "pil" (list of PIL images), "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W)
                in [0, 1], or "latent" (B, C, H/f, W/f) model-space latents.
            guidance_interval: (start, end) fractions of the run where guidance applies (None: the model's
                default, else the whole run).
            cache_interval: the approximate fast mode (gen.fastmode, after DeepCache) where > 1: the whole
                denoiser runs every cache_interval-th step, the steps between reuse its deep features.
            true_cfg_scale: for families whose guidance_scale is an embedded input (Flux dev): classifier-free
                guidance at this scale against negative_prompt, where both are given and the scale is > 1.
            image: start from this image (img2img; a path, PIL image, array, tensor in [0, 1], or latents):
                the output has its size unless height/width are given; strength in [0, 1] (default 0.8) is how
                much of the schedule runs (gen.img2img).
            mask_image: repaint where this mask is white (inpainting; default strength 1.0); mask_blur: blur
                radius in pixels; padding_mask_crop: repaint only the mask's box grown by this many pixels, at
                height x width (A1111's "only masked").
            clip_skip: A1111's "Clip skip": N ends the CLIP towers N - 1 layers early (N at most their layers).
            prompt_weighting: read A1111's (word:1.3) / (word) / [word] / BREAK syntax (else plain text); prompts
                longer than 75 tokens are encoded in chunks either way, each padded to its own negative's chunks
                only (gen.prompt_weights).
            hires_scale, hires_strength, hires_steps, hires_upscaler: A1111's hires fix: sample, upscale by
                hires_scale ("latent": the latents, bilinear; "image": the decoded image, Lanczos), then run
                img2img at hires_strength for hires_steps (default: the same steps) at the larger size
                (gen.hires).
            skip_guidance_layers: skip-layer guidance (SD3.5; families whose denoiser can skip layers): the
                transformer blocks left out of a third pass, whose difference from the conditional pass is added at
                skip_layer_guidance_scale on the steps between the start and stop fractions; as diffusers'
                StableDiffusion3Pipeline (7, 8, 9 with scale 2.8 for SD3.5-medium), and only with guidance > 1.
            max_sequence_length: the T5 encoder's token length (SD3: 256 by default, Flux: 512), as diffusers'.
                An SD3 model without T5 takes zeros in its place, as many as the model sets (256; a
                model gen trained from scratch, model.family=sd3: 0).
            sampler, schedule: gen's, A1111's or ComfyUI's names (gen.sampling.names); schedule None: the model's own.
            ip_adapter_image: the image prompt of the loaded IP-Adapter (load_ip_adapter; a path or PIL image), its
                tokens weighted by ip_adapter_scale (0: as without the adapter).
            control: gen.control.Control items (a ControlNet, its hint image, weight, start and end), summed;
                control_resize: how hints meet the size, "just-resize", "crop-and-resize" or "resize-and-fill".

        Returns:
            PipelineOutput with `.images` and the `.seeds` used.
        """
        call = {k: v for k, v in locals().items() if k != "self"}
        if hires_scale is not None:
            from gen import hires

            return hires.run(self, call)
        source = img2img.prepare(self, image, mask_image, strength, height, width, mask_blur, padding_mask_crop)
        if source is not None:
            height, width = source.height, source.width
        d = self.defaults
        steps = d["steps"] if num_inference_steps is None else num_inference_steps
        scale = d["guidance"] if guidance_scale is None else guidance_scale
        rescale = d.get("guidance_rescale", 0.0) if guidance_rescale is None else guidance_rescale
        guidance_interval = self.guidance_interval if guidance_interval is None else tuple(guidance_interval)
        height = d["height"] if height is None else height
        width = d["width"] if width is None else width
        by_diffusers, ksampler, schedule = ksampling.route(sampler or d["sampler"], schedule or own_schedule(d, sampler),
                                                           self.formulation)
        sampler = by_diffusers or ksampler.name
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]  # _check rejects non-strings
        negs = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        self._check(prompts, negs, steps, scale, rescale, guidance_interval, height, width,
                    num_images_per_prompt, sampler, output_type)
        if control and cache_interval != 1:  # the cached forward takes no residuals
            raise GenError("the fast mode (cache_interval) does not combine with ControlNet; leave one out")
        if cache_interval != 1 and not self.family.fast_mode:
            raise GenError(f"the fast mode (cache_interval) does not support {self.family.title} models")
        ip_adapter.check_call(self.ip_adapter, ip_adapter_image, ip_adapter_scale, cache_interval)
        if self._streamed is not None:  # hooked now: LoRAs loaded or fused since the last call are in the groups
            if cache_interval != 1:  # its forward calls the blocks itself, past the hooks that move them
                raise GenError(f"the fast mode (cache_interval) does not combine with offload {self._streamed.mode!r}")
            # the CLIP towers (at most 0.7B) visit whole: a call's textual-inversion copies of them (gen.embeddings)
            # would run the original's hooked forward; the T5 (4.7B in SD3/Flux) streams
            self._streamed.install(*(m for m in self.text_parts.values() if not pw.is_clip(m)), self.denoiser)
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
            raise GenError(f"clip_skip must be an integer >= 1 (1: the last layer), not {clip_skip!r}")
        n = len(prompts) * num_images_per_prompt
        seeds, generator = self._generators(seed, generator, n)
        slg = None
        if skip_guidance_layers is not None:
            slg = SkipLayers(list(skip_guidance_layers), skip_layer_guidance_scale, skip_layer_guidance_start,
                             skip_layer_guidance_stop, steps)
            if not self.family.skip_layers:
                raise GenError(f"skip-layer guidance is for SD3 models; a {self.family.title} model cannot skip layers")
            slg.check(self.denoiser.config.num_layers)
        scale, embedded = self.family.guidance(self.denoiser, scale, true_cfg_scale, negative_prompt is not None, n)
        cfg = uses_cfg(scale) or ksampler.cfg_pp  # CFG++ steps along the unconditional pass at any scale
        texts = self._texts(max_sequence_length)
        if "_embeddings" in self.__dict__:  # the call's copies read its textual-inversion embeddings
            texts = self._embeddings.for_call(texts, prompts + negs)
        chunks = pw.chunk_counts(texts, prompts, negs if cfg else None, prompt_weighting)
        if len(set(chunks)) > 1:  # no prompt is padded to another's length
            return pw.by_chunks(self, call, prompts, negs, chunks, seeds, generator)
        texts = pw.with_syntax(texts, prompt_weighting, clip_skip, chunks[0])  # for this call only

        f = self.vae_scale_factor
        shape = self.family.latent_shape(self.denoiser, n, height // f, width // f)
        with self._on_device(self.vae):  # img2img's image to latents, drawn before the noise
            x0 = img2img.encode(self, source, generator, n) if source is not None else None
        if control:  # the hints' latents (Flux) are drawn before the noise, as diffusers draws them
            from gen.control import run as ctl
            nets, hints = ctl.prepare(self, list(control), height, width, n, generator, control_resize)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        latents, extra = self.family.pack(latents)  # extra: conditioning the packing adds (position ids)
        if by_diffusers is None:  # before encoding: it may refuse
            plan = ksampling.prepare(self, schedule, steps, latents, source is not None)
        else:
            scheduler = make_scheduler(sampler, self.formulation, self.scheduler_config)
            scheduler.set_timesteps(device=self.device, **self.family.scheduler_kwargs(scheduler, steps, latents))
        extra = {k: v.to(self.device) for k, v in (extra | embedded).items()}
        with self._on_device(*(t.model for t in texts)):  # each tower runs once per prompt batch, not per image
            cond = families.repeat(self.encode_prompts(prompts, height, width, texts), num_images_per_prompt) | extra
            neg = None
            if cfg:
                neg = self.family.encode_negative(texts, negs, negative_prompt is not None, height, width)
                neg = families.repeat(families.to(neg, self.dtype), num_images_per_prompt) | extra
        if ip_adapter_image is not None:
            ip_adapter.condition(self, ip_adapter_image, ip_adapter_scale, n, cond, neg)
        both = families.cat(neg, cond) if neg is not None else None
        if both is None and slg is not None:
            log.info("skip-layer guidance needs classifier-free guidance (guidance > 1); it is off for this call")
            slg = None
        if by_diffusers is None:  # the k-diffusion-style samplers scale the noise to their first sigma themselves
            run = img2img.Start(latents, 0)
        elif source is None:
            run = img2img.Start(latents * getattr(scheduler, "init_noise_sigma", 1.0), 0)
        else:
            run = img2img.start(self, source, scheduler, steps, latents, x0, generator, n)  # FlowMatch sigma: 1
        predict = self._predict
        if cache_interval != 1:
            from gen.fastmode import FeatureCache, forward_fn, kind
            if self._compile is not None and self._fast_forward is None:  # the cached path compiled as well
                self._fast_forward = torch.compile(forward_fn(kind(self.denoiser)), **self._compile)
            cache = FeatureCache(self.denoiser, cache_interval, self._fast_forward)
            predict = lambda x, t, c: cache(x, t, **self.family.denoiser_kwargs(c))  # noqa: E731
        predict = run.wrap(predict) if run.wrap else predict
        if control:
            predict = ctl.Controlled(self, predict, list(control), nets, hints)
        # gen's DiT computes its text keys and values once per run (not when streamed: its blocks' weights move)
        reuse = getattr(self.denoiser, "reusing_context", None) if self._streamed is None else None
        reusing = reuse() if reuse else contextlib.nullcontext()
        with attn.use_backend(self.attention), self._on_device(self.denoiser), reusing:
            if by_diffusers is None:
                latents = ksampling.run(ksampler, plan, predict, run.latents, cond, both, scale, rescale,
                                        guidance_interval, slg, generator, seeds, self._progress_bar_config)
            else:
                latents = denoise(predict, scheduler, run.latents, cond, both, scale, rescale, guidance_interval,
                                  generator, self._progress_bar_config, run.first, run.after_step, slg)
        latents = self.family.unpack(latents, height // f, width // f)

        if output_type == "latent":
            return PipelineOutput(latents, seeds)
        with self._on_device(self.vae):
            images = img2img.finish(source, vae_lib.decode(self.vae, latents))  # (B, 3, H, W) in [0, 1]
        return PipelineOutput.of(images, output_type, seeds)

    def _generators(self, seed, generator, n):
        if generator is not None:
            if isinstance(generator, list) and len(generator) != n:
                raise GenError(f"got {len(generator)} generators for {n} images")
            return [], generator
        if seed is None:
            seed = random.randrange(2 ** 32)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed + n - 1 > MAX_SEED:
            raise GenError(f"seed must be an integer in [0, {MAX_SEED - n + 1}], not {seed!r}")
        seeds = [seed + i for i in range(n)]
        return seeds, [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def _check(self, prompts, negs, steps, scale, rescale, interval, height, width, num_images, sampler, output_type):
        if not all(isinstance(p, str) for p in prompts) or not prompts:
            raise GenError("prompt must be a string or a non-empty list of strings")
        if len(negs) != len(prompts) or not all(isinstance(p, str) for p in negs):
            raise GenError(f"negative_prompt must be a string or a list of {len(prompts)} strings")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise GenError(f"steps must be an integer >= 1, not {steps!r}")
        check_guidance(scale, rescale, tuple(interval))
        m = self.size_multiple
        for side, v in (("height", height), ("width", width)):
            img2img.check_side(side, v, m)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise GenError(f"num_images_per_prompt must be an integer >= 1, not {num_images!r}")
        if output_type not in OUTPUT_TYPES:
            raise GenError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")

