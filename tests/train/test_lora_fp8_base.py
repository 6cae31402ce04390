"""`gen lora` with lora.base_weights=fp8: the frozen base's Linear/Conv weights stored as float8_e4m3fn (gen/quant,
upcast per layer), the adapters in fp32; the LoRA file loads on the full-precision base and moves its images as the
same LoRA trained on a bf16 base does."""

import json

import numpy as np
import pytest
import torch

from gen import quant
from gen.cli import main as gen_main
from gen.errors import GenError
from gen.pipeline import Pipeline
from train.config import load_config
from train.lora import LoraTask
from tests.train.test_lora_train import images, settings  # noqa: F401 (a fixture)

PROMPT = "a photo of sks dog"
RUN = dict(num_inference_steps=3, guidance_scale=6.0, height=16, width=16, seed=3, output_type="np")


def config(sd_folder, images, out, base_weights):
    """test_lora_train's 4-step UNet + text-encoder LoRA, in bf16 compute, on a base stored as `base_weights`."""
    return settings(sd_folder, images, out, train__mixed_precision="bf16", lora__base_weights=base_weights,
                    train__checkpoint_every=0)


def test_the_base_is_stored_fp8_and_the_adapters_fp32(sd_folder, images, tmp_path):
    cfg = load_config("configs/lora-subject.yaml", extra=config(sd_folder, images, tmp_path, "fp8"))
    task = LoraTask(cfg, torch.device("cpu"), torch.bfloat16)
    denoiser = task.model.denoiser
    stored = quant.layers([denoiser])
    assert stored > 0 and quant.layers([task.text_parts["text_encoder"].model]) > 0
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert not any(p.requires_grad for n, p in denoiser.named_parameters() if ".lora_" not in n)


@pytest.fixture(scope="module")
def loras(sd_folder, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-base")
    out = {}
    for weights in ("fp8", "full"):
        overrides = [f"{k}={json.dumps(v)}" for k, v in config(sd_folder, images, root / weights, weights).items()]
        assert gen_main(["lora", "configs/lora-subject.yaml", *overrides]) == 0
        out[weights] = root / weights / "lora.safetensors"
    return out


def test_a_lora_trained_on_an_fp8_base_moves_images_as_the_bf16_one(sd_folder, loras):
    def sample(lora=None):
        pipe = Pipeline.from_pretrained(sd_folder)  # the full-precision (fp32) base
        pipe.progress = False
        if lora:
            pipe.load_lora(lora)
        return pipe(PROMPT, **RUN).images

    base, fp8, bf16 = sample(), sample(loras["fp8"]), sample(loras["full"])
    moved_fp8, moved_bf16 = np.abs(fp8 - base).mean(), np.abs(bf16 - base).mean()
    apart = np.abs(fp8 - bf16).mean()
    print(f"mean abs: fp8-base LoRA moves {moved_fp8:.4f}, bf16-base LoRA {moved_bf16:.4f}, apart {apart:.4f} "
          f"(max {np.abs(fp8 - bf16).max():.4f})")
    # measured: moves 0.0207 (fp8 base) and 0.0204 (bf16 base) mean abs, 0.0068 apart (max 0.0388)
    assert moved_fp8 > 0.01 and moved_bf16 > 0.01
    assert apart < 0.5 * moved_bf16


def test_dora_on_an_fp8_base_is_refused(sd_folder, images, tmp_path):
    extra = config(sd_folder, images, tmp_path, "fp8") | {"lora.dora": True, "lora.format": "diffusers"}
    cfg = load_config("configs/lora-subject.yaml", extra=extra)
    with pytest.raises(GenError, match="DoRA needs the full-precision base"):
        LoraTask(cfg, torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("flux_folder", [True], indirect=True, ids=["dev"])
def test_a_flux_lora_on_an_fp8_base_resumes_bitwise_and_loads_on_the_full_base(flux_folder, images, tmp_path):
    """Transformer + CLIP adapters, gradient checkpointing (the stored layers' hooks run again in the recompute)."""
    from tests.train.test_sdxl_train import assert_same_checkpoints, straight_and_resumed

    more = {"lora.rank": 4, "lora.alpha": 8, "lora.text_encoder": True, "lora.save_dtype": "fp32",
            "lora.base_weights": "fp8", "lora.instance_prompt": PROMPT, "train.gradient_checkpointing": True,
            "train.mixed_precision": "bf16"}
    a, b = straight_and_resumed("configs/lora-sd3-flux.yaml", flux_folder, images, tmp_path, more, LoraTask, steps=2)
    assert_same_checkpoints(a, b, 2)
    pipe = Pipeline.from_pretrained(flux_folder)
    pipe.progress = False
    run = RUN | dict(guidance_scale=3.5)
    before = pipe(PROMPT, **run).images
    pipe.load_lora(a / "lora.safetensors")
    assert quant.layers(pipe.models) == 0 and np.abs(pipe(PROMPT, **run).images - before).max() > 1e-3
