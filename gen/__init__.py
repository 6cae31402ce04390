"""gen: train, LoRA fine-tune and sample text-to-image latent diffusion and rectified-flow models."""

from gen.errors import GenError

__all__ = ["GenError", "Pipeline"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import gen` (and `gen --help`) stay fast; torch loads on first use.
    if name == "Pipeline":
        from gen.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'gen' has no attribute {name!r}")
