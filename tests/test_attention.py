"""Attention backends: dispatch, errors, the diffusers UNet processor, and whole pipelines per backend."""

import importlib.util
import logging
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # the triton backend runs on CPU tensors, in numpy

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from gen import attention as attn  # noqa: E402
from gen.errors import GenError  # noqa: E402
from gen.models.tiny import tiny_pipeline  # noqa: E402
from gen.models.unet import build_unet  # noqa: E402
from gen.pipeline import Pipeline  # noqa: E402
from tests.conftest import diffusers_pipeline  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture(autouse=True)
def default_backend():
    """The backend is process-wide: every test leaves it at the default."""
    yield
    attn.set_backend(None)


def qkv(n=50, m=77, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, length, d, generator=g) for length in (n, m, m)]


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto", pytest.param("triton", marks=needs_triton)])
def test_backends_agree_with_the_reference(backend):
    q, k, v = qkv()
    attn.set_backend(backend)
    assert attn.get_backend() == backend
    assert (attn.attention(q, k, v) - attn.math_attention(q, k, v)).abs().max().item() <= 1e-5


def test_unknown_backend_is_an_error_listing_the_choices():
    with pytest.raises(GenError, match="triton, xformers, sdpa, math, auto"):
        attn.set_backend("flash3")


def test_xformers_missing_says_how_to_install():
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    with pytest.raises(GenError, match="pip install xformers"):
        attn.set_backend("xformers")
    assert attn.get_backend() == "auto"  # a failed switch leaves the backend as it was


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="triton runs natively here")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from gen import attention\ntry:\n    attention.set_backend('triton')\n"
            "except ValueError as e:\n    print('ERROR', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    assert "ERROR" in out and "CUDA GPU" in out and "--attention sdpa" in out


def test_auto_picks_sdpa_on_cpu_and_logs_once(caplog):
    attn.set_backend("auto")
    with caplog.at_level(logging.INFO, logger="gen"):
        for d in (40, 64, 40):
            q, k, v = qkv(d=d)
            out = attn.attention(q, k, v)
    picks = [r.getMessage() for r in caplog.records if "auto picked" in r.getMessage()]
    assert picks == ["attention: auto picked sdpa for cpu float32"]
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_auto_timing_picks_the_fastest_candidate():
    """On CUDA, auto times the candidates once per shape class; the timing helper itself runs anywhere."""
    import time

    def slow(q, k, v, scale=None):
        time.sleep(0.004)
        return q

    def broken(q, k, v, scale=None):
        raise RuntimeError("no kernel for this shape")

    fast = lambda q, k, v, scale=None: q  # noqa: E731
    name, times = attn._fastest({"slow": slow, "fast": fast, "broken": broken}, *qkv(), sync=lambda: None, reps=3)
    assert name == "fast" and set(times) == {"slow", "fast"} and times["fast"] < times["slow"]


@pytest.mark.parametrize("backend", ["sdpa", "math", pytest.param("triton", marks=needs_triton)])
def test_backends_take_a_scale(backend):
    q, k, v = qkv()
    attn.set_backend(backend)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.2)
    assert (attn.attention(q, k, v, 0.2) - ref).abs().max().item() <= 1e-5


@needs_triton
def test_triton_backend_hands_gradients_and_wide_heads_to_sdpa():
    """The kernel is forward-only and stops at head dim 128; those cases run on SDPA instead of failing."""
    attn.set_backend("triton")
    q, k, v = (t.requires_grad_() for t in qkv(n=9, m=7, d=16))
    attn.attention(q, k, v).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    q, k, v = qkv(n=9, m=7, d=160)
    assert (attn.attention(q, k, v) - attn.math_attention(q, k, v)).abs().max().item() <= 1e-5


def test_available_backends_lists_what_runs_here():
    names = attn.available_backends()
    assert {"sdpa", "math"} <= set(names) and "auto" not in names


@pytest.mark.parametrize("backend", ["math", pytest.param("triton", marks=needs_triton)])
def test_unet_processor_matches_the_stock_processor(backend):
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=8).eval()
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=text).sample
        attn.set_backend(backend)
        attn.install_processor(unet)
        out = unet(x, t, encoder_hidden_states=text).sample
    assert {type(p) for p in unet.attn_processors.values()} == {attn.GenAttnProcessor}
    assert ref.abs().mean() > 0.01
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet") / "tiny-unet"
    tiny_pipeline("unet", sample_size=8).save_pretrained(path)
    return path


def sample(folder, backend, **kw):
    pipe = Pipeline.from_pretrained(folder, attention=backend)
    pipe.progress = False
    args = dict(num_inference_steps=2, guidance_scale=4.0, seed=3, output_type="np") | kw
    return pipe, pipe("a red circle", negative_prompt="blurry", **args).images


@needs_triton
@pytest.mark.parametrize("folder", ["unet_folder", "dit_folder"])
def test_pipeline_with_triton_matches_sdpa(folder, request):
    path = request.getfixturevalue(folder)
    _, ref = sample(path, "sdpa")
    pipe, out = sample(path, "triton")
    if pipe.family.denoiser_part == "unet":
        assert all(isinstance(p, attn.GenAttnProcessor) for p in pipe.denoiser.attn_processors.values())
    assert ref.std() > 0.01
    assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.parametrize("folder", ["unet_folder", "dit_folder"])
