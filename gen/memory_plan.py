"""The memory planner: the peak device memory of sampling with each memory option, and of LoRA training, predicted
from the model built on the meta device (shapes only, no weights, any size), as `gen info --memory` prints it and
`gen sample --max-memory` uses it.

A model is its components' classes and configs: a diffusers folder's config.json files, a preset with the released
models' configs (FAMILIES, below; written out from their config.json files: nothing downloads), or a single file's
family preset. Sampling runs three phases, each holding some weights on the device plus its transient tensors:
  text     the text towers encode the prompt (and the negative: batch 2, 1 for a guidance-distilled model)
  denoise  the denoiser runs on the latents (batch 2 with CFG)
  decode   the VAE decodes one image
The transient bytes of a phase are the peak of the live tensors its forward allocates, counted on the meta device by
a dispatch mode (LiveBytes: every non-view result counted while it lives; attention as a fused kernel's output,
never the N x M score matrix), in the compute dtype. An option sets which weights a phase holds and their bytes:
  resident     everything, at the dtype's bytes
  offload      (--offload) the phase's own component(s) only
  group        (--offload group) the denoiser and T5 streamed a block at a time: their parts outside the blocks
               plus two blocks (the running one and the prefetched next); CLIP towers and the VAE whole
  sequential   (--offload sequential) as group, with layers instead of blocks
  fp8          (--weights fp8) the denoiser's and text towers' Linear/Conv weights that gen.quant stores (not
               norms, embeddings, skip patterns) at 1 byte, plus the largest such layer upcast while it runs
  gguf-q4      a GGUF Q4_0 denoiser file: those weights of the denoiser at 18 bytes per 32 (a block of 4-bit
               values and an fp16 scale), plus the largest layer dequantized (fp32, then the dtype)
  nf4, int8    (--weights nf4 / int8, bitsandbytes) the Linear layers among fp8's (bitsandbytes has no Conv) at
               4.5 bits (nf4: 4-bit values, an 8-bit absmax per 64 and its fp32 scale per 256 blocks) or 1 byte plus
               an fp32 scale per row (counted as 1), plus the largest layer dequantized while it runs
Peak = max over phases of (weights held + transient). Not counted: the CUDA context and the allocator's cache
(fragmentation), which add a few hundred MiB on a GPU. LoRA training: gen.memory_train's formula.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from gen.errors import GenError
from gen.memory_train import build, denoiser_key, estimate, family_forward, family_models, fused_attention_on_meta

# ---- the released models' configs (diffusers / transformers config.json of each folder) ---------------------------
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
VAE_SD = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
VAE_16 = VAE_SD | dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = SD35_LARGE | dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))

# family -> {component: (builder, config)}, text encoders first
FAMILIES = {
    "SD-1.5": {"CLIP-L": (CLIPTextModel, CLIP_L),
               "UNet": (UNet2DConditionModel, dict(sample_size=64, cross_attention_dim=768)),
               "VAE": (AutoencoderKL, VAE_SD)},
    "SDXL": {"CLIP-L": (CLIPTextModel, CLIP_L), "CLIP-G": (CLIPTextModelWithProjection, CLIP_G),
             "UNet": (UNet2DConditionModel, SDXL_UNET), "VAE": (AutoencoderKL, VAE_SD)},
    "SD3.5-medium": {"CLIP-L": (CLIPTextModelWithProjection, CLIP_L), "CLIP-G": (CLIPTextModelWithProjection, CLIP_G),
                     "T5-XXL": (T5EncoderModel, T5_XXL), "MMDiT": (SD3Transformer2DModel, SD35_MEDIUM),
                     "VAE": (AutoencoderKL, VAE_16)},
    "SD3.5-large": {"CLIP-L": (CLIPTextModelWithProjection, CLIP_L), "CLIP-G": (CLIPTextModelWithProjection, CLIP_G),
                    "T5-XXL": (T5EncoderModel, T5_XXL), "MMDiT": (SD3Transformer2DModel, SD35_LARGE),
                    "VAE": (AutoencoderKL, VAE_16)},
    "Flux-dev": {"CLIP-L": (CLIPTextModel, CLIP_L), "T5-XXL": (T5EncoderModel, T5_XXL),
                 "MMDiT": (FluxTransformer2DModel, FLUX_DEV), "VAE": (AutoencoderKL, VAE_16)},
}
PRESETS = {"sd15": "SD-1.5", "sdxl": "SDXL", "sd3.5-medium": "SD3.5-medium", "sd3.5-large": "SD3.5-large",
           "flux-dev": "Flux-dev"}  # gen info --memory NAME


def count(cls, config: dict) -> int:
    """Weights of a component, built on the meta device (shapes only): its parameters and buffers (SD3's
    positional embedding is a buffer: 226M values in SD3.5-medium)."""
    with torch.device("meta"):
        model = build(cls, config)
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()])


GIB = 2 ** 30
Q4_0 = 18 / 32  # GGUF Q4_0: blocks of 32 values in 16 bytes + an fp16 scale
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # bitsandbytes nf4 with double quantization (its default in gen/quant/bnb.py)
# --max-memory tries these in order, the fastest first: (label, --weights, --offload)
CHOICES = (("resident", None, None), ("fp8", "fp8", None), ("offload", None, "model"), ("fp8+offload", "fp8", "model"),
           ("group", None, "group"), ("fp8+group", "fp8", "group"), ("sequential", None, "sequential"))
OPTIONS = CHOICES[:2] + (("nf4", "nf4", None), ("int8", "int8", None), ("gguf-q4", "gguf-q4", None)) + CHOICES[2:4] \
    + (("nf4+offload", "nf4", "model"), ("gguf-q4+offload", "gguf-q4", "model"), *CHOICES[4:])


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensors allocated while it is on and still alive: every result of an operator that is
    not a view or in place counts its storage's bytes until it is freed (a weakref finalizer). On the meta device
    nothing is allocated and the count is the model's alone."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new storage
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def transient(run) -> int:
    """Peak bytes of the live tensors `run()` allocates, no grad, attention counted as a fused kernel's."""

    with torch.no_grad(), fused_attention_on_meta(), LiveBytes() as live:
        run()
    return live.peak


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' (width x height) or '1024' -> (height, width) in pixels."""
    m = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if not m or int(m[1]) < 8:
        raise GenError(f"a size is WIDTHxHEIGHT or one number of pixels (e.g. 1024x768), not {text!r}")
    w = int(m[1])
    return (int(m[2]) if m[2] else w), w


