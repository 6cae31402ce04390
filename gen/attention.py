"""Attention backend dispatch (triton | xformers | sdpa | math | auto), the diffusers attention processor that
routes a UNet's attention through it, and diffusers' MMDiT processors (SD3's joint attention, Flux's) with only
their softmax(QK^T)V rebound to it; the project's DiT calls `attention` directly."""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import types
from typing import Callable

import torch
import torch.nn.functional as F

from gen.errors import GenError

log = logging.getLogger("gen")

BACKENDS = ("triton", "xformers", "sdpa", "math", "auto")
AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, scale=None) -> out

_backend = "auto"
_fn: AttentionFn | None = None  # None = auto: chosen per device, dtype and shape on first use
_auto: dict[tuple, AttentionFn] = {}
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference softmax(q k^T * scale) v (scale = 1/sqrt(d) by default), computed in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """torch's fused kernels (flash / memory-efficient on CUDA, a tiled C++ kernel on CPU)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _load_triton() -> AttentionFn:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise GenError("attention backend 'triton' needs triton: pip install triton "
                       "(or pip install 'gen[cuda]'); or use --attention sdpa") from None
    from gen.kernels.flash_attention import INTERPRET, MAX_HEAD_DIM, flash_attention
    if not INTERPRET and not torch.cuda.is_available():
        raise GenError("attention backend 'triton' needs a CUDA GPU (on CPU only under TRITON_INTERPRET=1, "
                       "for tests); use --attention sdpa")

    def triton_attention(q, k, v, scale=None):
        # The kernel is forward-only and stops at head dim 128: training and wider heads go to SDPA.
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            _log_once("attention: triton kernel is forward-only; SDPA runs where gradients are needed")
            return sdpa_attention(q, k, v, scale)
        if q.shape[-1] > MAX_HEAD_DIM:
            _log_once(f"attention: triton kernel stops at head dim {MAX_HEAD_DIM}; SDPA runs head dim {q.shape[-1]}")
            return sdpa_attention(q, k, v, scale)
        return flash_attention(q, k, v, scale)
    return triton_attention


def _load_xformers() -> AttentionFn:
    try:
        import xformers.ops as xops
    except (ImportError, OSError, RuntimeError):
        raise GenError("attention backend 'xformers' needs xformers and a CUDA build of torch: "
                       "pip install xformers (or pip install 'gen[cuda]'); or use --attention sdpa") from None

    def xformers_attention(q, k, v, scale=None):  # xformers takes (B, N, H, D)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    return xformers_attention


_LOADERS: dict[str, Callable[[], AttentionFn]] = {
    "triton": _load_triton, "xformers": _load_xformers,
    "sdpa": lambda: sdpa_attention, "math": lambda: math_attention}


def available_backends() -> list[str]:
    """The concrete backends that can run here (auto chooses among these)."""
    names = []
    for name, load in _LOADERS.items():
        try:
            load()
        except GenError:
            continue
        names.append(name)
    return names


def set_backend(name: str | None) -> None:
    """Selects the backend `attention` uses (None = "auto"). Raises GenError, saying how to install it,
    when the backend is unknown or cannot run here; the backend is then left as it was."""
    global _backend, _fn
    name = name or "auto"
    if name not in BACKENDS:
        raise GenError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    _fn = None if name == "auto" else _LOADERS[name]()
    _backend = name
    _auto.clear()  # auto chooses (and logs) afresh
    _logged.clear()


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str | None):
    """Runs the block with backend `name` (None = auto), then restores the one before; auto keeps what it
    chose. Pipelines sample inside this, so pipelines with different backends can share a process."""
    global _backend, _fn
    saved = _backend, _fn
    name = name or "auto"
    if name not in BACKENDS:
        raise GenError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name != _backend:
        _fn = None if name == "auto" else _LOADERS[name]()
        _backend = name
    try:
        yield
    finally:
        _backend, _fn = saved


def _fastest(candidates: dict[str, AttentionFn], q, k, v, sync: Callable[[], None], reps: int = 5
             ) -> tuple[str, dict[str, float]]:
    """Times each candidate on these inputs (after two warm-up calls, which also run triton's autotuning)
    and returns the fastest name with the median milliseconds of each."""
    times = {}
    for name, fn in candidates.items():
        try:
            for _ in range(2):
                fn(q, k, v)
        except Exception as e:  # e.g. xformers without a kernel for this shape
            log.debug("attention: auto skips %s here (%s)", name, e)
            continue
        sync()
        laps = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(q, k, v)
            sync()
            laps.append((time.perf_counter() - t0) * 1e3)
        times[name] = statistics.median(laps)
    return min(times, key=times.get), times


def _pick(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionFn:
    """auto. CPU: SDPA. CUDA: the fastest of triton, xformers and SDPA, timed once per (dtype, head dim,
    query and key lengths rounded up to a power of two) on the first call with such a shape."""
    if q.device.type != "cuda":
        key = (q.device.type, q.dtype)
        if key not in _auto:
            _auto[key] = sdpa_attention
            _log_once(f"attention: auto picked sdpa for {q.device.type} {str(q.dtype).removeprefix('torch.')}")
        return _auto[key]
    pow2 = lambda n: 1 << max(n - 1, 0).bit_length()  # noqa: E731
    key = (q.device.type, q.dtype, q.shape[-1], pow2(q.shape[-2]), pow2(k.shape[-2]))
    fn = _auto.get(key)
    if fn is not None:
        return fn
    if (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()
            or (torch.is_grad_enabled() and q.requires_grad)):
        return sdpa_attention  # no timing inside a trace or a CUDA graph capture, nor for training
    candidates = {"sdpa": sdpa_attention}
    for name in ("triton", "xformers"):
        try:
            candidates[name] = _LOADERS[name]()
        except GenError:
            pass
    if len(candidates) == 1:
        name, times = "sdpa", {}
    else:
        name, times = _fastest(candidates, q, k, v, torch.cuda.synchronize)
    _auto[key] = candidates[name]
    timing = ", ".join(f"{n} {ms:.3f} ms" for n, ms in times.items())
    _log_once(f"attention: auto picked {name} for cuda {str(q.dtype).removeprefix('torch.')}, head dim "
              f"{q.shape[-1]}, {q.shape[-2]} x {k.shape[-2]} tokens" + (f" ({timing})" if timing else ""))
    return _auto[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention through the selected backend.
    q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D); scale defaults to 1/sqrt(D)."""
    return (_fn or _pick(q, k, v))(q, k, v, scale)


class GenAttnProcessor:
    """A diffusers attention processor (as AttnProcessor2_0) that runs the attention itself through
    `attention`, i.e. the selected backend. Masked attention, which SD UNets do not use, stays on SDPA."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:  # (B, C, H, W) -> (B, H*W, C)
            B, C, Hs, Ws = hidden_states.shape
            hidden_states = hidden_states.view(B, C, Hs * Ws).transpose(1, 2)
        B = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads, head_dim = attn.heads, k.shape[-1] // attn.heads

        def split(t):  # (B, L, heads*head_dim) -> (B, heads, L, head_dim)
            return t.view(B, -1, heads, head_dim).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attention_mask is None:
            out = attention(q, k, v, attn.scale)
        else:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], B).view(B, heads, -1, k.shape[2])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(B, -1, heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image:
            out = out.transpose(-1, -2).reshape(B, C, Hs, Ws)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _sdpa_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """F.scaled_dot_product_attention as diffusers' processors call it, q (B, H, N, D): the plain case through
    `attention`, masked, dropout, causal or other calls on torch's SDPA unchanged."""
    if attn_mask is None and not dropout_p and not is_causal and not kwargs:
        return attention(query, key, value, scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, **kwargs)


class _Functional(types.ModuleType):
    """torch.nn.functional with scaled_dot_product_attention through gen's backend: the `F` that SD3's
    JointAttnProcessor2_0 and IPAdapterAttnProcessor2_0 see."""
    scaled_dot_product_attention = staticmethod(_sdpa_call)

    def __getattr__(self, name):
        return getattr(F, name)


def _dispatch_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   attention_kwargs=None, *, backend=None, parallel_config=None):
    """diffusers' dispatch_attention_fn, q (B, N, H, D): the plain case through `attention`; a diffusers backend
    set on the processor (set_attention_backend), context parallelism, masks and the rest go to diffusers."""
    if (attn_mask is None and not dropout_p and not is_causal and not enable_gqa and not attention_kwargs
            and backend is None and parallel_config is None):
        return attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale).transpose(1, 2)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 attention_kwargs, backend=backend, parallel_config=parallel_config)


