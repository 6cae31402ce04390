"""ControlNet sampling (gen/control): parity with diffusers' StableDiffusionControlNetPipeline, the SDXL and the Flux
ControlNet pipelines on tiny random ControlNets built from the tiny bases (one net, and two with weights and
start/end), an original-layout single file, the preprocessors, the PNG recipe and `gen sample --control`, refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (ControlNetModel, FluxControlNetModel, FluxControlNetPipeline, FluxPipeline,
                       StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                       StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline)
from PIL import Image

from gen import recipe
from gen.cli import main
from gen.control import Control, hints, parse
from gen.control.files import load_file, to_original
from gen.errors import GenError
from tests.conftest import (quiet_pipeline, tiny_flux_components, tiny_sd_components,
                            tiny_sdxl_components)

PROMPTS = ["a red circle", "a blue square"]
SIZE = 32
NONZERO = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out",
           "controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder", "pos_embed_input")


def randomized(net, seed: int):
    """A ControlNet whose zero-initialised output layers are random, so that it changes the image."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(NONZERO):
                p.normal_(0, 0.3)
    return net.eval()


def pick(nets, case):
    """One ControlNet, or a list that diffusers wraps in its Multi... class."""
    return nets[0] if len(CASES[case][0]) == 1 else nets


def unet_nets(unet, seeds=(1, 2)):
    # the hint encoder halves the size once: the tiny VAE's factor 2
    return [randomized(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), s)
            for s in seeds]



def quiet(theirs: dict) -> dict:
    """diffusers' pipelines of a fixture, their progress bars off."""
    for p in theirs.values():
        p.set_progress_bar_config(disable=True)
    return theirs

@pytest.fixture(scope="module")
def hint_images():
    rng = np.random.RandomState(0)
    a = Image.fromarray((rng.rand(SIZE, SIZE, 3) * 255).astype("uint8"))
    return a, a.transpose(Image.FLIP_LEFT_RIGHT)


def _diffusers_args(nets, images, weights, starts, ends, seed=7, steps=3, guidance=6.0, size=SIZE):
    one = len(nets) == 1
    pick = (lambda v: v[0]) if one else list
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    return dict(prompt=PROMPTS, image=images[0] if one else list(images), controlnet_conditioning_scale=pick(weights),
                control_guidance_start=pick(starts), control_guidance_end=pick(ends), num_inference_steps=steps,
                guidance_scale=guidance, generator=gens, output_type="np", height=size, width=size)


def _ours(pipe, nets, images, weights, starts, ends, seed=7, steps=3, guidance=6.0, size=SIZE, **kw):
    controls = [Control(n, i, w, s, e) for n, i, w, s, e in zip(nets, images, weights, starts, ends)]
    return pipe(PROMPTS, control=controls, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                output_type="np", height=size, width=size, **kw).images


CASES = {"one": ([0.7], [0.0], [1.0]), "two": ([0.7, 1.2], [0.0, 0.3], [0.7, 1.0])}


