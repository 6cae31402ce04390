"""DiT (Peebles & Xie 2023) with cross-attention to text, as a diffusers ModelMixin/ConfigMixin.

Latents are patchified into tokens; each block is adaLN-Zero self-attention, cross-attention to the
text hidden states, and an adaLN-Zero MLP. The pooled text embedding is added to the timestep
embedding, so it steers every block's modulation.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from gen.attention import attention

# (depth, hidden_size, num_heads) from the DiT paper, plus "T" for tests.
DIT_SIZES = {"T": (2, 64, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS = {f"DiT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
               for s, (d, h, n) in DIT_SIZES.items() for p in (2, 4, 8)}


def build_dit(preset: str = "DiT-T/2", **overrides) -> "DiT":
    """A randomly initialised DiT from a named preset, e.g. "DiT-S/2"."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose from {sorted(DIT_PRESETS)}")
    return DiT(**{**DIT_PRESETS[preset], **overrides})


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, (h*w, dim)."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([one_axis(dim // 2, gy), one_axis(dim // 2, gx)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)  # (N, freq_dim)
        return self.mlp(emb.to(self.mlp[0].bias.dtype))  # the bias: a weight may be stored fp8 (gen/quant)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None. Optional RMS QK-norm."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim or dim, dim)
        self.to_v = nn.Linear(context_dim or dim, dim)
        self.to_out = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, D/H)
        B, _, D = t.shape
        return t.view(B, -1, self.num_heads, D // self.num_heads).transpose(1, 2)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys (QK-normed) and values of `context`, by heads."""
        return self.norm_k(self._heads(self.to_k(context))), self._heads(self.to_v(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, kv=None) -> torch.Tensor:
        """`kv`: kv(context) computed before (DiT.reusing_context), else computed here."""
        B, N, D = x.shape
        k, v = kv if kv is not None else self.kv(x if context is None else context)
        out = attention(self.norm_q(self._heads(self.to_q(x))), k, v)  # (B, H, N, D/H)
        return self.to_out(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to text, adaLN-Zero MLP."""

    def __init__(self, hidden_size: int, num_heads: int, context_dim: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = Attention(hidden_size, num_heads, context_dim=context_dim, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, kv=None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), context, kv)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(ModelMixin, ConfigMixin):
    """Diffusion transformer over latent patches, conditioned on text tokens and pooled text."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 4, out_channels: int | None = None,
                 patch_size: int = 2, hidden_size: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, cross_attention_dim: int = 768,
                 pooled_projection_dim: int | None = None, qk_norm: bool = True):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.out_channels = out_channels or in_channels
        self.gradient_checkpointing = False
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Linear(pooled_projection_dim or cross_attention_dim, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, cross_attention_dim, mlp_ratio, qk_norm)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        grid = sample_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, grid, grid)[None], persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and so does the output.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(block.cross_attn.to_out.weight)
            nn.init.zeros_(block.cross_attn.to_out.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @contextmanager
    def reusing_context(self):
        """Within it, outside autograd: the cross-attention keys and values of a text-states tensor already seen are
        reused (a sampling run passes the same tensors at every step; the same numbers, 0.955x the time per image
        of the bundled model on CPU, median of 30 interleaved). Scoped, so weights changed between runs (a LoRA) never meet stale keys."""
        self._context_kv = {}
        try:
            yield
        finally:
            self._context_kv = None

    def _kv(self, context: torch.Tensor) -> list:
        cache = getattr(self, "_context_kv", None)
        if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return [None] * len(self.blocks)
        seen = cache.get(id(context))
        if seen is None:  # the tensor is held beside its keys: its id cannot pass to another tensor meanwhile
            seen = cache[id(context)] = (context, [block.cross_attn.kv(context) for block in self.blocks])
        return seen[1]

    def _pos_embed(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        if self.pos_embed.shape[1] == h * w and h == w:
            return self.pos_embed.to(like.dtype)
        return sincos_pos_embed(self.config.hidden_size, h, w)[None].to(like.device, like.dtype)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor | None = None,
                return_dict: bool = True):
        """sample (N, C, H, W), timestep (N,) or scalar, encoder_hidden_states (N, L, Dc),
        pooled_projections (N, Dp) -> prediction (N, C_out, H, W)."""
        N, _, H, W = sample.shape
        p = self.config.patch_size
        h, w = H // p, W // p
        x = self.x_embedder(sample).flatten(2).transpose(1, 2)  # (N, T, D)
        x = x + self._pos_embed(h, w, x)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(N)
        c = self.t_embedder(t)  # (N, D)
        if pooled_projections is not None:
            c = c + self.y_embedder(pooled_projections.to(c.dtype))
        kvs = self._kv(encoder_hidden_states)
        for block, kv in zip(self.blocks, kvs):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, encoder_hidden_states)
            else:
                x = block(x, c, encoder_hidden_states, kv)
        x = self.final_layer(x, c)  # (N, T, p*p*C)
        x = x.view(N, h, w, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        out = x.reshape(N, self.out_channels, H, W)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
