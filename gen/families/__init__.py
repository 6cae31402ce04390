"""Model families: what differs between SD-1.x, SD-2.x, SDXL and gen's DiT lives in one small class each.

A family says which components a model has (text encoders and their tokenizers, the denoiser class and its
folder), how prompts become conditioning (a dict of batch-first tensors) and how that conditioning is handed
to the denoiser, how the family is recognised from a diffusers folder, its LoRA names, and its sampling
defaults. The pipeline, training, LoRA loading, the CLI and `gen info` ask the family; none of them tests for
a model type. ComfyUI's supported_models.py is the shape: a family is a short class in its own module, and
adding one touches that module and its tests only (it registers itself with @register).

Conditioning keys: "hidden" (B, L, D) token states for cross-attention, "pooled" (B, D) a pooled prompt
embedding, and whatever else a family needs ("time_ids" for SDXL). Generic code only stacks, repeats and
selects along the batch dimension (cat, repeat, where below).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch

from gen.errors import GenError

REGISTRY: dict[str, type["Family"]] = {}


def register(cls: type["Family"]) -> type["Family"]:
    REGISTRY[cls.name] = cls
    return cls


class Family:
    """The base family: one CLIP text encoder conditioning a denoiser by cross-attention (SD-1.x)."""

    def __init__(self, index: dict | None = None, configs: dict[str, dict] | None = None):
        """`index`: the folder's model_index.json, `configs`: its parts' configs (folder_configs), where a
        family reads settings from them."""
    name = ""
    title = ""
    pipeline_class = ""  # model_index.json `_class_name` written on save
    denoiser_part = "unet"  # the folder of the denoiser, and its prefix in diffusers LoRA files
    text_parts = (("text_encoder", "tokenizer"),)  # (encoder folder, tokenizer folder), in conditioning order
    kohya_text = {"text_encoder": "lora_te_"}  # text encoder folder -> kohya LoRA key prefix
    kohya_base = ""  # kohya's ss_base_model_version for this family ("": none, gen names it gen_unet)
    # the layout `gen lora` writes unless lora.format says: the one every peer of the family reads
    lora_format = "diffusers"
    # the denoiser's LoRA targets (peft regexes over module names): attention projections, feed-forward layers
    lora_targets = {"attn": r"attn[12]\.(to_q|to_k|to_v|to_out\.0)", "ff": r"ff\.net\.(0\.proj|2)"}
    # how the denoiser's layer names in LoRA files begin (diffusers' and the original layout's): tells families
    # that share kohya's text prefixes apart (lora_families)
    denoiser_blocks = ("down_blocks", "mid_block", "up_blocks", "input_blocks", "middle_block", "output_blocks")
    objective = "DDPM"  # for the README's table and `gen info`
    index_extra: dict = {}  # model_index.json entries besides the components
    text_max_length: dict = {}  # text encoder folder -> the token length its prompts are padded to (else its own)
    fast_mode = True  # whether gen.fastmode's feature cache knows the denoiser
    presets: dict = {}  # model.preset -> the family's denoiser config, for training one from scratch (new_denoiser)
    skip_layers = False  # whether predict() takes skip_layers (skip-layer guidance)
    sequence_part = None  # the text encoder folder whose token length max_sequence_length sets (a T5)

    # ---- components ------------------------------------------------------------------------------
    @staticmethod
    def denoiser_class():
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    @staticmethod
    def text_class(part: str):
        from transformers import CLIPTextModel

        return CLIPTextModel

    @staticmethod
    def tokenizer_class(part: str):
        """The transformers tokenizer class of tokenizer folder `part`."""
        from transformers import CLIPTokenizer

        return CLIPTokenizer

    @classmethod
    def recognises(cls, index: dict, configs: dict[str, dict]) -> bool:
        """Whether a diffusers folder is of this family: its model_index.json and its parts' config.json."""
        raise NotImplementedError

    # ---- single files (the original LDM layout; gen/single_file.py, gen/families/ldm.py) ------------------------
    # Each text tower's (encoder folder, tokenizer folder, key prefix, "hf" | "openclip" | "t5" naming); () = none.
    file_texts: tuple = ()
    file_layout = "LDM"  # the denoiser's original layout: LDM's UNet (gen/families/ldm.py), or "SD3 MMDiT" / "BFL
    # Flux" (gen/families/mmdit_file.py)
    file_optional: tuple = ()  # text encoders a whole file may lack (SD3's T5)
    file_penultimate = False  # the file's last text block is unused (conditioning on the one before)
    # tokenizer folders of OpenCLIP towers (H, bigG): they pad with "!" (id 0), as open_clip and sd-scripts
    # (strategy_sdxl/strategy_sd3: pad_token_id = 0) tokenize; gen's bundled CLIP tokenizer is told so
    file_pad_zero: tuple = ()

    @classmethod
    def recognises_file(cls, keys: set[str], shapes: dict[str, list[int]]) -> bool:
        """Whether a single file's state dict (its keys and tensor shapes) is of this family."""
        return False

    @classmethod
    def refuses_file(cls, keys: set[str], shapes: dict[str, list[int]]) -> str | None:
        """Why a single file that looks like this family cannot be used, or None."""
        return None

    # text encoder folder -> the tower a component file must be there ("CLIP-L", "CLIP-G", "OpenCLIP-H", "T5"),
    # as files name them (gen/components.py)
    file_roles: dict = {}

    @staticmethod
    def file_text_widths(config) -> dict:
        """Text encoder folder -> the width (hidden size, T5's d_model) the denoiser `config` takes from it, where
        it fixes one; a component file of another width is refused."""
        return {}

    @classmethod
    def file_prediction(cls, src) -> tuple[str, str] | None:
        """(prediction type, why) a DDPM file's weights suggest (`src`: its tensors), or None: epsilon."""
        return None

    @classmethod
    def file_convention(cls, prediction_type: str) -> dict:
        """Config values a single file's shapes cannot tell, as the family's released checkpoints have them:
        UNet `heads` (or `head_dim`), `sample_size`, the VAE's latent scale `vae_scale`."""
        raise NotImplementedError

    # ---- conditioning ------------------------------------------------------------------------------
    def encode(self, encoders: list, prompts: list[str], height: int, width: int) -> dict[str, torch.Tensor]:
        """Prompts -> conditioning: CLIP's last hidden states and its pooled output."""
        hidden, pooled = encoders[0](prompts)
        return {"hidden": hidden, "pooled": pooled}

    def encode_negative(self, encoders: list, prompts: list[str], given: bool, height: int, width: int) -> dict:
        """The negative (unconditional) side of classifier-free guidance; `given`: whether the user gave a
        negative prompt (else `prompts` are empty strings)."""
        return self.encode(encoders, prompts, height, width)

    def sized(self, cond: dict, original: torch.Tensor | None, crop: torch.Tensor | None,
              target: tuple[int, int]) -> dict:
        """Training conditioning for images of these sizes: each image's original (height, width) before
        resizing (N, 2), the top-left (top, left) of its crop (N, 2), the (height, width) it trains at. Only
        families with size micro-conditioning (SDXL) use them."""
        return cond

    def train_conditioning(self, encoders: list, prompts: list[str], drop: torch.Tensor, original, crop,
                           target: tuple[int, int]) -> dict:
        """One training batch's conditioning: prompt i's, or where drop[i] (conditioning dropout) the
        unconditional that sampling uses without a negative prompt (encode_negative of ""), for the whole
        text conditioning at once; with the images' sizes (`sized`). Gradients flow into encoders that train."""
        h, w = target
        cond = self.encode(encoders, ["" if d else p for p, d in zip(prompts, drop.tolist())], h, w)
        if bool(drop.any()):
            empty = self.encode_negative(encoders, [""], False, h, w)
            cond = where(~drop.to(cond["hidden"].device), cond, empty)
        return self.sized(cond, original, crop, target)

    def trained_texts(self) -> tuple[str, ...]:
        """The text encoder folders that model.train_text_encoder and lora.text_encoder train (the others stay
        frozen): here every one."""
        return tuple(enc for enc, _ in self.text_parts)

    def train_inputs(self, denoiser, guidance: float | None, n: int) -> dict:
        """Conditioning entries a training batch of n images adds besides the text's (Flux dev: the embedded
        guidance value); `guidance`: the train.guidance key (None: unset)."""
        if guidance is not None:
            raise GenError(f"config key 'train.guidance': this {self.title} model has no guidance input (it is for "
                           "guidance-distilled models, Flux dev); remove the key")
        return {}

    def use_defaults(self, defaults: dict) -> None:
        """Takes the model's own settings that change how its prompts are encoded (gen_config.json's defaults, read
        by Pipeline); here none."""

    def denoiser_options(self, encoders: list) -> dict:
        """Architecture keys of a denoiser built from scratch for these text encoders."""
        return {"cross_attention_dim": encoders[0].model.config.hidden_size}

    def stage_texts(self, text, folder: str | Path) -> list:
        """The family's text encoders made from one `clip` stage's output (model.family: a new model of this family
        on gen's own stages): `text` is the stage's TextEncoder, `folder` its output folder. Here the one encoder
        the family has; a family that needs another kind of tower (Flux: T5) says so."""
        if len(self.text_parts) > 1:
            able = [n for n, f in sorted(REGISTRY.items())
                    if f.stage_texts is not Family.stage_texts or len(f.text_parts) == 1]
            raise GenError(f"config key 'model.family': a {self.title} model's text encoders "
                           f"({', '.join(e for e, _ in self.text_parts)}) cannot all be made from a clip stage's "
                           f"CLIP; families that can: {', '.join(able)}")
        return [text]

    def new_denoiser(self, encoders: list, preset: str, options: dict, latent_channels: int, sample_size: int):
        """A denoiser built from scratch (model.preset, model.options) by a family with its own denoiser class, or
        None where the training task builds gen's DiT or a UNet preset (with denoiser_options)."""
        return None

    def denoiser_kwargs(self, cond: dict[str, torch.Tensor]) -> dict:
        """The denoiser contract's extra inputs: model(x_t, t, **denoiser_kwargs(cond))."""
        return {"encoder_hidden_states": cond["hidden"]}

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict, **control) -> torch.Tensor:
        """One denoiser call: model(x_t, t, **denoiser_kwargs(cond)) -> prediction; `control`: the ControlNets'
        residuals (control_call's keywords, summed)."""
        kwargs = self.denoiser_kwargs(cond)
        if "ip_embeds" in cond:  # an IP-Adapter's image embeddings (gen.ip_adapter), as diffusers passes one adapter's
            kwargs["added_cond_kwargs"] = {**kwargs.get("added_cond_kwargs", {}), "image_embeds": [cond["ip_embeds"]]}
        return denoiser(x, t, return_dict=False, **kwargs, **control)[0]

    # ---- ControlNet (gen/control) ------------------------------------------------------------------------------
    control_classes = ("ControlNetModel",)  # the diffusers ControlNet classes this family's denoiser takes
    control_latent_hint = False  # the hint goes in as VAE latents (SD3, Flux) rather than pixels in [0, 1]

    def control_fits(self, net, denoiser) -> str | None:
        """Why ControlNet `net` cannot steer this denoiser (it was made for another family), or None."""
        for key in ("cross_attention_dim", "addition_embed_type"):
            if net.config.get(key) != denoiser.config.get(key):
                return f"its {key} is {net.config.get(key)}, this model's {denoiser.config.get(key)}"
        return None

    def control_attach(self, net, denoiser) -> None:
        """Gives `net` what it borrows from the denoiser it steers (nothing here; SD3.5's large ControlNets take
        the transformer's patch embedding)."""

    def control_hint(self, pipe, net, image: torch.Tensor, generator, n: int) -> torch.Tensor:
        """The hint as the ControlNet takes it, from the image at the sampling size (1, 3, H, W): here the pixels
        in [0, 1]; latent-hint families encode it (in [-1, 1], control_latent_hint)."""
        return image

    def control_modes(self, net) -> tuple[str, ...] | None:
        """A union ControlNet's mode names by index (its `mode=`), or None for a single-mode ControlNet."""
        return None

    def new_controlnet(self, denoiser, hint_channels: tuple[int, ...]):
        """A zero-initialised ControlNet for this denoiser (stage=controlnet): diffusers' ControlNetModel.from_unet,
        the UNet's encoder copied, its hint encoder `hint_channels` wide per level."""
        from diffusers import ControlNetModel

        return ControlNetModel.from_unet(denoiser, conditioning_embedding_out_channels=hint_channels)

    def control_train_hint(self, vae, net, pixels: torch.Tensor, generator) -> torch.Tensor:
        """A training batch's hints (N, 3, H, W) in [0, 1] as the ControlNet takes them (what control_hint makes
        when sampling; latent-hint families draw the posterior sample from the training generator)."""
        return pixels

    def control_call(self, net, x: torch.Tensor, t: torch.Tensor, cond: dict, hint: torch.Tensor,
                     scale: float, mode: int | None = None) -> dict:
        """One ControlNet's residuals for this step, as predict's keywords (StableDiffusionControlNetPipeline);
        `mode`: a union ControlNet's mode index (control_modes)."""
        down, mid = net(x, t, controlnet_cond=hint, conditioning_scale=scale, return_dict=False,
                        **self.denoiser_kwargs(cond))
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def guidance(self, denoiser, scale: float, true_cfg: float | None, negative_given: bool,
                 n: int) -> tuple[float, dict]:
        """(the classifier-free guidance scale of the sampling loop, conditioning entries for n images): here
        the user's scale, none; a family with embedded guidance (Flux) feeds the scale to the denoiser."""
        if true_cfg is not None:
            raise GenError(f"true_cfg_scale is for guidance-embedding models (Flux dev); a {self.title} model "
                           f"takes guidance_scale")
        return scale, {}

    # ---- latents and timesteps ---------------------------------------------------------------------
    def latent_shape(self, denoiser, n: int, height: int, width: int) -> tuple[int, ...]:
        """The shape the initial noise is drawn in, for latents of height x width (image size / VAE factor): the
        denoiser's output channels (an inpainting UNet takes 9 channels in, 4 of them latents)."""
        return (n, denoiser.config.out_channels or denoiser.config.in_channels, height, width)

    def pack(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Noise in latent_shape -> the denoiser's input layout, and conditioning that layout adds (position ids)."""
        return latents, {}

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The denoiser's layout -> (B, C, height, width) latents for the VAE."""
        return latents

    def scheduler_kwargs(self, scheduler, steps: int, latents: torch.Tensor) -> dict:
        """scheduler.set_timesteps arguments for sampling these (packed) latents in `steps` steps."""
        return {"num_inference_steps": steps}

    # ---- LoRA files ------------------------------------------------------------------------------------
    def kohya_version(self, denoiser, formulation=None) -> str:
        """kohya's ss_base_model_version for a LoRA of this denoiser trained with this formulation (None:
        epsilon DDPM); what sd-scripts would not write (another objective, a non-standard width) is gen's own
        name, gen_unet."""
        return "gen_unet"

    def lora_from_file(self, factors: dict, kohya: bool, denoiser) -> dict:
        """A LoRA file's denoiser layers ({name: Factor}, names flat for a kohya file) -> named as the diffusers
        model names them: here as they are; a family with an original layout (SD3, Flux) maps its names."""
        return factors

    def lora_to_file(self, factors: dict, denoiser) -> dict:
        """The denoiser's LoRA layers ({diffusers layer: Factor}) -> as a kohya file names them (dotted)."""
        return factors

    @classmethod
    def owns_kohya_version(cls, version: str) -> bool:
        return bool(cls.kohya_base) and version.removesuffix("_v") == cls.kohya_base

    # ---- geometry and defaults -----------------------------------------------------------------------
    def size_multiple(self, denoiser, vae_factor: int) -> int:
        return vae_factor

    def default_settings(self, denoiser, vae_factor: int, flow: bool) -> dict:
        return dict(steps=28 if flow else 50, guidance=5.0 if flow else 7.5,
                    height=denoiser.config.sample_size * vae_factor, width=denoiser.config.sample_size * vae_factor)

    def index(self, scheduler_class: str) -> dict:
        """model_index.json of a saved folder."""
        import diffusers

        out = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__}
        for enc, tok in self.text_parts:
            out[enc] = ["transformers", self.text_class(enc).__name__]
            out[tok] = ["transformers", self.tokenizer_class(tok).__name__]
        denoiser = self.denoiser_class()
        out[self.denoiser_part] = [denoiser.__module__.split(".")[0], denoiser.__name__]
        out |= {"vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", scheduler_class]}
        return out | self.index_extra