# diffusers processor -> (the global name its __call__ reaches attention through, gen's stand-in for it)
_F = _Functional("gen_functional")
_DISPATCH_POINTS = {"JointAttnProcessor2_0": ("F", _F), "IPAdapterAttnProcessor2_0": ("F", _F),
                    "FluxAttnProcessor": ("dispatch_attention_fn", _dispatch_call),
                    "FluxIPAdapterAttnProcessor": ("dispatch_attention_fn", _dispatch_call)}
_rebound: dict[type, type] = {}


def _rebind(cls: type) -> type | None:
    """A subclass of diffusers' processor class whose __call__ is diffusers' own code (the same code object: q/k/v,
    norms, rope, output projections) with its attention global bound to gen's backend; None where this diffusers
    version's __call__ no longer reaches attention through that name (the processor is then left alone)."""
    if cls not in _rebound:
        name, stand_in = _DISPATCH_POINTS[cls.__name__]
        fn = cls.__call__
        if name not in fn.__code__.co_names:
            _rebound[cls] = None
        else:
            call = types.FunctionType(fn.__code__, fn.__globals__ | {name: stand_in}, fn.__name__, fn.__defaults__,
                                      fn.__closure__)
            call.__kwdefaults__ = fn.__kwdefaults__
            _rebound[cls] = type(f"Gen{cls.__name__}", (cls,), {"__call__": call, "__doc__": cls.__doc__})
    return _rebound[cls]


def _routed(p):
    """The processor that runs `p`'s attention through `attention`, or p itself where gen has none for it."""
    kind = type(p).__name__
    if kind in ("AttnProcessor2_0", "AttnProcessor"):
        return GenAttnProcessor()
    cls = _rebind(type(p)) if kind in _DISPATCH_POINTS else None
    if cls is None:
        return p
    routed = object.__new__(cls)
    routed.__dict__.update(p.__dict__)  # e.g. a diffusers backend set on it, which it keeps
    return routed


def install_processor(denoiser) -> None:
    """Routes a diffusers UNet's standard attention layers, IP-Adapter's decoupled cross-attention (gen.ip_adapter),
    SD3's joint attention and Flux's attention (with its IP-Adapter's) through `attention` (other processors, e.g. fused ones, are left as
    they are)."""
    denoiser.set_attn_processor({name: _routed(p) for name, p in denoiser.attn_processors.items()})
