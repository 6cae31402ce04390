"""IP-Adapter (gen.ip_adapter): a tiny random CLIP vision encoder and adapter saved in h94's layout give diffusers'
images (load_ip_adapter + ip_adapter_image) for SD-1.x and SDXL; scale 0 is the model without it; `gen sample
--ip-adapter` records it and `--from` replays it; wrong files and images are one-line errors."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from gen.cli import main
from gen.errors import GenError
from gen.recipe import read_png
from gen.samplers import SAMPLERS
from tests.conftest import diffusers_pipeline, quiet_pipeline
from tests.test_cli import gen

RUN = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32)
SEED = 3


def plus_projection(ctx: int, width: int = 32, dim: int = 64, tokens: int = 4, depth: int = 4) -> dict:
    """IP-Adapter Plus's image_proj (h94's Resampler: a perceiver over the encoder's states, one 64-wide head)."""
    r = {"latents": torch.randn(1, tokens, dim) * dim ** -0.5, "proj_in.weight": torch.randn(dim, width) * 0.2,
         "proj_in.bias": torch.zeros(dim), "proj_out.weight": torch.randn(ctx, dim) * 0.2,
         "proj_out.bias": torch.zeros(ctx), "norm_out.weight": torch.ones(ctx), "norm_out.bias": torch.zeros(ctx)}
    for i in range(depth):
        r |= {f"layers.{i}.0.{k}": v for k, v in {
            "norm1.weight": torch.ones(dim), "norm1.bias": torch.zeros(dim), "norm2.weight": torch.ones(dim),
            "norm2.bias": torch.zeros(dim), "to_q.weight": torch.randn(dim, dim) * 0.1,
            "to_kv.weight": torch.randn(2 * dim, dim) * 0.1, "to_out.weight": torch.randn(dim, dim) * 0.1}.items()}
        r |= {f"layers.{i}.1.0.weight": torch.ones(dim), f"layers.{i}.1.0.bias": torch.zeros(dim),
              f"layers.{i}.1.1.weight": torch.randn(4 * dim, dim) * 0.1,
              f"layers.{i}.1.3.weight": torch.randn(dim, 4 * dim) * 0.1}
    return r


def h94_adapter(folder, unet, name: str, seed: int = 0, plus: bool = False):
    """An IP-Adapter file in h94's layout for `unet` (image_proj.* and ip_adapter.{1,3,5,...}.to_k_ip / to_v_ip,
    numbered over all attention layers as the original repo's AttnProcessor list), and its image_encoder/."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = unet.config.cross_attention_dim
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=8, projection_dim=16))
    encoder.save_pretrained(folder / "image_encoder")
    proj = plus_projection(ctx) if plus else {
        "proj.weight": torch.randn(4 * ctx, 16) * 0.3, "proj.bias": torch.randn(4 * ctx),
        "norm.weight": 1 + torch.randn(ctx) * 0.1, "norm.bias": torch.randn(ctx) * 0.1}
    state = {f"image_proj.{k}": v for k, v in proj.items()}
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for j, name_ in enumerate(cross):
        width = unet.get_submodule(name_[:-len(".processor")]).to_k.out_features
        for k in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * j + 1}.{k}.weight"] = torch.randn(width, ctx) * 0.3
    save_file(state, str(folder / name))
    return folder / name


@pytest.fixture(scope="module")
def ip_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("ip") / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def diffusers_images(cls, folder, adapter, image, scale: float):
    theirs = diffusers_pipeline(cls, folder)
    theirs.scheduler = SAMPLERS["euler"][1].from_config(theirs.scheduler.config, **SAMPLERS["euler"][2])
    theirs.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
    theirs.set_ip_adapter_scale(scale)
    return theirs(**RUN, ip_adapter_image=Image.open(image), output_type="np",
                  generator=torch.Generator("cpu").manual_seed(SEED)).images


@pytest.mark.parametrize("kind", ["sd", "sd-plus", "sdxl"])
def test_parity_with_diffusers_and_scale_zero_is_no_adapter(kind, sd_folder, sdxl_folder, ip_image, tmp_path):
    """The plus model reads the encoder's penultimate states, its negative those of a zero image."""
    sd = kind.startswith("sd-") or kind == "sd"
    folder, cls = (sd_folder, StableDiffusionPipeline) if sd else (sdxl_folder, StableDiffusionXLPipeline)
    pipe = quiet_pipeline(folder)
    adapter = h94_adapter(tmp_path / "models", pipe.denoiser, f"ip-adapter_{kind}.safetensors", plus="plus" in kind)
    plain = pipe(**RUN, seed=SEED, sampler="euler", output_type="np").images
    pipe.load_ip_adapter(adapter)
    kinds = {type(p).__name__ for n, p in pipe.denoiser.attn_processors.items() if n.endswith("attn2.processor")}
    assert kinds == {"GenIPAdapterAttnProcessor2_0"}  # diffusers' code, its attention through gen's backend
    ours = pipe(**RUN, seed=SEED, sampler="euler", output_type="np", ip_adapter_image=ip_image,
                ip_adapter_scale=0.7).images
    ref = diffusers_images(cls, folder, adapter, ip_image, 0.7)
    diff = np.abs(ours - ref).max()
    print(f"{kind}: max abs diff vs diffusers {diff:.2e}, adapter effect {np.abs(ours - plain).max():.3f}")
    assert diff <= 1e-4 and np.abs(ours - plain).max() > 0.01
    zero = pipe(**RUN, seed=SEED, sampler="euler", output_type="np", ip_adapter_image=ip_image,
                ip_adapter_scale=0.0).images
    assert np.abs(zero - plain).max() <= 1e-6
    if kind == "sd":  # image k of a batch is that image made alone (DESIGN.md's seeds contract)
        two = pipe(**RUN, seed=SEED - 1, sampler="euler", output_type="np", ip_adapter_image=ip_image,
                   ip_adapter_scale=0.7, num_images_per_prompt=2).images
        assert np.abs(two[1] - ours[0]).max() <= 1e-5
    with pytest.raises(GenError, match="fast mode"):
        pipe(**RUN, seed=SEED, ip_adapter_image=ip_image, cache_interval=2)
    pipe.unload_ip_adapter()
    assert np.abs(pipe(**RUN, seed=SEED, sampler="euler", output_type="np").images - plain).max() <= 1e-6