@pytest.mark.parametrize("backend", [b for b in attn.BACKENDS if b != "sdpa"])
def test_every_available_backend_gives_the_sdpa_images(folder, backend, request):
    """The contract: whichever backend runs, a pipeline's images are the SDPA ones within fp32 tolerance."""
    if backend != "auto" and backend not in attn.available_backends():
        pytest.skip(f"{backend} cannot run here")
    path = request.getfixturevalue(folder)
    _, ref = sample(path, "sdpa")
    _, out = sample(path, backend)
    assert ref.std() > 0.01
    assert np.abs(out - ref).max() <= 1e-4


def test_a_unet_always_runs_through_gens_processor_and_matches_diffusers(unet_folder):
    """Even with the default backend, so that auto governs a UNet as it does the DiT; on CPU (auto = SDPA)
    the UNet's output is bitwise what diffusers' own processor gives."""
    pipe = Pipeline.from_pretrained(unet_folder)
    assert all(isinstance(p, attn.GenAttnProcessor) for p in pipe.denoiser.attn_processors.values())
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(300), torch.randn(2, 77, 32)
    with torch.no_grad():
        ours = pipe.denoiser(x, t, encoder_hidden_states=text).sample
        pipe.denoiser.set_attn_processor(AttnProcessor2_0())
        theirs = pipe.denoiser(x, t, encoder_hidden_states=text).sample
    assert torch.equal(ours, theirs)


def test_pipelines_in_one_process_keep_their_own_backend(unet_folder):
    seen = []
    pipes = {}
    for backend in ("math", "sdpa"):
        pipes[backend] = Pipeline.from_pretrained(unet_folder, attention=backend)
        pipes[backend].progress = False
        pipes[backend].denoiser.register_forward_pre_hook(lambda *_: seen.append(attn.get_backend()))
    pipes["math"]("a", num_inference_steps=1, guidance_scale=1.0, seed=0, output_type="latent")
    assert seen == ["math"] and attn.get_backend() == "sdpa"  # the last one loaded stays the process default
    with pytest.raises(GenError, match="unknown attention backend"):
        with attn.use_backend("flash9"):
            pass


# ---- the MMDiT families: diffusers' own processors with only softmax(QK^T)V through gen's backend -------------
@pytest.fixture(scope="module")
def sd3_theirs(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    return diffusers_pipeline(StableDiffusion3Pipeline, sd3_folder)


def test_mmdit_processors_run_diffusers_code_with_gens_attention(sd3_folder, flux_folder):
    """The routed processors are subclasses of diffusers' whose __call__ is diffusers' code object; what differs is
    only the global it reaches attention through."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    for folder, stock in ((sd3_folder, JointAttnProcessor2_0), (flux_folder, FluxAttnProcessor)):
        procs = set(map(type, Pipeline.from_pretrained(folder, attention="math").denoiser.attn_processors.values()))
        assert len(procs) == 1 and issubclass(proc := procs.pop(), stock) and proc is not stock
        assert proc.__call__.__code__ is stock.__call__.__code__


TRITON = dict(marks=needs_triton)  # the interpreter is slow: a short T5 sequence, a small image, few steps


@pytest.mark.parametrize("backend,sampler,shift,short", [
    ("sdpa", "flow-euler", None, False), ("sdpa", "flow-heun", 1.5, False), ("math", "flow-euler", 1.5, False),
    ("math", "flow-heun", None, False), pytest.param("triton", "flow-euler", 1.5, True, **TRITON)])
def test_sd3_matches_diffusers_with_every_backend(sd3_theirs, sd3_folder, tmp_path, backend, sampler, shift, short):
    from tests.test_sd3 import with_shift
    from tests.test_sdxl import our_images, theirs_images

    seen = []
    pipe = Pipeline.from_pretrained(with_shift(sd3_folder, shift, tmp_path), attention=backend)
    pipe.progress = False
    pipe.denoiser.transformer_blocks[0].attn.register_forward_pre_hook(lambda *_: seen.append(attn.get_backend()))
    kw = dict(n=1, steps=1 if short else 3, size=16 if short else 32)
    if short and pipe.family.has_t5:
        kw["max_sequence_length"] = 8
    a = theirs_images(sd3_theirs, sampler, scheduler=None if shift is None else {"shift": shift}, **kw)
    b = our_images(pipe, sampler, **kw)
    assert set(seen) == {backend} and a.std() > 0.01
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "math", pytest.param("triton", **TRITON)])
def test_flux_matches_diffusers_with_every_backend(flux_folder, backend):
    from diffusers import FluxPipeline

    from tests.test_flux import our_images, theirs_images

    theirs = FluxPipeline.from_pretrained(flux_folder)
    theirs.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(flux_folder, attention=backend)
    pipe.progress = False
    kw = dict(n=1, height=16, width=24) | (dict(steps=2, max_sequence_length=8) if backend == "triton" else {})
    a, b = theirs_images(theirs, **kw), our_images(pipe, **kw)
    assert a.std() > 0.01
    assert np.abs(a - b).max() <= 1e-4


def test_an_mmdit_keeps_a_diffusers_backend_set_on_it(flux_folder):
    """set_attention_backend on the transformer still chooses diffusers' kernel: the processor hands such calls to
    diffusers' dispatch (here its native SDPA, so the images are the default's)."""
    pipe = Pipeline.from_pretrained(flux_folder, attention="math")
    pipe.progress = False
    ref = pipe("a cat", num_inference_steps=2, seed=0, height=16, width=16, output_type="np").images
    pipe.denoiser.set_attention_backend("native")
    out = pipe("a cat", num_inference_steps=2, seed=0, height=16, width=16, output_type="np").images
    procs = list(pipe.denoiser.attn_processors.values())
    assert all(p._attention_backend == "native" for p in procs)
    assert np.abs(out - ref).max() <= 1e-4
