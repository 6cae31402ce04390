"""Single-file checkpoints (original LDM/A1111/SGM layout): folder -> file -> folder with the same images, diffusers'
from_single_file reading gen's files, configs derived from shapes alone, `gen convert`/`gen info`, and the errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gen.errors import GenError
from gen.io import write_safetensors
from gen.pipeline import Pipeline

from tests.conftest import tiny_sd_components, tiny_sdxl_components

KW = dict(num_inference_steps=3, seed=7, output_type="np", height=16, width=16)


def tiny_sd2_components(seed: int = 0) -> dict:
    """A tiny SD-2.x-like model: linear projections in the UNet's transformers, per-level head counts, an
    OpenCLIP-like (gelu) text tower, and a v-prediction DDIM schedule, built with diffusers/transformers."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = tiny_sd_components(seed)
    torch.manual_seed(seed + 1)
    parts["unet"] = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, cross_attention_dim=48, norm_num_groups=32)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=48, intermediate_size=64, num_attention_heads=3,
        num_hidden_layers=3, vocab_size=len(parts["tokenizer"]), hidden_act="gelu", max_position_embeddings=77))
    parts["scheduler"] = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                       prediction_type="v_prediction")
    return parts


def tiny_sdxl_two_widths(seed: int = 0) -> dict:
    """The tiny SDXL with towers of different widths (32 and 48): diffusers' from_single_file tells SDXL's two
    towers apart by width (768 vs 1280), so equal widths would load CLIP-L's weights into both."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    parts = tiny_sdxl_components(seed)
    cfg = parts["text_encoder_2"].config.to_dict() | dict(hidden_size=48, num_attention_heads=4)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    parts["unet"] = UNet2DConditionModel.from_config(dict(parts["unet"].config) | {"cross_attention_dim": 80})
    return parts


def _saved(tmp_path_factory, components: dict, name: str):
    """A diffusers folder of these components, saved by diffusers' own pipeline class."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = tmp_path_factory.mktemp(name) / name
    if "text_encoder_2" in components:
        StableDiffusionXLPipeline(**components).save_pretrained(path)
    else:
        StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sdxl2_folder(tmp_path_factory):
    return _saved(tmp_path_factory, tiny_sdxl_two_widths(), "tiny-sdxl2")


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    return _saved(tmp_path_factory, tiny_sd2_components(), "tiny-sd2")


@pytest.fixture(params=["sd_folder", "sd2_folder", "sdxl_folder"])
def folder(request):
    return request.getfixturevalue(request.param)


def _images(path, **kw) -> np.ndarray:
    pipe = Pipeline.from_pretrained(path, **kw)
    pipe.progress = False
    return pipe("a red square", negative_prompt="blur", **KW).images