def _load_families() -> None:
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")


def families() -> list[type[Family]]:
    """Every registered family, most specific first (SD-1.x, the fallback UNet family, last)."""
    _load_families()
    return sorted(REGISTRY.values(), key=lambda f: f.name == "sd1")


def get(name: str) -> Family:
    _load_families()
    if name not in REGISTRY:
        raise GenError(f"unknown model family {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def sequence_length(n, low: int, what: str) -> int:
    """`n` as a T5 token length (or an absent T5's zero count, from `low` 0), else a GenError naming `what`."""
    if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= 512:
        raise GenError(f"{what} must be an integer in [{low}, 512], not {n!r}")
    return n


def folder_configs(path: Path, index: dict) -> dict[str, dict]:
    """Each part's config.json (or scheduler_config.json) in a diffusers folder, {} where absent."""
    from gen.io import read_json

    out = {}
    for part in index:
        if part.startswith("_"):
            continue
        for name in ("config.json", "scheduler_config.json"):
            if (path / part / name).is_file():
                out[part] = read_json(path / part / name)
                break
    return out


def detect_folder(path: Path, index: dict) -> Family:
    """The family of a diffusers folder, or a GenError that says what the folder is and what gen loads."""
    configs = folder_configs(path, index)
    for fam in families():
        refusal = getattr(fam, "refuses", lambda i, c: None)(index, configs)
        if refusal:
            raise GenError(f"{path}: {refusal}")
        if fam.recognises(index, configs):
            return fam(index, configs)
    known = ", ".join(f.title for f in families())
    raise GenError(f"{path}: {index.get('_class_name', 'this pipeline')} is not a model family gen knows "
                   f"({known})")


def detect_models(denoiser, text_encoders: list) -> Family:
    """The family of live models (a Pipeline built in Python rather than loaded from a folder)."""
    index = {f"text_encoder{'_' + str(i + 1) if i else ''}": ["transformers", type(t).__name__]
             for i, t in enumerate(text_encoders)}
    part = "transformer" if not hasattr(denoiser.config, "block_out_channels") else "unet"
    index[part] = [type(denoiser).__module__.split(".")[0], type(denoiser).__name__]
    configs = {part: dict(denoiser.config)} | {k: t.config.to_dict() for k, t in
                                               zip(index, text_encoders)}
    for fam in families():
        if fam.recognises(index, configs):
            return fam(index, configs)
    raise GenError(f"no model family for a {type(denoiser).__name__} with {len(text_encoders)} text encoder(s)")


def lora_families(texts: dict[str, str | None], metadata: dict, layers=()) -> list[type[Family]]:
    """The families a LoRA file fits: the one gen recorded (gen.family), else the one kohya's
    ss_base_model_version names, else those with these text encoder folders ({folder: kohya prefix, or None
    for a diffusers file}), narrowed to those whose denoiser has these `layers` (names, dotted or kohya-flat)
    where that leaves any (SDXL and SD3 share kohya's lora_te1_/lora_te2_)."""
    every = families()
    named = [f for f in every if f.name == metadata.get("gen.family")] or \
        [f for f in every if f.owns_kohya_version(metadata.get("ss_base_model_version", ""))]
    fit = named or [f for f in every if all(p in f.kohya_text.values() if p else c in f.kohya_text
                                            for c, p in texts.items())]
    return [f for f in fit if any(n.startswith(f.denoiser_blocks) for n in layers)] or fit


def kohya_prefixes() -> dict[str, str]:
    """Every kohya LoRA key prefix a family uses -> its component (the denoiser or a text encoder folder)."""
    out = {"lora_unet_": "denoiser"}
    for fam in families():
        out |= {p: folder for folder, p in fam.kohya_text.items()}
    return out


def projected_text(text, folder: str | Path):
    """A clip stage's text tower as a CLIPTextModelWithProjection (SDXL's second tower, SD3's two), with the text
    projection the stage learned contrastively, from its clip/ folder (both towers); a folder without one (a model
    folder's text_encoder/ only) gets a new projection, said in the log."""
    import copy
    import logging

    from transformers import CLIPTextModelWithProjection

    from gen.io import load_state_dict, read_json
    from gen.models.text import TextEncoder

    config = copy.deepcopy(text.model.config)
    clip = Path(folder) / "clip"
    weights = sorted(clip.glob("*.safetensors")) if (clip / "config.json").is_file() else []
    config.projection_dim = read_json(clip / "config.json")["projection_dim"] if weights else config.hidden_size
    model = CLIPTextModelWithProjection(config)
    model.text_model.load_state_dict(text.model.state_dict())  # CLIPTextModel's keys are its text_model's
    if weights:
        model.text_projection.load_state_dict({"weight": load_state_dict(weights[0])["text_projection.weight"]})
    else:
        logging.getLogger("gen").warning("model.text_encoder %s has no clip/ folder (a clip stage's two towers): the "
                                         "text projection starts from random weights", folder)
    return TextEncoder(model.to(text.model.dtype), text.tokenizer)


def new_model(family: Family, preset: str, options: dict):
    """family.denoiser_class() built from one of family.presets updated with `options`; a GenError naming the
    config key for an unknown preset or a bad option."""
    if preset not in family.presets:
        raise GenError(f"config key 'model.preset': {preset!r} is not a {family.title} preset; known: "
                       f"{', '.join(family.presets)} (model.options sets any of the denoiser's config keys)")
    try:
        return family.denoiser_class()(**family.presets[preset] | options)
    except (TypeError, ValueError) as e:
        raise GenError(f"config key 'model.options': {e}") from None


# ---- conditioning dicts: batch-dimension operations -----------------------------------------------------
def cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def repeat(cond: dict, n: int) -> dict:
    return {k: v.repeat_interleave(n, 0) for k, v in cond.items()}


def where(mask: torch.Tensor, a: dict, b: dict) -> dict:
    """Row i from a where mask[i], else from b (b's rows may be a single row, broadcast)."""
    return {k: torch.where(mask.view(-1, *[1] * (v.ndim - 1)), v, b[k]) for k, v in a.items()}


def to(cond: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
