"""SDXL LoRA files against real diffusers + peft: a LoRA on the UNet and both text encoders (diffusers layout, and
kohya's lora_unet_/lora_te1_/lora_te2_ layout) loads with every key matched and gives diffusers' images; gen's
kohya export reads back and loads in diffusers; SD LoRAs and SDXL models (and the reverse) refuse each other."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from gen.cli import main
from gen.errors import GenError
from gen.io import read_metadata
from gen.pipeline import Pipeline
from gen.samplers import names_for
from tests.conftest import tiny_sd_components, tiny_sdxl_components
from tests.test_sdxl import our_images, theirs, theirs_images  # noqa: F401 (theirs: a fixture)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RUN = dict(n=1, steps=4)
SAMPLERS = names_for("ddpm")  # every sampler of a DDPM model


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def lora_layers(path) -> dict[str, int]:
    """Adapted layers per key prefix of a LoRA file, counted from its keys (one down matrix per layer)."""
    counts: dict[str, int] = {}
    for key in load_file(str(path)):
        if key.endswith((".lora_A.weight", ".lora_down.weight")):
            prefix = key.split(".")[0] if ".lora_A." in key else re.match(r"lora_(unet|te\d?)_", key).group(0)
            counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def adapted(models: dict) -> dict:
    """Component -> {module name: (A, B, alpha)} of peft LoRA layers."""
    return {c: {n: (m.lora_A["default"].weight, m.lora_B["default"].weight, m.lora_alpha["default"])
                for n, m in model.named_modules() if isinstance(m, LoraLayer)} for c, model in models.items()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A LoRA made with peft on the tiny SDXL's parts as diffusers' SDXL scripts make one (UNet add_adapter, text
    encoders by peft's inject_adapter_in_model), random non-zero B, saved by StableDiffusionXLPipeline."""
    d = tmp_path_factory.mktemp("sdxl-lora")
    parts = tiny_sdxl_components()
    torch.manual_seed(11)
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False),
               "text_encoder": LoraConfig(r=4, lora_alpha=2, target_modules=TEXT_TARGETS, init_lora_weights=False),
               "text_encoder_2": LoraConfig(r=2, lora_alpha=4, target_modules=TEXT_TARGETS[:4],
                                            init_lora_weights=False)}
    parts["unet"].add_adapter(configs["unet"])
    for name in ("text_encoder", "text_encoder_2"):
        inject_adapter_in_model(configs[name], parts[name])
    StableDiffusionXLPipeline.save_lora_weights(
        d, weight_name="sdxl.safetensors", unet_lora_layers=get_peft_model_state_dict(parts["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(parts["text_encoder"]),
        text_encoder_2_lora_layers=get_peft_model_state_dict(parts["text_encoder_2"]),
        **{f"{c}_lora_adapter_metadata": cfg.to_dict() for c, cfg in configs.items()})
    return d / "sdxl.safetensors", adapted({c: parts[c] for c in configs})


@pytest.fixture(scope="module")
def kohya_named(made, tmp_path_factory):
    """The same LoRA written by sd-scripts' naming rule (networks/lora.py: prefix + module path with dots as
    underscores; lora_down, lora_up, alpha), independently of gen's writer. Its CLIP module paths start with
    `text_model.` (both towers, in the transformers sd-scripts runs; transformers 5 dropped that level from
    CLIPTextModel)."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for comp, layers in made[1].items():
        for name, (a, b, alpha) in layers.items():
            path = name if comp == "unet" else "text_model." + name.removeprefix("text_model.")
            key = prefixes[comp] + path.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": a.detach().clone(), f"{key}.lora_up.weight": b.detach().clone(),
                        f"{key}.alpha": torch.tensor(float(alpha))}
    path = tmp_path_factory.mktemp("kohya") / "kohya-sdxl.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora",
                                             "ss_base_model_version": "sdxl_base_v1-0"})
    return path


def theirs_with(theirs, path, sampler):
    theirs.load_lora_weights(path)
    try:
        return theirs_images(theirs, sampler, **RUN)
    finally:
        theirs.unload_lora_weights()


@pytest.fixture()
def ours(sdxl_folder):
    pipe = Pipeline.from_pretrained(sdxl_folder)
    pipe.progress = False
    return pipe


def loaded_layers(pipe) -> dict[str, int]:
    return {c: sum(isinstance(m, LoraLayer) for m in model.modules()) for c, model in {"denoiser": pipe.denoiser, **pipe.text_parts}.items()}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_diffusers_sdxl_lora_loads_with_every_key_and_gives_diffusers_images(theirs, ours, made, sampler):
    base = our_images(ours, sampler, **RUN)
    ours.load_lora(made[0])
    counts = lora_layers(made[0])
    assert set(counts) == {"unet", "text_encoder", "text_encoder_2"}
    assert loaded_layers(ours) == {"denoiser": counts["unet"], "text_encoder": counts["text_encoder"],
                                   "text_encoder_2": counts["text_encoder_2"]}
    assert counts == {c: len(layers) for c, layers in made[1].items()}
    a, b = theirs_with(theirs, made[0], sampler), our_images(ours, sampler, **RUN)
    assert diff(b, base) > 0.02  # the LoRA changes the image
    assert diff(a, b) <= 1e-4


def test_gen_kohya_export_reads_back_and_loads_in_diffusers(theirs, ours, made, sdxl_folder, tmp_path):
    ours.load_lora(made[0])
    expected = our_images(ours, "euler", **RUN)
    path = ours.save_lora(tmp_path / "sdxl-kohya.safetensors", format="kohya")
    header = read_metadata(path)
    # kohya-ss/sd-scripts: sdxl_train_network.py sets model_version = MODEL_VERSION_SDXL_BASE_V1_0
    # ("sdxl_base_v1-0", library/sdxl_model_util.py), written as ss_base_model_version; args.v2 is False
    assert (header["ss_base_model_version"], header["ss_v2"]) == ("sdxl_base_v1-0", "False")
    counts = lora_layers(made[0])
    assert lora_layers(path) == {"lora_unet_": counts["unet"], "lora_te1_": counts["text_encoder"],
                                 "lora_te2_": counts["text_encoder_2"]}
    again = Pipeline.from_pretrained(sdxl_folder)
    again.progress = False
    again.load_lora(path)
    assert loaded_layers(again) == loaded_layers(ours)
    assert diff(our_images(again, "euler", **RUN), expected) == 0
    assert diff(theirs_with(theirs, path, "euler"), expected) <= 1e-4


def test_a_kohya_sdxl_file_in_sd_scripts_naming_loads_with_every_key(ours, made, kohya_named):
    ours.load_lora(made[0])
    expected = our_images(ours, "ddim", **RUN)
    ours.unload_lora()
    ours.load_lora(kohya_named)
    counts = lora_layers(kohya_named)
    assert sum(counts.values()) * 3 == len(load_file(str(kohya_named)))  # down, up, alpha: every key is a layer's
    assert loaded_layers(ours) == {"denoiser": counts["lora_unet_"], "text_encoder": counts["lora_te1_"],
                                   "text_encoder_2": counts["lora_te2_"]}
    assert diff(our_images(ours, "ddim", **RUN), expected) <= 1e-6


def sd_lora(tmp_path) -> str:
    parts = tiny_sd_components()
    torch.manual_seed(3)
    parts["unet"].add_adapter(LoraConfig(r=2, target_modules=UNET_TARGETS, init_lora_weights=False))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=TEXT_TARGETS, init_lora_weights=False),
                            parts["text_encoder"])
    StableDiffusionPipeline.save_lora_weights(tmp_path, weight_name="sd.safetensors",
                                              unet_lora_layers=get_peft_model_state_dict(parts["unet"]),
                                              text_encoder_lora_layers=get_peft_model_state_dict(parts["text_encoder"]))
    return tmp_path / "sd.safetensors"


def one_line_error(pipe, path) -> str:
    with pytest.raises(GenError) as e:
        pipe.load_lora(path)
    assert "\n" not in str(e.value) and "LyCORIS" not in str(e.value)
    assert pipe.loras.weights == {} and not loaded_layers(pipe)["denoiser"]  # nothing changed
    return str(e.value)


def test_an_sdxl_lora_on_an_sd_model_and_the_reverse_are_refused_naming_the_families(
        ours, made, kohya_named, sd_folder, tmp_path):
    sd = Pipeline.from_pretrained(sd_folder)
    for path in (made[0], kohya_named):
        assert "LoRA for SDXL, not for this SD-1.x model" in one_line_error(sd, path)
    assert "lora_te1_ (text_encoder)" in one_line_error(sd, kohya_named)
    sd.load_lora(sd_lora(tmp_path))  # an SD LoRA exported by gen (gen.family) or by kohya's naming
    exported = sd.save_lora(tmp_path / "sd-kohya.safetensors", format="kohya")
    message = one_line_error(ours, exported)
    assert "LoRA for SD-1.x, not for this SDXL model" in message and "lora_te_ (text_encoder)" in message
    renamed = tmp_path / "sd-kohya-plain.safetensors"
    save_file(load_file(str(exported)), str(renamed), metadata={"ss_base_model_version": "sd_v1"})
    assert "LoRA for SD-1.x, not for this SDXL model" in one_line_error(ours, renamed)
    args = [sys.executable, "-m", "gen", "sample", "x", "--model", str(sd_folder), "--lora", str(made[0]),
            "--steps", "1", "--height", "16", "--width", "16", "--out", str(tmp_path / "x.png"), "--no-progress"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 2 and "LoRA for SDXL" in run.stderr and "Traceback" not in run.stderr


def test_gen_info_reports_the_sdxl_components(ours, made, kohya_named, capsys):
    for path in (made[0], kohya_named):
        counts = lora_layers(path)
        assert main(["info", str(path)]) == 0
        text = capsys.readouterr().out
        order = sorted(counts, key=lambda p: (p not in ("unet", "lora_unet_"), p))  # the denoiser first
        parts = ", ".join(f"{p.rstrip('_')} {counts[p]}" for p in order)
        assert f"targets: {sum(counts.values())} layers ({parts})" in text


def sgm_prefixes(config) -> dict[str, str]:
    """diffusers UNet module prefix -> the original (SGM/LDM) block prefix sd-scripts' SDXL UNet names it by
    (its networks/lora_diffusers.py make_unet_conversion_map, written here for any layers_per_block)."""
    n, out = config.layers_per_block + 1, {"mid_block.resnets.0.": "middle_block.0.",
                                           "mid_block.attentions.0.": "middle_block.1.",
                                           "mid_block.resnets.1.": "middle_block.2."}
    for i in range(len(config.down_block_types)):
        for j in range(n - 1):
            out |= {f"down_blocks.{i}.resnets.{j}.": f"input_blocks.{n * i + j + 1}.0.",
                    f"down_blocks.{i}.attentions.{j}.": f"input_blocks.{n * i + j + 1}.1."}
        out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{n * (i + 1)}.0.op."
    for i, kind in enumerate(config.up_block_types):
        for j in range(n):
            out |= {f"up_blocks.{i}.resnets.{j}.": f"output_blocks.{n * i + j}.0.",
                    f"up_blocks.{i}.attentions.{j}.": f"output_blocks.{n * i + j}.1."}
        out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{n * i + n - 1}.{2 if 'CrossAttn' in kind else 1}."
    return out


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def to_sgm(module: str, config) -> str:
    prefix = next(p for p in sgm_prefixes(config) if (module + ".").startswith(p))
    rest = (module + ".")[len(prefix):].removesuffix(".")
    return (sgm_prefixes(config)[prefix] + (RESNET.get(rest, rest) if ".resnets." in prefix else rest)).rstrip(".")


@pytest.fixture(scope="module")
def sgm_named(kohya_named, sdxl_folder, tmp_path_factory):
    """kohya_named with its UNet layers named as sd-scripts' sdxl_train_network.py names them (the original
    blocks), plus LoCon factors on resnet convolutions, time embeddings, a downsampler and an upsampler; and the
    same file in diffusers' names."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sdxl_folder / "unet")
    layers = dict(unet.named_modules())
    tensors, torch_gen = load_file(str(kohya_named)), torch.Generator().manual_seed(5)
    for name in ("down_blocks.0.resnets.1.conv1", "down_blocks.1.resnets.0.conv_shortcut",
                 "up_blocks.0.resnets.2.conv2", "mid_block.resnets.1.time_emb_proj",
                 "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"):
        w = layers[name].weight
        down = (2, *w.shape[1:]) if w.ndim == 2 else (2, w.shape[1], *w.shape[2:])
        up = (w.shape[0], 2) + ((1, 1) if w.ndim == 4 else ())
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": torch.randn(down, generator=torch_gen) * 0.3,
                    f"{key}.lora_up.weight": torch.randn(up, generator=torch_gen) * 0.3,
                    f"{key}.alpha": torch.tensor(1.0)}
    d = tmp_path_factory.mktemp("sgm")
    save_file(tensors, str(d / "diffusers-names.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    unet_names = {k.split(".")[0].removeprefix("lora_unet_") for k in tensors if k.startswith("lora_unet_")}
    flat = {n.replace(".", "_"): n for n in layers}
    renamed = {}
    for key, value in tensors.items():
        head, _, tail = key.partition(".")
        if head.startswith("lora_unet_") and head.removeprefix("lora_unet_") in unet_names:
            head = "lora_unet_" + to_sgm(flat[head.removeprefix("lora_unet_")], unet.config).replace(".", "_")
        renamed[f"{head}.{tail}"] = value
    save_file(renamed, str(d / "sgm-names.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return d / "sgm-names.safetensors", d / "diffusers-names.safetensors"


def test_an_sd_scripts_sdxl_lora_in_original_block_names_loads_every_layer(sdxl_folder, sgm_named):
    """sd-scripts' SDXL LoRA/LoCon names (input_blocks / middle_block / output_blocks, in_layers_2, op, ...)
    land on the layers their diffusers-named twin does: every key matched, the same image."""
    sgm, twin = sgm_named
    keys = load_file(str(sgm))
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert any("_in_layers_2." in k or "_out_layers_3." in k for k in keys)
    images = []
    for path in (twin, sgm):
        pipe = Pipeline.from_pretrained(sdxl_folder)
        pipe.progress = False
        pipe.load_lora(path)
        counts = lora_layers(path)
        assert loaded_layers(pipe)["denoiser"] == counts["lora_unet_"]
        images.append(our_images(pipe, "euler", **RUN))
    assert diff(images[0], images[1]) == 0



def test_an_sd_scripts_sdxl_lora_gives_diffusers_image(theirs, sdxl_folder, sgm_named):
    """diffusers reads the same file by its own SGM mapping (_maybe_map_sgm_blocks_to_diffusers): same image."""
    pipe = Pipeline.from_pretrained(sdxl_folder)
    pipe.progress = False
    pipe.load_lora(sgm_named[0])
    assert diff(theirs_with(theirs, sgm_named[0], "euler"), our_images(pipe, "euler", **RUN)) <= 1e-4