def test_folder_to_file_and_back_same_images(folder, tmp_path):
    """folder -> single file -> Pipeline and -> folder again: the same images (<= 1e-4), same family and defaults."""
    src = Pipeline.from_pretrained(folder)
    file = tmp_path / "model.safetensors"
    src.save_pretrained(file, single_file=True)
    keys = set(safe_open(str(file), "pt").keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    loaded = Pipeline.from_pretrained(file)
    assert loaded.family.name == src.family.name
    assert loaded.defaults == src.defaults and loaded.formulation == src.formulation
    want = _images(folder)
    assert np.abs(_images(file) - want).max() <= 1e-4
    loaded.save_pretrained(tmp_path / "again")
    assert np.abs(_images(tmp_path / "again") - want).max() <= 1e-4


def test_sd2_v_prediction_read_from_metadata_and_overridable(sd2_folder, tmp_path):
    file = tmp_path / "sd2.safetensors"
    Pipeline.from_pretrained(sd2_folder).save_pretrained(file, single_file=True)
    pipe = Pipeline.from_pretrained(file)
    assert pipe.family.name == "sd2" and pipe.formulation.prediction_type == "v_prediction"
    eps = Pipeline.from_pretrained(file, prediction_type="epsilon")
    assert eps.formulation.prediction_type == "epsilon"
    with pytest.raises(GenError, match="prediction_type"):
        Pipeline.from_pretrained(file, prediction_type="flow")


@pytest.mark.parametrize("name", ["sd_folder", "sd2_folder", "sdxl2_folder"])
def test_diffusers_from_single_file_reads_gen_files(name, request, tmp_path):
    """diffusers' own single-file loader, given the original folder as config, gives the folder's images."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(name)
    klass = StableDiffusionXLPipeline if name == "sdxl2_folder" else StableDiffusionPipeline
    file = tmp_path / "model.safetensors"
    Pipeline.from_pretrained(folder).save_pretrained(file, single_file=True)
    extra = {} if klass is StableDiffusionXLPipeline else {"safety_checker": None, "requires_safety_checker": False}
    run = dict(prompt="a red square", num_inference_steps=3, height=16, width=16, output_type="np")
    a = klass.from_pretrained(folder, **extra)(**run, generator=torch.Generator().manual_seed(3)).images
    b = klass.from_single_file(str(file), config=str(folder), local_files_only=True, **extra)
    assert not any(p.is_meta for m in b.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    b = b(**run, generator=torch.Generator().manual_seed(3)).images
    assert np.abs(a - b).max() <= 1e-4
    if name == "sdxl2_folder":  # and gen reads its own file of this model the same
        assert np.abs(_images(file) - _images(folder)).max() <= 1e-4


def test_configs_from_shapes_alone_match_the_folder(folder, tmp_path):
    """With gen's hints left out, the shapes alone give the folder's architecture (ComfyUI's detection keys)."""
    from gen import single_file
    from gen.families import ldm

    pipe = Pipeline.from_pretrained(folder)
    file = tmp_path / "m.safetensors"
    pipe.save_pretrained(file, single_file=True)
    shapes, _ = single_file.header(file)
    family = single_file.detect(file, shapes)
    assert family.name == pipe.family.name
    conv = family.file_convention("epsilon") | {"pooled_dim": pipe.texts[-1].model.config.projection_dim}
    unet, want = ldm.unet_config(shapes, {}, conv), pipe.denoiser.config
    for key in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                "up_block_types", "use_linear_projection", "addition_embed_type"):
        assert unet.get(key) == (list(want[key]) if isinstance(want[key], tuple) else want[key]), key
    assert list(unet["block_out_channels"]) == list(want.block_out_channels)
    if want.addition_embed_type:
        assert unet["addition_time_embed_dim"] == want.addition_time_embed_dim
        assert unet["transformer_layers_per_block"] == [1, 2]
    vae = ldm.vae_config(shapes, {}, conv)
    for key in ("block_out_channels", "latent_channels", "layers_per_block"):
        assert list(np.atleast_1d(vae[key])) == list(np.atleast_1d(pipe.vae.config[key])), key
    for (enc, tok, prefix, kind), text in zip(family.file_texts, pipe.texts):
        cfg = ldm.text_config(shapes, prefix, kind, {}, False, text.tokenizer)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"):
            assert cfg[key] == getattr(text.model.config, key), (enc, key)


def _strip_gen_metadata(src, dst, extra_block: bool = False) -> None:
    """A copy of a file as another tool writes it: no gen metadata (and, for SD-2.x, the unused last block)."""
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if extra_block:
        last = max(int(k.split(".")[4]) for k in tensors if ".resblocks." in k)
        for k in [k for k in tensors if f".resblocks.{last}." in k]:
            tensors[k.replace(f".resblocks.{last}.", f".resblocks.{last + 1}.")] = torch.randn_like(tensors[k])
    write_safetensors(dst, tensors, {})


def test_foreign_file_needs_tokenizer_and_takes_hints(sd2_folder, tmp_path):
    """A file gen did not write: no tokenizer (one-line error naming --tokenizer), the prediction type from the
    caller; SD-2.x's unused last OpenCLIP block is dropped as diffusers does."""
    file = tmp_path / "gen.safetensors"
    Pipeline.from_pretrained(sd2_folder).save_pretrained(file, single_file=True)
    foreign = tmp_path / "foreign" / "sd2.safetensors"
    _strip_gen_metadata(file, foreign, extra_block=True)
    with pytest.raises(GenError, match="--tokenizer FOLDER") as e:
        Pipeline.from_pretrained(foreign)
    assert "\n" not in str(e.value)
    pipe = Pipeline.from_pretrained(foreign, tokenizer=sd2_folder, prediction_type="v_prediction")
    assert pipe.formulation.prediction_type == "v_prediction" and pipe.family.name == "sd2"
    assert pipe.text.model.config.num_hidden_layers == 3
    assert pipe.text.model.config.hidden_act == "gelu"  # OpenCLIP's, not CLIP-L's quick_gelu
    assert list(pipe.denoiser.config.attention_head_dim) == [1, 1]  # SD-2.x's 64 channels a head, at least one
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_gen_convert_both_ways_and_info(sdxl_folder, tmp_path):
    file, back = tmp_path / "xl.safetensors", tmp_path / "xl-folder"
    r = _cli("convert", sdxl_folder, file)
    assert r.returncode == 0, r.stderr
    r = _cli("convert", file, back)
    assert r.returncode == 0, r.stderr
    assert (back / "model_index.json").is_file() and (back / "text_encoder_2").is_dir()
    assert np.abs(_images(back) - _images(sdxl_folder)).max() <= 1e-4
    info = _cli("info", file)
    assert info.returncode == 0, info.stderr
    assert "family: SDXL" in info.stdout and "single file" in info.stdout and "unet:" in info.stdout
    info = _cli("info", back)
    assert "family: SDXL" in info.stdout and "diffusers folder" in info.stdout
    r = _cli("sample", "a red square", "--model", file, "--steps", 2, "--height", 16, "--width", 16, "--seed", 1,
             "--out", tmp_path / "o.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.png").is_file()


def _write(path, tensors: dict) -> None:
    write_safetensors(path, {k: torch.zeros(s) for k, s in tensors.items()}, {})


@pytest.mark.parametrize("keys, match", [
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4)},
     "needs a CLIP-L encoder .*--text-encoder clip_l.safetensors.*CLIP-G.*--vae ae.safetensors"),
    ({"double_blocks.0.img_attn.qkv.weight": (4, 4)},
     "needs a CLIP-L encoder .*a T5 encoder \\(--text-encoder t5xxl.safetensors\\)"),
    ({"encoder.layers.0.weight": (4, 4)}, "architecture gen does not know"),
])
def test_unknown_and_unsupported_architectures(tmp_path, keys, match):
    path = tmp_path / "m.safetensors"
    _write(path, keys)
    with pytest.raises(GenError, match=match) as e:
        Pipeline.from_pretrained(path)
    assert "\n" not in str(e.value)
    r = _cli("sample", "x", "--model", path)
    assert r.returncode == 2 and match.split()[0] in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_truncated_not_safetensors_and_pickle_files(sd_folder, tmp_path):
    file = tmp_path / "m.safetensors"
    Pipeline.from_pretrained(sd_folder).save_pretrained(file, single_file=True)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(GenError, match="truncated"):
        Pipeline.from_pretrained(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not a safetensors file")
    with pytest.raises(GenError, match="not a valid safetensors"):
        Pipeline.from_pretrained(junk)
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(GenError, match="pickle"):
        Pipeline.from_pretrained(ckpt)


def test_ckpt_loads_only_when_allowed(sd_folder, tmp_path):
    file = tmp_path / "m.safetensors"
    Pipeline.from_pretrained(sd_folder).save_pretrained(file, single_file=True)
    with safe_open(str(file), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(GenError, match="allow_pickle"):
        Pipeline.from_pretrained(ckpt, tokenizer=sd_folder)
    pipe = Pipeline.from_pretrained(ckpt, tokenizer=sd_folder, allow_pickle=True)
    pipe.progress = False
    same = tmp_path / "same.safetensors"  # the same tensors, no gen metadata either: the same conventions apply
    _strip_gen_metadata(file, same)
    assert np.abs(pipe("a red square", negative_prompt="blur", **KW).images -
                  _images(same, tokenizer=sd_folder)).max() <= 1e-4


def test_metadata_is_self_contained_and_write_is_atomic(sd_folder, tmp_path):
    file = tmp_path / "m.safetensors"
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.save_pretrained(file, single_file=True)
    meta = safe_open(str(file), "pt").metadata()
    gen = json.loads(meta["gen"])
    assert gen["family"] == "sd1" and gen["prediction_type"] == "epsilon" and "tokenizer_config.json" in json.loads(meta["gen.tokenizer"])
    before = file.read_bytes()
    with pytest.raises(GenError):
        pipe.save_pretrained(tmp_path / "m.bin", single_file=True)
    tensors = {"a": torch.ones(3), "b": torch.empty(2, device="meta")}  # fails while writing the data
    with pytest.raises(NotImplementedError):
        write_safetensors(file, tensors, {})
    assert file.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
