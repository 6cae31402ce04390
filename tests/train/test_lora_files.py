"""`gen lora` on files as users have them: model.base a whole SD checkpoint written by diffusers' own writer script
(no gen metadata, no tokenizer: gen's shipped one), its VAE given apart as model.vae=FILE (gen sample's --vae), or a
Flux transformer-only file with model.text_encoders and model.vae, trains the LoRA the equivalent diffusers folder
trains; component files with a folder base are a one-line error."""

import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tests.test_user_files import _checkpoint, _folder, _vae
from tests.train.test_lora_train import images  # noqa: F401 - the fixture
from tests.vendor import diffusers_to_original_sd as sd_script
from train.config import load_config
from train.loop import train
from train.lora import LoraTask

RUN = ["data.resolution=16", "data.flip=false", "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=0",
       "train.mixed_precision=no", "optim.lr=1e-2", "lora.rank=4", "lora.alpha=8", "lora.text_encoder=true",
       "lora.save_dtype=fp32", "validation.every=0", "validation.prompts=[a photo of sks dog]", "validation.seeds=[0]",
       "sampling.steps=2", "log.tracker=none", "log.progress=false"]


def _gen(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_gen_lora_on_a_checkpoint_file_and_a_vae_file_trains_the_folders_lora(images, tmp_path):  # noqa: F811
    folder = tmp_path / "folder"
    state = _checkpoint("sd1", folder, _folder("sd1", folder), tmp_path / "whole.safetensors")
    files = tmp_path / "files"
    files.mkdir()
    torch.manual_seed(5)  # the checkpoint's own VAE is another one: only the VAE file gives the folder's LoRA
    other = sd_script.convert_vae_state_dict(_vae().state_dict())
    other = {"first_stage_model." + k: v.contiguous() for k, v in other.items()}
    save_file(state | other, files / "sd1.safetensors")
    vae = sd_script.convert_vae_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.items()}, files / "vae.safetensors")
    run = _gen("lora", "configs/lora-subject.yaml", f"model.base={files / 'sd1.safetensors'}",
               f"model.vae={files / 'vae.safetensors'}", f"data.path={images}", f"train.output_dir={tmp_path / 'a'}",
               *RUN)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--vae" in run.stderr  # the "use it" line names the VAE file too
    ours = load_file(tmp_path / "a" / "lora.safetensors")
    cfg = load_config("configs/lora-subject.yaml", [f"model.base={folder}", f"data.path={images}",
                                                    f"train.output_dir={tmp_path / 'b'}", *RUN])
    theirs = load_file(train(cfg, LoraTask))
    assert ours.keys() == theirs.keys() and any(k.startswith("lora_te") for k in ours)
    assert max(float(np.abs(ours[k].numpy() - theirs[k].numpy()).max()) for k in ours) <= 1e-6
    bad = _gen("lora", "configs/lora-subject.yaml", f"model.base={folder}", f"model.vae={files / 'vae.safetensors'}",
               f"data.path={images}", f"train.output_dir={tmp_path / 'c'}", *RUN)
    errors = [line for line in bad.stderr.splitlines() if "error" in line.lower()]  # a warning on the size may precede
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(errors) == 1, bad.stderr
    assert "config key 'model.vae': component files go with a single-file model.base" in errors[0]


def test_gen_lora_on_a_flux_transformer_file_and_component_files_trains_the_folders_lora(images,  # noqa: F811
                                                                                        tmp_path):
    """model.base a BFL transformer-only file (no gen record: dev's objective read from its guidance input),
    model.text_encoders clip_l + t5xxl, model.vae ae.safetensors: the LoRA the diffusers folder trains."""
    from tests.test_component_files import _flux

    folder, files, name, texts = _flux(tmp_path, True, False)
    run_ = ["data.resolution=32", "train.batch_size=1", "train.grad_accum=1", "train.max_steps=2",
            "train.checkpoint_every=0", "train.mixed_precision=no", "train.gradient_checkpointing=false",
            "optim.lr=1e-2", "lora.rank=4", "lora.alpha=4", "lora.save_dtype=fp32", "validation.every=0",
            "validation.prompts=[a photo of a cat]", "validation.seeds=[0]", "sampling.steps=1", "log.tracker=none",
            "log.progress=false", f"data.path={images}"]
    run = _gen("lora", "configs/lora-sd3-flux.yaml", f"model.base={files / name}",
               f"model.vae={files / 'ae.safetensors'}",
               f"model.text_encoders=[{files / texts[0]}, {files / texts[1]}]", f"train.output_dir={tmp_path / 'a'}",
               *run_)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"--text-encoder {files / texts[0]}" in run.stderr  # the "use it" line
    ours = load_file(tmp_path / "a" / "lora.safetensors")
    cfg = load_config("configs/lora-sd3-flux.yaml", [f"model.base={folder}", f"train.output_dir={tmp_path / 'b'}",
                                                     *run_])
    theirs = load_file(train(cfg, LoraTask))
    assert ours.keys() == theirs.keys() and len(ours) > 0
    # the file's pipeline and the folder's, same tensors, sample 1.2e-6 apart (float summation order); two Adam
    # steps at lr 1e-2 carry that to ~4e-5, against adapter weights of ~1e-2
    assert max(float(np.abs(v.numpy()).max()) for v in ours.values()) > 1e-3
    assert max(float(np.abs(ours[k].numpy() - theirs[k].numpy()).max()) for k in ours) <= 1e-4
