"""Flux IP-Adapter (gen.ip_adapter_flux): a tiny random CLIP vision encoder and an adapter written in XLabs' key
layout give diffusers' images (FluxPipeline.load_ip_adapter + ip_adapter_image, true CFG's black-image negative
too); scale 0 is the model without it; `gen sample --ip-adapter` on Flux; SD files on Flux (and the reverse), wrong
encoders and block counts are one-line errors."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from gen.cli import main
from gen.errors import GenError
from tests.conftest import quiet_pipeline
from tests.test_cli import gen
from tests.test_ip_adapter import h94_adapter

RUN = dict(prompt="a red circle", num_inference_steps=2, height=16, width=16)
SEED = 5


def image_encoder(folder, projection_dim: int = 16):
    torch.manual_seed(1)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=8, projection_dim=projection_dim)).save_pretrained(folder)
    return folder


def xlabs_adapter(folder, transformer, blocks: int | None = None, seed: int = 0):
    """An IP-Adapter file in XLabs' Flux layout for `transformer` (ip_adapter_proj_model.* and
    double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*, biased), and its image_encoder/."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ctx, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    state = {"ip_adapter_proj_model.proj.weight": torch.randn(4 * ctx, 16) * 0.3,
             "ip_adapter_proj_model.proj.bias": torch.randn(4 * ctx) * 0.1,
             "ip_adapter_proj_model.norm.weight": 1 + torch.randn(ctx) * 0.1,
             "ip_adapter_proj_model.norm.bias": torch.randn(ctx) * 0.1}
    for n in range(transformer.config.num_layers if blocks is None else blocks):
        for kv in ("k", "v"):
            key = f"double_blocks.{n}.processor.ip_adapter_double_stream_{kv}_proj"
            state |= {f"{key}.weight": torch.randn(inner, ctx) * 0.5, f"{key}.bias": torch.randn(inner) * 0.1}
    save_file(state, str(folder / "ip_adapter.safetensors"))
    image_encoder(folder / "image_encoder")
    return folder / "ip_adapter.safetensors"


@pytest.fixture(scope="module")
def ip_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("ipflux") / "style.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def _guidance(pipe) -> dict:
    """dev: the embedded guidance 3.5; schnell refuses one (diffusers ignores it)."""
    return {"guidance_scale": 3.5} if pipe.denoiser.config.guidance_embeds else {}


def diffusers_images(folder, adapter, image, scale: float, **kw):
    theirs = FluxPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_ip_adapter(str(adapter.parent), weight_name=adapter.name, image_encoder_dtype=torch.float32,
                           image_encoder_pretrained_model_name_or_path=str(adapter.parent / "image_encoder"))
    theirs.set_ip_adapter_scale(scale)
    return theirs(**RUN, guidance_scale=3.5, ip_adapter_image=Image.open(image), output_type="np",
                  generator=torch.Generator("cpu").manual_seed(SEED), **kw).images


