"""Streamed offload (gen.memory.Streamed: Pipeline.enable_offload(mode="group" | "sequential"), from_pretrained(
offload=..., offload_blocks=...), gen sample --offload group --offload-blocks N): diffusers' group-offloading hooks
on the denoiser's blocks (or layers) and the T5's layers; the CLIP towers visit whole (textual inversion copies
them per call). On this CPU-only machine the execution device is the CPU, so the hooks run (each group "onloaded"
to the CPU) and the images must be those without offload, bit for bit; the GPU timing and parity are
bench/offload.py's (bench/gpu.py's offload step)."""

import numpy as np
import pytest
from diffusers.hooks import HookRegistry

from gen import memory
from gen.errors import GenError
from tests.conftest import quiet_pipeline
from tests.test_cli import gen
from tests.test_lora import peft_lora_saved_by_diffusers

KW = dict(negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.0, num_images_per_prompt=2, seed=5,
          height=32, width=32, output_type="np")


def hooked(module) -> list[str]:
    """The names of `module`'s submodules that carry a group-offloading hook (the leaders of each group)."""
    return [name for name, m in module.named_modules()
            if isinstance(getattr(m, "_diffusers_hook", None), HookRegistry)
            and m._diffusers_hook.get_hook("group_offloading") is not None]


def test_block_path_finds_each_models_blocks(sd_folder, flux_folder):
    sd, flux = quiet_pipeline(sd_folder), quiet_pipeline(flux_folder)
    assert memory.block_path(sd.denoiser) == [] and memory.block_path(flux.denoiser) == []
    assert memory.block_path(sd.text.model) == ["encoder"]  # CLIP: encoder.layers (transformers 5's layout)
    assert memory.block_path(flux.texts[1].model) == ["encoder"]  # T5: encoder.block


