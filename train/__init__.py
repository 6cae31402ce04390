"""Everything only training needs: config, data, the one training loop, checkpoints.

`gen train CONFIG.yaml [key=value ...]` calls `main`; from Python, `train.loop.train(load_config(...))`.
A config with a top-level `chain:` runs stages in order into one model folder (see train/chain.py).
"""

from __future__ import annotations


def main(config: str, overrides: list[str]) -> int:
    from train.chain import is_chain, run_chain
    from train.config import load_config
    from train.loop import train

    if is_chain(config):
        run_chain(config, overrides)
    else:
        train(load_config(config, overrides))
    return 0
