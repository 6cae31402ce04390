"""Start-up: `gen` commands import only what they use (checked in fresh interpreters, as a user's command starts)."""

import subprocess
import sys

import pytest


def run(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_the_command_line_imports_no_model_library():
    heavy = ("bitsandbytes", "torch", "diffusers", "transformers", "peft")
    assert run(f"import sys, gen.cli\nprint(*[m in sys.modules for m in {heavy}])") == ["False"] * len(heavy)


def test_sampling_does_not_import_bitsandbytes_until_asked():
    pytest.importorskip("bitsandbytes")
    # the sampling path imports diffusers and peft (its LoRA backend); both import bitsandbytes by themselves. Asked
    # for (--weights nf4), it is imported, and diffusers and peft see it as if they had imported it themselves.
    out = run("""if True:
        import sys
        import gen.pipeline, peft.helpers, diffusers.quantizers.bitsandbytes.utils as q
        from diffusers.utils import is_bitsandbytes_available
        print("bitsandbytes" in sys.modules)
        from gen.quant import bnb
        b = bnb.package("--weights nf4")
        print(is_bitsandbytes_available(), q.bnb is b, peft.helpers.bnb is b)""")
    assert out == ["False", "True", "True", "True"]
