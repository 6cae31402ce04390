"""Loading models: what the Python API prints, the dtype weights load in, the folder hash."""

import subprocess
import sys

import pytest


def test_the_python_api_keeps_bitsandbytes_kernel_message_off_stderr():
    """diffusers imports bitsandbytes where it is installed, whose CPU backend warns that an optional 4-bit kernel
    package is missing; `gen.Pipeline.from_pretrained` (not only the CLI) keeps that off stderr."""
    pytest.importorskip("bitsandbytes")
    code = "import gen; gen.Pipeline.from_pretrained(); print('loaded')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr
    assert "kernels" not in r.stderr, r.stderr
