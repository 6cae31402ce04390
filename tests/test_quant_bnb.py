"""bitsandbytes weights (gen/quant/bnb.py): `weights="nf4"|"fp4"|"int8"` quantize the denoiser's and text encoders'
Linear layers -- the ones fp8 stores, by the same rule -- and sample the image of bitsandbytes' own dequantized
weights; a LoRA runs unfused on them as on the dequantized base; `gen sample --weights nf4` is recorded in the PNG
recipe and replayed; QLoRA training (lora.base_weights=nf4) resumes bitwise; one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen.errors import GenError
from gen.quant import bnb, eligible, layers
from gen.quant.store import parameter_bytes
from tests.conftest import psnr, quiet_pipeline, tiny_flux_components
from tests.test_quant_fp8 import _gen, _lora, recorded_and_replayed
from tests.train.test_lora_train import images  # noqa: F401 (a fixture)

KW = dict(num_inference_steps=2, seed=3, output_type="np", height=16, width=16)
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny Flux folder (transformer, CLIP and T5) saved by diffusers."""
    from diffusers import FluxPipeline

    tmp = tmp_path_factory.mktemp("flux-bnb")
    FluxPipeline(**tiny_flux_components(tmp)).save_pretrained(tmp / "folder")
    return tmp / "folder"


def dequantized_twin(folder, pipe):
    """The same model loaded in full precision, each layer `pipe` quantized holding bitsandbytes' own
    dequantization of it (bitsandbytes.functional.dequantize_4bit / int8_vectorwise_dequant)."""
    ref = quiet_pipeline(folder)
    with torch.no_grad():
        for model, mine in zip(ref.models, pipe.models):
            modules = dict(model.named_modules())
            for n, m in mine.named_modules():
                if bnb.is_quantized(m):
                    modules[n].weight.copy_(bnb.dequantized(m))
    return ref


@pytest.mark.parametrize("kind, model", [("nf4", "flux"), ("fp4", "flux"), ("int8", "flux"), ("nf4", "sd")])
def test_bnb_weights_sample_the_image_of_their_dequantized_weights(kind, model, request):
    folder = request.getfixturevalue("flux" if model == "flux" else "sd_folder")
    full = quiet_pipeline(folder)
    rule = {n for m in [full.denoiser, *full.text_parts.values()] for n, layer in eligible(m)
            if type(layer) is torch.nn.Linear}  # fp8's rule, Convs aside (bitsandbytes has none)
    pipe = quiet_pipeline(folder, weights=kind)
    assert pipe.weights == kind
    quantized = {n for m in [pipe.denoiser, *pipe.text_parts.values()] for n, layer in m.named_modules()
                 if bnb.is_quantized(layer)}
    assert quantized == rule and len(quantized) > 5
    for part in [pipe.denoiser, *pipe.text_parts.values()]:  # the T5 and CLIP encoders too
        assert layers([part]) > 0
    assert layers([pipe.vae]) == 0
    most = 0.7 if kind == "int8" or model == "sd" else 0.6  # the SD UNet's convolutions stay as they are
    assert parameter_bytes(pipe.denoiser) < most * parameter_bytes(full.denoiser)
    ref = dequantized_twin(folder, pipe)  # read before the first call: bnb may repack 4-bit data for its CPU kernel
    image = pipe([PROMPT], **KW).images
    diff = np.abs(image - ref([PROMPT], **KW).images).max()
    quality = psnr(image, full([PROMPT], **KW).images)
    print(f"{kind} {model}: max abs diff vs bitsandbytes' dequantized weights {diff:.2e}, PSNR vs full {quality:.1f} dB")
    assert image.std() > 0.01 and diff <= 1e-5
    assert quality > 20


def test_a_lora_on_an_nf4_base_equals_it_on_the_dequantized_base(flux, tmp_path):
    pipe = quiet_pipeline(flux, weights="nf4")
    ref = dequantized_twin(flux, pipe)
    image = pipe([PROMPT], **KW).images
    lora = _lora(flux, tmp_path / "lora.safetensors")
    pipe.load_lora(lora)
    ref.load_lora(lora)
    with_lora = pipe([PROMPT], **KW).images
    assert np.abs(with_lora - image).max() > 1e-3  # the LoRA acts, unfused, beside the 4-bit layers (peft's bnb layers)
    assert np.abs(with_lora - ref([PROMPT], **KW).images).max() <= 1e-5
    with pytest.raises(GenError, match="fuse_lora needs full-precision weights.*bitsandbytes.*--weights full"):
        pipe.fuse_lora()
    assert np.array_equal(pipe([PROMPT], **KW).images, with_lora)  # the refusal changed nothing
    with pytest.raises(GenError, match="--offload group .* bitsandbytes' nf4"):
        pipe.enable_offload("cpu", "group")


