"""bench/train_memory.py: the activation count on the meta device equals the one on real tensors, and the
peak-memory formula agrees with torch's MemTracker on real CPU training steps; every recipe gets a row."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ scripts import each other as bench.*
from bench import train_memory as tm  # noqa: E402
from gen.memory_train import saved_activation_bytes  # noqa: E402


def count(build, batch, latent, device, checkpointing):
    with torch.device(device):
        model = build()
    kw = tm.denoiser_inputs(model, batch, latent, device, torch.float32)
    return saved_activation_bytes(model, lambda: model(**kw), checkpointing)[0]


@pytest.mark.parametrize("name", ["DiT d128 x 2 blocks", "UNet tiny"])
def test_meta_device_counts_what_real_tensors_save(name):
    build, batch, latent = tm.check_builds()[name]
    full, ckpt = (count(build, batch, latent, "meta", c) for c in (False, True))
    real = count(build, batch, latent, "cpu", False)
    assert abs(full / real - 1) < 0.05  # the DiT: equal; the UNet's group norms save a little more on meta
    assert 0 < ckpt < 0.7 * full  # checkpointing keeps block inputs and one block's activations
    assert count(build, 2 * batch, latent, "meta", False) == pytest.approx(2 * full, rel=0.02)  # per sample


def test_formula_matches_measured_peaks():
    build, batch, latent = tm.check_builds()["DiT d128 x 2 blocks"]
    for ckpt in (False, True):
        formula = tm.estimate(build, batch, latent, "no", ckpt, ema=False, device_type="cpu").peak
        measured = tm.measured_peak(build, batch, latent, ckpt)
        assert abs(formula / measured - 1) < 0.15, (ckpt, formula, measured)


def test_formula_matches_a_flux_step_built_by_the_family():
    """The SD3/Flux rows' path (the family's encode, pack, train_inputs and predict) on a real step of a small
    Flux-dev architecture, checkpointed as the recipes train."""
    build, meta_inputs = tm.tiny_flux("meta")
    cpu_inputs = tm.tiny_flux("cpu")[1]
    formula = tm.estimate(build, 2, 16, "no", True, ema=False, device_type="cpu", inputs=meta_inputs).peak
    measured = tm.measured_peak(build, 2, 16, True, inputs=cpu_inputs)
    assert abs(formula / measured - 1) < 0.15, (formula, measured)


def test_every_recipe_has_a_row():
    rows = tm.recipe_rows(mmdit_models=("SD3.5-medium",))  # the others: the test below, the script
    recipes = {r[0] for r in rows}
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml")
               if "chain" not in p.read_text()}
    assert shipped | {"configs/default/dit.yaml"} == recipes
    for recipe, name, _, _, ckpt, _, m in rows:
        assert m.peak >= m.weights + m.optimizer + m.ema + m.activations > 0
    by = {(r[0], r[1], r[4]): r[6] for r in rows}
    for recipe, name, _ in by:  # checkpointing trades activations for recompute, nothing else
        off, on = by[recipe, name, False], by[recipe, name, True]
        assert on.activations < off.activations and on.weights == off.weights and on.optimizer == off.optimizer
    lora, full = by["configs/lora-sd.yaml", "SD-1.5 UNet + LoRA", False], by["configs/unet-sd15-finetune.yaml",
                                                                             "UNet sd15", False]
    assert lora.optimizer < full.optimizer / 100  # only the adapter trains


@pytest.mark.parametrize("model", ["Flux-dev", "SD3.5-medium"])
def test_sd3_flux_rows_hold_the_released_models_parts(model):
    """The SD3/Flux recipes' rows: the released transformer (bench/memory.py's count, parameters and buffers)
    trains in fp32 or is a LoRA's bf16 base; the CLIPs, T5-XXL and the VAE are frozen and resident in bf16."""
    from gen import memory_plan as memory

    rows = {(r[0], r[4]): r[6] for r in tm.recipe_rows(mmdit_models=(model,)) if r[1].startswith(model)}
    parts = {name: memory.count(*part) for name, part in memory.FAMILIES[model].items()}
    frozen = sum(n for name, n in parts.items() if name != "MMDiT")
    with torch.device("meta"):
        trained = sum(p.numel() for p in memory.build(*memory.FAMILIES[model]["MMDiT"]).parameters())
    full, lora = rows["configs/finetune-sd3-flux.yaml", True], rows["configs/lora-sd3-flux.yaml", True]
    assert full.gradients == 4 * trained  # the transformer alone trains (its buffers do not)
    assert full.weights == pytest.approx(4 * parts["MMDiT"] + 2 * frozen, rel=1e-3)
    assert full.ema == full.gradients  # the recipe's EMA
    adapter = lora.gradients // 4
    assert 0 < adapter < parts["MMDiT"] / 100
    assert lora.weights == pytest.approx(4 * adapter + 2 * (parts["MMDiT"] + frozen), rel=1e-3)
    assert lora.activations < full.activations / 4  # 512 px, checkpointed, against 1024 px
