"""The Pipeline contract: seeds, output types, guidance, DiT + flow end to end, prompts, bad input."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from gen.errors import GenError
from gen.pipeline import Pipeline


def call(pipe, prompt="a red circle", **kw):
    kw = {"num_inference_steps": 4, "seed": 3, "output_type": "np", **kw}
    return pipe(prompt, **kw).images


def test_image_k_of_a_batch_equals_it_alone(dit_pipe):
    batch = call(dit_pipe, num_images_per_prompt=3, seed=10)
    for k in range(3):
        alone = call(dit_pipe, num_images_per_prompt=1, seed=10 + k)
        assert np.abs(batch[k] - alone[0]).max() <= 1e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # different seeds, different images


def test_set_progress_bar_config_reaches_the_sampling_bar(dit_pipe):
    """As on a diffusers pipeline: the kwargs go to the tqdm bar over the steps; `progress` still works."""
    shown = io.StringIO()
    dit_pipe.set_progress_bar_config(file=shown, desc="denoising", leave=True, ascii=True)
    assert dit_pipe.progress
    call(dit_pipe, num_inference_steps=3)
    assert "denoising" in shown.getvalue() and "3/3" in shown.getvalue()
    hidden = io.StringIO()
    dit_pipe.set_progress_bar_config(disable=True, file=hidden)  # replaces the config, as diffusers' does
    assert not dit_pipe.progress
    call(dit_pipe, num_inference_steps=3)
    assert hidden.getvalue() == ""
    dit_pipe.progress = True  # keeps the other settings
    call(dit_pipe, num_inference_steps=3)
    assert "sampling" in hidden.getvalue() and "denoising" not in hidden.getvalue()


@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun"])
def test_dit_flow_samples_end_to_end(dit_pipe, sampler):
    out = dit_pipe(["a red circle", "a blue square"], num_inference_steps=3, sampler=sampler, seed=0)
    assert len(out.images) == 2 and all(isinstance(i, Image.Image) for i in out.images)
    assert out.images[0].size == (dit_pipe.defaults["width"], dit_pipe.defaults["height"])
    assert out.seeds == [0, 1]


def test_output_types_agree(dit_pipe):
    pt = dit_pipe("a red circle", num_inference_steps=3, seed=1, output_type="pt").images
    np_ = call(dit_pipe, num_inference_steps=3, seed=1)
    pil = dit_pipe("a red circle", num_inference_steps=3, seed=1).images
    lat = dit_pipe("a red circle", num_inference_steps=3, seed=1, output_type="latent").images
    assert pt.shape == (1, 3, 32, 32) and np_.shape == (1, 32, 32, 3) and lat.shape == (1, 4, 16, 16)
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), np_)
    assert np.abs(np.asarray(pil[0]) / 255.0 - np_[0]).max() <= 0.5 / 255 + 1e-6
    from gen.models.vae import decode
    assert torch.allclose(decode(dit_pipe.vae, lat), pt, atol=1e-6)


def count_batches(pipe):
    sizes = []
    pipe.denoiser.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes


def test_guidance_at_most_one_skips_unconditional_pass(dit_folder):
    pipe = Pipeline.from_pretrained(dit_folder)
    pipe.progress = False
    sizes = count_batches(pipe)
    call(pipe, guidance_scale=1.0, num_inference_steps=3)
    assert sizes == [1, 1, 1]
    sizes.clear()
    call(pipe, guidance_scale=4.0, num_inference_steps=3)
    assert sizes == [2, 2, 2]  # conditional and unconditional in one batched forward
    sizes.clear()
    call(pipe, guidance_scale=4.0, num_inference_steps=4, guidance_interval=(0.5, 1.0))
    assert sizes == [1, 1, 2, 2]


def test_a_models_default_guidance_interval_is_kept_and_used_by_the_api_and_the_cli(dit_folder, tmp_path):
    """sampling.guidance_interval in a model folder's gen_config.json is its default: the API and `gen sample` use
    it (only the conditional pass outside it), the PNG records it, and a given interval overrides it."""
    from gen.recipe import read_png
    from tests.test_cli import gen

    pipe = Pipeline.from_pretrained(dit_folder)
    pipe.defaults["guidance_interval"] = [0.5, 1.0]
    pipe.save_pretrained(tmp_path / "m")
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    pipe.progress = False
    sizes = count_batches(pipe)
    call(pipe, guidance_scale=4.0, num_inference_steps=4)
    assert sizes == [1, 1, 2, 2]
    sizes.clear()
    call(pipe, guidance_scale=4.0, num_inference_steps=4, guidance_interval=(0.0, 1.0))
    assert sizes == [2, 2, 2, 2]
    r = gen("sample", "a red circle", "--model", tmp_path / "m", "--steps", 4, "--seed", 3, "--out",
            tmp_path / "a.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert read_png(tmp_path / "a.png").guidance_interval == (0.5, 1.0)
    shown = np.asarray(Image.open(tmp_path / "a.png")) / 255.0
    assert np.abs(shown - call(pipe, guidance_scale=pipe.defaults["guidance"], num_inference_steps=4)[0]).max() <= 1 / 255


def test_negative_prompt_and_rescale_change_the_result(sd_folder):
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.progress = False
    base = call(pipe, sampler="ddim")
    assert np.abs(base - call(pipe, sampler="ddim", negative_prompt="green")).max() > 1e-3
    assert np.abs(base - call(pipe, sampler="ddim", guidance_rescale=0.7)).max() > 1e-4
    assert np.abs(base - call(pipe, sampler="ddim")).max() == 0  # and it is deterministic


def test_empty_unicode_and_long_prompts(dit_pipe, caplog):
    assert call(dit_pipe, "").shape == (1, 32, 32, 3)
    assert call(dit_pipe, "ein rotes Quadrat, 赤い円 🎨").shape == (1, 32, 32, 3)
    long = "a red circle " * 30 + "THE KEPT TAIL"  # over 77 tokens: encoded in chunks, nothing dropped
    with caplog.at_level(logging.WARNING, logger="gen"):
        call(dit_pipe, long)
    assert "dropped" not in caplog.text
    from gen.prompt_weights import chunks, with_syntax

    length = dit_pipe.text.max_length
    n = len(chunks(dit_pipe.text.tokenizer, long, length=length))
    hidden = dit_pipe.encode_prompts([long], texts=with_syntax(dit_pipe.texts))["hidden"]
    assert n > 1 and hidden.shape[1] == n * length


@pytest.mark.parametrize("kw, msg", [
    ({"height": 33}, "height must be a positive multiple of 4"),
    ({"width": 0}, "width must be a positive multiple"),
    ({"num_inference_steps": 0}, "steps must be an integer >= 1"),
    ({"guidance_scale": -1.0}, "guidance scale must be >= 0"),
    ({"sampler": "ddim"}, "cannot sample flow models"),
    ({"sampler": "nope"}, "unknown sampler"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": 2 ** 64}, "seed must be an integer"),
    ({"output_type": "jpg"}, "output_type must be one of"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
])
def test_bad_input_is_a_clear_error(dit_pipe, kw, msg):
    with pytest.raises(GenError, match=msg):
        call(dit_pipe, **kw)


def test_bad_model_paths(tmp_path, dit_folder):
    with pytest.raises(GenError, match="not found"):
        Pipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(GenError, match="not a model folder"):
        Pipeline.from_pretrained(tmp_path)
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(dit_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(GenError, match="missing the vae/ folder"):
        Pipeline.from_pretrained(broken)


def test_pickle_only_weights_are_refused(tmp_path, dit_folder):
    import shutil
    folder = tmp_path / "pickled"
    shutil.copytree(dit_folder, folder)
    canary = tmp_path / "canary"
    torch.save({"x": torch.zeros(1)}, folder / "vae" / "diffusion_pytorch_model.bin")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(GenError, match="pickle-based"):
        Pipeline.from_pretrained(folder)
    assert not canary.exists()


def test_save_pretrained_round_trip_keeps_defaults_and_recipe(dit_pipe, tmp_path):
    dit_pipe.defaults["steps"] = 7
    dit_pipe.recipe = {"lr": 1e-4}
    dit_pipe.save_pretrained(tmp_path / "m")
    dit_pipe.save_pretrained(tmp_path / "m")  # overwriting an existing folder is atomic and fine
    again = Pipeline.from_pretrained(tmp_path / "m")
    assert again.defaults["steps"] == 7 and again.recipe == {"lr": 1e-4}
    assert again.formulation == dit_pipe.formulation
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind
    (tmp_path / "link").symlink_to(tmp_path / "m")  # a link to a model folder (gen convert FILE LINK): the link is
    dit_pipe.save_pretrained(tmp_path / "link")  # replaced by the folder written, what it pointed to is kept
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "m" / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "m"]
    a = call(dit_pipe)
    again.progress = False
    assert np.abs(a - call(again)).max() == 0


def test_a_dit_run_computes_its_text_keys_once_and_draws_the_same_image(dit_pipe):
    """gen's DiT reuses a run's cross-attention keys and values (DiT.reusing_context): bitwise the image of computing
    them at every step, the key projections run once per text tensor (CFG's batch, then the conditional one outside
    the guidance interval), not once per step; nothing is kept after the run."""
    dit = dit_pipe.denoiser
    kw = dict(guidance_scale=4.0, num_inference_steps=4, guidance_interval=(0.0, 0.5))
    calls = []
    hook = dit.blocks[0].cross_attn.to_k.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    reused = call(dit_pipe, **kw)
    assert calls == [2, 1] and dit._context_kv is None
    calls.clear()
    dit.reusing_context = None  # the pipeline then computes them at every step
    try:
        every_step = call(dit_pipe, **kw)
    finally:
        del dit.reusing_context
    hook.remove()
    assert calls == [2, 2, 1, 1]
    assert np.array_equal(reused, every_step)
