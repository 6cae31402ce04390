"""The Triton flash-attention kernel against the fp32 reference, on CPU under TRITON_INTERPRET=1."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when gen.kernels.flash_attention is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gen.attention import math_attention  # noqa: E402
from gen.errors import GenError  # noqa: E402
from gen.kernels.flash_attention import flash_attention  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def qkv(n, m, d, dtype, b=1, h=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).to(dtype) for length in (n, m, m)]


# (queries, keys, head dim): odd lengths across several tiles, head dims padded to a power of two,
# cross-attention to 77 text tokens, a single short tile, the largest head dim.
SHAPES = [(100, 100, 40), (130, 77, 80), (67, 77, 64), (5, 3, 8), (33, 129, 128)]
CASES = [(s, torch.float32) for s in SHAPES] + [(s, dt) for s in SHAPES[:3] for dt in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{n}x{m}x{d}-{str(dt)[6:]}" for (n, m, d), dt in CASES])
def test_kernel_matches_reference(shape, dtype):
    q, k, v = qkv(*shape, dtype)
    out = flash_attention(q, k, v)
    ref = math_attention(q.float(), k.float(), v.float())  # exact maths on the same rounded inputs
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref).abs().max().item() <= TOL[dtype]


def test_kernel_takes_strided_inputs_and_a_scale():
    """The UNet processor hands over (B, N, H, D) projections transposed to (B, H, N, D) views."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 3, 40, generator=g).transpose(1, 2) for n in (70, 77, 77))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, scale=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert (out - ref).abs().max().item() <= 1e-5


def test_kernel_rejects_what_it_cannot_do():
    q, k, v = qkv(8, 8, 160, torch.float32)
    with pytest.raises(GenError, match="head dims up to 128"):
        flash_attention(q, k, v)
    q, k, v = qkv(8, 8, 16, torch.float32)
    with pytest.raises(GenError, match="B, H, N, D"):
        flash_attention(q, k[:, :1], v)
    with pytest.raises(GenError, match="fp16, bf16 or fp32"):
        flash_attention(q.double(), k.double(), v.double())


def test_gpu_tile_configs_fit_the_shape():
    """The autotuner's GPU configs: no 128-wide key tiles at head dim 128 (shared memory), and short key
    tiles for 77-token cross-attention; the interpreter gets one small fixed config."""
    from gen.kernels.flash_attention import _configs, _prune

    gpu = _configs(interpret=False)
    assert len(gpu) > 1 and len(_configs()) == 1
    wide = _prune(gpu, {"BLOCK_D": 128, "N_K": 4096})
    assert wide and all(c.kwargs["BLOCK_N"] < 128 for c in wide)
    cross = _prune(gpu, {"BLOCK_D": 64, "N_K": 77})
    assert cross and all(c.kwargs["BLOCK_N"] <= 128 for c in cross)
    assert {c.kwargs["BLOCK_N"] for c in _prune(gpu, {"BLOCK_D": 64, "N_K": 20})} == {32}