def parse_memory(text: str) -> int:
    """'12GiB', '12GB', '800MiB', '1.5G' or bytes -> bytes (G / GiB / GB all 2**30: as GPUs are sold and shown)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    try:
        value = float(m[1]) * 1024 ** " KMGT".index((m[2] or " ").upper())
    except (TypeError, ValueError):
        raise GenError(f"a memory size is a number with a unit, like 12GiB or 800MiB, not {text!r}") from None
    if value <= 0:
        raise GenError(f"a memory budget must be positive, not {text!r}")
    return int(value)


# ---- a model on the meta device --------------------------------------------------------------------------------
def folder_parts(path: Path) -> dict:
    """A diffusers folder -> {component: (class, config)} (text_encoder*, the denoiser, VAE), from its config files."""
    from gen import families
    from gen.io import read_json

    path = Path(path)
    index = read_json(path / "model_index.json")
    family = families.detect_folder(path, index)
    configs = families.folder_configs(path, index)
    parts = {name: (family.text_class(name), configs[name]) for name in index if name.startswith("text_encoder")
             and isinstance(index[name], list) and index[name][0] is not None}
    for name in ("unet", "transformer"):
        if name in configs:
            parts[name] = (family.denoiser_class(), configs[name])
    return parts | {"VAE": (AutoencoderKL, configs["vae"])}


def file_parts(path: Path) -> tuple[dict, str]:
    """A single file -> (the preset of its family, which preset): gen plans a file by its family's released model."""
    from gen import single_file
    from gen.file_source import header

    shapes, _ = header(path)
    family = single_file.detect(path, shapes)
    blocks = {m[1] for k in shapes for m in [re.search(r"(?:^|\.)(?:joint|transformer)_blocks\.(\d+)\.", k)] if m}
    sd3 = "sd3.5-medium" if len(blocks) <= 24 else "sd3.5-large"  # 24 or 38 MMDiT blocks
    name = {"sd1": "sd15", "sdxl": "sdxl", "flux": "flux-dev", "sd3": sd3}.get(family.name)
    if name is None:
        raise GenError(f"{path}: gen plans {family.title} files by a folder of the model (no preset for it here)")
    return FAMILIES[PRESETS[name]], name