def matches_diffusers(family, ours, nets, theirs, hint_images, case, image_key="image", theirs_kw=None, **kw):
    """gen's images of one CASES case, checked against diffusers' ControlNet pipeline's (<= 1e-4); `image_key`: the
    pipeline's name for the hint, `kw`: settings of both, `theirs_kw`: diffusers' only."""
    n = len(CASES[case][0])
    args = (nets[:n], hint_images[:n], *CASES[case])
    kwargs = _diffusers_args(*args, **{k: v for k, v in kw.items() if k in ("guidance", "size")})
    kwargs[image_key] = kwargs.pop("image")
    expected = theirs[case](**kwargs, **(theirs_kw or {})).images
    got = _ours(ours, *args, **kw)
    print(f"{family} {case}: max abs diff {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= 1e-4
    return got


# ---- SD-1.x -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    comp = tiny_sd_components()
    folder = tmp_path_factory.mktemp("cn") / "sd"
    StableDiffusionPipeline(**comp, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    nets = unet_nets(comp["unet"])
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs = {k: StableDiffusionControlNetPipeline(**comp, controlnet=pick(nets, k), **extra)
              for k in CASES}
    return folder, quiet_pipeline(folder), nets, quiet(theirs)


@pytest.mark.parametrize("case", CASES)
def test_sd_controlnet_matches_diffusers(sd, hint_images, case):
    _, ours, nets, theirs = sd
    got = matches_diffusers("sd", ours, nets, theirs, hint_images, case, theirs_kw=dict(negative_prompt=["blurry"] * 2),
                            negative_prompt="blurry")
    plain = ours(PROMPTS, negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0, seed=7,
                 output_type="np", height=SIZE, width=SIZE).images
    assert np.abs(got - plain).max() > 0.05  # the ControlNet changed the image


def test_sd_controlnet_with_img2img_matches_diffusers(sd, hint_images):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    _, ours, nets, theirs = sd
    theirs = StableDiffusionControlNetImg2ImgPipeline.from_pipe(theirs["one"])
    source = hint_images[1].rotate(90)
    kwargs = _diffusers_args(nets[:1], hint_images[:1], [0.8], [0.0], [0.6], steps=4)
    expected = theirs(control_image=kwargs.pop("image"), image=source, strength=0.7, **kwargs).images
    got = _ours(ours, nets[:1], hint_images[:1], [0.8], [0.0], [0.6], steps=4, image=source, strength=0.7)
    print(f"sd img2img: max abs diff {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= 1e-4


def test_a_window_that_misses_every_step_leaves_the_image_alone(sd, hint_images):
    _, ours, nets, _ = sd
    plain = ours(PROMPTS, num_inference_steps=2, seed=3, output_type="np", height=SIZE, width=SIZE).images
    late = _ours(ours, nets[:1], hint_images[:1], [1.0], [0.9], [1.0], steps=2, seed=3, guidance=7.5)
    assert np.array_equal(late, plain)


def test_each_hint_is_encoded_once_per_call_not_once_per_step(sd, hint_images):
    """The ControlNets' hint encoders run once per call (diffusers runs them at every step), with diffusers' images
    (the parity tests), and each net's own encoder is back in place after the call."""
    _, ours, nets, theirs = sd
    encoders = [net.controlnet_cond_embedding for net in nets]
    calls = []
    handles = [e.register_forward_hook(lambda m, i, o: calls.append(m)) for e in encoders]
    try:
        _ours(ours, nets, hint_images, *CASES["two"], steps=4)
        ours_calls = [sum(c is e for c in calls) for e in encoders]
        calls.clear()
        theirs["two"](**_diffusers_args(nets, hint_images, *CASES["two"], steps=4))
    finally:
        for h in handles:
            h.remove()
    assert ours_calls == [1, 1]  # windows 0-0.7 and 0.3-1 of 4 steps: the nets run at 2 and 3 of them
    assert [sum(c is e for c in calls) for e in encoders] == [4, 4]  # diffusers: every step (at scale 0 outside)
    assert [net.controlnet_cond_embedding for net in nets] == encoders


def test_an_original_layout_file_loads_as_the_folder_net(sd, tmp_path):
    net = sd[2][0]
    to_original(net, tmp_path / "control_tiny.safetensors")  # checks that it reads back
    back = load_file(tmp_path / "control_tiny.safetensors")
    assert type(back) is ControlNetModel
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())


# ---- SDXL -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    comp = tiny_sdxl_components()
    folder = tmp_path_factory.mktemp("cn") / "sdxl"
    StableDiffusionXLPipeline(**comp).save_pretrained(folder)
    nets = unet_nets(comp["unet"], seeds=(3, 4))
    theirs = {k: StableDiffusionXLControlNetPipeline(**comp, controlnet=pick(nets, k)) for k in CASES}
    return quiet_pipeline(folder), nets, quiet(theirs)


@pytest.mark.parametrize("case", CASES)
def test_sdxl_controlnet_matches_diffusers(sdxl, hint_images, case):
    matches_diffusers("sdxl", *sdxl, hint_images, case)


# ---- Flux -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn-flux")
    comp = tiny_flux_components(tmp)
    FluxPipeline(**comp).save_pretrained(tmp / "flux")
    nets = [randomized(FluxControlNetModel.from_transformer(comp["transformer"], num_layers=1, num_single_layers=1,
                                                            attention_head_dim=16, num_attention_heads=2), s)
            for s in (5, 6)]
    # from the folder, as gen loads it (its T5 tokenizer read back from there)
    theirs = {k: FluxControlNetPipeline.from_pretrained(tmp / "flux", controlnet=pick(nets, k)) for k in CASES}
    return quiet_pipeline(tmp / "flux"), nets, quiet(theirs)


@pytest.mark.parametrize("case", CASES)
def test_flux_controlnet_matches_diffusers(flux, hint_images, case):
    matches_diffusers("flux", *flux, hint_images, case, "control_image", guidance=3.5, size=16)


# ---- refusals, preprocessors, the command line ------------------------------------------------------------------
def test_a_controlnet_for_another_family_and_bad_hints_are_one_line_errors(sd, sdxl, flux, hint_images, tmp_path):
    ours = sd[1]
    for net in (sdxl[1][0], flux[1][0]):  # an SDXL net: another text width; a Flux net: another class
        with pytest.raises(GenError, match="for another model family|does not fit this SD-1.x model: its cross"):
            _ours(ours, [net], hint_images[:1], [1.0], [0.0], [1.0], steps=1)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(GenError, match=r"^the ControlNet hint image .*bad\.png: not a readable image"):
        _ours(ours, sd[2][:1], [tmp_path / "bad.png"], [1.0], [0.0], [1.0], steps=1)
    for spec, message in (("m:i:3", r"weight must be in \[0, 2\]"), ("m:i:1:0.5:0.2", "0 <= start < end <= 1"),
                          ("m", "expected"), ("m:i:x", "must be numbers")):
        with pytest.raises(GenError, match=message):
            parse(spec)
    assert parse("canny:net:hint.png:0.5:0.1:0.9") == Control("net", "hint.png", 0.5, 0.1, 0.9, "canny")


def test_canny_finds_the_edges_of_a_square():
    image = Image.new("RGB", (24, 24))
    image.paste((255, 255, 255), (6, 6, 18, 18))
    edges = np.asarray(hints.canny(image).convert("L")) > 0
    assert edges[6:18, 5:7].any(axis=1).all() and edges[6:18, 17:19].any(axis=1).all()  # left and right sides
    assert not edges[:4].any() and not edges[9:15, 9:15].any()  # nothing in flat regions
    for name in ("invert", "blur", "tile", "grayscale"):
        assert hints.MODULES[name](image).size == image.size


# ---- sd-webui-controlnet's reading of A1111's `ControlNet N` fields, restated (the extension is GPL-3.0, A1111
# AGPL-3.0: not vendored into this Apache-2.0 project) from Mikubill/sd-webui-controlnet internal_controlnet/args.py
# (commit 084dd0107bf331c67f27343a7b5583202af71484): displaytext_to_field(), parse_value(), ControlNetUnit.parse()
# and infotext_fields(); the resize modes are scripts/enums.py's ResizeMode values. A1111's own parsing of the
# parameters line is tests/test_recipe_png.py's a1111_parse (modules/infotext_utils.py).
WEBUI_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                "guidance_start", "guidance_end", "pixel_perfect", "control_mode",
                "union_control_type")  # the last: Forge's and the extension's later union field
WEBUI_RESIZE = ("Just Resize", "Crop and Resize", "Resize and Fill")


def webui_parse_value(value: str):
    if value in ("True", "False"):
        return value == "True"
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def a1111_controlnet_units(parameters: str) -> list[dict]:
    """The ControlNet units A1111 + sd-webui-controlnet read from a PNG's `parameters` text, in order."""
    from tests.test_recipe_png import a1111_parse

    res = a1111_parse(parameters)
    units = []
    for i in range(len(res)):
        if f"ControlNet {i}" not in res:
            break
        unit = {"_".join(w.lower() for w in key.split(" ")): webui_parse_value(value)
                for item in res[f"ControlNet {i}"].split(",") for (key, value) in (item.strip().split(": "),)}
        assert set(unit) <= set(WEBUI_FIELDS) and unit.get("resize_mode", WEBUI_RESIZE[0]) in WEBUI_RESIZE, unit
        assert 0 <= unit["weight"] <= 2 and 0 <= unit["guidance_start"] <= unit["guidance_end"] <= 1, unit
        units.append(unit)
    return units


def test_gen_sample_control_writes_the_recipe_and_from_replays_it(sd, hint_images, tmp_path):
    folder, ours, nets, _ = sd
    to_original(nets[0], tmp_path / "control_tiny.safetensors")
    hint_images[0].save(tmp_path / "hint.png")
    out = tmp_path / "a.png"
    spec = f"canny:{tmp_path / 'control_tiny.safetensors'}:{tmp_path / 'hint.png'}:0.8:0:0.9"
    cmd = [sys.executable, "-m", "gen", "sample", "a red circle", "--model", str(folder), "--steps", "2",
           "--seed", "5", "--height", "32", "--width", "32", "--control", spec, "--control-resize",
           "crop-and-resize", "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = Image.open(out).info["parameters"]
    _, _, fields = recipe.parse(text)
    assert fields["ControlNet 0"] == ("Module: canny, Model: control_tiny, Weight: 0.8, Resize Mode: Crop and Resize, "
                                      "Guidance Start: 0, Guidance End: 0.9")
    assert json.loads(fields["gen ControlNet 0"])[1] == str(tmp_path / "hint.png")
    assert a1111_controlnet_units(text) == [dict(module="canny", model="control_tiny", weight=0.8,
                                                 resize_mode="Crop and Resize", guidance_start=0, guidance_end=0.9)]
    expected = ours("a red circle", num_inference_steps=2, seed=5, height=32, width=32, control_resize="crop-and-resize",
                    control=[Control(nets[0], tmp_path / "hint.png", 0.8, 0.0, 0.9, "canny")]).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    assert main(["sample", "--from", str(out), "--out", str(tmp_path / "b.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png").convert("RGB")),
                          np.asarray(Image.open(out).convert("RGB")))
    assert main(["sample", "x", "--model", str(folder), "--control", f"{tmp_path / 'none.safetensors'}:"
                 f"{tmp_path / 'hint.png'}", "--out", str(tmp_path / "c.png")]) == 2


# ---- SD3 --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """Diffusers encodes an SD3 hint with an unseeded posterior sample, gen with the posterior's mean: the tiny VAE's
    log-variance is pinned to its floor (-30, a standard deviation of 3e-7) so that the two agree."""
    from diffusers import (SD3ControlNetModel, SD3Transformer2DModel, StableDiffusion3ControlNetPipeline,
                           StableDiffusion3Pipeline)

    from tests.conftest import tiny_sd3_components

    comp = tiny_sd3_components(t5=False)
    torch.manual_seed(0)  # two blocks: the last one (context_pre_only) takes no ControlNet residual
    comp["transformer"] = SD3Transformer2DModel.from_config({**comp["transformer"].config, "num_layers": 2})
    with torch.no_grad():
        comp["vae"].encoder.conv_out.bias[4:] = -100.0
    folder = tmp_path_factory.mktemp("cn-sd3") / "sd3"
    StableDiffusion3Pipeline(**comp).save_pretrained(folder)
    # random blocks: the base's last block has no context output, a ControlNet block has
    nets = [randomized(SD3ControlNetModel.from_transformer(comp["transformer"], num_layers=1,
                                                           num_extra_conditioning_channels=0,
                                                           load_weights_from_transformer=False), s) for s in (7, 8)]
    theirs = {k: StableDiffusion3ControlNetPipeline.from_pretrained(folder, controlnet=pick(nets, k),
                                                                    text_encoder_3=None, tokenizer_3=None)
              for k in CASES}
    return quiet_pipeline(folder), nets, quiet(theirs)


@pytest.mark.parametrize("case", CASES)
def test_sd3_controlnet_matches_diffusers(sd3, hint_images, case):
    ours, nets, theirs = sd3
    got = matches_diffusers("sd3", ours, nets, theirs, hint_images, case, "control_image", size=16)
    plain = ours(PROMPTS, num_inference_steps=3, guidance_scale=6.0, seed=7, output_type="np", height=16,
                 width=16).images
    print(f"sd3 {case}: from no ControlNet {np.abs(got - plain).max():.2e}")
    assert np.abs(got - plain).max() > 0.01


def test_resize_modes_stretch_crop_or_fit_the_hint(sd):
    from gen.control.run import prepare

    ours, net = sd[1], sd[2][0]
    wide = Image.new("RGB", (64, 32))
    wide.paste((255, 255, 255), (0, 0, 8, 32))  # a white stripe at the left edge
    hint = {mode: prepare(ours, [Control(net, wide)], SIZE, SIZE, 1, None, mode)[1][0][0].mean(0)
            for mode in ("just-resize", "crop-and-resize", "resize-and-fill")}
    assert all(h.shape == (SIZE, SIZE) for h in hint.values())
    assert hint["just-resize"][:, :3].min() > 0.9  # squeezed to 4 px
    assert hint["crop-and-resize"][:, :8].max() < 0.1  # the centre crop leaves it out
    assert hint["resize-and-fill"][16, :3].min() > 0.9 and hint["resize-and-fill"][0, 8:].max() < 0.1  # fit, filled
    with pytest.raises(GenError, match="unknown ControlNet resize mode"):
        prepare(ours, [Control(net, wide)], SIZE, SIZE, 1, None, "stretch")
