"""Diversity and the no-copying check on real images of the shapes world, where the answer is known by construction:
one image repeated has no diversity, unseen images of the data are as diverse as the data and as far from the
training images as held-out ones, and copies of training images are flagged."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gen.errors import GenError
from train.diversity import copying, distances, diversity, mean_pairwise, nearest, report
from train.evaluate import prompt_set, reference_images

SPECS = prompt_set()[::7]  # 6 prompts: singles and pairs
K = 12


def _world(seed: int) -> dict:
    """K renders of each prompt, {prompt: (K, 64, 64, 3) uint8}."""
    imgs = reference_images(SPECS, K, "ground-truth", seed)
    return {s.prompt: np.stack(imgs[i * K:(i + 1) * K]) for i, s in enumerate(SPECS)}


def test_distances_are_rms_pixel_differences():
    black, white = np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 255, np.uint8)
    half = np.zeros((1, 4, 4, 3), np.uint8)
    half[:, :2] = 255  # half the values differ by 1: RMS sqrt(1/2)
    assert distances(black, white)[0, 0] == pytest.approx(1.0)
    assert distances(black, half)[0, 0] == pytest.approx(0.5 ** 0.5)
    # pairs (b, w), (b, h), (w, h): 1, sqrt(1/2), sqrt(1/2)
    assert mean_pairwise(np.concatenate([black, white, half])) == pytest.approx((1 + 2 * 0.5 ** 0.5) / 3)
    assert nearest(np.concatenate([white, half]), black).tolist() == pytest.approx([1.0, 0.5 ** 0.5])
    with pytest.raises(GenError, match="at least 2"):
        mean_pairwise(black)


def test_one_image_repeated_has_no_diversity():
    train = _world(0)
    same = {p: np.repeat(v[:1], 4, axis=0) for p, v in train.items()}
    out = diversity(same, train)
    assert out["ratio"] == 0.0 and all(r["train"] > 0.05 for r in out["per_prompt"].values())


def test_unseen_data_is_as_diverse_as_the_data_and_not_a_copy():
    train, unseen, heldout = _world(0), _world(1), _world(2)
    out = report(unseen, train, np.concatenate(list(heldout.values())))
    assert 0.8 < out["diversity"]["ratio"] < 1.25, out["diversity"]
    c = out["copying"]
    assert 0.8 < c["nn_ratio"] < 1.25 and c["below_heldout"] < 0.2 and not c["flagged"], c


def test_copies_of_training_images_are_flagged():
    train, heldout = _world(0), _world(2)
    pool = np.concatenate(list(train.values()))
    c = copying(pool[::3], pool, np.concatenate(list(heldout.values())))
    assert c["sample_nn_median"] == 0.0 and c["below_heldout"] == 1.0 and c["flagged"], c
    # copies with a little noise are still nearer than unseen data is
    noisy = np.clip(pool[::3].astype(int) + np.random.default_rng(0).integers(-3, 4, pool[::3].shape), 0, 255)
    assert copying(noisy.astype(np.uint8), pool, np.concatenate(list(heldout.values())))["flagged"]


def test_cli_reports_diversity_of_the_worlds_own_images(tmp_path):
    out = tmp_path / "adherence.json"
    r = subprocess.run([sys.executable, "-m", "gen", "eval", "adherence", "--reference", "ground-truth", "--n", "3",
                        "--diversity", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "diversity ratio" in r.stdout and "COPYING" not in r.stdout
    data = json.loads(out.read_text())
    # 3 images per prompt against 16: the ratio of two estimates of one statistic
    assert 0.75 < data["diversity"]["ratio"] < 1.3 and not data["copying"]["flagged"], data["copying"]
    assert len(data["diversity"]["per_prompt"]) == len(prompt_set())
    bad = subprocess.run([sys.executable, "-m", "gen", "eval", "adherence", "--reference", "noise", "--diversity"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "needs --n 2" in bad.stderr and "Traceback" not in bad.stderr
