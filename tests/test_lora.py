"""LoRA against real diffusers + peft: the same images both ways, kohya export, scale, fuse, compose, load-check."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.conftest import tiny_sd_components
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from gen import lora
from gen.families.dit import GenDiT
from gen.cli import _lora_arg, main
from gen.errors import GenError
from gen.io import read_metadata
from gen.pipeline import Pipeline

PROMPT, NEG, SEED = "a red circle", "blurry", 7
RUN = dict(num_inference_steps=3, guidance_scale=6.0, height=16, width=16)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in is a 1x1 conv in this UNet
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def theirs_images(pipe):
    return pipe(PROMPT, negative_prompt=NEG, generator=[torch.Generator("cpu").manual_seed(SEED)],
                output_type="np", **RUN).images


def our_images(pipe, output_type="np"):
    return pipe(PROMPT, negative_prompt=NEG, seed=SEED, sampler="ddim", output_type=output_type, **RUN).images


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def has_adapters(pipe) -> bool:
    return any(".lora_A." in k for m in (pipe.denoiser, pipe.text.model) for k in m.state_dict())


def adapters_made_as_diffusers_scripts_do(seed, unet_config, text_config=None, unet=None):
    """Tiny SD UNet and CLIP with LoRAs added as diffusers' training scripts add them (`unet.add_adapter(LoraConfig(
    ...))`) but with random non-zero B (init_lora_weights=False, so that the LoRA changes the images); the text
    encoder is None without text_config. Its adapter is injected with peft itself, which is what transformers'
    `add_adapter` (the scripts' call) does underneath; going through transformers' PEFT integration would tie
    this fixture to its peft version check."""
    parts = tiny_sd_components()
    unet, text = unet or parts["unet"], parts["text_encoder"]
    torch.manual_seed(seed)
    unet.add_adapter(unet_config)  # diffusers' own PEFT mixin
    if text_config is None:
        return unet, None
    inject_adapter_in_model(text_config, text)
    return unet, text


def peft_lora_saved_by_diffusers(path, seed, r, unet_alpha, text_alpha, unet=None):
    """peft keys written by diffusers' save_lora_weights with the LoraConfig header (rank, alpha)."""
    unet_config = LoraConfig(r=r, lora_alpha=unet_alpha, target_modules=UNET_TARGETS, init_lora_weights=False)
    text_config = LoraConfig(r=r, lora_alpha=text_alpha, target_modules=TEXT_TARGETS, init_lora_weights=False)
    unet, text = adapters_made_as_diffusers_scripts_do(seed, unet_config, text_config, unet)
    StableDiffusionPipeline.save_lora_weights(
        path.parent, weight_name=path.name, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    other_unet = UNet2DConditionModel(**{**tiny_sd_components()["unet"].config, "cross_attention_dim": 48})
    return {"a": peft_lora_saved_by_diffusers(d / "a.safetensors", 1, r=4, unet_alpha=8, text_alpha=2),
            "b": peft_lora_saved_by_diffusers(d / "b.safetensors", 2, r=2, unet_alpha=1, text_alpha=3),
            "other": peft_lora_saved_by_diffusers(d / "other.safetensors", 3, 4, 4, 4, unet=other_unet)}


@pytest.fixture(scope="module")
def theirs(sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(theirs, files):
    base = theirs_images(theirs)
    theirs.load_lora_weights(files["a"])
    with_a = theirs_images(theirs)
    theirs.unload_lora_weights()
    assert diff(with_a, base) > 0.02  # the LoRA really changes the image
    return {"base": base, "a": with_a}


@pytest.fixture(scope="module")
def shared_pipe(sd_folder):
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.progress = False
    return pipe


@pytest.fixture()
def pipe(shared_pipe):
    yield shared_pipe
    if shared_pipe.loras._backup is not None:
        shared_pipe.unfuse_lora()
    shared_pipe.unload_lora()
    lora.remove_adapters(shared_pipe.denoiser), lora.remove_adapters(shared_pipe.text.model)


def test_lora_saved_by_diffusers_gives_diffusers_images(pipe, files, reference):
    assert pipe.load_lora(files["a"]) == "a"
    assert diff(our_images(pipe), reference["a"]) <= 1e-4  # alpha 8 and 2 at rank 4 both came through


# The LoraConfig targets of diffusers' training scripts: examples/text_to_image/train_text_to_image_lora.py (UNet
# attention); examples/dreambooth/train_dreambooth_lora.py (also add_k/v_proj, which SD's UNet lacks, and with
# --train_text_encoder CLIP's attention); --use_dora as in train_dreambooth_lora_sdxl.py. "attn+ff" also adapts
# layers convert_state_dict_to_diffusers leaves as lora_A/B, so one file mixes two spellings per component.
SCRIPT_UNET = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
SCRIPT_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]
SCRIPTS = {"text_to_image": (SCRIPT_UNET[:4], None, False), "dreambooth": (SCRIPT_UNET, SCRIPT_TEXT, False),
           "dreambooth_dora": (SCRIPT_UNET, SCRIPT_TEXT, True),
           "attn+ff": (UNET_TARGETS + ["ff.net.0.proj", "ff.net.2"], TEXT_TARGETS, False)}
# Where diffusers' own load_lora_weights (0.42, transformers 5.23) reads such a file wrongly, the reference is a
# diffusers pipeline holding the very models the adapters were made in: for "attn+ff" its UNet loader converts
# the lora.down keys only when the first key is not lora_A (loaders/peft.py, load_lora_adapter), and for DoRA
# transformers' adapter loading leaves CLIP's lora_magnitude_vector at its initial value.
DIFFUSERS_MISREADS = ("attn+ff", "dreambooth_dora")


def adapter_layers(pipe, name) -> int:
    return sum(name in m.lora_A for model in (pipe.denoiser, pipe.text.model) for _, m in lora._tuner_layers(model))


def diffusers_images_with(theirs, path):
    theirs.load_lora_weights(path)
    try:
        return theirs_images(theirs)
    finally:
        theirs.unload_lora_weights()


def diffusers_images_of(unet, text):
    parts = tiny_sd_components()
    parts.update(unet=unet.eval(), text_encoder=(text or parts["text_encoder"]).eval())
    return theirs_images(StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False))


@pytest.mark.parametrize("script", SCRIPTS)
def test_lora_written_as_diffusers_training_scripts_do_gives_diffusers_images(pipe, theirs, reference, script,
                                                                                 tmp_path):
    unet_targets, text_targets, dora = SCRIPTS[script]
    config = lambda targets: LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False,  # noqa
                                        use_dora=dora)
    unet, text = adapters_made_as_diffusers_scripts_do(6, config(unet_targets), text_targets and config(text_targets))
    models = [m for m in (unet, text) if m is not None]
    if dora:  # as initialised, DoRA's magnitudes are the norms of W + BA: it would be the plain LoRA
        with torch.no_grad():
            for _, m in (x for model in models for x in lora._tuner_layers(model)):
                m.lora_magnitude_vector["default"].weight.mul_(torch.rand(m.out_features) + 0.5)
    layers = [get_peft_model_state_dict(m) for m in models]
    StableDiffusionPipeline.save_lora_weights(  # what the scripts save, into their output_dir
        tmp_path / "out", unet_lora_layers=convert_state_dict_to_diffusers(layers[0]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(layers[1]) if text else None)
    keys = list(load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith(".lora.down.weight") for k in keys) and lora.is_lora(keys)
    assert not text or any(".lora_linear_layer.down." in k for k in keys)
    n_layers = sum(k.endswith(".lora_A.weight") for part in layers for k in part)
    ref = (diffusers_images_of(unet, text) if script in DIFFUSERS_MISREADS
           else diffusers_images_with(theirs, tmp_path / "out"))
    assert diff(ref, reference["base"]) > 0.02
    name = pipe.load_lora(tmp_path / "out")  # the scripts' output_dir, as diffusers' load_lora_weights takes it
    assert adapter_layers(pipe, name) == n_layers == lora.read(tmp_path / "out").count()
    assert diff(our_images(pipe), ref) <= 1e-4


def attention_processor_keys(layers: dict, table: dict, processor: str) -> dict:
    """peft keys -> the LoRAAttnProcessor keys of diffusers < 0.21, by diffusers' own table read backwards."""
    back = {new: processor + old for old, new in table.items() if "_lora." in old}
    out = {}
    for key, value in layers.items():
        pattern = next(p for p in back if p in key)
        out[key.replace(pattern, back[pattern])] = value
    return out


def test_lora_in_the_attention_processor_layout_gives_diffusers_images(pipe, theirs, reference, tmp_path):
    config = lambda targets: LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False)  # noqa
    unet, text = adapters_made_as_diffusers_scripts_do(7, config(SCRIPT_UNET), config(SCRIPT_TEXT))
    unet_old = attention_processor_keys(get_peft_model_state_dict(unet), UNET_TO_DIFFUSERS, ".processor")
    text_old = attention_processor_keys(get_peft_model_state_dict(text), DIFFUSERS_OLD_TO_PEFT, "")
    text_old = {"text_model." + k: v for k, v in text_old.items()}  # CLIPTextModel's level in transformers < 5
    path = tmp_path / "old.safetensors"
    StableDiffusionPipeline.save_lora_weights(tmp_path, weight_name=path.name, unet_lora_layers=unet_old,
                                              text_encoder_lora_layers=text_old)
    assert any(".processor.to_out_lora.up.weight" in k for k in load_file(path))
    ref = diffusers_images_with(theirs, path)
    assert diff(ref, reference["base"]) > 0.02
    name = pipe.load_lora(path)
    assert adapter_layers(pipe, name) == (len(unet_old) + len(text_old)) // 2
    assert diff(our_images(pipe), ref) <= 1e-4


def test_one_matrix_in_two_spellings_is_an_error(pipe, files, tmp_path):
    state = load_file(files["a"])
    key = next(k for k in state if k.endswith("attn1.to_q.lora_A.weight"))
    state[key.replace(".lora_A.", ".lora.down.")] = state[key].clone()
    save_file(state, tmp_path / "twice.safetensors")
    with pytest.raises(GenError, match="down matrix twice"):
        pipe.load_lora(tmp_path / "twice.safetensors")


def test_a_folder_loads_its_one_lora_file(pipe, files, tmp_path):
    for name in ("x", "y"):
        shutil.copy(files["b"], tmp_path / f"{name}.safetensors")
    with pytest.raises(GenError, match="folder with 2 .safetensors files"):
        pipe.load_lora(tmp_path)
    (tmp_path / "y.safetensors").unlink()
    assert pipe.load_lora(tmp_path) == tmp_path.name and has_adapters(pipe)


def test_lora_saved_by_gen_and_its_kohya_export_load_in_diffusers(pipe, theirs, tmp_path):
    torch.manual_seed(5)  # a LoRA trained in gen: peft layers in gen's models, written by save_lora
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, init_lora_weights=False),
                            pipe.denoiser)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS, init_lora_weights=False),
                            pipe.text.model)
    ours = our_images(pipe)
    paths = {f: lora.save_lora(tmp_path / f"{f}.safetensors", pipe.denoiser, pipe.text.model, format=f,
                               recipe={"rank": 4}, base_model="tiny-sd") for f in ("diffusers", "kohya")}
    lora.remove_adapters(pipe.denoiser), lora.remove_adapters(pipe.text.model)
    assert load_file(paths["kohya"])["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 3
    for path in paths.values():
        theirs.load_lora_weights(path)
        try:
            assert diff(theirs_images(theirs), ours) <= 1e-4
        finally:
            theirs.unload_lora_weights()
    pipe.load_lora(paths["kohya"])  # and back into gen
    assert diff(our_images(pipe), ours) <= 1e-4


def test_scale_zero_is_no_lora(pipe, files, reference):
    pipe.load_lora(files["a"], scale=0.0)
    assert diff(our_images(pipe), reference["base"]) <= 1e-6


def test_fuse_gives_the_same_images_and_unfuse_restores_the_base_weights_exactly(pipe, files, reference):
    models = (pipe.denoiser, pipe.text.model)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    pipe.load_lora(files["a"])
    pipe.fuse_lora()
    assert diff(our_images(pipe), reference["a"]) <= 1e-4
    with pytest.raises(GenError, match="unfuse_lora"):
        pipe.load_lora(files["b"])
    pipe.unfuse_lora()
    pipe.unload_lora()
    for m, b in zip(models, before):
        after = m.state_dict()
        assert after.keys() == b.keys() and all(torch.equal(after[k], b[k]) for k in b)


def test_two_adapters_compose_as_diffusers_set_adapters(pipe, theirs, files):
    theirs.load_lora_weights(files["a"], adapter_name="a")
    theirs.load_lora_weights(files["b"], adapter_name="b")
    theirs.set_adapters(["a", "b"], adapter_weights=[0.7, -0.5])
    try:
        ref = theirs_images(theirs)
    finally:
        theirs.unload_lora_weights()
    pipe.load_lora(files["a"], scale=0.7)
    pipe.load_lora(files["b"], scale=-0.5)
    assert diff(our_images(pipe), ref) <= 1e-4
    pipe.set_adapters("b")
    only_b = our_images(pipe)
    pipe.set_adapters(["a", "b"], [0.7, -0.5])
    assert diff(our_images(pipe), ref) <= 1e-4 < diff(only_b, ref)
    with pytest.raises(GenError, match="no LoRA adapter named 'c'"):
        pipe.set_adapters(["a", "c"])


def test_partly_matching_lora_is_an_error_with_counts(pipe, files, tmp_path):
    state = load_file(files["a"])
    moved = [k for k in state if "up_blocks.0.attentions.0" in k]
    for k in moved:
        state[k.replace("up_blocks.0.attentions.0", "up_blocks.0.attentions.9")] = state.pop(k)
    save_file(state, tmp_path / "partial.safetensors")
    n_total, n_moved = len(state) // 2, len({k.split(".lora_")[0] for k in moved})
    with pytest.raises(GenError, match=rf"matches only {n_total - n_moved} of its {n_total} layers.*attentions\.9"):
        pipe.load_lora(tmp_path / "partial.safetensors")
    dit_style = {k.replace("unet.", "transformer.", 1): v for k, v in load_file(files["a"]).items()
                 if k.startswith("unet.")}
    save_file(dit_style, tmp_path / "dit.safetensors")
    with pytest.raises(GenError, match="matches none of its"):
        pipe.load_lora(tmp_path / "dit.safetensors")
    assert not has_adapters(pipe) and not pipe.loras.weights


def test_lora_for_other_shapes_fails_in_one_line_and_changes_nothing(pipe, files):
    before = our_images(pipe, output_type="latent")
    with pytest.raises(GenError, match="made for a model of other shapes") as e:
        pipe.load_lora(files["other"])
    assert "\n" not in str(e.value) and "attn2.to_k" in str(e.value)
    assert not has_adapters(pipe)
    assert torch.equal(our_images(pipe, output_type="latent"), before)


def test_pickle_lora_is_refused_unless_allowed(pipe, files, tmp_path):
    torch.save(load_file(files["a"]), tmp_path / "a.pt")
    with pytest.raises(GenError, match="pickle"):
        pipe.load_lora(tmp_path / "a.pt")
    pipe.load_lora(tmp_path / "a.pt", allow_pickle=True)
    assert has_adapters(pipe)


def test_dit_lora_round_trips_in_both_layouts(dit_pipe, tmp_path):
    torch.manual_seed(4)
    with torch.no_grad():  # a fresh DiT is adaLN-zero: every block is the identity until its gates move
        for p in dit_pipe.denoiser.parameters():
            if not p.any():
                p.normal_(std=0.05)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2,
                                       target_modules=lora.target_modules(GenDiT.lora_targets, ("attn", "ff")),
                                       init_lora_weights=False), dit_pipe.denoiser)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS, init_lora_weights=False),
                            dit_pipe.text.model)
    run = dict(num_inference_steps=2, seed=1, output_type="latent", height=16, width=16)
    with_lora = dit_pipe("a red circle", **run).images
    paths = [lora.save_lora(tmp_path / f"{f}.safetensors", dit_pipe.denoiser, dit_pipe.text.model, format=f)
             for f in lora.FORMATS]
    state = convert_state_dict_to_diffusers(load_file(paths[0]))  # the spelling of diffusers' training scripts
    assert any(k.endswith("attn.to_q.lora.down.weight") for k in state)
    save_file(state, tmp_path / "scripts.safetensors", metadata=read_metadata(paths[0]))
    paths.append(tmp_path / "scripts.safetensors")
    lora.remove_adapters(dit_pipe.denoiser), lora.remove_adapters(dit_pipe.text.model)
    base = dit_pipe("a red circle", **run).images
    assert diff(base, with_lora) > 1e-3
    for path in paths:
        dit_pipe.load_lora(path)
        assert diff(dit_pipe("a red circle", **run).images, with_lora) <= 1e-5
        dit_pipe.unload_lora()


def test_lora_arg_splits_scale_only_when_it_is_a_number():
    assert _lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert _lora_arg("dir/a:b.safetensors:0.5") == ("dir/a:b.safetensors", 0.5)
    assert _lora_arg("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert _lora_arg("C:\\loras\\a.safetensors:-1") == ("C:\\loras\\a.safetensors", -1.0)


def test_cli_sample_with_lora(pipe, files, sd_folder, tmp_path, capsys):
    out = tmp_path / "x.png"
    args = [sys.executable, "-m", "gen", "sample", PROMPT, "--model", str(sd_folder), "--lora", f"{files['a']}:0.5",
            "--negative-prompt", NEG, "--seed", str(SEED), "--sampler", "ddim", "--steps", "3", "--guidance", "6",
            "--height", "16", "--width", "16", "--out", str(out), "--no-progress"]
    subprocess.run(args, check=True, capture_output=True)
    pipe.load_lora(files["a"], scale=0.5)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(our_images(pipe, "pil")[0]))
    assert main([*args[3:7], "--lora", str(files["other"]), "--out", str(tmp_path)]) == 2
    assert "other shapes" in capsys.readouterr().err


# kohya-ss/sd-scripts (train_network.py) writes ss_base_model_version =
# model_util.get_model_version_str_for_sd1_sd2(args.v2, args.v_parameterization), i.e. "sd" + "_v2" or "_v1" +
# "_v" with v-prediction, and ss_v2 = str(bool(args.v2)); a rectified-flow UNet is none of those: gen's own name.
@pytest.mark.parametrize("cross, objective, version, v2", [
    (768, dict(prediction_type="epsilon"), "sd_v1", "False"), (1024, dict(prediction_type="epsilon"), "sd_v2", "True"),
    (1024, dict(prediction_type="v_prediction"), "sd_v2_v", "True"), (768, dict(shift=1.0), "gen_unet", "False")])
def test_kohya_header_names_the_base_model_as_sd_scripts_does(cross, objective, version, v2, tmp_path):
    parts = tiny_sd_components()
    unet_config = {**parts["unet"].config, "cross_attention_dim": cross}
    unet, _ = adapters_made_as_diffusers_scripts_do(8, LoraConfig(r=2, target_modules=SCRIPT_UNET[:4]),
                                                     unet=UNet2DConditionModel(**unet_config))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    scheduler = parts["scheduler"] if "shift" not in objective else FlowMatchEulerDiscreteScheduler()
    ours = Pipeline(parts["text_encoder"], parts["tokenizer"], parts["vae"], UNet2DConditionModel(**unet_config),
                    scheduler_config={**scheduler.config, **objective, "_class_name": type(scheduler).__name__})
    ours.load_lora(tmp_path)
    header = read_metadata(ours.save_lora(tmp_path / "kohya.safetensors", format="kohya"))
    assert (header["ss_base_model_version"], header["ss_v2"]) == (version, v2)


def test_gen_info_describes_a_lora(pipe, files, tmp_path, capsys):
    pipe.load_lora(files["b"])
    pipe.save_lora(tmp_path / "b-kohya.safetensors", format="kohya")
    assert main(["info", str(files["a"])]) == 0
    text = capsys.readouterr().out
    assert "layout: diffusers" in text and "targets: 84 layers (unet 54, text_encoder 30)" in text
    assert "rank: 4" in text and "alpha: 2..8" in text
    assert main(["info", str(tmp_path / "b-kohya.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "layout: kohya" in text and "rank: 2" in text and "alpha: 1..3" in text and "base model: tiny-sd" in text
