"""Union (multi-mode) ControlNets (gen/control, `mode=`): parity with diffusers'
StableDiffusionXLControlNetUnionPipeline (one mode; two modes of one model, as its MultiControlNetUnionModel runs
them) and FluxControlNetPipeline with a union FluxControlNetModel, on tiny random models; the mode in the PNG recipe
and `gen sample`; the one-line errors of a mode the model lacks or a mode for a single-mode model."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (ControlNetUnionModel, FluxControlNetModel, FluxControlNetPipeline, FluxPipeline,
                       StableDiffusionXLControlNetUnionPipeline, StableDiffusionXLPipeline)
from PIL import Image

from gen import recipe
from gen.cli import main
from gen.control import Control, parse
from gen.errors import GenError
from tests.conftest import quiet_pipeline, tiny_flux_components, tiny_sdxl_components
from tests import test_controlnet
from tests.test_controlnet import PROMPTS, SIZE, a1111_controlnet_units, quiet, randomized
from tests.test_controlnet import NONZERO as PLAIN_NONZERO

hint_images = test_controlnet.hint_images  # the fixture: two random 32 px hints

UNION_NONZERO = ("spatial_ch_projs",)  # the union model's zero-initialised layers besides a ControlNet's
CASES = {"one": (["depth"], [0.7], [0.0], [1.0]), "two": (["depth", "canny"], [0.7, 1.2], [0.0, 0.3], [0.7, 1.0])}


def reconfigured(cls, base, **changes):
    """`cls` with `base`'s config and `changes` (the config's record of defaults dropped: diffusers would restore
    them)."""
    return cls.from_config({k: v for k, v in base.config.items() if k != "_use_default_values"} | changes)


def tiny_sdxl_union(unet):
    """A ControlNetUnionModel (ProMax's 8 modes) from a tiny SDXL UNet: its transformer over the hints as wide as
    the UNet's first level (the task embedding is added to the hint's channels)."""
    base = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    width = unet.config.block_out_channels[0]
    net = reconfigured(ControlNetUnionModel, base, num_trans_channel=width, num_proj_channel=width, num_control_type=8)
    mine = net.state_dict()  # the UNet's copied weights; the union layers (their widths changed) random
    net.load_state_dict({k: v for k, v in base.state_dict().items() if v.shape == mine[k].shape}, strict=False)
    return net


def tiny_flux_union(transformer):
    """A union FluxControlNetModel (InstantX's: 10 mode slots) from a tiny Flux transformer."""
    base = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                attention_head_dim=16, num_attention_heads=2)
    return reconfigured(FluxControlNetModel, base, num_mode=10)


def union_randomized(net, seed):
    randomized(net, seed)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(UNION_NONZERO) and not name.startswith(PLAIN_NONZERO):
                p.normal_(0, 0.3)
    return net


def ours_with_modes(pipe, net, images, modes, weights, starts, ends, size, guidance, steps=3, seed=7):
    controls = [Control(net, i, w, s, e, mode=m) for i, m, w, s, e in zip(images, modes, weights, starts, ends)]
    return pipe(PROMPTS, control=controls, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                output_type="np", height=size, width=size).images


def diffusers_args(images, weights, starts, ends, size, guidance, steps=3, seed=7):
    one = len(weights) == 1
    pick = (lambda v: v[0]) if one else list
    return dict(prompt=PROMPTS, controlnet_conditioning_scale=pick(weights), control_guidance_start=pick(starts),
                control_guidance_end=pick(ends), num_inference_steps=steps, guidance_scale=guidance, height=size,
                width=size, generator=[torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))],
                output_type="np")


# ---- SDXL: ControlNetUnionModel ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_union(tmp_path_factory):
    comp = tiny_sdxl_components()
    folder = tmp_path_factory.mktemp("union") / "sdxl"
    StableDiffusionXLPipeline(**comp).save_pretrained(folder)
    torch.manual_seed(11)
    net = union_randomized(tiny_sdxl_union(comp["unet"]), 12)
    net.save_pretrained(folder.parent / "union-net")
    theirs = {"one": StableDiffusionXLControlNetUnionPipeline(**comp, controlnet=net),
              "two": StableDiffusionXLControlNetUnionPipeline(**comp, controlnet=[net, net])}
    return folder, quiet_pipeline(folder), net, quiet(theirs)


