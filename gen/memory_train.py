"""Peak training memory from a formula (bench/train_memory.py prints it per recipe and checks it against measured
peaks; gen.memory_plan prints it per model for a LoRA). For one optimizer step (AdamW, autocast mixed precision):
    weights      trainable parameters in fp32 (accelerate keeps fp32 masters) + frozen parts (VAE, text
                 encoder(s), a LoRA's base) in the weight dtype + the denoiser's buffers with its weights
    gradients    trainable x 4;  optimizer: trainable x 8 (AdamW's two moments);  EMA: trainable x 4
    activations  what autograd keeps from the denoiser's forward for its backward, counted exactly by
                 torch.autograd.graph.saved_tensors_hooks on a model built on the meta device (no memory,
                 no compute, any size), tensors in the autocast dtype; plus the autocast copies of the
                 trainable weights. With gradient checkpointing: what is saved outside the checkpointed
                 units, their inputs, and the largest unit's activations (recomputed one unit at a time).
    peak         = weights + optimizer + EMA + max(activations, gradients + the larger of AdamW's
                 temporaries and (checkpointing) one unit's recomputed activations)
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from gen.models.text import TextEncoder

DTYPE_BYTES = {"no": 4, "bf16": 2, "fp16": 2}

@dataclasses.dataclass
class Memory:
    """One training step's memory, bytes."""

    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int
    adam_temp: int
    recompute: int = 0  # with checkpointing: the largest unit's activations, rebuilt while gradients fill up

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.ema + max(self.activations,
                                                              self.gradients + max(self.adam_temp, self.recompute))


class _FlashAttentionSaves(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient on CUDA, flash on CPU) keeps for backward:
    q, k, v, the output and the row log-sum-exp, never the N x M score matrix. On the meta device torch
    takes the math path, which would count that matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


@contextlib.contextmanager
def fused_attention_on_meta():
    sdpa = F.scaled_dot_product_attention

    def patched(*args, **kwargs):  # diffusers' dispatcher (Flux, SD3) passes query=, key=, value=
        q, k, v, *rest = (*args, *(kwargs.pop(n) for n in ("query", "key", "value") if n in kwargs))
        return _FlashAttentionSaves.apply(q, k, v) if q.device.type == "meta" else sdpa(q, k, v, *rest, **kwargs)

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def saved_activation_bytes(model: torch.nn.Module, run, checkpointing: bool) -> tuple[int, int]:
    """(bytes autograd keeps after `run()` (a forward of `model`), parameters excluded, each storage once;
    the largest checkpointable unit's share). With `checkpointing`, what stays alive under checkpointing: the
    saves outside the checkpointed units, the units' inputs, and the largest unit's activations (its
    recompute, during backward)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    outside, inputs, units = {}, {}, []

    def counter(into: dict):
        def pack(t: torch.Tensor):
            st = t.untyped_storage()
            if st._cdata not in params:
                into[st._cdata] = st.nbytes()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def unit(fn, *args):  # diffusers calls this for each checkpointed block when checkpointing is on
        for a in args:
            if isinstance(a, torch.Tensor) and a.untyped_storage()._cdata not in params:
                inputs[a.untyped_storage()._cdata] = a.untyped_storage().nbytes()
        units.append({})
        with counter(units[-1]):
            return fn(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=unit)
    try:
        with counter(outside), fused_attention_on_meta():
            run()
    finally:
        model.disable_gradient_checkpointing()
    biggest = max((sum(u.values()) for u in units), default=0)
    if not checkpointing:
        return sum({**outside, **{k: v for u in units for k, v in u.items()}}.values()), biggest
    return sum({**outside, **inputs}.values()) + biggest, biggest


def denoiser_inputs(model, batch: int, latent: int, device, dtype, text_tokens: int = 77) -> dict:
    c = model.config
    d = c.cross_attention_dim
    kw = dict(sample=torch.randn(batch, c.in_channels, latent, latent, device=device, dtype=dtype),
              timestep=torch.rand(batch, device=device), return_dict=False,
              encoder_hidden_states=torch.randn(batch, text_tokens, d, device=device, dtype=dtype))
    if getattr(c, "pooled_projection_dim", None):
        kw["pooled_projections"] = torch.randn(batch, c.pooled_projection_dim, device=device, dtype=dtype)
    return kw


def family_forward(family, texts: list):
    """inputs(model, batch, latent, dtype) -> the forward of train/task.py's step for a family with its own
    input layout (SD3, Flux), asked of the family: its encode on `texts` (ZeroTokens: the towers' real forward,
    no grad), its latent_shape, pack and train_inputs, its predict; on the model's device (meta: shapes only)."""
    def inputs(model, batch: int, latent: int | tuple[int, int], dtype):
        device = next(model.parameters()).device
        h, w = latent if isinstance(latent, tuple) else (latent, latent)  # latent cells
        with torch.device(device):
            with torch.no_grad():
                cond = family.encode(texts, [""] * batch, h, w)
            x, extra = family.pack(torch.randn(family.latent_shape(model, batch, h, w), dtype=dtype))
            extra |= family.train_inputs(model, None, batch)
            t = torch.rand(batch) * 1000  # the flow formulation's model_timestep: sigma x 1000
        return lambda: family.predict(model, x, t, cond | {k: v.to(device) for k, v in extra.items()})
    return inputs


