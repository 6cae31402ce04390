"""fp8 weights (gen/quant): e4m3fn, e5m2 and ComfyUI's scaled fp8 files load with their Linear weights still fp8 in
memory and sample the image of the same weights upcast; `weights="fp8"` stores a model as diffusers'
enable_layerwise_casting(storage_dtype=float8_e4m3fn) does, to the same outputs; a LoRA runs unfused on an fp8
base; `gen sample --weights fp8` records it in the PNG recipe; one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gen.errors import GenError
from gen.quant import store_fp8
from gen.quant.store import LAYERS, parameter_bytes, stored
from tests.conftest import psnr, quiet_pipeline, tiny_flux_components, tiny_sd_components

KW = dict(num_inference_steps=2, seed=3, output_type="np", height=16, width=16)
PREFIX = "model.diffusion_model."
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_file(bfl: dict, dtype: torch.dtype, scaled: bool) -> tuple[dict, dict]:
    """(an fp8 transformer file's tensors, as ComfyUI's files hold them, the same weights upcast): every tensor
    but the RMSNorm scales in `dtype`; `scaled`: ComfyUI's scaled fp8 (a `scaled_fp8` marker, per-layer
    scale_weight = max|W| / 448 and scale_input = 1 beside each 2-D weight)."""
    out, ref = {}, {}
    for k, v in bfl.items():
        if k.endswith(".scale"):
            out[PREFIX + k], ref[PREFIX + k] = v, v
            continue
        layer = k[:-len(".weight")]
        if scaled and k.endswith(".weight") and v.dim() == 2:
            s = v.abs().max() / 448
            q = (v / s).to(dtype)
            out[PREFIX + k], ref[PREFIX + k] = q, q.float() * s
            out[f"{PREFIX}{layer}.scale_weight"] = s.reshape(())
            out[f"{PREFIX}{layer}.scale_input"] = torch.ones(())
        else:
            out[PREFIX + k] = v.to(dtype)
            ref[PREFIX + k] = out[PREFIX + k].float()
    if scaled:
        out[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=dtype)
    return out, ref


@pytest.mark.parametrize("dtype, scaled", [(E4M3, False), (E5M2, False), (E4M3, True)],
                         ids=["e4m3fn", "e5m2", "scaled-fp8"])
def test_fp8_file_stays_fp8_and_samples_its_upcast_weights(flux_bfl, dtype, scaled, tmp_path):
    folder, bfl = flux_bfl
    tensors, ref = fp8_file(bfl, dtype, scaled)
    save_file(tensors, tmp_path / "fp8.safetensors")
    save_file(ref, tmp_path / "upcast.safetensors")
    pipe = quiet_pipeline(tmp_path / "fp8.safetensors", base=folder)
    fp8 = [m for m in pipe.denoiser.modules() if stored(m) is not None]
    linears = [m for m in pipe.denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert len(fp8) == len(linears)  # every Linear weight of the file (all fp8) is kept fp8
    assert all(m.weight.dtype == torch.uint8 and m.weight.numel() == m.in_features * m.out_features for m in fp8)
    assert all(m.bias.dtype == torch.float32 for m in fp8)  # biases upcast on load
    upcast = quiet_pipeline(tmp_path / "upcast.safetensors", base=folder)
    weights = sum(m.weight.numel() for m in linears)
    assert parameter_bytes(upcast.denoiser) - parameter_bytes(pipe.denoiser) == 3 * weights  # 1 byte, not 4
    image = pipe(["a red circle"], **KW).images
    assert np.abs(image - upcast(["a red circle"], **KW).images).max() <= 1e-5
    assert psnr(image, quiet_pipeline(folder)(["a red circle"], **KW).images) > 20
    full = quiet_pipeline(tmp_path / "fp8.safetensors", base=folder, weights="full")
    assert not any(stored(m) for m in full.denoiser.modules())
    assert np.abs(full(["a red circle"], **KW).images - image).max() <= 1e-6


def _round_biases(model):
    """Biases made fp8-representable: diffusers' layerwise casting stores biases in fp8 too, gen keeps them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LAYERS) and m.bias is not None:
                m.bias.copy_(m.bias.to(E4M3).float())


def _parity(model, inputs: dict) -> float:
    _round_biases(model)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    store_fp8(ours)
    theirs.enable_layerwise_casting(storage_dtype=E4M3, compute_dtype=torch.float32)
    fp8 = {n for n, m in theirs.named_modules() if isinstance(m, LAYERS) and m.weight.dtype == E4M3}
    assert {n for n, m in ours.named_modules() if stored(m) is not None} == fp8 and len(fp8) > 5
    with torch.no_grad():
        a, b = ours(**inputs, return_dict=False)[0], theirs(**inputs, return_dict=False)[0]
    return (a - b).abs().max().item()


