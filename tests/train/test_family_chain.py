"""model.family: the chain's denoiser stage as a new model of a real family's architecture (SD3's MMDiT, SDXL's
UNet) on gen's own CLIP and VAE stages, no downloaded base; the product samples through the family's normal path
(`gen sample --model`) and converts to a single file (`gen convert`) that samples the same images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gen.cli import main as gen_main
from gen.errors import GenError
from train.chain import run_chain
from train.config import load_config
from train.loop import train
from tests.train.test_stages import CLIP, COMMON

RES = 32
FAMILY = {"sd3": {"model.family": "sd3", "model.preset": "tiny"},
          "sdxl": {"model.family": "sdxl", "model.denoiser": "unet", "model.preset": "tiny"}}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A clip and a vae stage's outputs (2 steps each), shared by the families' denoiser stages."""
    tmp = tmp_path_factory.mktemp("stages")
    chain = {"chain": {"clip": "clip.yaml", "vae": "vae.yaml"}, "output_dir": str(tmp / "run")}
    for stage in chain["chain"]:
        (tmp / f"{stage}.yaml").write_text(json.dumps({"stage": stage}))
    (tmp / "chain.yaml").write_text(json.dumps(chain))
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**COMMON, "data.resolution": RES}.items()] + ["train.max_steps=2"]
    overrides += [f"clip:{k}={json.dumps(v)}" for k, v in CLIP.items()]
    overrides += ["vae:vae.preset=tiny", "vae:vae.eval_images=8"]
    run_chain(tmp / "chain.yaml", overrides)
    return tmp / "run"


def _gen(capsys, *args) -> str:
    """`gen ARGS` through the CLI's main, in this process (the imports once); its stdout."""
    capsys.readouterr()
    code = gen_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


def _denoiser(stages, out, family, **extra):
    return load_config(None, extra={**COMMON, "data.resolution": RES, "stage": "denoiser",
                                    "train.output_dir": str(out), "train.max_steps": 2, "sampling.steps": 2,
                                    "model.text_encoder": str(stages / "clip" / "model"),
                                    "model.vae": str(stages / "vae" / "model"), **FAMILY[family], **extra})


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_a_family_trains_on_gens_stages_samples_and_converts(stages, tmp_path, family, capsys):
    from transformers import CLIPModel

    from gen.pipeline import Pipeline

    folder = train(_denoiser(stages, tmp_path / "run", family))
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.family.name == family
    assert type(pipe.denoiser) is pipe.family.denoiser_class()
    # the pooled embedding's projection is the one the clip stage learned
    clip = CLIPModel.from_pretrained(stages / "clip" / "model" / "clip")
    assert np.array_equal(pipe.texts[-1].model.text_projection.weight.detach().numpy(),
                          clip.text_projection.weight.detach().numpy())
    if family == "sd3":  # the CLIPs' tokens alone: no zeros stand in for a T5 the model never had
        assert pipe.defaults["max_sequence_length"] == 0
        assert pipe.encode_prompts(["a red circle"])["hidden"].shape[1] == pipe.texts[0].max_length
    sample = ["sample", "a red circle", "--steps", "2", "--seed", "3", "--no-progress", "--model"]
    _gen(capsys, *sample, folder, "--out", tmp_path / "a.png")
    file = tmp_path / f"{family}.safetensors"
    assert pipe.family.title in _gen(capsys, "convert", folder, file)
    _gen(capsys, *sample, file, "--out", tmp_path / "b.png")
    a, b = (np.asarray(Image.open(tmp_path / n), np.int16) for n in ("a.png", "b.png"))
    assert a.shape == (RES, RES, 3) and np.abs(a - b).max() <= 1
    if family == "sd3":  # the file keeps the setting; a bad one in gen_config.json is a one-line error
        assert Pipeline.from_pretrained(file).family.t5_length == 0
        config = json.loads((folder / "gen_config.json").read_text())
        config["sampling"]["max_sequence_length"] = "none"
        (folder / "gen_config.json").write_text(json.dumps(config))
        with pytest.raises(GenError, match=r"default max_sequence_length \(gen_config.json\) must be an integer"):
            Pipeline.from_pretrained(folder)


def test_family_refusals(stages, tmp_path):
    with pytest.raises(GenError, match="unknown family 'sd5'"):
        _denoiser(stages, tmp_path, "sd3", **{"model.family": "sd5"})
    with pytest.raises(GenError, match="model.family.*model.base"):
        _denoiser(stages, tmp_path, "sd3", **{"model.base": str(stages)})
    with pytest.raises(GenError, match="Flux model's text encoders"):
        train(_denoiser(stages, tmp_path / "flux", "sd3", **{"model.family": "flux"}))
    with pytest.raises(GenError, match="model.family 'sdxl' builds a SDXL model.*model.denoiser=unet"):
        train(_denoiser(stages, tmp_path / "x", "sdxl", **{"model.denoiser": "dit"}))