def estimate(build, batch: int, latent: int, compute: str, checkpointing: bool, ema: bool,
             frozen_params: int = 0, lora: dict | None = None, device_type: str = "cuda", inputs=None) -> Memory:
    """The formula for the denoiser `build()` makes (on the meta device), trained at `batch` x `latent`^2
    (or latent = (h, w) with `inputs`).
    `lora`: lora_config arguments (presets: the family's lora_targets, rank, parts, ...): the denoiser is frozen
    and only the adapter trains. `inputs`: a family_forward (default: denoiser_inputs, gen's DiT and UNets)."""
    with torch.device("meta"):
        model = build()
        if lora:
            from peft import inject_adapter_in_model

            from gen.lora import lora_config

            model.requires_grad_(False)
            inject_adapter_in_model(lora_config(**lora), model)
    dtype = torch.float32 if compute == "no" else torch.bfloat16
    model.to(dtype)
    trainable = sum(p.numel() for n, p in model.named_parameters() if not lora or ".lora_" in n)
    frozen = sum(p.numel() for p in model.parameters()) - trainable + frozen_params
    # buffers (SD3's positional embedding: 226M values in SD3.5-medium) live with the denoiser's weights
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    if inputs is None:
        kw = denoiser_inputs(model, batch, latent, "meta", dtype)
        run = lambda: model(**kw)  # noqa: E731
    else:
        run = inputs(model, batch, latent, dtype)
    act, unit = saved_activation_bytes(model, run, checkpointing)
    act += trainable * DTYPE_BYTES[compute] if compute != "no" else 0  # autocast's copies of fp32 weights
    held = DTYPE_BYTES[compute] if lora else 4  # a LoRA's base in the weight dtype, a trained denoiser in fp32
    return Memory(weights=4 * trainable + DTYPE_BYTES[compute] * frozen + held * buffers, gradients=4 * trainable,
                  optimizer=8 * trainable, ema=4 * trainable if ema else 0, activations=act,
                  adam_temp=4 * trainable if device_type == "cuda" else 0, recompute=unit if checkpointing else 0)


class ZeroTokens(TextEncoder):
    """gen's TextEncoder fed max_length zero token ids instead of a tokenizer's (the released models' tokenizers
    are not here; memory depends on the length only): a family's encode runs the tower's real forward."""

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), self.max_length, dtype=torch.long, device=self.model.device)


TEXT = ("CLIP-L", "CLIP-G", "T5-XXL")  # a folder's parts: text_encoder, text_encoder_2, ...


def is_text(name: str) -> bool:
    return name in TEXT or name.startswith("text_encoder")


def build(cls, config: dict) -> torch.nn.Module:
    """A component from its class and config.json (a transformers tower or a diffusers model)."""
    from transformers import PreTrainedModel

    if issubclass(cls, PreTrainedModel):
        return cls(cls.config_class(**config))
    return cls.from_config(config)


def family_models(parts: dict, dtype: torch.dtype, device: str = "meta") -> tuple:
    """(text towers, their ZeroTokens, VAE, denoiser, family) of a model given as gen.memory_plan's FAMILIES
    entries ({component: (class, config)}): the towers on `device` in `dtype`, the VAE and the denoiser on meta,
    the family detected from the live models as gen.Pipeline does, the text token lengths the family's
    (text_max_length, else the tower's max_position_embeddings)."""
    from gen.families import detect_models

    with torch.device(device):
        towers = [build(*parts[name]).to(dtype) for name in parts if is_text(name)]
    with torch.device("meta"):
        vae = build(*parts["VAE"])
        denoiser = build(*parts[denoiser_key(parts)])
        family = detect_models(denoiser, towers)
    names = [f"text_encoder{'_' + str(i + 1) if i else ''}" for i in range(len(towers))]
    texts = [ZeroTokens(t, None, max_length=family.text_max_length.get(n) or t.config.max_position_embeddings)
             for n, t in zip(names, towers)]
    return towers, texts, vae, denoiser, family


def denoiser_key(parts: dict) -> str:
    return next(name for name in parts if not is_text(name) and name != "VAE")


def family_setup(parts: dict, dtype: torch.dtype, device: str = "meta") -> tuple:
    """(denoiser builder, family_forward, frozen parameters, VAE factor, family) of a model given as
    gen.memory_plan's FAMILIES entries: its text towers (on `device`) and VAE (counted on meta) frozen."""
    towers, texts, vae, _, family = family_models(parts, dtype, device)
    frozen = sum(p.numel() for m in (*towers, vae) for p in m.parameters())
    return (lambda: build(*parts[denoiser_key(parts)]), family_forward(family, texts), frozen,
            2 ** (len(vae.config.block_out_channels) - 1), family)
