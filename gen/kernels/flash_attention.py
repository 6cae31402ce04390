"""Triton flash-attention forward after FlashAttention-2 (Dao 2023): tiled online softmax, fp32 accumulation.

q (B, H, N, D), k and v (B, H, M, D), as torch's scaled_dot_product_attention takes them. Any N and M
(masked tails, so 77-token cross-attention works), head dims up to 128 (padded inside the kernel to the
next power of two, so 40 and 80 work), fp16/bf16/fp32 inputs. One program per (query tile, batch*head).

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (read when this module is imported), which is
how the tests check it without a GPU.
"""

from __future__ import annotations

import math

import os

import torch
import triton
import triton.language as tl

from gen.errors import GenError

MAX_HEAD_DIM = 128
try:  # triton >= 3.4 reads its settings into `knobs`
    from triton import knobs

    INTERPRET = bool(knobs.runtime.interpret)
except ImportError:
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    if interpret:  # the interpreter runs every tile in numpy, ~15 ms each: one config, no tuning runs
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4), (128, 128, 8, 2))]


def _prune(configs, named_args, capability: int | None = None, **kwargs):
    """Drop the configs that overflow shared memory or spill registers (found by `python -m gen.kernels.aot`):
    128-wide key tiles at head dim 128, and on pre-Hopper GPUs 128-query tiles at head dim 128. Short key
    sequences want short key tiles. `capability` (e.g. 80) defaults to the current GPU's."""
    d, m = named_args["BLOCK_D"], named_args["N_K"]
    if capability is None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        capability = 10 * major + minor
    pre_hopper = capability is not None and capability < 90
    keep = [c for c in configs if not (d >= 128 and (c.kwargs["BLOCK_N"] >= 128 or
                                                     (pre_hopper and c.kwargs["BLOCK_M"] >= 128)))]
    short = [c for c in keep if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(m))]
    return short or keep


@triton.autotune(configs=_configs(), key=["N_Q", "N_K", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _flash_fwd(Q, K, V, O, qk_scale,
               s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_on, s_od,
               H, N_Q, N_K, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """FlashAttention-2 forward (Dao 2023): one (BLOCK_M queries, batch*head) tile, online softmax over key tiles."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # the padded head-dim lanes load as 0 and are never stored

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=(offs_m[:, None] < N_Q) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32, so this is the same maths
        q = q.to(tl.float32)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        k_ok = cols < N_K
        kt = tl.load(k_base + cols[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee" if IEEE else "tf32") * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        # Online softmax: rescale what was accumulated so far by exp(old max - new max).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        p = p.to(V.dtype.element_ty)  # the PV product runs on the inputs' dtype, as in FlashAttention
        if UPCAST:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee" if IEEE else "tf32")
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
             acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & d_ok[None, :])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with scale = 1/sqrt(D) by default.

    Args:
        q: (B, H, N, D) queries; fp16, bf16 or fp32; D <= 128.
        k: (B, H, M, D) keys, same dtype and device.
        v: (B, H, M, D) values.

    Returns:
        (B, H, N, D) in q's dtype.
    """
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise GenError(f"flash_attention wants q (B, H, N, D) and k, v (B, H, M, D); got {tuple(q.shape)}, "
                       f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise GenError(f"flash_attention wants q, k, v all fp16, bf16 or fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, N, D = q.shape
    M = k.shape[2]
    if D > MAX_HEAD_DIM:
        raise GenError(f"the triton attention kernel supports head dims up to {MAX_HEAD_DIM}, not {D}; "
                       "use --attention sdpa")
    if q.device.type != "cuda" and not INTERPRET:
        raise GenError("the triton attention kernel needs a CUDA GPU (or TRITON_INTERPRET=1 set before import, "
                       "for testing on CPU); use --attention sdpa")
    if M == 0 and N and B * H:
        raise GenError("flash_attention needs at least one key")
    return _flash_op(q, k, v, scale)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    B, H, N, D = q.shape
    M = k.shape[2]
    o = torch.empty_like(q)
    if N == 0 or B * H == 0:
        return o
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(D)) * 1.4426950408889634  # exp -> exp2
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    _flash_fwd[grid](q, k, v, o, qk_scale, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                     H, N, M, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                     IEEE=q.dtype == torch.float32, UPCAST=INTERPRET and q.dtype == torch.bfloat16)
    return o


# A torch custom op, so torch.compile and CUDA graphs treat the launch as one opaque call (torch >= 2.4).
if hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("gen::flash_attention", mutates_args=())
    def _flash_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        return _launch(q, k, v, scale)

    @_flash_op.register_fake
    def _(q, k, v, scale):
        return torch.empty_like(q)
else:  # pragma: no cover
    _flash_op = _launch


def aot_specs(capability: int, head_dims=(40, 64, 80, 128), dtypes=("fp16", "bf16"), configs=None) -> list:
    """Every build the autotuner can launch on a GPU, for `python -m gen.kernels.aot`: each config that
    survives pruning for long key sequences (short ones tune over a subset of these), per head dim and dtype.
    Arguments are specialised as a launch on contiguous (B, H, N, D) tensors specialises them: unit
    head-dim strides become constants, 16-aligned pointers and strides are marked so."""
    from gen.kernels.aot import Spec

    names = _flash_fwd.fn.arg_names
    specs = []
    for d in head_dims:
        block_d = max(16, triton.next_power_of_2(d))
        for dtype in dtypes:
            ints = {n: "i32" for n in names if n.startswith("s_") or n in ("H", "N_Q", "N_K")}
            signature = {**ints, **{n: f"*{dtype}" for n in "QKVO"}, "qk_scale": "fp32"}
            long_keys = {"BLOCK_D": block_d, "N_K": 1 << 14}
            for cfg in _prune(configs or _configs(interpret=False), long_keys, capability):
                constexprs = {"HEAD_DIM": d, "BLOCK_D": block_d, "IEEE": False, "UPCAST": False, **cfg.kwargs,
                              **{f"s_{t}d": 1 for t in "qkvo"}}
                signature.update({n: "constexpr" for n in constexprs})
                aligned = [*"QKVO"] + ([f"s_{t}n" for t in "qkvo"] if d % 16 == 0 else [])
                attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
                name = f"flash_fwd d{d} {dtype} M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} " \
                       f"w{cfg.num_warps} s{cfg.num_stages}"
                specs.append(Spec(name, _flash_fwd.fn, dict(signature), constexprs, cfg.num_warps, cfg.num_stages,
                                  attrs))
    return specs
