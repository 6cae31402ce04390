"""Recipes by name: `gen lora lora-sd ...`, `gen train dit-shapes ...`, `--list`, `--print-config`.

The recipes are the repository's configs/ folder, the one source: train/configs is a symlink to it, so an
editable install reads configs/ itself, and a built wheel carries copies of its files as package data of
`train` (pyproject.toml). A name is a file's path under it without `.yaml` (`lora-sd`, `default/dit`)."""

from __future__ import annotations

import re
from pathlib import Path

from gen.errors import GenError

RECIPES = Path(__file__).resolve().parent / "configs"


def names() -> list[str]:
    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.yaml"))


def kind(path: Path) -> str:
    """`lora` for a LoRA recipe, else `train`."""
    from train.config import read_yaml

    return "lora" if "lora" in read_yaml(path) else "train"


def resolve(config: str) -> Path:
    """A config argument -> its file: an existing path as given, else a shipped recipe by name."""
    path = Path(config)
    if path.is_file():
        return path
    name = config[:-5] if config.endswith(".yaml") else config
    name = name.removeprefix("configs/")
    if (RECIPES / f"{name}.yaml").is_file():
        return RECIPES / f"{name}.yaml"
    raise GenError(f"config file not found: {config}; give a YAML file or a recipe name ({', '.join(names())}; "
                   "`gen train --list` describes them)")


def describe(path: Path) -> str:
    """A recipe's one-line description: the first sentence of its leading comment."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").rstrip()
        if not text or text.startswith(("gen ", "accelerate ")):
            break
        lines.append(text)
    return re.split(r"(?<! al)\. ", " ".join(lines))[0].rstrip(":").rstrip(".")


def listing(command: str) -> str:
    """`gen train --list` / `gen lora --list`: the recipes that command runs, a line each."""
    rows = [(n, describe(RECIPES / f"{n}.yaml")) for n in names() if kind(RECIPES / f"{n}.yaml") == command]
    width = max(len(n) for n, _ in rows)
    return "\n".join(f"{n:<{width}}  {d}" for n, d in rows)


def print_config(config: str, overrides: list[str]) -> str:
    """The recipe resolved with the overrides as YAML, to start one's own from (user paths may stay empty)."""
    from train.config import load_config, read_yaml

    path = resolve(config)
    if "chain" in read_yaml(path):
        return path.read_text()
    return load_config(path, overrides, check_paths=False).to_yaml()


def command(args, command: str) -> int | None:
    """--list, --print-config; else resolves args.config (a path, or a shipped recipe's name)."""
    if "--print-config" in args.overrides:  # after the config: in `gen lora`'s free-form overrides
        args.overrides.remove("--print-config")
        args.print_config = True
    if args.list:
        print(listing(command))
        return 0
    if args.config is None:
        raise GenError(f"gen {command} needs a recipe name or a YAML config (`gen {command} --list` names them)")
    if args.print_config:
        print(print_config(args.config, args.overrides), end="")
        return 0
    args.config = str(resolve(args.config))
    return None


def native_size(base: str) -> int | None:
    """The image side a base model folder was made for (its recorded sampling height, else its denoiser's
    sample_size times the VAE factor); None where the folder does not say."""
    import json

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
    import logging

    native = native_size(cfg.model.base) if cfg.model.base and cfg.stage == "denoiser" else None
    if native is None:
        return
    if not given:
        cfg.data.resolution = native
    elif not 0.5 <= cfg.data.resolution / native <= 2:
        logging.getLogger("gen").warning("data.resolution %d is far from %d, the size the base %s was made for; it "
                                         "will train on images of a size it never saw (leave data.resolution unset "
                                         "for %d)", cfg.data.resolution, native, cfg.model.base, native)
