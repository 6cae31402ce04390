"""model.denoiser must be what model.base's family exports, and `gen train` refuses a LoRA recipe: either mistake
used to train (a random DiT on an SD base) and write a model folder that does not load."""

import subprocess
import sys

import pytest

from gen.errors import GenError
from tests.conftest import quiet_pipeline
from tests.train.conftest import fast_config
from train.loop import train


def test_gen_train_refuses_a_lora_recipe_in_one_line(sd_folder, captioned, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "gen", "train", "configs/lora-sd.yaml", f"model.base={sd_folder}",
                        f"data.path={captioned}", f"train.output_dir={run}", "train.mixed_precision=no",
                        "data.resolution=16", "train.max_steps=1", "validation.prompts=[]"],
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("gen: error:"), r.stderr
    assert "LoRA recipe" in err[0] and "`gen lora configs/lora-sd.yaml ...`" in err[0]
    assert not run.exists()


@pytest.mark.parametrize("base, denoiser, want", [("sd_folder", "dit", "unet"), ("base_dit", "unet", "dit")])
def test_a_denoiser_the_base_family_cannot_hold_is_refused(base, denoiser, want, request, tmp_path):
    base = request.getfixturevalue(base)
    for init in (False, True):
        cfg = fast_config(base, tmp_path, model__denoiser=denoiser, model__preset="tiny" if denoiser == "unet"
                          else "DiT-T/2", model__init_from_base=init, objective__type="flow")
        with pytest.raises(GenError, match=rf"'model.denoiser'.*{base}.*set model.denoiser={want}"):
            train(cfg)
    assert not (tmp_path / "model").exists()


def test_the_suggested_keys_train_a_dit_on_an_sd_folders_text_encoder_and_vae(sd_folder, tmp_path):
    with pytest.raises(GenError) as e:
        train(fast_config(sd_folder, tmp_path / "a", model__denoiser="dit"))
    hint = str(e.value).split("set model.denoiser=unet; to train a dit with its text encoder and VAE, set ")[1]
    keys = dict(kv.split("=", 1) for kv in hint.split())
    assert keys == {"model.base": "''", "model.text_encoder": str(sd_folder), "model.vae": str(sd_folder)}
    out = train(fast_config("", tmp_path / "b", model__base="", model__text_encoder=str(sd_folder),
                            model__vae=str(sd_folder), train__max_steps=1))
    pipe = quiet_pipeline(out)
    assert pipe.family.name == "dit" and pipe(["a"], num_inference_steps=1, height=16, width=16).images