def test_weights_fp8_equals_diffusers_layerwise_casting_flux(tmp_path):
    model = tiny_flux_components(tmp_path)["transformer"]
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32,
                  generator=g), pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    assert _parity(model, inputs) <= 1e-6


def test_weights_fp8_equals_diffusers_layerwise_casting_unet():
    model = tiny_sd_components()["unet"]
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=g))
    assert _parity(model, inputs) <= 1e-6


def test_weights_fp8_images_equal_diffusers_layerwise_casting(flux_bfl, tmp_path):
    """The whole pipeline: gen's `weights="fp8"` gives the image of diffusers' FluxPipeline with the transformer
    under layerwise casting (float8_e4m3fn storage, fp32 compute); the biases made fp8-representable, which
    diffusers stores in fp8 too. diffusers' pipeline cannot take layerwise casting on its transformers text
    encoders (it reads their dtype, the first parameter's: fp8, for the latents), so there the same layers gen
    stores are rounded to e4m3fn in place, which is what fp8 storage with fp32 compute computes."""
    from diffusers import FluxPipeline

    theirs = FluxPipeline.from_pretrained(flux_bfl[0])
    for model in (theirs.transformer, theirs.text_encoder, theirs.text_encoder_2):
        _round_biases(model)
    theirs.save_pretrained(tmp_path / "rounded")
    ours = quiet_pipeline(tmp_path / "rounded", weights="fp8")
    theirs.transformer.enable_layerwise_casting(storage_dtype=E4M3, compute_dtype=torch.float32)
    with torch.no_grad():
        for model, mine in ((theirs.text_encoder, ours.texts[0].model), (theirs.text_encoder_2, ours.texts[1].model)):
            layers = dict(model.named_modules())
            for n, m in mine.named_modules():
                if stored(m) is not None:
                    layers[n].weight.copy_(layers[n].weight.to(E4M3).float())
    theirs.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=3.5, output_type="np", height=16, width=16)
    a = theirs("a red circle", generator=torch.Generator().manual_seed(7), **kw).images
    b = ours("a red circle", seed=7, **kw).images
    assert a.std() > 0.01 and np.abs(a - b).max() <= 1e-4


def _lora(folder, path):
    """A random LoRA file (rank 2) on the Flux transformer's attention layers, written by gen."""
    from peft import LoraConfig, inject_adapter_in_model

    from gen.lora import save_lora

    pipe = quiet_pipeline(folder)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]), pipe.denoiser)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pipe.denoiser.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    return save_lora(path, pipe.denoiser, {}, "default", family=pipe.family)


def test_pipeline_weights_fp8_with_an_unfused_lora(flux_bfl, tmp_path):
    folder = flux_bfl[0]
    pipe = quiet_pipeline(folder, weights="fp8")
    assert pipe.weights == "fp8"
    for model in [pipe.denoiser, *pipe.text_parts.values()]:  # the T5 and CLIP encoders too
        assert any(stored(m) is not None for m in model.modules())
    ref = quiet_pipeline(folder)  # the same weights rounded to e4m3fn by hand, stored as fp32
    before = parameter_bytes(ref.denoiser)
    with torch.no_grad():
        for model, mine in zip(ref.models, pipe.models):
            layers = dict(model.named_modules())
            for n, m in mine.named_modules():
                if stored(m) is not None:
                    layers[n].weight.copy_(layers[n].weight.to(E4M3).float())
    assert parameter_bytes(pipe.denoiser) < 0.5 * before
    image = pipe(["a red circle"], **KW).images
    assert np.abs(image - ref(["a red circle"], **KW).images).max() <= 1e-5
    lora = _lora(folder, tmp_path / "lora.safetensors")
    pipe.load_lora(lora)
    ref.load_lora(lora)
    with_lora = pipe(["a red circle"], **KW).images
    assert np.abs(with_lora - image).max() > 1e-3  # the LoRA acts through the fp8 layers' hooks
    assert np.abs(with_lora - ref(["a red circle"], **KW).images).max() <= 1e-5
    with pytest.raises(GenError, match="fuse_lora needs full-precision weights.*--weights full"):
        pipe.fuse_lora()
    with pytest.raises(GenError, match="save_pretrained needs full-precision"):
        pipe.unload_lora() or pipe.save_pretrained(tmp_path / "out")


def _gen(*args, code: str = ""):
    """`gen` in a subprocess (`code`: Python run first, in the same process)."""
    return subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nfrom gen.cli import main\nsys.exit(main())",
                           *map(str, args)], capture_output=True, text=True)