def test_nf4_computes_in_bf16(flux):
    pipe = quiet_pipeline(flux, weights="nf4", dtype="bf16")
    layer = next(m for m in pipe.denoiser.modules() if bnb.is_quantized(m))
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.uint8
    image = pipe([PROMPT], **KW).images
    assert psnr(image, quiet_pipeline(flux, dtype="bf16")([PROMPT], **KW).images) > 20


def test_cli_weights_nf4_is_recorded_and_replayed(flux, tmp_path):
    recorded_and_replayed(flux, "nf4", tmp_path)


def test_without_bitsandbytes_is_a_one_line_error(flux, tmp_path):
    """bitsandbytes missing, as gen sees it (its import fails): exit 2, one line naming the install."""
    r = _gen("sample", "x", "--model", flux, "--weights", "int8", "--out", tmp_path / "o.png",
             code="import sys\nsys.modules['bitsandbytes'] = None")
    assert r.returncode == 2 and "pip install 'gen[quant]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- QLoRA: lora.base_weights=nf4|int8 --------------------------------------------------------------------------
QLORA = {"lora.rank": 4, "lora.alpha": 8, "lora.text_encoder": True, "lora.save_dtype": "fp32",
         "lora.instance_prompt": "a photo of sks dog", "train.mixed_precision": "bf16"}


def test_qlora_int8_base_trains_and_dora_is_refused(sd_folder, images, tmp_path):
    from gen.cli import main as gen_main
    from tests.train.test_sdxl_train import args, settings
    from train.config import load_config
    from train.lora import LoraTask

    extra = settings(sd_folder, images, tmp_path, **{k.replace(".", "__"): v for k, v in QLORA.items()})
    int8 = extra | {"lora.base_weights": "int8", "train.max_steps": 1, "train.checkpoint_every": 0}
    task = LoraTask(load_config("configs/lora-subject.yaml", extra=int8), torch.device("cpu"), torch.bfloat16)
    assert layers([task.model.denoiser]) > 0 and layers([task.text_parts["text_encoder"].model]) > 0
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert gen_main(["lora", "configs/lora-subject.yaml", *args(int8)]) == 0  # a step backward through Linear8bitLt
    assert (tmp_path / "lora.safetensors").is_file()
    cfg = load_config("configs/lora-subject.yaml", extra=extra | {"lora.base_weights": "nf4", "lora.dora": True,
                                                                 "lora.format": "diffusers"})
    with pytest.raises(GenError, match="DoRA needs the full-precision base"):
        LoraTask(cfg, torch.device("cpu"), torch.bfloat16)


def test_qlora_nf4_adapters_move_and_resume_bitwise(sd_folder, images, tmp_path):
    """2 steps straight vs 1 + resumed 1 on an nf4 base (bf16 compute): the same adapters and optimizer state, bit
    for bit; the LoRA file, on the full-precision base, moves its images as the same LoRA trained on a bf16 base."""
    from gen.cli import main as gen_main
    from tests.train.test_sdxl_train import args, assert_same_checkpoints, settings, straight_and_resumed
    from train.lora import LoraTask

    a, b = straight_and_resumed("configs/lora-subject.yaml", sd_folder, images, tmp_path,
                                QLORA | {"lora.base_weights": "nf4"}, LoraTask, steps=2)
    assert_same_checkpoints(a, b, 2)
    bf16 = settings(sd_folder, images, tmp_path / "bf16", **{k.replace(".", "__"): v for k, v in QLORA.items()})
    assert gen_main(["lora", "configs/lora-subject.yaml", *args(bf16 | {"train.max_steps": 2})]) == 0

    def sample(lora=None):
        pipe = quiet_pipeline(sd_folder)
        if lora:
            pipe.load_lora(lora)
        return pipe(QLORA["lora.instance_prompt"], **KW).images

    base, nf4, full = sample(), sample(a / "lora.safetensors"), sample(tmp_path / "bf16" / "lora.safetensors")
    moved_nf4, moved_full, apart = (np.abs(x - y).mean() for x, y in ((nf4, base), (full, base), (nf4, full)))
    d_nf4, d_full = (nf4 - base).ravel(), (full - base).ravel()
    cosine = float(d_nf4 @ d_full / np.linalg.norm(d_nf4) / np.linalg.norm(d_full))
    print(f"mean abs: nf4-base LoRA moves {moved_nf4:.4f}, bf16-base LoRA {moved_full:.4f}, apart {apart:.4f}; "
          f"cosine of the two moves {cosine:.3f}")
    # measured: moves 0.0340 (nf4 base) and 0.0320 (bf16 base), 0.0252 apart, cosine 0.719: the same direction, but
    # nf4 rounds this tiny random UNet coarsely (30.5 dB image PSNR), so the two trainings see different bases
    assert moved_nf4 > 1e-3 and 0.7 < moved_nf4 / moved_full < 1.4 and cosine > 0.5
