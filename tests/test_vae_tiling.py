"""VAE tiling and slicing (gen.memory.vae_tiling, Pipeline.enable_vae_tiling, from_pretrained(vae_tiling=...),
gen sample --vae-tiling): the tiled path is taken (the decoder and encoder see tiles), its images are diffusers' own
tiled decode and encode, and they are close to the untiled ones, closer than tiles stitched without blending."""

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from gen import memory
from gen.errors import GenError
from gen.models import vae as vae_lib
from tests.conftest import psnr, quiet_pipeline
from tests.test_cli import gen


@pytest.fixture(scope="module")
def vae():
    """A 3-level (factor 4) VAE whose config.sample_size, 32 px, is diffusers' tile size: 8x8 latent tiles."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         sample_size=32).eval()


def smooth_latents(n=2, side=14, seed=1, channels=4) -> torch.Tensor:
    """Low-frequency latents (bicubic from 4x4 noise), as a denoised image's are, rather than white noise."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, channels, 4, 4, generator=g)
    return torch.nn.functional.interpolate(noise, size=(side, side), mode="bicubic")


def calls(module) -> list:
    """The input shape of each call of `module`, appended as it runs."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    return seen


def step(x: torch.Tensor, cols: list[int]) -> float:
    """The mean absolute step between pixel columns c - 1 and c over `cols`, relative to the image's mean step."""
    d = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(0, 1, 2))
    return (d[[c - 1 for c in cols]].mean() / d.mean()).item()


@torch.no_grad()
def test_tiled_decode_is_diffusers_own_and_close_to_the_whole_decode(vae):
    z = smooth_latents()
    whole = vae_lib.decode(vae, z)
    theirs = copy.deepcopy(vae)
    theirs.enable_tiling()  # diffusers' own: tiles from config.sample_size, overlap 0.25, blended seams
    ref = (theirs.decode(vae_lib.from_latents(vae, z)).sample.float() / 2 + 0.5).clamp(0, 1)
    ours = copy.deepcopy(vae)
    assert memory.vae_tiling(ours) == 32 and ours.tile_latent_min_size == 8
    seen = calls(ours.decoder)
    tiled = vae_lib.decode(ours, z)
    # 14 latent cells, tiles of 8 every 6: 3 x 3 tiles, and the batch one image at a time (slicing)
    assert len(seen) == 3 * 3 * 2 and seen[:3] == [(1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 2)]
    assert tiled.shape == whole.shape == (2, 3, 56, 56)
    assert (tiled - ref).abs().max() <= 1e-5
    ours.tile_overlap_factor = 0.0  # the same tiles stitched edge to edge, no overlap and no blend
    stitched = vae_lib.decode(ours, z)
    err, err_stitched = (tiled - whole).abs().mean().item(), (stitched - whole).abs().mean().item()
    # measured: blended 0.084 mean abs (PSNR 18.7 dB), stitched 0.102 (17.1 dB). A random VAE's GroupNorms and
    # mid-block attention see only their tile, so tiles differ everywhere (a trained VAE's far less); the seams are
    # where a blend shows: the step across the blended seams (px 24, 48) is 0.81 of the image's mean step (0.83 in
    # the whole decode), across the stitched seam (px 32) 2.03 (0.53 whole)
    assert 0 < err < 0.1 and err < 0.9 * err_stitched
    assert psnr(tiled.numpy(), whole.numpy()) > psnr(stitched.numpy(), whole.numpy()) + 1
    assert step(tiled, [24, 48]) < 1.1 * step(whole, [24, 48]) and step(stitched, [32]) > 3 * step(whole, [32])
    memory.no_vae_tiling(ours)
    assert torch.equal(vae_lib.decode(ours, z), whole)


@torch.no_grad()
def test_tiled_encode_is_diffusers_own(vae):
    x = vae_lib.decode(vae, smooth_latents()) * 2 - 1  # a 56 px image: 32 px tiles every 24 px
    theirs = copy.deepcopy(vae)
    theirs.enable_tiling()
    ours = copy.deepcopy(vae)
    memory.vae_tiling(ours)
    seen = calls(ours.encoder)
    mean = ours.encode(x).latent_dist.mean
    assert len(seen) == 2 * 3 * 3 and seen[0] == (1, 3, 32, 32)
    assert (mean - theirs.encode(x).latent_dist.mean).abs().max() <= 1e-5
    whole = vae.encode(x).latent_dist.mean
    assert 0 < (mean - whole).abs().mean() < 0.5 * whole.abs().mean()