@pytest.mark.parametrize("case", CASES)
def test_sdxl_union_controlnet_matches_diffusers(sdxl_union, hint_images, case):
    from gen.families.sdxl import SDXL

    _, ours, net, theirs = sdxl_union
    modes, *rest = CASES[case]
    images = hint_images[:len(modes)]
    index = [SDXL.UNION_MODES.index(m) for m in modes]
    kwargs = diffusers_args(images, *rest, size=SIZE, guidance=6.0)
    expected = theirs[case](control_image=list(images), control_mode=index if case == "two" else index[0],
                            **kwargs).images
    got = ours_with_modes(ours, net, images, modes, *rest, size=SIZE, guidance=6.0)
    print(f"sdxl union {case}: max abs diff {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= 1e-4
    other = ours_with_modes(ours, net, images, ["openpose"] * len(modes), *rest, size=SIZE, guidance=6.0)
    assert np.abs(got - other).max() > 1e-3  # the mode steers


# ---- Flux: FluxControlNetModel with num_mode ----------------------------------------------------------------------
def flux_base(tmp_path_factory, name: str):
    """(a folder holding the tiny Flux model in flux/, its components)."""
    tmp = tmp_path_factory.mktemp(name)
    comp = tiny_flux_components(tmp)
    FluxPipeline(**comp).save_pretrained(tmp / "flux")
    return tmp, comp


@pytest.fixture(scope="module")
def flux_union(tmp_path_factory):
    tmp, comp = flux_base(tmp_path_factory, "union-flux")
    torch.manual_seed(13)
    net = randomized(tiny_flux_union(comp["transformer"]), 14)
    theirs = FluxControlNetPipeline.from_pretrained(tmp / "flux", controlnet=net)
    theirs.set_progress_bar_config(disable=True)
    return quiet_pipeline(tmp / "flux"), net, theirs


def test_flux_union_controlnet_matches_diffusers(flux_union, hint_images):
    from gen.families.flux import Flux

    ours, net, theirs = flux_union
    kwargs = diffusers_args(hint_images[:1], [0.8], [0.0], [0.7], size=16, guidance=3.5)
    expected = theirs(control_image=hint_images[0], control_mode=Flux.UNION_MODES.index("depth"), **kwargs).images
    got = ours_with_modes(ours, net, hint_images[:1], ["depth"], [0.8], [0.0], [0.7], size=16, guidance=3.5)
    print(f"flux union: max abs diff {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= 1e-4
    by_number = ours_with_modes(ours, net, hint_images[:1], [2], [0.8], [0.0], [0.7], size=16, guidance=3.5)
    assert np.array_equal(by_number, got)  # mode 2 is depth
    listed = r"has no mode 'segment'; it has canny \(0\), tile \(1\), depth \(2\).*, 9 \(9\)"
    with pytest.raises(GenError, match=listed):
        ours_with_modes(ours, net, hint_images[:1], ["segment"], [1.0], [0.0], [1.0], size=16, guidance=3.5)


# ---- the command line, the recipe, the errors ---------------------------------------------------------------------
def test_gen_sample_union_mode_is_recorded_and_a_missing_mode_is_one_line(sdxl_union, hint_images, tmp_path, capsys):
    folder, _, _, _ = sdxl_union
    hint_images[0].save(tmp_path / "hint.png")
    net = folder.parent / "union-net"
    base = [sys.executable, "-m", "gen", "sample", "a red circle", "--model", str(folder), "--steps", "1",
            "--height", "32", "--width", "32", "--no-progress"]
    done = subprocess.run(base + ["--control", f"{net}:{tmp_path / 'hint.png'}:0.9:mode=canny", "--out",
                                  str(tmp_path / "a.png")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, _, fields = recipe.parse(Image.open(tmp_path / "a.png").info["parameters"])
    assert fields["ControlNet 0"].endswith("Guidance End: 1, Union Control Type: canny")
    assert a1111_controlnet_units(Image.open(tmp_path / "a.png").info["parameters"]) == [dict(
        module="none", model="union-net", weight=0.9, resize_mode="Just Resize", guidance_start=0, guidance_end=1,
        union_control_type="canny")]
    assert main(["sample", "--from", str(tmp_path / "a.png"), "--out", str(tmp_path / "c.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(Image.open(tmp_path / "a.png")))
    for spec, message in ((f"{net}:{tmp_path / 'hint.png'}:mode=lineart",
                           "has no mode 'lineart'; it has openpose (0), depth (1), hed (2), canny (3)"),
                          (f"{net}:{tmp_path / 'hint.png'}", "is a union model: pick its mode with mode=NAME")):
        assert main(base[3:] + ["--control", spec, "--out", str(tmp_path / "b.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_mode_for_a_single_mode_controlnet_and_bad_mode_syntax_are_errors(sdxl_union, hint_images):
    from diffusers import ControlNetModel

    _, ours, net, _ = sdxl_union
    plain = ControlNetModel.from_unet(ours.denoiser, conditioning_embedding_out_channels=(8, 16))
    with pytest.raises(GenError, match="is not a union model: it has no mode 'depth'; drop mode="):
        ours_with_modes(ours, plain, hint_images[:1], ["depth"], [1.0], [0.0], [1.0], size=SIZE, guidance=6.0)
    assert parse("net:hint.png:0.5:mode=depth") == Control("net", "hint.png", 0.5, mode="depth")
    assert parse("canny:net:hint.png:mode=3:0.5:0.1:0.9") == Control("net", "hint.png", 0.5, 0.1, 0.9, "canny", "3")
    for spec in ("net:hint.png:mode=", "net:hint.png:mode=a:mode=b"):
        with pytest.raises(GenError, match="give one mode=MODE"):
            parse(spec)


def test_bad_control_flags_are_one_line_errors_on_the_command_line(tmp_path, capsys):
    """Issue 28's errors before any model loads: weight or start/end out of range, a hint that cannot be read."""
    (tmp_path / "net.safetensors").write_bytes(b"")
    (tmp_path / "bad.png").write_text("not an image")
    net, bad = tmp_path / "net.safetensors", tmp_path / "bad.png"
    for spec, message in ((f"{net}:{bad}:2.5", r"weight must be in [0, 2], not 2.5"),
                          (f"{net}:{bad}:-1", r"weight must be in [0, 2], not -1"),
                          (f"{net}:{bad}:1:0.6:0.4", "0 <= start < end <= 1, not 0.6, 0.4"),
                          (f"{net}:{bad}:1:0:1.5", "0 <= start < end <= 1, not 0, 1.5"),
                          (f"{net}:{bad}", "bad.png: not a readable image")):
        assert main(["sample", "x", "--model", str(tmp_path), "--control", spec]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (spec, err)
