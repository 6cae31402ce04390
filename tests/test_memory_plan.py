"""gen.memory_plan: the planner's weight bytes equal the real models', its transient peaks are within 10% of the
tensors measured on CPU (torch's MemTracker; tiny SD-1, Flux and SD3 models), and `gen sample --max-memory` picks the fastest setting that fits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gen import memory_plan as mp
from gen.errors import GenError
from gen.memory_train import build, denoiser_key, family_forward, family_models
from tests.conftest import quiet_pipeline, tiny_flux_components, tiny_sd3_components

BOUND = 0.10  # |predicted / measured - 1| of the transient peaks (measured: -5.5% .. +0.0% on these models)


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    from diffusers import FluxPipeline

    tmp = tmp_path_factory.mktemp("flux-plan")
    FluxPipeline(**tiny_flux_components(tmp)).save_pretrained(tmp / "tiny-flux")
    return tmp / "tiny-flux"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    path = tmp_path_factory.mktemp("sd3-plan") / "tiny-sd3"
    StableDiffusion3Pipeline(**tiny_sd3_components()).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["sd", "flux", "sd3"])
def folder(request, sd_folder, flux_dev, sd3):
    return {"sd": sd_folder, "flux": flux_dev, "sd3": sd3}[request.param]


def nbytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def test_predicted_weight_bytes_equal_the_real_models(folder):
    """Per kind (text towers, denoiser, VAE), full precision and with --weights fp8 stored (1 byte a weight)."""
    from gen import quant

    meta = mp.MetaModel(mp.folder_parts(folder), torch.float32)
    pipe = quiet_pipeline(folder)
    real = {"text": list(pipe.text_parts.values()), "denoiser": [pipe.denoiser], "vae": [pipe.vae]}

    def planned(weights):
        return {kind: sum(c.nbytes(c.module, "", weights, 4)
                          for c in meta.components if c.kind == kind) for kind in real}

    assert planned(None) == {kind: nbytes(ms) for kind, ms in real.items()}
    quant.apply(pipe, "fp8", torch.float32)
    assert quant.layers(pipe.models) > 0
    fp8 = planned("fp8")
    assert fp8 == {kind: nbytes(ms) for kind, ms in real.items()}
    assert fp8["denoiser"] < planned(None)["denoiser"]


@pytest.mark.parametrize("weights", ["nf4", "int8"])
def test_predicted_bitsandbytes_bytes_are_the_real_models(flux_dev, weights):
    """--weights nf4 / int8: the planner's bytes per kind against bitsandbytes' layers (gen.quant.parameter_bytes,
    statistics included), up to its per-layer constants (code tables, a row scale) the formula leaves out."""
    from gen import quant
    from gen.quant.store import parameter_bytes

    meta = mp.MetaModel(mp.folder_parts(flux_dev), torch.float32)
    pipe = quiet_pipeline(flux_dev)
    quant.apply(pipe, weights, torch.float32)
    real = {"text": list(pipe.text_parts.values()), "denoiser": [pipe.denoiser]}
    for kind, models in real.items():
        layers = quant.layers(models)
        got = sum(parameter_bytes(m) for m in models)
        predicted = sum(c.nbytes(c.module, "", weights, 4) for c in meta.components if c.kind == kind)
        slack = layers * (1400 if weights == "nf4" else 4 * 64)  # nf4: code tables (1 KiB), its packed state
        print(f"{weights} {kind}: {layers} layers, real {got}, predicted {predicted:.0f}")
        assert layers > 0 and abs(predicted - got) <= 0.02 * got + slack, (kind, predicted, got)
        assert predicted < sum(c.nbytes(c.module, "", None, 4) for c in meta.components if c.kind == kind)


def measured(run, model) -> int:
    """Peak bytes of the tensors alive while `run()` runs on CPU beyond `model`'s weights (torch's MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with torch.no_grad(), tracker:
        run()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - nbytes([model])