@torch.no_grad()
def test_the_16_channel_vae_of_sd3_and_flux_tiles_as_diffusers_does():
    """SD3's and Flux's VAE layout: 16 latent channels, no quant convs, a shift factor (gen.models.vae scales it)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), latent_channels=16, layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                        sample_size=32).eval()
    z = smooth_latents(channels=16)
    whole = vae_lib.decode(vae, z)
    theirs = copy.deepcopy(vae)
    theirs.enable_tiling()
    ours = copy.deepcopy(vae)
    memory.vae_tiling(ours)
    seen = calls(ours.decoder)
    tiled = vae_lib.decode(ours, z)
    ref = (theirs.decode(vae_lib.from_latents(vae, z)).sample.float() / 2 + 0.5).clamp(0, 1)
    assert len(seen) == 2 * 3 * 3 and (tiled - ref).abs().max() <= 1e-5
    assert 0 < (tiled - whole).abs().mean() < 0.15  # measured 0.114 mean abs (16.2 dB): a random VAE, as above
    x = whole * 2 - 1
    mean = ours.encode(x).latent_dist.mean
    assert (mean - theirs.encode(x).latent_dist.mean).abs().max() <= 1e-5  # measured 2.9e-6 (decode 2.7e-6)
    whole_mean = vae.encode(x).latent_dist.mean
    assert 0 < (mean - whole_mean).abs().mean() < 0.8 * whole_mean.abs().mean()  # measured 0.15 of 0.25


def test_a_tile_size_that_does_not_fit_the_vae_is_one_line(vae):
    for bad in (30, 12, 0, 0.5, True):
        with pytest.raises(GenError, match="multiple of 16 pixels"):
            memory.vae_tiling(copy.deepcopy(vae), bad)


def test_the_pipeline_tiles_decode_img2img_and_hires(sd_folder):
    """The tiny SD VAE (factor 2): 64 px images in 32 px tiles (32 latent cells, tiles of 16 every 12: 3 x 3)."""
    kw = dict(num_inference_steps=2, seed=3, height=64, width=64, output_type="np")
    whole = quiet_pipeline(sd_folder)("a red circle", **kw).images
    pipe = quiet_pipeline(sd_folder, vae_tiling=32)
    assert pipe.vae_tiling == 32 and pipe.vae.use_tiling and pipe.vae.use_slicing
    dec, enc = calls(pipe.vae.decoder), calls(pipe.vae.encoder)
    tiled = pipe("a red circle", **kw).images
    assert len(dec) == 9 and not enc
    assert 0 < np.abs(tiled - whole).max() and psnr(tiled, whole) > 25  # measured 37.4 dB
    pipe("a red circle", image=Image.fromarray((tiled[0] * 255).astype("uint8")), strength=0.5, **kw)
    assert len(enc) == 9 and len(dec) == 18  # 64 px: 32 px tiles every 24 px
    pipe("a red circle", hires_scale=1.5, hires_upscaler="image", **(kw | dict(height=48, width=48)))
    assert len(enc) == 9 + 9 and len(dec) == 18 + 4 + 9  # decode at 48 px: 2 x 2 tiles; encode, decode at 72: 3 x 3
    assert np.array_equal(pipe.disable_vae_tiling()("a red circle", **kw).images, whole)


@pytest.mark.parametrize("flux_folder", [True], indirect=True, ids=["dev"])
def test_a_flux_pipeline_tiles_its_decode(flux_folder):
    """Flux's latents, unpacked, decode in tiles (the tiny Flux VAE: factor 2, 32 px tiles of 16 cells)."""
    kw = dict(num_inference_steps=2, seed=3, height=64, width=64, output_type="np")
    whole = quiet_pipeline(flux_folder)("a red circle", **kw).images
    pipe = quiet_pipeline(flux_folder, vae_tiling=32)
    dec = calls(pipe.vae.decoder)
    tiled = pipe("a red circle", **kw).images
    assert len(dec) == 9 and 0 < np.abs(tiled - whole).max() and psnr(tiled, whole) > 22  # measured 26.8 dB


def test_gen_sample_vae_tiling(sd_folder, tmp_path):
    """--vae-tiling (the VAE's own 32 px sample_size, below 512): the API's image, the tile in the PNG recipe (it moves
    pixels), and --from makes the same image again; a tile that does not fit is one line, exit 2."""
    out = tmp_path / "a.png"
    r = gen("sample", "a red circle", "--model", sd_folder, "--steps", 2, "--seed", 3, "--height", 64, "--width", 64,
            "--vae-tiling", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    api = quiet_pipeline(sd_folder).enable_vae_tiling()
    assert api.vae_tiling == 32
    image = api("a red circle", num_inference_steps=2, seed=3, height=64, width=64).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(image))
    assert "gen VAE tile: 32" in Image.open(out).text["parameters"]
    again = tmp_path / "b.png"
    r = gen("sample", "--from", out, "--out", again, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(image))
    r = gen("sample", "a red circle", "--model", sd_folder, "--vae-tiling", "36", "--steps", 2,
            "--out", tmp_path / "c.png")
    assert r.returncode == 2 and "multiple of 8 pixels" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c.png").exists()
