"""The lean loop's options: the approximate fast mode (deep-feature reuse), channels_last and torch.compile."""

import numpy as np
import pytest
import torch

from gen.errors import GenError
from gen.fastmode import FeatureCache, dit_forward, unet_forward
from gen.models.dit import build_dit
from gen.models.tiny import tiny_pipeline
from gen.models.unet import build_unet
from gen.pipeline import Pipeline


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet") / "tiny-unet"
    tiny_pipeline("unet", sample_size=8).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dit4_folder(tmp_path_factory):
    """The tiny DiT pipeline with 4 blocks (the fast mode skips the middle ones) that all do something."""
    pipe = tiny_pipeline("dit", sample_size=8)
    torch.manual_seed(1)
    pipe.denoiser = build_dit("DiT-T/2", depth=4, sample_size=8, cross_attention_dim=32, pooled_projection_dim=32)
    for p in pipe.denoiser.parameters():
        p.data.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("dit4") / "tiny-dit4"
    pipe.save_pretrained(path)
    return path


def images(folder, **kw):
    options = {k: kw.pop(k) for k in ("compile", "channels_last") if k in kw}
    pipe = Pipeline.from_pretrained(folder, **options)
    pipe.progress = False
    args = dict(num_inference_steps=6, guidance_scale=4.0, seed=3, output_type="np") | kw
    return pipe("a red circle", negative_prompt="blurry", **args).images


@pytest.mark.parametrize("preset,size", [("tiny", 8), ("tiny", 12), ("small", 16)])
def test_unet_forward_is_diffusers_forward_and_reuses_the_deep_path(preset, size):
    torch.manual_seed(0)
    unet = build_unet(preset, sample_size=size).eval()
    x, t = torch.randn(2, 4, size, size), torch.tensor(700)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=text).sample
        out, deep = unet_forward(unet, x, t, text)
        again, same = unet_forward(unet, x, t, text, cached=deep)  # the same step from its own cache: the same output
        moved, _ = unet_forward(unet, x + 0.1, t, text, cached=deep)
    assert torch.equal(out, ref) and torch.equal(again, ref) and same is deep
    assert deep.shape[-2:] == x.shape[-2:]  # DeepCache's branch 0 is at full latent resolution
    assert not torch.equal(moved, ref)
    ran = []
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in unet.modules()
             if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]
    with torch.no_grad():
        unet_forward(unet, x, t, text, cached=deep)
    for h in hooks:
        h.remove()
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    shallow = [first.resnets[0], last.resnets[-2], last.resnets[-1]]
    shallow += [first.attentions[0], last.attentions[-2], last.attentions[-1]] if hasattr(first, "attentions") else []
    assert sorted(map(id, ran)) == sorted(map(id, shallow))  # a cached step runs only the shallow layers


def test_dit_forward_is_the_dit_forward_and_reuses_its_middle_blocks():
    torch.manual_seed(0)
    dit = build_dit("DiT-T/2", depth=4, sample_size=8, cross_attention_dim=32, pooled_projection_dim=32).eval()
    for p in dit.parameters():  # adaLN-Zero starts as the identity: give every block something to do
        p.data.normal_(0, 0.05)
    x, t, text, pooled = torch.randn(2, 4, 8, 8), torch.tensor(0.4), torch.randn(2, 77, 32), torch.randn(2, 32)
    with torch.no_grad():
        ref = dit(x, t, encoder_hidden_states=text, pooled_projections=pooled).sample
        out, residual = dit_forward(dit, x, t, text, pooled)
        again, _ = dit_forward(dit, x, t, text, pooled, cached=residual)
    assert torch.equal(out, ref)
    assert (again - ref).abs().max() < 1e-5


@pytest.mark.parametrize("folder", ["unet_folder", "dit4_folder"])
def test_cache_interval_1_is_exact_and_3_is_close(folder, request):
    path = request.getfixturevalue(folder)
    exact = images(path)
    assert np.array_equal(images(path, cache_interval=1), exact)
    fast = images(path, cache_interval=3)
    assert 0 < np.abs(fast - exact).max() < 0.25


