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