def model_parts(model: str) -> tuple[dict, str]:
    """MODEL (a preset name, a diffusers folder, a .safetensors file) -> ({component: (class, config)}, a title)."""
    if model.lower() in PRESETS:
        return FAMILIES[PRESETS[model.lower()]], f"{PRESETS[model.lower()]} (released configs)"
    path = Path(model)
    if path.is_dir() and (path / "model_index.json").is_file():
        return folder_parts(path), f"folder {path}"
    if path.is_file() and path.suffix == ".safetensors":
        parts, name = file_parts(path)
        return parts, f"file {path} (planned as the {name} preset, its family's released model)"
    raise GenError(f"{model} is neither a preset ({', '.join(PRESETS)}) nor a model folder nor a .safetensors file")


@dataclass(eq=False)
class Part:
    """One component on the meta device: its kind (text, denoiser, vae), whether it streams under group /
    sequential offload (the denoiser and a T5, as Pipeline), which weights gen.quant stores under fp8, and which of
    those are Linear (bitsandbytes quantizes only these)."""
    kind: str
    module: torch.nn.Module
    streams: bool
    stored: set
    linear: set

    def storage(self, weights: str | None) -> tuple[float | None, set]:
        """(bytes per stored weight, the weights so stored) of this part under --weights `weights`."""
        per = stored_bytes(weights, self.kind)
        return per, (self.linear if weights in ("nf4", "int8") else self.stored) if per is not None else set()

    def nbytes(self, module: torch.nn.Module, prefix: str, weights: str | None, b: int) -> float:
        """Bytes of `module` (this part's submodule at `prefix`) with its weights stored as `weights` stores them."""
        per, stored = self.storage(weights)
        n = 0.0
        for name, t in [*module.named_parameters(prefix), *module.named_buffers(prefix)]:
            each = (per if name in stored else b if t.is_floating_point() else t.element_size())
            n += t.numel() * each
        return n

    def held(self, mode: str | None, weights: str | None, b: int) -> float:
        """Bytes on the device while it runs: whole, or streamed (outside the blocks/layers + two of them)."""
        from gen.memory import blocks

        m = self.module
        if not self.streams or mode not in ("group", "sequential"):
            return self.nbytes(m, "", weights, b)
        if mode == "group":
            units = blocks(m)
        else:
            units = [(name, leaf) for name, leaf in m.named_modules()
                     if not list(leaf.children()) and any(True for _ in leaf.parameters(recurse=False))]
        sizes = [self.nbytes(u, name, weights, b) for name, u in units]
        whole = self.nbytes(m, "", weights, b)
        return min(whole, whole - sum(sizes) + 2 * max(sizes, default=0))  # a model of two blocks: all of it

    def upcast(self, weights: str | None, b: int) -> float:
        """The transient of a stored weight upcast while its layer runs: the largest one (GGUF: via fp32)."""
        per, stored = self.storage(weights)
        if not stored:
            return 0
        largest = max(t.numel() for name, t in self.module.named_parameters() if name in stored)
        return largest * (4 + b if weights == "gguf-q4" else b)


def quantized(model: torch.nn.Module) -> tuple[set, set]:
    """The weights of `model` gen.quant stores (fp8: Linear and Conv) and those bitsandbytes quantizes (Linear)."""
    from gen.quant import eligible

    layers = eligible(model)
    return ({f"{n}.weight" for n, _ in layers},
            {f"{n}.weight" for n, m in layers if type(m) is torch.nn.Linear})


