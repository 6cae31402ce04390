"""kohya/LyCORIS DoRA files (`.dora_scale` beside lora_down/lora_up/alpha, LyCORIS' weight_decompose) load as peft
DoRA layers. diffusers drops dora_scale keys (its load_lora_weights warns and filters them), so the reference is
the DoRA formula as LyCORIS (wd_on_out, its default) and peft define it, per output channel:
W' = m * (W + s B A) / ||W + s B A||, the norm over each output row (a convolution's: over in x kh x kw).
A fused original-layout layer (Flux's qkv) splits its magnitudes by rows, which is exact."""

import subprocess
import sys

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from gen.errors import GenError
from tests.conftest import quiet_pipeline


def dora_reference(weight: torch.Tensor, down, up, alpha: float, magnitude) -> torch.Tensor:
    """W' by the DoRA formula, in float64."""
    w = weight.double()
    delta = (alpha / down.shape[0]) * (up.flatten(1).double() @ down.flatten(1).double())
    merged = w + delta.reshape(w.shape)
    norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
    return magnitude.double().reshape(norm.shape) * merged / norm


def dora_factors(layer: torch.nn.Module, g: torch.Generator, rank: int = 2):
    """LyCORIS' tensors for one layer: lora_down (rank, in[, kh, kw]), lora_up (out, rank[, 1, 1]), and dora_scale
    (out, 1[, 1, 1]), initialised by LyCORIS to ||W|| per output row, here moved off it as training does."""
    w = layer.weight.detach()
    down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
    up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.3
    norm = w.flatten(1).norm(dim=1)
    scale = (norm * (1 + 0.5 * torch.rand(w.shape[0], generator=g))).reshape(-1, *[1] * (w.ndim - 1))
    return down, up, scale


def write(path, layers: dict, alpha: float = 3.0, seed: int = 0) -> dict:
    """{kohya name: layer} -> a DoRA file; returns {kohya name: W'} (the reference, from the layers' weights now)."""
    g, tensors, want = torch.Generator().manual_seed(seed), {}, {}
    for key, layer in layers.items():
        down, up, scale = dora_factors(layer, g)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha),
                    f"{key}.dora_scale": scale}
        want[key] = dora_reference(layer.weight.detach(), down, up, alpha, scale)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya",
                                             "ss_network_args": '{"algo": "lora", "dora_wd": "True"}'})
    return want


def sd_layers(pipe) -> dict:
    """An attention projection, an attention output, a 3x3 resnet convolution (LoCon) and a CLIP projection."""
    unet = dict(pipe.denoiser.named_modules())
    pick = [next(n for n in unet if n.endswith(s)) for s in ("attn1.to_q", "attn2.to_out.0", "resnets.0.conv1")]
    text = dict(pipe.text.model.named_modules())
    clip = next(n for n in text if n.endswith("layers.0.self_attn.q_proj"))
    return {**{"lora_unet_" + n.replace(".", "_"): unet[n] for n in pick},
            "lora_te_text_model_" + clip.removeprefix("text_model.").replace(".", "_"): text[clip]}


def test_a_kohya_dora_file_is_the_dora_formula_per_output_channel(sd_folder, tmp_path):
    pipe = quiet_pipeline(sd_folder)
    layers = sd_layers(pipe)
    assert layers[next(k for k in layers if "conv1" in k)].weight.ndim == 4
    want = write(tmp_path / "dora.safetensors", layers)
    x = {k: torch.randn(1, l.in_channels, 6, 6) if l.weight.ndim == 4 else torch.randn(3, l.in_features)
         for k, l in layers.items()}
    pipe.load_lora(tmp_path / "dora.safetensors")
    dora = [m for model in (pipe.denoiser, pipe.text.model) for m in model.modules()
            if isinstance(m, LoraLayer) and any(m.use_dora.values())]
    assert len(dora) == len(want) == 4  # every layer of the file, each a peft DoRA layer
    models = {**dict(pipe.denoiser.named_modules()), **dict(pipe.text.model.named_modules())}
    live = {k: models[n] for k in layers for n in models if ("lora_unet_" + n.replace(".", "_")) == k or
            ("lora_te_text_model_" + n.removeprefix("text_model.").replace(".", "_")) == k}
    assert len(live) == 4
    worst_forward = 0.0
    with torch.no_grad():
        for k, layer in live.items():  # peft's unfused DoRA forward = the layer with W'
            ref = (torch.nn.functional.conv2d(x[k], want[k].float(), layer.base_layer.bias, padding=1)
                   if want[k].ndim == 4 else torch.nn.functional.linear(x[k], want[k].float(), layer.base_layer.bias))
            worst_forward = max(worst_forward, (layer(x[k]) - ref).abs().max().item())
    assert worst_forward < 1e-4, worst_forward
    pipe.fuse_lora()
    pipe.unload_lora()  # fused weights stay
    worst = max((models[n].weight.double() - want[k]).abs().max().item() for k in layers for n in models
                if ("lora_unet_" + n.replace(".", "_")) == k)
    assert worst < 1e-5, worst


def test_a_dora_magnitude_on_a_fused_flux_layer_splits_by_rows(flux_folder, tmp_path):
    """sd-scripts/LyCORIS name Flux's fused qkv: the DoRA of the fused weight, row for row, on to_q, to_k, to_v."""
    pipe = quiet_pipeline(flux_folder)
    attn = pipe.denoiser.transformer_blocks[0].attn
    fused = torch.nn.Linear(attn.to_q.in_features, 3 * attn.to_q.out_features)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    want = write(tmp_path / "qkv.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": fused})
    pipe.load_lora(tmp_path / "qkv.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora()
    got = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).double()
    assert (got - want["lora_unet_double_blocks_0_img_attn_qkv"]).abs().max().item() < 1e-5


def test_dora_on_the_input_axis_is_a_one_line_error(sd_folder, tmp_path):
    pipe = quiet_pipeline(sd_folder)
    key, layer = next(iter(sd_layers(pipe).items()))
    w = layer.weight
    save_file({f"{key}.lora_down.weight": torch.randn(2, w.shape[1]), f"{key}.lora_up.weight": torch.randn(w.shape[0], 2),
               f"{key}.alpha": torch.tensor(2.0), f"{key}.dora_scale": w.norm(dim=0, keepdim=True)},  # (1, in)
              str(tmp_path / "in.safetensors"))
    with pytest.raises(GenError, match=r"is DoRA on the input axis \(dora_scale \(1, \d+\), LyCORIS' wd_on_out=false\)"):
        pipe.load_lora(tmp_path / "in.safetensors")
    args = [sys.executable, "-m", "gen", "sample", "x", "--model", str(sd_folder), "--lora",
            str(tmp_path / "in.safetensors"), "--steps", "1", "--height", "16", "--width", "16",
            "--out", str(tmp_path / "x.png"), "--no-progress"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 2 and "input axis" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