def test_cache_runs_the_whole_denoiser_every_kth_step_and_when_cfg_switches_on():
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=8).eval()
    cache = FeatureCache(unet, 3)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 77, 32)
    with torch.no_grad():
        for _ in range(7):
            cache(x, t, encoder_hidden_states=text)
        assert (cache.calls, cache.full_calls) == (7, 3)  # steps 0, 3, 6
        cache(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([text, text]))  # CFG switched on: a new batch
        assert cache.full_calls == 4
        cond = x + 0.5
        pair, deep = unet_forward(unet, torch.cat([x, cond]), t, torch.cat([text, text]))
        cache.cached = deep
        half = cache(cond, t, encoder_hidden_states=text)  # CFG switched off: the conditional half of the cache serves
    assert cache.full_calls == 4
    assert torch.allclose(half, pair[1:], atol=1e-5)


def test_cache_refuses_what_it_cannot_do():
    unet = build_unet("tiny", sample_size=8)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(GenError, match="cache interval"):
            FeatureCache(unet, bad)
    with pytest.raises(GenError, match="SD-style"):
        FeatureCache(build_unet("tiny", sample_size=8, class_embed_type="timestep"), 2)
    freeu = build_unet("tiny", sample_size=8)
    freeu.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(GenError, match="FreeU"):
        FeatureCache(freeu, 2)
    with pytest.raises(GenError, match="at least 3 blocks"):
        FeatureCache(build_dit("DiT-T/2", depth=2, sample_size=8, cross_attention_dim=32), 2)


def test_channels_last_gives_the_same_images(unet_folder):
    pipe = Pipeline.from_pretrained(unet_folder, channels_last=True)
    assert pipe.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(images(unet_folder, channels_last=True) - images(unet_folder)).max() <= 1e-5


@pytest.mark.parametrize("folder", ["unet_folder", "dit_folder"])
def test_compiled_denoiser_gives_the_same_images(folder, request):
    """torch.compile traces the denoiser, gen's attention dispatch included (the eager backend keeps this
    test quick; the default inductor backend takes minutes here)."""
    path = request.getfixturevalue(folder)
    pipe = Pipeline.from_pretrained(path, compile={"backend": "eager"})
    assert pipe.denoiser._compiled_call_impl is not None
    assert np.abs(images(path, compile={"backend": "eager"}, num_inference_steps=2)
                  - images(path, num_inference_steps=2)).max() <= 1e-5


@pytest.mark.parametrize("folder", ["unet_folder", "dit4_folder"])
def test_compile_covers_the_fast_mode(folder, request):
    """With compile on, the fast mode's cached forward is compiled too (once per pipeline), same images."""
    path = request.getfixturevalue(folder)
    pipe = Pipeline.from_pretrained(path, compile={"backend": "eager"})
    pipe.progress = False
    args = dict(num_inference_steps=6, guidance_scale=4.0, seed=3, output_type="np", cache_interval=3)
    first = pipe("a red circle", negative_prompt="blurry", **args).images
    compiled = pipe._fast_forward
    assert compiled is not None and hasattr(compiled, "_torchdynamo_orig_callable")
    assert np.abs(pipe("a red circle", negative_prompt="blurry", **args).images - first).max() == 0
    assert pipe._fast_forward is compiled
    assert np.abs(first - images(path, cache_interval=3)).max() <= 1e-5


def test_cli_takes_the_speed_flags(dit4_folder, tmp_path, capsys):
    from gen.cli import main

    out = tmp_path / "x.png"
    assert main(["sample", "a cat", "--model", str(dit4_folder), "--steps", "4", "--cache-interval", "2",
                 "--channels-last", "--attention", "math", "--no-progress", "--seed", "1", "--out", str(out),
                 "--guidance-interval", "0.2", "0.8"]) == 0
    assert out.is_file()
    assert main(["sample", "a cat", "--model", str(dit4_folder), "--steps", "4", "--guidance-interval", "0.8", "0.2",
                 "--no-progress", "--out", str(tmp_path / "y.png")]) == 2
    assert "guidance interval must be" in capsys.readouterr().err and not (tmp_path / "y.png").exists()