def recorded_and_replayed(folder, weights: str, tmp_path) -> None:
    """`gen sample --weights W` writes W in the PNG recipe, and `--from` that PNG makes the same image."""
    from PIL import Image

    from gen.recipe import read_png

    r = _gen("sample", "a red circle", "--model", folder, "--weights", weights, "--steps", 2, "--height", 16,
             "--width", 16, "--seed", 5, "--out", tmp_path / "a.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert read_png(tmp_path / "a.png").weights == weights
    r = _gen("sample", "--from", tmp_path / "a.png", "--out", tmp_path / "b.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_cli_weights_fp8_is_recorded_and_replayed(flux_bfl, tmp_path):
    recorded_and_replayed(flux_bfl[0], "fp8", tmp_path)


def test_fp8_without_float8_dtypes_is_a_one_line_error(flux_bfl, tmp_path):
    folder, bfl = flux_bfl
    save_file(fp8_file(bfl, E4M3, False)[0], tmp_path / "fp8.safetensors")
    # a torch without float8 dtypes, as gen sees one: diffusers and transformers name torch.float8_* at import,
    # so the attributes cannot be deleted; gen asks torch for them in one place, fp8_dtypes
    old_torch = "import gen.quant.store\ngen.quant.store.fp8_dtypes = lambda: {}"
    for args in (["--model", folder, "--weights", "fp8"], ["--model", tmp_path / "fp8.safetensors", "--base", folder]):
        r = _gen("sample", "x", *args, "--out", tmp_path / "o.png", code=old_torch)
        assert r.returncode == 2 and "float8" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_whole_fp8_checkpoint_with_its_text_encoders_and_vae(family, request, tmp_path):
    """A whole checkpoint in fp8 (denoiser, text encoders and VAE: every tensor of 2 or more dimensions e4m3fn;
    Flux's BFL/HF layout, SD-1's LDM layout) loads alone and samples the image of the same tensors upcast; T5's
    `wo`, which transformers keeps in fp32 (its caller casts the input to the weight's dtype), is upcast."""
    from safetensors import safe_open

    folder = request.getfixturevalue("flux_bfl")[0] if family == "flux" else request.getfixturevalue("sd_folder")
    quiet_pipeline(folder).save_pretrained(tmp_path / "whole.safetensors", single_file=True)
    with safe_open(str(tmp_path / "whole.safetensors"), "pt") as f:  # gen's file: configs in its header
        meta, fp8 = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    fp8 = {k: v.to(E4M3) if v.dim() >= 2 else v for k, v in fp8.items()}
    save_file(fp8, tmp_path / "fp8.safetensors", metadata=meta)
    save_file({k: v.float() for k, v in fp8.items()}, tmp_path / "upcast.safetensors", metadata=meta)
    pipe = quiet_pipeline(tmp_path / "fp8.safetensors")
    for model in pipe.models:
        assert any(stored(m) is not None for m in model.modules())
    for n, m in pipe.text_parts.get("text_encoder_2", torch.nn.Module()).named_modules():
        assert stored(m) is None or not n.endswith(".wo")
    image = pipe(["a red circle"], **KW).images
    upcast = quiet_pipeline(tmp_path / "upcast.safetensors")
    assert np.abs(image - upcast(["a red circle"], **KW).images).max() <= 1e-5


def test_gen_dit_with_fp8_weights(dit_folder):
    pipe = quiet_pipeline(dit_folder, weights="fp8")
    assert sum(stored(m) is not None for m in pipe.denoiser.modules()) > 5
    image = pipe(["a red circle"], **KW).images
    assert psnr(image, quiet_pipeline(dit_folder)(["a red circle"], **KW).images) > 25


def test_fp8_storage_computes_in_bf16(flux_bfl):
    """fp8 weights upcast to the pipeline's dtype: bf16 compute on the CPU (fp16/bf16 on a GPU)."""
    folder = flux_bfl[0]
    pipe = quiet_pipeline(folder, weights="fp8", dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    layer = next(m for m in pipe.denoiser.modules() if stored(m) is not None)
    seen = []  # the weight as the layer's call sees it (a pre-hook after gen's), and the output
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype)),
             layer.register_forward_hook(lambda m, args, out: seen.append(out.dtype))]
    image = pipe(["a red circle"], **KW).images
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the weight, upcast for the call
    assert layer.weight.dtype == torch.uint8  # and back to its bytes after
    assert psnr(image, quiet_pipeline(folder, dtype="bf16")(["a red circle"], **KW).images) > 25
