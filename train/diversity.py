"""Sample diversity and a no-copying check, for any images with their prompts (no downloaded evaluator).

Distances are root-mean-square pixel differences of images scaled to [0, 1] (the L2 distance over sqrt of the
number of values), so that they read alike at any size. Two figures beside a model's accuracy:

- diversity ratio: for each prompt, the mean pairwise distance of its samples divided by the same statistic on
  training images of that prompt; averaged over prompts. 1.0 = as diverse as the data, 0 = one image per prompt
  (the "one way of writing each digit" failure).
- copying: each sample's distance to its nearest training image, against the same distance for held-out real
  images (drawn from the data but not trained on). A model that generalises lands about as far from its training
  set as unseen data does; one that copies lands nearer. `below_heldout` is the fraction of samples nearer than
  COPY_QUANTILE of the held-out images are (expected about COPY_QUANTILE), flagged above COPY_LIMIT.
"""

from __future__ import annotations

import numpy as np

from gen.errors import GenError

COPY_QUANTILE = 0.05  # the held-out nearest-neighbour distance below which a sample counts as near a copy
COPY_LIMIT = 0.25  # flag copying when more samples than this are that near (5x what unseen data gives)


def _flat(images) -> np.ndarray:
    """(N, ...) images, uint8 in [0, 255] or floats in [0, 1] -> (N, D) float64 in [0, 1]."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    return x.reshape(len(x), -1)


def distances(a, b) -> np.ndarray:
    """(Na, Nb) RMS distances between two sets of images of one size."""
    a, b = _flat(a), _flat(b)
    if a.shape[1] != b.shape[1]:
        raise GenError(f"images of {a.shape[1]} and {b.shape[1]} values cannot be compared; resize them first")
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0) / a.shape[1])


def mean_pairwise(images) -> float:
    """Mean RMS distance over the N (N - 1) / 2 pairs of N >= 2 images."""
    if len(images) < 2:
        raise GenError(f"the mean pairwise distance needs at least 2 images, not {len(images)}")
    d = distances(images, images)
    return float(d[np.triu_indices(len(d), k=1)].mean())


def nearest(queries, pool) -> np.ndarray:
    """Each query image's RMS distance to its nearest image in `pool`, (N,)."""
    return distances(queries, pool).min(axis=1)


def diversity(samples: dict, train: dict) -> dict:
    """{prompt: images} of samples and of training images -> each prompt's mean pairwise distances and their
    ratio, and the mean ratio over prompts (1.0: as diverse as the data)."""
    missing = sorted(set(samples) - set(train))
    if missing:
        raise GenError(f"no training images for prompt {missing[0]!r}")
    rows = {}
    for prompt, imgs in samples.items():
        s, t = mean_pairwise(imgs), mean_pairwise(train[prompt])
        rows[prompt] = {"samples": round(s, 5), "train": round(t, 5), "ratio": round(s / t, 4) if t else None}
    ratios = [r["ratio"] for r in rows.values() if r["ratio"] is not None]
    return {"ratio": round(float(np.mean(ratios)), 4) if ratios else None, "per_prompt": rows}


def copying(samples, train, heldout) -> dict:
    """Nearest-training-image distances of samples vs held-out real images (flat image arrays): their medians and
    ratio (about 1: no copying, near 0: copies), the fraction of samples nearer than COPY_QUANTILE of the held-out
    images are, and whether that fraction is over COPY_LIMIT."""
    s, h = nearest(samples, train), nearest(heldout, train)
    edge = float(np.quantile(h, COPY_QUANTILE))
    below = float((s < edge).mean())
    return {"sample_nn_median": round(float(np.median(s)), 5), "heldout_nn_median": round(float(np.median(h)), 5),
            "nn_ratio": round(float(np.median(s) / max(np.median(h), 1e-12)), 4),
            "below_heldout": round(below, 4), "quantile": COPY_QUANTILE, "flagged": below > COPY_LIMIT}


def report(samples: dict, train: dict, heldout) -> dict:
    """diversity() and copying() in one dict; the copying check pools every prompt's training images."""
    pool = np.concatenate([np.asarray(v) for v in train.values()])
    flat = np.concatenate([np.asarray(v) for v in samples.values()])
    return {"diversity": diversity(samples, train), "copying": copying(flat, pool, heldout)}


def format_lines(result: dict) -> list[str]:
    """Two printed lines for a report()."""
    c = result["copying"]
    return [f"diversity ratio (samples / training images, mean pairwise distance per prompt): "
            f"{result['diversity']['ratio']}",
            f"nearest training image, median RMS distance: samples {c['sample_nn_median']}, held-out real "
            f"{c['heldout_nn_median']} (ratio {c['nn_ratio']}); samples nearer than {c['quantile']:.0%} of held-out: "
            f"{c['below_heldout']:.1%}{'  COPYING' if c['flagged'] else ''}"]