def test_parity_with_diffusers_and_scale_zero_is_no_adapter(flux_folder, ip_image, tmp_path):
    pipe = quiet_pipeline(flux_folder)
    adapter = xlabs_adapter(tmp_path / "xlabs", pipe.denoiser)
    plain = pipe(**RUN, **_guidance(pipe), seed=SEED, output_type="np").images
    pipe.load_ip_adapter(adapter)
    kinds = {type(p).__name__ for n, p in pipe.denoiser.attn_processors.items() if n.startswith("transformer_")}
    assert kinds == {"GenFluxIPAdapterAttnProcessor"}  # diffusers' code, its attention through gen's backend
    ours = pipe(**RUN, **_guidance(pipe), seed=SEED, output_type="np", ip_adapter_image=ip_image,
                ip_adapter_scale=0.7).images
    diff = np.abs(ours - diffusers_images(flux_folder, adapter, ip_image, 0.7)).max()
    print(f"flux: max abs diff vs diffusers {diff:.2e}, adapter effect {np.abs(ours - plain).max():.3f}")
    assert diff <= 1e-4 and np.abs(ours - plain).max() > 0.01
    cfg = dict(negative_prompt="blurry", true_cfg_scale=3.0)  # the negative pass sees a black image's embedding
    ours_cfg = pipe(**RUN, **_guidance(pipe), seed=SEED, output_type="np", ip_adapter_image=ip_image,
                    ip_adapter_scale=0.7, **cfg).images
    diff = np.abs(ours_cfg - diffusers_images(flux_folder, adapter, ip_image, 0.7, **cfg)).max()
    print(f"flux true CFG: max abs diff vs diffusers {diff:.2e}")
    assert diff <= 1e-4
    zero = pipe(**RUN, **_guidance(pipe), seed=SEED, output_type="np", ip_adapter_image=ip_image,
                ip_adapter_scale=0.0).images
    assert np.abs(zero - plain).max() <= 1e-6
    pipe.unload_ip_adapter()
    assert {type(p).__name__ for p in pipe.denoiser.attn_processors.values()} == {"GenFluxAttnProcessor"}
    assert np.abs(pipe(**RUN, **_guidance(pipe), seed=SEED, output_type="np").images - plain).max() <= 1e-6


@pytest.mark.parametrize("flux_folder", [True], indirect=True, ids=["dev"])
def test_refusals_are_one_line(flux_folder, sd_folder, ip_image, tmp_path, capsys):
    flux, sd = quiet_pipeline(flux_folder), quiet_pipeline(sd_folder)
    adapter = xlabs_adapter(tmp_path / "xlabs", flux.denoiser)
    with pytest.raises(GenError, match="is a Flux IP-Adapter \\(XLabs' layout\\), but this is a SD"):
        sd.load_ip_adapter(adapter)
    sd_adapter = h94_adapter(tmp_path / "sd", sd.denoiser, "ip-adapter_sd15.safetensors")
    with pytest.raises(GenError, match="is an IP-Adapter for cross-attention width 32 UNets .* but this is a Flux"):
        flux.load_ip_adapter(sd_adapter)
    with pytest.raises(GenError, match="for 2 double blocks with 32x32 projections, but this Flux transformer has 1"):
        flux.load_ip_adapter(xlabs_adapter(tmp_path / "two", flux.denoiser, blocks=2))
    with pytest.raises(GenError, match="gives 24-wide embeddings, but ip_adapter.safetensors takes 16"):
        flux.load_ip_adapter(adapter, image_encoder=image_encoder(tmp_path / "wide", projection_dim=24))
    with pytest.raises(GenError, match="text_encoder is not a CLIP vision encoder \\(its config.json is a clip_text"):
        flux.load_ip_adapter(adapter, image_encoder=flux_folder / "text_encoder")
    assert flux.ip_adapter is None and getattr(flux.denoiser, "encoder_hid_proj", None) is None  # a refused file changes nothing
    capsys.readouterr()
    assert main(["sample", "x", "--model", str(flux_folder), "--steps", "1", "--height", "16", "--width", "16",
                 "--ip-adapter", str(sd_adapter), "--ip-image", str(ip_image), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "but this is a Flux model" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flux_folder", [True], indirect=True, ids=["dev"])
def test_cli_sample_on_flux_is_the_pipelines_image(flux_folder, ip_image, tmp_path):
    adapter = xlabs_adapter(tmp_path / "xlabs", quiet_pipeline(flux_folder).denoiser)
    out = tmp_path / "a.png"
    r = gen("sample", RUN["prompt"], "--model", flux_folder, "--steps", 2, "--height", 16, "--width", 16, "--seed",
            SEED, "--guidance", 3.5, "--ip-adapter", adapter, "--image-encoder", adapter.parent / "image_encoder",
            "--ip-image", ip_image, "--ip-scale", 0.7, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    api = quiet_pipeline(flux_folder, ip_adapter=adapter)(**RUN, guidance_scale=3.5, seed=SEED,
                                                          ip_adapter_image=ip_image, ip_adapter_scale=0.7).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))
