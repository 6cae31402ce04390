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
        _refuse_lora_recipe(config, overrides)
        train(cfg)
    return 0


# lora.* keys only `gen lora` reads (lora.class_prompt & co. serve full fine-tuning as well: train/prior.py)
ADAPTER_KEYS = ("rank", "alpha", "dropout", "targets", "text_encoder", "dora", "algo", "format", "save_dtype",
                "instance_prompt")


def _refuse_lora_recipe(config: str, overrides: list[str]) -> None:
    """`gen train` on a LoRA recipe would ignore its lora.* keys and train a whole denoiser."""
    from gen.errors import GenError
    from train.config import parse_overrides, read_yaml

    section = read_yaml(config).get("lora") or {}
    keys = [f"lora.{k}" for k in ADAPTER_KEYS if k in section]
    keys += [k for k, _, _ in parse_overrides(overrides) if k.removeprefix("lora.") in ADAPTER_KEYS]
    if keys:
        raise GenError(f"{config} is a LoRA recipe ({', '.join(keys[:3])}): run `gen lora {config} ...` "
                       "(`gen train` trains a whole denoiser and would ignore the lora.* keys)")