def stored_bytes(weights: str | None, kind: str) -> float | None:
    """Bytes per stored weight of a part of `kind` under --weights `weights` (None: not stored)."""
    if weights in ("fp8", "int8") and kind in ("text", "denoiser"):
        return 1
    if weights == "nf4" and kind in ("text", "denoiser"):
        return NF4
    if weights == "gguf-q4" and kind == "denoiser":
        return Q4_0
    return None


@dataclass
class Row:
    option: str
    weights: str | None
    offload: str | None
    peak: float
    phase: str  # the phase that peaks


@dataclass
class Planned:
    title: str
    height: int
    width: int
    dtype: torch.dtype
    rows: list
    training: list  # (label, gen.memory_train.Memory)

    def row(self, option: str) -> Row:
        return next(r for r in self.rows if r.option == option)


class MetaModel:
    """A model's components on the meta device in the compute dtype, and its phases' transient bytes at a size."""

    def __init__(self, parts: dict, dtype: torch.dtype):
        from gen.prompt_weights import is_clip

        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # .to(dtype) on meta models warns of fp32 modules they have none of
        self.parts, self.dtype = parts, dtype
        towers, self.texts, vae, denoiser, self.family = family_models(parts, dtype)
        self.vae, self.denoiser = vae.to(dtype), denoiser.to(dtype)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.components = [Part("text", t, not is_clip(t), *quantized(t)) for t in towers]
        self.components += [Part("denoiser", self.denoiser, True, *quantized(self.denoiser)),
                            Part("vae", self.vae, False, set(), set())]

    def native_size(self) -> tuple[int, int]:
        if getattr(self.denoiser.config, "sample_size", None) is None:
            return 1024, 1024  # Flux: no sample_size in its config; diffusers' FluxPipeline default
        s = self.family.default_settings(self.denoiser, self.factor, True)
        return s["height"], s["width"]

    def cfg_batch(self) -> int:
        """2 with classifier-free guidance (prompt + negative), 1 for a guidance-distilled model (Flux-dev)."""
        return 1 if getattr(self.denoiser.config, "guidance_embeds", False) else 2

    def transients(self, height: int, width: int) -> dict[str, int]:

        n, lh, lw = self.cfg_batch(), height // self.factor, width // self.factor
        run = family_forward(self.family, self.texts)(self.denoiser, n, (lh, lw), self.dtype)
        z = torch.empty(1, self.vae.config.latent_channels, lh, lw, device="meta", dtype=self.dtype)
        return {"text": transient(lambda: self.family.encode(self.texts, [""] * n, height, width)),
                "denoise": transient(run), "decode": transient(lambda: self.vae.decode(z))}

    def peak(self, weights: str | None, offload: str | None, act: dict[str, int]) -> tuple[float, str]:
        """(peak bytes, the phase at it) of sampling with --weights `weights` --offload `offload`."""
        b = self.dtype.itemsize
        phases = {"text": "text", "denoise": "denoiser", "decode": "vae"}
        held = {c: c.held(offload, weights, b) for c in self.components}
        out = []
        for phase, kind in phases.items():
            running = [c for c in self.components if c.kind == kind]
            on = running if offload else self.components
            extra = max((c.upcast(weights, b) for c in running), default=0)
            out.append((sum(held[c] for c in on) + act[phase] + extra, phase))
        return max(out)

    def lora_training(self, height: int, width: int) -> list[tuple[str, object]]:
        """LoRA training rows (rank 16 on the family's attention targets, batch 1, AdamW, autocast in the dtype;
        text towers and VAE resident): checkpointing off, on, and on with the base's weights stored fp8."""
        import dataclasses


        compute = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        frozen = sum(p.numel() for c in self.components if c.kind != "denoiser" for p in c.module.parameters())
        lora = dict(presets=self.family.lora_targets, rank=16, alpha=16, parts=("attn",))
        name = denoiser_key(self.parts)
        rows = []
        for ckpt in (False, True):
            mem = estimate(lambda: build(*self.parts[name]), 1, (height // self.factor, width // self.factor),
                           compute, ckpt, ema=False, frozen_params=frozen, lora=lora,
                           inputs=family_forward(self.family, self.texts))
            rows.append((f"LoRA, checkpointing {'on' if ckpt else 'off'}", mem))
        den = self.components[-2]
        saved = sum(p.numel() for n, p in den.module.named_parameters() if n in den.stored) * (self.dtype.itemsize - 1)
        rows.append(("LoRA, checkpointing on, fp8 base", dataclasses.replace(mem, weights=int(mem.weights - saved))))
        return rows


def plan(model: str, size: str | None = None, dtype: torch.dtype = torch.bfloat16, training: bool = True,
         options=OPTIONS) -> Planned:
    """The predicted peaks of MODEL (a preset name, a folder, a file) at `size` ('WxH', default its native size)."""
    parts, title = model_parts(model)
    meta = MetaModel(parts, dtype)
    height, width = parse_size(size) if size else meta.native_size()
    act = meta.transients(height, width)
    rows = [Row(label, w, o, *meta.peak(w, o, act)) for label, w, o in options]
    return Planned(title, height, width, dtype, rows, meta.lora_training(height, width) if training else [])


def choose(planned: Planned, budget: int) -> Row:
    """The fastest setting that fits `budget` bytes (CHOICES' order), or a GenError saying none does."""
    for label, _, _ in CHOICES:
        row = planned.row(label)
        if row.peak <= budget:
            return row
    least = min((planned.row(label) for label, _, _ in CHOICES), key=lambda r: r.peak)
    raise GenError(f"no setting fits --max-memory {human(budget)} at {planned.width}x{planned.height}: the least, "
                   f"{least.option}, needs {human(least.peak)} (predicted); raise the budget or sample smaller")


def human(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def table(planned: Planned) -> str:
    dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[planned.dtype]
    big = max(r.peak for r in planned.rows) >= GIB
    unit, scale = ("GiB", GIB) if big else ("MiB", 2 ** 20)
    lines = [f"memory plan: {planned.title}, {planned.width}x{planned.height}, {dt} (predicted peak device memory, "
             f"{unit}: weights held + the running phase's tensors)",
             f"  {'option':<18}{'--weights':<11}{'--offload':<12}{'peak':>7}  at"]
    for r in planned.rows:
        w = {"gguf-q4": "gguf Q4_0", None: "-"}.get(r.weights, r.weights)
        lines.append(f"  {r.option:<18}{w:<11}{r.offload or '-':<12}{r.peak / scale:7.2f}  {r.phase}")
    if planned.training:
        lines.append("  training (batch 1, AdamW; LoRA rank 16 on attention; text towers and VAE resident):")
        lines += [f"  {label:<41}{m.peak / scale:7.2f}" for label, m in planned.training]
    return "\n".join(lines)


def fit(model: str, budget_text: str, size: str | None, dtype: torch.dtype) -> tuple[Row, str]:
    """gen sample --max-memory: (the fastest setting predicted to fit, the line that says so)."""
    budget = parse_memory(budget_text)
    planned = plan(model, size, dtype, training=False, options=CHOICES)
    row = choose(planned, budget)
    return row, (f"gen: --max-memory {human(budget)}: {row.option} (--weights {row.weights or 'auto'} --offload "
                 f"{row.offload or 'none'}), predicted peak {human(row.peak)} at {planned.width}x{planned.height}")


def info(model: str, size: str | None, dtype: torch.dtype, weights: str | None, offload: str | None) -> str:
    """gen info --memory: the table, its rows limited to --weights (full, fp8, nf4, int8, gguf-q4) and --offload (none, model,
    group, sequential) where given."""
    want_w, want_o = {"full": None}.get(weights, weights), {"none": None}.get(offload, offload)
    options = [o for o in OPTIONS if (weights is None or o[1] == want_w) and (offload is None or o[2] == want_o)]
    if not options:
        raise GenError(f"no planned setting has --weights {weights} with --offload {offload}")
    return table(plan(model, size, dtype, options=options))
