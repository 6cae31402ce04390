"""Model components: DiT contract and presets, UNet presets, text encoder, VAE scaling."""

import pytest
import torch

from gen.models.dit import DIT_PRESETS, DiT, build_dit
from gen.models.text import TextEncoder, build_text_encoder, byte_level_tokenizer
from gen.models.unet import UNET_PRESETS, build_unet
from gen.models.vae import build_vae, decode, encode, from_latents, scale_factor, to_latents


def test_dit_contract_shapes_and_zero_init():
    m = build_dit("DiT-T/2", sample_size=8, cross_attention_dim=32)
    x = torch.randn(3, 4, 8, 8)
    ctx, pooled = torch.randn(3, 5, 32), torch.randn(3, 32)
    out = m(x, torch.tensor(500), ctx, pooled_projections=pooled).sample
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained model predicts zero


def trained_like(m):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def test_dit_uses_text_timestep_and_pooled_and_handles_other_sizes():
    m = trained_like(build_dit("DiT-T/2", sample_size=8, cross_attention_dim=32))
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.randn(2, 32)
    base = m(x, 100, ctx, pooled, return_dict=False)[0]
    assert not torch.allclose(base, m(x, 900, ctx, pooled, return_dict=False)[0])
    assert not torch.allclose(base, m(x, 100, ctx + 1, pooled, return_dict=False)[0])
    assert not torch.allclose(base, m(x, 100, ctx, pooled + 1, return_dict=False)[0])
    # per-sample timesteps; sample k does not depend on the rest of the batch
    per = m(x, torch.tensor([100, 900]), ctx, pooled, return_dict=False)[0]
    assert torch.allclose(per[0], base[0], atol=1e-5)
    assert m(torch.randn(1, 4, 12, 16), 5, ctx[:1], pooled[:1]).sample.shape == (1, 4, 12, 16)


def test_dit_gradient_checkpointing_gives_same_gradients():
    m = trained_like(build_dit("DiT-T/2", sample_size=8, cross_attention_dim=32))
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.randn(2, 32)
    m(x, 10, ctx, pooled).sample.square().mean().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.enable_gradient_checkpointing()
    m(x, 10, ctx, pooled).sample.square().mean().backward()
    for a, p in zip(g1, m.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_dit_presets_follow_the_paper():
    assert set(DIT_PRESETS) >= {f"DiT-{s}/{p}" for s in "SBL" for p in (2, 4)} | {"DiT-XL/2", "DiT-XL/4"}
    assert DIT_PRESETS["DiT-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert DIT_PRESETS["DiT-S/4"] == dict(depth=12, hidden_size=384, num_heads=6, patch_size=4)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        build_dit("DiT-Q/2")


def test_dit_save_load_round_trip(tmp_path):
    m = trained_like(build_dit("DiT-T/2", sample_size=8, cross_attention_dim=32))
    m.save_pretrained(tmp_path)
    again = DiT.from_pretrained(tmp_path)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    assert torch.equal(m(x, 3, ctx).sample, again(x, 3, ctx).sample)


def test_unet_presets_build_and_base_is_70_to_100m():
    tiny = build_unet("tiny")
    out = tiny(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 7, 32)).sample
    assert out.shape == (1, 4, 8, 8)
    n = sum(p.numel() for p in build_unet("base").parameters())
    assert 70e6 <= n <= 100e6, n
    assert UNET_PRESETS["sd15"]["block_out_channels"] == (320, 640, 1280, 1280)


def test_text_encoder_hidden_and_pooled():
    tok = byte_level_tokenizer()
    enc = TextEncoder(build_text_encoder("tiny", vocab_size=len(tok)), tok)
    hidden, pooled = enc(["a red circle", ""])
    assert hidden.shape == (2, 77, 32) and pooled.shape == (2, 32)
    assert not torch.allclose(hidden[0], hidden[1])


def test_vae_scaling_and_shift_from_config():
    vae = build_vae("tiny", scaling_factor=0.5, shift_factor=0.25)
    z = torch.randn(1, 4, 4, 4)
    assert torch.allclose(to_latents(vae, z), (z - 0.25) * 0.5)
    assert torch.allclose(from_latents(vae, to_latents(vae, z)), z, atol=1e-6)
    assert scale_factor(vae) == 2
    img = torch.rand(1, 3, 8, 8) * 2 - 1
    lat = encode(vae, img, torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 4, 4)
    out = decode(vae, lat)
    assert out.shape == (1, 3, 8, 8) and 0 <= out.min() and out.max() <= 1