def test_predicted_transient_peaks_are_within_the_bound_of_the_measured(folder):
    """The denoiser's forward (CFG batch, the family's own inputs) and the VAE decode at 64 px, fp32 on CPU."""
    parts = mp.folder_parts(folder)
    meta = mp.MetaModel(parts, torch.float32)
    predicted = meta.transients(64, 64)
    _, texts, _, _, family = family_models(parts, torch.float32, "cpu")
    torch.manual_seed(0)
    denoiser, vae = build(*parts[denoiser_key(parts)]), build(*parts["VAE"])
    latent = 64 // meta.factor
    run = family_forward(family, texts)(denoiser, meta.cfg_batch(), (latent, latent), torch.float32)
    z = torch.randn(1, vae.config.latent_channels, latent, latent)
    got = {"denoise": measured(run, denoiser), "decode": measured(lambda: vae.decode(z), vae)}
    for phase, n in got.items():
        assert abs(predicted[phase] / n - 1) <= BOUND, (phase, predicted[phase], n)


def test_options_order_and_choice(sd_folder):
    planned = mp.plan(str(sd_folder), "64x64", torch.float32, training=False)
    peak = {r.option: r.peak for r in planned.rows}
    assert peak["fp8"] < peak["resident"] and peak["offload"] < peak["resident"]
    assert peak["sequential"] <= peak["group"] <= peak["offload"] and peak["fp8+offload"] <= peak["offload"]
    assert peak["fp8+group"] <= peak["group"]
    assert mp.choose(planned, int(peak["resident"])).option == "resident"
    assert mp.choose(planned, int(peak["resident"]) - 1).option == "fp8"
    with pytest.raises(GenError, match="no setting fits"):
        mp.choose(planned, int(min(peak.values())) - 1)
    assert mp.parse_memory("12GiB") == 12 * 2 ** 30 and mp.parse_memory("800MB") == 800 * 2 ** 20
    for bad in ("twelve", "0GiB", "12XB"):
        with pytest.raises(GenError):
            mp.parse_memory(bad)
    assert mp.parse_size("768x512") == (512, 768) and mp.parse_size("64") == (64, 64)


def test_max_memory_picks_the_fastest_setting_that_fits(sd_folder, tmp_path):
    planned = mp.plan(str(sd_folder), "32x32", torch.float32, training=False, options=mp.CHOICES)
    peak = {r.option: r.peak for r in planned.rows}
    budget = int(peak["resident"]) - 1  # resident does not fit; fp8 (next in order) does
    assert peak["fp8"] <= budget
    r = subprocess.run([sys.executable, "-m", "gen", "sample", "a red circle", "--model", str(sd_folder), "--steps",
                        "1", "--height", "32", "--width", "32", "--max-memory", str(budget), "--out",
                        str(tmp_path / "a.png"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stderr.splitlines() if "--max-memory" in x]
    assert len(line) == 1 and ": fp8 (--weights fp8 --offload none)" in line[0], r.stderr
    assert (tmp_path / "a.png").is_file()


def test_max_memory_refuses_a_budget_nothing_fits_and_info_prints_the_table(sd_folder, tmp_path, capsys):
    from gen.cli import main

    args = ["sample", "a red circle", "--model", str(sd_folder), "--steps", "1", "--height", "32", "--width", "32",
            "--out", str(tmp_path / "b.png")]
    assert main(args + ["--max-memory", "1KiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gen: error: no setting fits --max-memory 0.0 MiB at 32x32") and len(err.splitlines()) == 1
    assert not (tmp_path / "b.png").exists()
    assert main(args + ["--max-memory", "1GiB", "--offload"]) == 2
    assert "leave those out" in capsys.readouterr().err
    assert main(["info", "--memory", str(sd_folder), "--size", "64x64", "--dtype", "fp32", "--offload", "model"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:6]]
    assert rows == ["offload", "fp8+offload", "nf4+offload", "gguf-q4+offload"], out
    assert "LoRA, checkpointing on" in out and "64x64" in out


def test_a_single_file_is_planned_as_its_familys_released_model(sd_folder, tmp_path):
    path = tmp_path / "tiny-sd.safetensors"
    quiet_pipeline(sd_folder).save_pretrained(path, single_file=True)
    parts, title = mp.model_parts(str(path))
    assert parts is mp.FAMILIES["SD-1.5"] and "sd15 preset" in title
    assert mp.model_parts("FLUX-dev")[0] is mp.FAMILIES["Flux-dev"]
    with pytest.raises(GenError, match="neither a preset"):
        mp.model_parts(str(tmp_path / "missing"))
