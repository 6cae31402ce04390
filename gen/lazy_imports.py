"""Start-up time: keep bitsandbytes (about a second, more on a loaded machine) out of every `gen` start. gen
quantizes with bitsandbytes itself (gen/quant/bnb.py), only under --weights nf4/fp4/int8, yet two packages import it
whenever it is installed: diffusers (its quantizer package, if `diffusers.utils.import_utils` found it) and peft
(`peft.helpers`, which diffusers imports as its LoRA backend). Neither has a switch for it.

So while those two modules run, and only then, `sys.modules["bitsandbytes"]` is None: `find_spec` reads that as
"not installed" and `import bitsandbytes` fails, which both modules take as its absence. The entry is removed right
after, so a later `import bitsandbytes` (gen.quant.bnb, training's 8-bit AdamW) imports the real package; when it
does, `found()` tells the two modules it is there after all (what they would have set had they seen it)."""

from __future__ import annotations

import importlib.abc
import sys

HIDING = ("diffusers.utils.import_utils", "peft.helpers")


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the HIDING modules (run with bitsandbytes hidden) and of bitsandbytes (then `found`)."""

    def find_spec(self, name, path=None, target=None):
        if name not in (*HIDING, "bitsandbytes") or (name != "bitsandbytes" and "bitsandbytes" in sys.modules):
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, name)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, name):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if self.name == "bitsandbytes":
            self.loader.exec_module(module)
            found(module)
            return
        sys.modules["bitsandbytes"] = None
        try:
            self.loader.exec_module(module)
        finally:
            if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
                del sys.modules["bitsandbytes"]


def install() -> None:
    """Called by `import gen`, before anything imports diffusers or peft."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def found(bitsandbytes) -> None:
    """bitsandbytes is imported after all: what diffusers and peft would have set at import, had they seen it."""
    utils = sys.modules.get(HIDING[0])
    if utils is not None:
        utils._bitsandbytes_available = True
        utils._bitsandbytes_version = getattr(bitsandbytes, "__version__", "N/A")
    quant = sys.modules.get("diffusers.quantizers.bitsandbytes.utils")
    if quant is not None:
        quant.bnb = bitsandbytes
    helpers = sys.modules.get(HIDING[1])
    if helpers is not None:
        helpers.bnb = bitsandbytes