@pytest.mark.parametrize("mode,blocks", [("group", 1), ("group", 2), ("sequential", 1)])
def test_sd_streamed_offload_changes_no_pixel(sd_folder, mode, blocks):
    whole = quiet_pipeline(sd_folder)("a red circle", **KW).images
    pipe = quiet_pipeline(sd_folder, offload=mode, offload_blocks=blocks)
    assert not hooked(pipe.denoiser)  # hooked at the first call
    images = pipe("a red circle", **KW).images
    assert np.abs(images - whole).max() == 0.0
    names = hooked(pipe.denoiser)
    if mode == "group":  # each group's first and last block lead it; the rest (conv_in, mid block, ...) one group
        ups, downs = len(pipe.denoiser.up_blocks), len(pipe.denoiser.down_blocks)
        leaders = {f"{part}.{i}" for part, n in (("down_blocks", downs), ("up_blocks", ups))
                   for g in range(0, n, blocks) for i in (g, min(g + blocks, n) - 1)}
        assert set(names) == leaders | {""}
    else:  # every Linear / Conv / Embedding is its own group
        import torch

        leaves = [n for n, m in pipe.denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        assert set(leaves) <= set(names)
    assert not hooked(pipe.text.model)  # the CLIP tower visits whole (textual inversion copies it per call)
    assert pipe.to("cpu")._streamed is None and not hooked(pipe.denoiser) and not hooked(pipe.text.model)
    assert np.array_equal(pipe("a red circle", **KW).images, whole)


@pytest.mark.parametrize("flux_folder", [True], indirect=True, ids=["dev"])
@pytest.mark.parametrize("mode", ["group", "sequential"])
def test_flux_streamed_offload_changes_no_pixel(flux_folder, mode):
    kw = KW | dict(negative_prompt=None, guidance_scale=3.5)
    whole = quiet_pipeline(flux_folder)("a red circle", **kw).images
    pipe = quiet_pipeline(flux_folder).enable_offload("cpu", mode)
    images = pipe("a red circle", **kw).images
    assert np.abs(images - whole).max() == 0.0
    assert hooked(pipe.denoiser) and hooked(pipe.texts[1].model)  # the transformer and T5
    if mode == "group":
        t = pipe.denoiser
        assert {f"transformer_blocks.{i}" for i in range(len(t.transformer_blocks))} <= set(hooked(t))
        assert {f"single_transformer_blocks.{i}" for i in range(len(t.single_transformer_blocks))} <= set(hooked(t))


@pytest.mark.parametrize("sd3_folder", ["with-t5"], indirect=True)
def test_sd3_skip_layer_guidance_under_group_offload(sd3_folder):
    """SLG's pass without some blocks: those blocks' groups are not called, the others load as usual."""
    kw = KW | dict(skip_guidance_layers=[0], skip_layer_guidance_scale=3.0, skip_layer_guidance_stop=0.9)
    whole = quiet_pipeline(sd3_folder)("a red circle", **kw).images
    pipe = quiet_pipeline(sd3_folder, offload="group")
    assert np.array_equal(pipe("a red circle", **kw).images, whole) and hooked(pipe.texts[2].model)


@pytest.mark.parametrize("mode", ["group", "sequential"])
def test_gens_dit_streamed_offload_changes_no_pixel(dit_folder, mode):
    whole = quiet_pipeline(dit_folder)("a red circle", **KW).images
    pipe = quiet_pipeline(dit_folder, offload=mode)
    assert np.array_equal(pipe("a red circle", **KW).images, whole)
    names = hooked(pipe.denoiser)
    for i in range(len(pipe.denoiser.blocks)):  # each block a group, or each of its layers
        assert f"blocks.{i}" in names if mode == "group" else any(n.startswith(f"blocks.{i}.") for n in names)


@pytest.mark.parametrize("flux_folder", [True], indirect=True, ids=["dev"])
def test_fp8_weights_stream_as_stored(flux_folder):
    """--weights fp8 with --offload group: the stored bytes move, the upcast hooks run on the device as before."""
    from gen import quant

    kw = KW | dict(negative_prompt=None, guidance_scale=3.5)
    alone = quiet_pipeline(flux_folder, weights="fp8")("a red circle", **kw).images
    pipe = quiet_pipeline(flux_folder, weights="fp8", offload="group")
    assert np.array_equal(pipe("a red circle", **kw).images, alone) and quant.layers([pipe.denoiser]) > 0


def test_a_lora_loaded_after_the_hooks_is_in_the_groups(sd_folder, tmp_path):
    """LoRA layers added (and fused) after a call re-hook the modules before the next one, as diffusers does."""
    lora = peft_lora_saved_by_diffusers(tmp_path / "a.safetensors", 1, r=4, unet_alpha=8, text_alpha=2)
    plain = quiet_pipeline(sd_folder)
    plain.load_lora(lora)
    want = plain("a red circle", **KW).images
    pipe = quiet_pipeline(sd_folder, offload="sequential")
    before = pipe("a red circle", **KW).images
    pipe.load_lora(lora)
    got = pipe("a red circle", **KW).images
    assert not np.array_equal(got, before) and np.abs(got - want).max() == 0.0
    lora_leaves = [n for n in hooked(pipe.denoiser) if "lora_A" in n]
    assert lora_leaves  # the LoRA's own Linear layers are groups too
    plain.fuse_lora(), pipe.fuse_lora()
    assert np.array_equal(pipe("a red circle", **KW).images, plain("a red circle", **KW).images)


def test_textual_inversion_under_streamed_offload(sd_folder, tmp_path):
    """A call's CLIP copies with the embedding's vectors run as without offload (they crashed when CLIP was hooked)."""
    import torch
    from safetensors.torch import save_file

    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    save_file({"emb_params": vectors}, tmp_path / "mystyle.safetensors")
    out = []
    for mode in (False, "group", "sequential"):
        pipe = quiet_pipeline(sd_folder, offload=mode)
        pipe.load_textual_inversion(tmp_path / "mystyle.safetensors")
        out.append(pipe("a red circle in mystyle style", **KW).images)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


def test_bad_modes_are_one_line_errors(sd_folder, tmp_path):
    for kw, match in ((dict(offload="blocks"), "unknown offload mode 'blocks'; choose model, group, sequential"),
                      (dict(offload="group", offload_blocks=0), "block count must be an integer >= 1"),
                      (dict(offload="sequential", offload_blocks=2), "applies to offload 'group', not 'sequential'"),
                      (dict(offload_blocks=2), "applies to offload 'group', not 'model'")):
        with pytest.raises(GenError, match=match):
            quiet_pipeline(sd_folder, **kw)
    pipe = quiet_pipeline(sd_folder, offload="group")
    with pytest.raises(GenError, match="fast mode .* does not combine with offload 'group'"):
        pipe("a red circle", cache_interval=2, **KW)
    r = gen("sample", "a red circle", "--model", sd_folder, "--offload", "stream", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown offload mode 'stream'" in r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flags", [("--offload", "group", "--offload-blocks", "2"), ("--offload", "sequential")])
def test_gen_sample_streamed_offload(sd_folder, tmp_path, flags):
    out = tmp_path / "a.png"
    r = gen("sample", "a red circle", "--model", sd_folder, "--steps", 2, "--seed", 3, "--height", 32, "--width", 32,
            *flags, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    image = quiet_pipeline(sd_folder)("a red circle", num_inference_steps=2, seed=3, height=32, width=32).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(image))
