"""data.resolution left unset: the size the base model was made for (`fit_resolution`, called by
train.config.load_config)."""

from __future__ import annotations

import json
import logging
from pathlib import Path


def native_size(base: str) -> int | None:
    """The image side a base model folder was made for (its recorded sampling height, else its denoiser's
    sample_size times the VAE factor); None where the folder does not say."""
    folder = Path(base)
    try:
        sampling = json.loads((folder / "gen_config.json").read_text()).get("sampling", {})
        if sampling.get("height"):
            return int(sampling["height"])
    except (OSError, ValueError):
        pass
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        for part in ("unet", "transformer"):
            config = folder / part / "config.json"
            if config.is_file():
                size = json.loads(config.read_text()).get("sample_size")
                return int(size) * factor if isinstance(size, int) else None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def fit_resolution(cfg, given: bool) -> None:
    """data.resolution not given (by the recipe or the user): the base's native size; given and far from it (over
    2x either way): a warning, since the base never saw that size."""
    native = native_size(cfg.model.base) if cfg.model.base and cfg.stage == "denoiser" else None
    if native is None:
        return
    if not given:
        cfg.data.resolution = native
    elif not 0.5 <= cfg.data.resolution / native <= 2:
        logging.getLogger("gen").warning("data.resolution %d is far from %d, the size the base %s was made for; it "
                                         "will train on images of a size it never saw (leave data.resolution unset "
                                         "for %d)", cfg.data.resolution, native, cfg.model.base, native)
