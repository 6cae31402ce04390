"""Everything only training needs: config, data, the one training loop, checkpoints.

`gen train CONFIG.yaml [key=value ...]` calls `main`; from Python, `train.loop.train(load_config(...))`.
"""

from __future__ import annotations


def main(config: str, overrides: list[str]) -> int:
    from train.config import load_config
    from train.loop import train

    train(load_config(config, overrides))
    return 0
