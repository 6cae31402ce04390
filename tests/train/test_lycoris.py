"""LoHa and LoKr (lora.algo) through peft: trained by `gen lora`, written in the LyCORIS/kohya layout, loaded back
by gen with the training model's images, fused; files with LyCORIS's key names load with every key matched and
the update LyCORIS's formula gives."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gen import lora as lora_lib
from gen.errors import GenError
from gen.io import read_metadata
from gen.pipeline import Pipeline
from train.config import load_config
from train.loop import train
from train.lora import LoraTask
from tests.train.test_lora_train import images  # noqa: F401 - the subject photos fixture

PROMPT = "a photo of sks dog"
RUN = dict(num_inference_steps=3, guidance_scale=6.0, height=16, width=16, seed=3, sampler="ddim", output_type="np")


def config(base, images, out, algo, **more):
    return load_config(None, extra={
        "model.base": str(base), "data.path": str(images), "data.resolution": 16, "train.output_dir": str(out),
        "train.batch_size": 2, "train.max_steps": 2, "train.checkpoint_every": 1, "train.ema_decay": 0.0,
        "optim.lr": 3e-2, "lora.algo": algo, "lora.format": "kohya", "lora.rank": 4, "lora.alpha": 2,
        "lora.targets": "attn+ff", "lora.text_encoder": True, "lora.instance_prompt": PROMPT, "validation.prompts": [], "sampling.steps": 2,
        "log.tracker": "none", "log.progress": False, **more})


def sample(pipe):
    pipe.progress = False
    return pipe(PROMPT, **RUN).images


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_trained_file_loads_in_gen_with_the_training_models_images(algo, sd_folder, images, tmp_path):
    cfg = config(sd_folder, images, tmp_path, algo)
    path = train(cfg, LoraTask)
    keys = load_file(str(path))
    part = ".hada_" if algo == "loha" else ".lokr_"
    assert all(k.startswith(("lora_unet_", "lora_te_")) and (part in k or k.endswith(".alpha")) for k in keys)
    assert any(k.startswith("lora_te_text_model_") for k in keys)
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": algo}

    # resumed from step 1 in another folder: the same adapters and optimizer state at step 2, bitwise
    train(config(sd_folder, images, tmp_path / "resumed", algo,
                 **{"train.resume": str(tmp_path / "checkpoints" / "step-00000001")}), LoraTask)
    for state in ("model", "optimizer"):
        a, b = (load_file(str(run / "checkpoints" / "step-00000002" / f"{state}.safetensors"))
                for run in (tmp_path, tmp_path / "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), state
        assert state == "optimizer" or all(part in k for k in a)  # only the LoHa/LoKr parameters

    # the trained adapters, live in the training task (from the checkpoint the run ended with)
    task = LoraTask(cfg, torch.device("cpu"))
    task.model.load_state_dict(load_file(str(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors")))
    live = sample(task.pipeline(task.model))

    pipe = Pipeline.from_pretrained(sd_folder)
    base = sample(pipe)
    pipe.load_lora(path)
    loaded = sample(pipe)
    assert np.abs(loaded - base).max() > 1e-3  # two steps at lr 3e-2 moved the images
    assert np.abs(loaded - live).max() <= 1e-5
    pipe.fuse_lora()
    assert np.abs(sample(pipe) - live).max() <= 1e-4
    pipe.unfuse_lora()
    pipe.unload_lora()
    assert np.array_equal(sample(pipe), base)
    assert f"layout: kohya ({algo})" in lora_lib.describe(path)


def lycoris_file(pipe, path, algo, rank=4, alpha=2.0, whole=False):
    """A LoHa/LoKr file as LyCORIS's kohya wrapper names it (lora_unet_<module path with underscores>.hada_w1_a
    ..., lora_te_text_model_...), for every UNet attention projection and the text encoder's q_proj/v_proj,
    built here from random factors; returns {layer: (module, its dW by LyCORIS's formula)}."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    tensors, expect = {}, {}
    layers = [("lora_unet_", n, m) for n, m in pipe.denoiser.named_modules()
              if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    layers += [("lora_te_", n, m) for n, m in pipe.text_parts["text_encoder"].named_modules()
               if n.endswith(("q_proj", "v_proj"))]
    for prefix, name, m in layers:
        if prefix == "lora_te_":  # sd-scripts names CLIP's layers from text_model
            name = "text_model." + name.removeprefix("text_model.")
        key = prefix + name.replace(".", "_")
        out, inp = m.weight.shape
        if algo == "loha":
            w = {"hada_w1_a": rand(out, rank), "hada_w1_b": rand(rank, inp), "hada_w2_a": rand(out, rank),
                 "hada_w2_b": rand(rank, inp)}
            dw = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * alpha / rank
        else:  # w1 (small, whole) x w2 (decomposed unless `whole`), out = 4 * (out / 4)
            w = {"lokr_w1": rand(4, 4)}
            if whole:
                w["lokr_w2"] = rand(out // 4, inp // 4)
            else:
                w["lokr_w2_a"], w["lokr_w2_b"] = rand(out // 4, rank), rand(rank, inp // 4)
            w2 = w["lokr_w2"] if whole else w["lokr_w2_a"] @ w["lokr_w2_b"]
            dw = torch.kron(w["lokr_w1"], w2) * (1.0 if whole else alpha / rank)  # whole factors: no scale
        tensors |= {f"{key}.{k}": v for k, v in w.items()}
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
        expect[key] = (m, dw)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya",
                                            "ss_network_args": json.dumps({"algo": algo})})
    return expect


@pytest.mark.parametrize("algo, whole", [("loha", False), ("lokr", False), ("lokr", True)])
def test_a_lycoris_file_loads_with_every_key_matched_and_fuses_to_its_formula(algo, whole, sd_folder, tmp_path):
    pipe = Pipeline.from_pretrained(sd_folder)
    before = {n: m.weight.detach().clone() for n, m in pipe.denoiser.named_modules() if hasattr(m, "weight")}
    expect = lycoris_file(pipe, tmp_path / "theirs.safetensors", algo, whole=whole)
    bases = {key: m.weight.detach().clone() for key, (m, _) in expect.items()}
    pipe.load_lora(tmp_path / "theirs.safetensors")
    from peft.tuners.lycoris_utils import LycorisLayer

    adapted = [m for model in (pipe.denoiser, *pipe.text_parts.values()) for m in model.modules()
               if isinstance(m, LycorisLayer)]
    assert len(adapted) == len(expect)  # every layer of the file found its module
    pipe.fuse_lora()
    for key, (m, dw) in expect.items():
        torch.testing.assert_close(m.weight - bases[key], dw, rtol=1e-4, atol=1e-6, msg=key)
    pipe.unfuse_lora()
    pipe.unload_lora()
    assert all(torch.equal(m.weight, before[n]) for n, m in pipe.denoiser.named_modules() if n in before)


def test_lycoris_config_errors(sd_folder, images, tmp_path):
    with pytest.raises(GenError, match="lora.format.*loha.*kohya"):
        train(config(sd_folder, images, tmp_path, "loha", **{"lora.format": "diffusers"}), LoraTask)
    with pytest.raises(GenError, match="lokr adapter trains without them"):
        train(config(sd_folder, images, tmp_path, "lokr", **{"lora.dropout": 0.1}), LoraTask)
    with pytest.raises(GenError, match="lora.algo"):
        config(sd_folder, images, tmp_path, "locon")
