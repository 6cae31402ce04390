"""fp16 VAE overflow: the decode is redone in fp32 with one warning instead of returning black images."""

import copy
import logging

import numpy as np
import torch

from gen.models import vae as vae_lib


def overflowing_vae():
    """A tiny fp16 VAE whose decoder input conv is scaled so its fp16 activations overflow to inf."""
    torch.manual_seed(0)
    vae = vae_lib.build_vae("tiny").eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    return vae.half()


def latents():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def test_the_vae_really_overflows_in_fp16():
    vae = overflowing_vae()
    with torch.no_grad():
        raw = vae.decode(vae_lib.from_latents(vae, latents()).half()).sample
    assert not torch.isfinite(raw).all()


def test_fp16_overflow_is_decoded_again_in_fp32(caplog):
    vae = overflowing_vae()
    reference = vae_lib.decode(copy.deepcopy(vae).float(), latents())  # the same (fp16-rounded) weights in fp32
    with caplog.at_level(logging.WARNING, logger="gen"), torch.no_grad():
        images = vae_lib.decode(vae, latents())
    assert [r.getMessage() for r in caplog.records if "overflow" in r.getMessage()] == [
        "VAE decode overflowed in float16 (NaN/inf); decoding again in float32"]
    assert torch.isfinite(images).all() and images.std() > 0.01  # not black
    assert torch.equal(images, reference)
    assert vae.dtype == torch.float16  # the VAE is left as it was


def test_pipeline_with_an_overflowing_fp16_vae_gives_images(dit_pipe, caplog):
    dit_pipe.vae = overflowing_vae()
    with caplog.at_level(logging.WARNING, logger="gen"):
        images = dit_pipe("x", num_inference_steps=1, height=32, width=32, output_type="np", seed=0).images
    assert np.isfinite(images).all() and images.max() > 0.05
    assert sum("overflow" in r.getMessage() for r in caplog.records) == 1
