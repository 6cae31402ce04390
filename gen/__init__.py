"""gen: train, LoRA fine-tune and sample text-to-image latent diffusion and rectified-flow models."""

import logging

from gen import lazy_imports
from gen.errors import GenError

lazy_imports.install()  # diffusers and peft then leave bitsandbytes alone; gen imports it for --weights nf4 etc.
# bitsandbytes' CPU backend warns on every load that an optional 4-bit kernel package is missing; gen uses no 4-bit
# kernel. Set here, so that the Python API and the CLI (which imports this package) both keep it off stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["GenError", "Pipeline"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import gen` (and `gen --help`) stay fast; torch loads on first use.
    if name == "Pipeline":
        from gen.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'gen' has no attribute {name!r}")