def test_refusals_are_one_line(sd_folder, sdxl_folder, dit_folder, ip_image, tmp_path, capsys):
    sd = quiet_pipeline(sd_folder)
    sd_adapter = h94_adapter(tmp_path / "sd", sd.denoiser, "ip-adapter_sd15.safetensors")
    with pytest.raises(GenError, match="IP-Adapter for cross-attention width 32"):
        quiet_pipeline(sdxl_folder).load_ip_adapter(sd_adapter)
    with pytest.raises(GenError, match="IP-Adapter is for SD-1.x/2.x and SDXL UNets and Flux; this is a"):
        quiet_pipeline(dit_folder).load_ip_adapter(sd_adapter)
    with pytest.raises(GenError, match="no CLIP image encoder"):
        sd.load_ip_adapter(sd_adapter, image_encoder=tmp_path / "nowhere")
    pickle = tmp_path / "sd" / "ip-adapter_sd15.bin"  # h94's .bin: {"image_proj": {...}, "ip_adapter": {...}}
    state = load_file(sd_adapter)
    torch.save({p: {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p)}
                for p in ("image_proj", "ip_adapter")}, pickle)
    with pytest.raises(GenError, match="pickle"):
        sd.load_ip_adapter(pickle)
    sd.load_ip_adapter(pickle, allow_pickle=True)  # read by gen.io's weights-only loader, as every pickle in gen
    assert torch.equal(sd.denoiser.encoder_hid_proj.image_projection_layers[0].image_embeds.weight,
                       state["image_proj.proj.weight"])
    sd.unload_ip_adapter()
    broken = tmp_path / "sd" / "broken.safetensors"
    save_file({k: v for k, v in state.items() if k != "image_proj.norm.bias"}, str(broken))
    with pytest.raises(GenError, match="not a loadable IP-Adapter"):
        sd.load_ip_adapter(broken)
    assert sd.denoiser.encoder_hid_proj is None and sd.ip_adapter is None  # a refused file changes nothing
    save_file(state | {"image_proj.proj.weight": torch.zeros(state["image_proj.proj.weight"].shape[0], 24)},
              str(broken))
    with pytest.raises(GenError, match="gives 16-wide embeddings, but broken.safetensors takes 24"):
        sd.load_ip_adapter(broken)
    with pytest.raises(GenError, match="needs an IP-Adapter"):
        sd(**RUN, ip_adapter_image=ip_image)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["sample", "x", "--model", str(sd_folder), "--steps", "1", "--height", "32", "--width", "32",
                 "--ip-adapter", str(sd_adapter), "--ip-image", str(bad), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable image" in err and len(err.splitlines()) == 1
    assert main(["sample", "x", "--model", str(sd_folder), "--ip-image", str(ip_image)]) == 2  # before any load
    assert capsys.readouterr().err.strip() == "gen: error: --ip-image needs --ip-adapter"


def test_cli_records_the_adapter_and_from_replays_it(sd_folder, ip_image, tmp_path):
    adapter = h94_adapter(tmp_path / "models", quiet_pipeline(sd_folder).denoiser, "ip-adapter_sd15.safetensors")
    out = tmp_path / "a.png"
    r = gen("sample", RUN["prompt"], "--model", sd_folder, "--steps", 2, "--height", 32, "--width", 32, "--seed", SEED,
            "--sampler", "euler", "--guidance", 5, "--ip-adapter", adapter, "--ip-image", ip_image, "--ip-scale", 0.7,
            "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    recipe = read_png(out)
    assert (recipe.ip_adapter, recipe.ip_image, recipe.ip_scale) == (str(adapter), str(ip_image), 0.7)
    api = quiet_pipeline(sd_folder, ip_adapter=adapter)(**RUN, seed=SEED, sampler="euler", ip_adapter_image=ip_image,
                                                        ip_adapter_scale=0.7).images[0]
    cli = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(cli, np.asarray(api))
    again = tmp_path / "b.png"
    assert main(["sample", "--from", str(out), "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), cli)
