"""Model offload (Pipeline.enable_offload, from_pretrained(offload=True), gen sample --offload): each component
group is on the execution device only while it runs, and the images are those without offload. bf16 weights."""

import numpy as np
import pytest
import torch

from gen.pipeline import Pipeline
from tests.conftest import tiny_sd3_components
from tests.test_img2img import inpainting_folder, mask, source  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    path = tmp_path_factory.mktemp("offload") / "tiny-sd3"
    StableDiffusion3Pipeline(**tiny_sd3_components(t5=True)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    return images(Pipeline.from_pretrained(folder))


def images(pipe, **kw):
    pipe.progress = False
    return pipe(["a red circle", "a cat"], negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
                num_images_per_prompt=2, seed=1, output_type="np", **kw).images


def test_offload_on_a_cpu_machine_moves_nothing_and_gives_the_same_images(folder, reference):
    pipe = Pipeline.from_pretrained(folder, offload=True)
    assert pipe._offload is None and pipe.device == torch.device("cpu")
    assert np.array_equal(images(pipe), reference)


def test_each_component_is_on_the_device_only_while_it_runs(folder, reference):
    """The phases: all text towers while the prompts are encoded, each run once per prompt batch (positive, then
    negative) whatever the number of images; the transformer for the loop; the VAE for decoding; then nothing.
    This machine has no device besides the CPU, so the execution device is the CPU: hooks read, at each call, which
    components the pipeline holds there, and check that their weights are on it (a real check on a GPU)."""
    pipe = Pipeline.from_pretrained(folder)
    pipe._offload = torch.device("cpu")  # what enable_offload("cuda") sets where there is a GPU
    parts = {**pipe.text_parts, "transformer": pipe.denoiser, "vae": pipe.vae.decoder}
    calls = []

    def hook(name):
        def record(module, *_):
            assert all(p.device == pipe.device for p in module.parameters())
            calls.append((name, sorted(n for n, m in parts.items() if m in pipe.resident or m is pipe.vae.decoder
                                       and pipe.vae in pipe.resident)))
        return record

    for name, module in parts.items():
        module.register_forward_pre_hook(hook(name))
    assert np.array_equal(images(pipe), reference)
    texts = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert calls[:6] == [(name, texts) for name in texts * 2]  # prompts, then negatives: each tower once each
    assert calls[6:9] == [("transformer", ["transformer"])] * 3 and calls[9:] == [("vae", ["vae"])]
    assert pipe.resident == ()


def test_bf16_weights_sample_close_to_fp32(folder, reference):
    pipe = Pipeline.from_pretrained(folder, dtype="bf16")
    assert {p.dtype for m in pipe.models for p in m.parameters()} == {torch.bfloat16}
    out = images(pipe)
    assert out.dtype == np.float32 and np.abs(out - reference).mean() < 0.02


def vae_calls(pipe) -> list[tuple[str, bool]]:
    """(part, on the device) at each call of the VAE's encoder and decoder: whether the pipeline holds the VAE on
    the execution device then, its weights there (the CPU here, as in the test above)."""
    pipe._offload = torch.device("cpu")
    pipe.progress = False
    calls = []
    for name in ("encoder", "decoder"):
        def record(module, *_, name=name):
            held = pipe.vae in pipe.resident
            calls.append((name, held and all(p.device == pipe.device for p in module.parameters())))
        getattr(pipe.vae, name).register_forward_pre_hook(record)
    return calls


def test_the_vae_is_on_the_device_in_hires_and_for_a_nine_channel_models_masked_image(folder, inpainting_folder):
    pipe = Pipeline.from_pretrained(folder)
    calls = vae_calls(pipe)  # hires with the image upscaler: decode, upscale, encode, img2img, decode
    pipe("a red circle", num_inference_steps=2, seed=1, hires_scale=1.5, hires_upscaler="image", output_type="np")
    assert calls == [("decoder", True), ("encoder", True), ("decoder", True)]
    pipe = Pipeline.from_pretrained(inpainting_folder)
    calls = vae_calls(pipe)  # the masked image encoded for the UNet's extra channels, then the decode
    pipe("a red circle", image=source(), mask_image=mask(), num_inference_steps=2, seed=1, output_type="np")
    assert calls == [("encoder", True), ("decoder", True)]
