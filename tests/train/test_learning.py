"""Learning works (reduced): on the shapes world, a tiny DiT with flow and a tiny UNet with ddpm end with a
clearly lower loss than they start with. The full check (a trained VAE, a few hundred steps, sampled colors
that follow the prompt) is bench/train_learns.py."""

import pytest

from tests.train.conftest import fast_config, losses
from train.loop import train

CASES = {"dit-flow": ("base_dit", 40), "unet-ddpm": ("base_unet", 20)}


@pytest.mark.parametrize("case", CASES)
def test_loss_goes_down(case, request, tmp_path):
    fixture, steps = CASES[case]
    train(fast_config(request.getfixturevalue(fixture), tmp_path, train__max_steps=steps, train__batch_size=8,
                      train__checkpoint_every=0, data__num_images=500, optim__lr=2e-3, optim__warmup_steps=5,
                      log__every=5))
    curve = losses(tmp_path)  # means over 5 steps each
    assert len(curve) == steps // 5
    assert curve[-1] < 0.6 * curve[0] and min(curve[1:]) < curve[0], curve
