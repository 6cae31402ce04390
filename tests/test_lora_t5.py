"""T5 LoRA layers (sd-scripts' lora_te3_, written by lora_sd3.py / lora_flux.py with --train_t5xxl) load onto
transformers' T5EncoderModel: SD3's text_encoder_3 and Flux's text_encoder_2, every key on the layer sd-scripts'
naming rule gives, with the file's values and scale; an SD3 model without T5 refuses such a file in one line."""

import subprocess
import sys

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from gen.errors import GenError
from tests.conftest import quiet_pipeline

# sd-scripts networks/lora_sd3.py and lora_flux.py: TEXT_ENCODER_TARGET_REPLACE_MODULE holds T5Attention and
# T5DenseGatedActDense (T5-XXL v1.1's gated MLP); the tiny test T5 has the plain T5DenseActDense, added here.
T5_TARGETS = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")


def sd_scripts_names(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Linear]:
    """sd-scripts' create_modules rule: for each module of a target class, each Linear below it is named
    prefix + module path + child path, dots as underscores (its LoRANetwork, written here without gen)."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ in T5_TARGETS:
            for child_name, child in module.named_modules():
                if type(child).__name__ == "Linear":
                    out[(prefix + "." + name + "." + child_name).replace(".", "_")] = child
    return out


def t5_lora(model: torch.nn.Module, path, extra: dict | None = None) -> dict[str, tuple]:
    """A file of random rank-2 factors (alpha 3) on every layer sd-scripts names; returns {key: (layer, delta W)}."""
    g, tensors, want = torch.Generator().manual_seed(7), dict(extra or {}), {}
    for key, layer in sd_scripts_names(model, "lora_te3").items():
        down = torch.randn(2, layer.in_features, generator=g) * 0.2
        up = torch.randn(layer.out_features, 2, generator=g) * 0.2
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(3.0)}
        want[key] = (layer, 3.0 / 2 * up @ down)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_args": "{}"})
    return want


def check_loaded(pipe, t5_part: str, path, want: dict) -> None:
    """Every T5 layer of the file is a peft LoRA layer, and fused, each weight moved by exactly its delta W."""
    t5 = pipe.text_parts[t5_part]
    before = {key: layer.weight.detach().clone() for key, (layer, _) in want.items()}
    pipe.load_lora(path)
    assert sum(isinstance(m, LoraLayer) for m in t5.modules()) == len(want)
    pipe.fuse_lora()
    pipe.unload_lora()  # fused weights stay
    layers = {(("lora_te3." + n).replace(".", "_")): m for n, m in t5.named_modules()}
    worst = max((layers[key].weight - before[key] - delta).abs().max().item() for key, (_, delta) in want.items())
    assert worst < 1e-6, worst


def test_a_flux_t5_lora_loads_on_text_encoder_2(flux_folder, tmp_path):
    pipe = quiet_pipeline(flux_folder)
    t5 = pipe.text_parts["text_encoder_2"]
    assert type(t5).__name__ == "T5EncoderModel"
    proj = "lora_unet_double_blocks_0_img_attn_proj"  # with a transformer layer, as sd-scripts' files have
    h = pipe.denoiser.config.num_attention_heads * pipe.denoiser.config.attention_head_dim
    extra = {f"{proj}.lora_down.weight": torch.randn(2, h), f"{proj}.lora_up.weight": torch.randn(h, 2),
             f"{proj}.alpha": torch.tensor(2.0)}
    want = t5_lora(t5, tmp_path / "t5.safetensors", extra)
    assert len(want) == 6  # one block: q, k, v, o and wi, wo
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in want
    check_loaded(pipe, "text_encoder_2", tmp_path / "t5.safetensors", want)


def test_an_sd3_t5_lora_loads_on_text_encoder_3_or_is_refused_without_t5(sd3_folder, tmp_path):
    pipe = quiet_pipeline(sd3_folder)
    with_t5 = "text_encoder_3" in pipe.text_parts
    if with_t5:
        want = t5_lora(pipe.text_parts["text_encoder_3"], tmp_path / "t5.safetensors")
        assert len(want) == 12  # two blocks of q, k, v, o, wi, wo
        check_loaded(pipe, "text_encoder_3", tmp_path / "t5.safetensors", want)
        # and gen writes them back under sd-scripts' names
        pipe.load_lora(tmp_path / "t5.safetensors", adapter_name="t5")
        saved = pipe.save_lora(tmp_path / "again.safetensors", format="kohya")
        assert {k.split(".")[0] for k in load_file(saved)} == set(want)
        return
    from transformers import T5Config, T5EncoderModel

    other = T5EncoderModel(T5Config(vocab_size=32, d_model=80, d_ff=37, d_kv=8, num_layers=1, num_heads=4))
    t5_lora(other, tmp_path / "t5.safetensors")
    with pytest.raises(GenError, match=r"adapts 6 layers of a T5 encoder \(lora_te3_\), which this SD3 model has "
                                       r"none of") as e:
        pipe.load_lora(tmp_path / "t5.safetensors")
    assert "\n" not in str(e.value)
    args = [sys.executable, "-m", "gen", "sample", "x", "--model", str(sd3_folder), "--lora",
            str(tmp_path / "t5.safetensors"), "--steps", "1", "--height", "16", "--width", "16",
            "--out", str(tmp_path / "x.png"), "--no-progress"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 2 and "T5 encoder" in run.stderr and "Traceback" not in run.stderr


def test_a_t5_lora_on_a_model_of_a_family_without_t5_names_the_families(sdxl_folder, tmp_path):
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=80, d_ff=37, d_kv=8, num_layers=1, num_heads=4))
    t5_lora(t5, tmp_path / "t5.safetensors")
    with pytest.raises(GenError, match=r"is a LoRA for Flux or SD3, not for this SDXL model \(its lora_te3_ "):
        quiet_pipeline(sdxl_folder).load_lora(tmp_path / "t5.safetensors")
