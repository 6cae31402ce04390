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
        cfg = load_config(config, overrides)
        _refuse_lora_recipe(config, cfg)
        train(cfg)
    return 0


# lora.* keys only `gen lora` reads (lora.class_prompt & co. serve full fine-tuning as well: train/prior.py)
ADAPTER_KEYS = ("rank", "alpha", "dropout", "targets", "text_encoder", "dora", "algo", "format", "save_dtype",
                "instance_prompt")


def _refuse_lora_recipe(config: str, cfg) -> None:
    """`gen train` on a LoRA recipe would ignore its lora.* keys and train a whole denoiser. A key set to its
    default says nothing (a full run's resolved config.yaml lists them all)."""
    from gen.errors import GenError
    from train.config import LoraOptions

    default = LoraOptions()
    keys = [f"lora.{k}" for k in ADAPTER_KEYS if getattr(cfg.lora, k) != getattr(default, k)]
    if keys:
        raise GenError(f"{config} is a LoRA recipe ({', '.join(keys[:3])}): run `gen lora {config} ...` "
                       "(`gen train` trains a whole denoiser and would ignore the lora.* keys)")
