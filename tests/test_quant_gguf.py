"""GGUF denoiser files (gen/quant/gguf.py; the block maths in gen/quant/store.py): gen's dequantization equals
the gguf package's own for each quant type;
a Flux GGUF written by gguf's GGUFWriter (BFL's key layout, as ComfyUI-GGUF's converter writes it) loads with
--base, stays quantized in memory and samples the image of the same weights dequantized by gguf; one-line errors
for a quant type or an architecture gen does not read."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from gen.errors import GenError  # noqa: E402
from gen.quant import gguf as gen_gguf  # noqa: E402
from gen.quant.store import dequantize, parameter_bytes, stored  # noqa: E402
from tests.conftest import psnr, quiet_pipeline, tiny_flux_components  # noqa: E402

KW = dict(num_inference_steps=2, seed=3, output_type="np", height=16, width=16)
QUANTIZERS = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # gguf-py quantizes these
# K-quants (gguf-py has no quantizer): per block, the byte ranges that hold fp16 super-block scales (d, dmin),
# set to sane values; every other byte (6-bit scales, quants, high bits) is random.
K_LAYOUT = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _compare(qtype: Q, raw: np.ndarray, rows: int, cols: int):
    theirs = quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(raw), qtype.name, (rows, cols))
    assert ours.shape == theirs.shape == (rows, cols)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", QUANTIZERS, ids=lambda q: q.name)
def test_dequantize_equals_gguf_quantized(qtype):
    a = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    _compare(qtype, quants.quantize(a, qtype), 6, 512)


def random_blocks(qtype: Q, rows: int, cols: int, rng, scale=(0.01, 0.1)) -> np.ndarray:
    """`rows` rows of `cols` values as random K-quant blocks (uint8 (rows, bytes)), super-block scales in `scale`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * (cols // block)
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in K_LAYOUT[qtype]:
        raw[:, at:at + 2] = rng.uniform(*scale, (n, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(K_LAYOUT), ids=lambda q: q.name)
def test_dequantize_equals_gguf_k_quant_random_blocks(qtype):
    _compare(qtype, random_blocks(qtype, 3, 512, np.random.default_rng(int(qtype))), 3, 512)


def test_supported_types_cover_the_common_quants():
    assert {"Q8_0", "Q5_K", "Q4_K", "Q4_0", "Q6_K", "Q5_0"} <= set(gen_gguf.supported())


# ---- a Flux GGUF ------------------------------------------------------------------------------------------------
def write_gguf(path, tensors: dict, qtype: Q | None, arch: str = "flux") -> dict:
    """Writes `tensors` with gguf's GGUFWriter, 2-D weights whose rows fill whole blocks quantized to `qtype`
    (by gguf's quantizer; a K-quant, which it cannot quantize, as random blocks of small values), the rest F32;
    returns the tensors as gguf's dequantize reads them back."""
    writer = gguf.GGUFWriter(str(path), arch)
    back, rng = {}, np.random.default_rng(0)
    for name, t in tensors.items():
        a = t.numpy().astype(np.float32)
        block = gguf.GGML_QUANT_SIZES[qtype][0] if qtype is not None else 0
        if qtype is not None and a.ndim == 2 and name.endswith(".weight") and a.shape[-1] % block == 0:
            q = random_blocks(qtype, *a.shape, rng, (1e-4, 1e-3)) if qtype in K_LAYOUT else quants.quantize(a, qtype)
            writer.add_tensor(name, q, raw_dtype=qtype)
            back[name] = torch.from_numpy(quants.dequantize(q, qtype).copy())
        else:
            writer.add_tensor(name, a)
            back[name] = torch.from_numpy(a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return back


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_flux_gguf_samples_the_image_of_its_dequantized_weights(flux_bfl, qtype, tmp_path):
    folder, bfl = flux_bfl
    back = write_gguf(tmp_path / "flux.gguf", bfl, qtype)
    save_file({k: v.contiguous() for k, v in back.items()}, tmp_path / "dequantized.safetensors")
    pipe = quiet_pipeline(tmp_path / "flux.gguf", base=folder)
    quantized = {n for n, m in pipe.denoiser.named_modules() if stored(m) is not None}
    assert len(quantized) >= 10 and all(stored(m).kind == qtype.name for n, m in pipe.denoiser.named_modules()
                                        if n in quantized)
    weights = [m.weight for n, m in pipe.denoiser.named_modules() if n in quantized]
    assert all(w.dtype == torch.uint8 for w in weights)  # kept quantized in memory
    ref = quiet_pipeline(tmp_path / "dequantized.safetensors", base=folder)
    assert parameter_bytes(pipe.denoiser) < 0.45 * parameter_bytes(ref.denoiser)
    image = pipe(["a red circle"], **KW).images
    assert np.abs(image - ref(["a red circle"], **KW).images).max() <= 1e-5
    full = quiet_pipeline(folder)(["a red circle"], **KW).images
    assert psnr(image, full) > (30 if qtype == Q.Q8_0 else 15)
    assert all(m.weight.dtype == torch.uint8 for n, m in pipe.denoiser.named_modules() if n in quantized)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K], ids=lambda q: q.name)
def test_flux_k_quant_gguf_samples_the_image_of_its_dequantized_weights(qtype, tmp_path):
    """A Flux transformer 256 wide (rows of whole 256-value K-quant super-blocks), its K-quant weights random
    blocks: the file samples the image of the same weights dequantized by gguf."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file

    parts = tiny_flux_components(tmp_path)
    parts["transformer"] = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                  attention_head_dim=128, num_attention_heads=2,
                                                  joint_attention_dim=32, pooled_projection_dim=32,
                                                  axes_dims_rope=[32, 48, 48], guidance_embeds=True)
    FluxPipeline(**parts).save_pretrained(tmp_path / "folder")
    quiet_pipeline(tmp_path / "folder").save_pretrained(tmp_path / "whole.safetensors", single_file=True)
    prefix = "model.diffusion_model."
    bfl = {k[len(prefix):]: v.float() for k, v in load_file(tmp_path / "whole.safetensors").items()
           if k.startswith(prefix)}
    back = write_gguf(tmp_path / "flux.gguf", bfl, qtype)
    save_file({k: v.contiguous() for k, v in back.items()}, tmp_path / "dequantized.safetensors")
    pipe = quiet_pipeline(tmp_path / "flux.gguf", base=tmp_path / "folder")
    kinds = [stored(m).kind for m in pipe.denoiser.modules() if stored(m) is not None]
    assert len(kinds) >= 8 and set(kinds) == {qtype.name}
    ref = quiet_pipeline(tmp_path / "dequantized.safetensors", base=tmp_path / "folder")
    image = pipe(["a red circle"], **KW).images
    assert np.isfinite(image).all() and image.std() > 0
    assert np.abs(image - ref(["a red circle"], **KW).images).max() <= 1e-5


def test_sd3_gguf_samples_the_image_of_its_dequantized_weights(sd3_folder, tmp_path):
    from safetensors.torch import load_file

    quiet_pipeline(sd3_folder).save_pretrained(tmp_path / "whole.safetensors", single_file=True)
    prefix = "model.diffusion_model."
    sai = {k[len(prefix):]: v.float() for k, v in load_file(tmp_path / "whole.safetensors").items()
           if k.startswith(prefix)}
    back = write_gguf(tmp_path / "sd3.gguf", sai, Q.Q8_0, arch="sd3")
    save_file({k: v.contiguous() for k, v in back.items()}, tmp_path / "dequantized.safetensors")
    pipe = quiet_pipeline(tmp_path / "sd3.gguf", base=sd3_folder)
    assert sum(stored(m) is not None for m in pipe.denoiser.modules()) >= 8
    ref = quiet_pipeline(tmp_path / "dequantized.safetensors", base=sd3_folder)
    assert np.abs(pipe(["a red circle"], **KW).images - ref(["a red circle"], **KW).images).max() <= 1e-5


def test_cli_samples_a_gguf_with_base(flux_bfl, tmp_path):
    folder, bfl = flux_bfl
    write_gguf(tmp_path / "flux-Q4_0.gguf", bfl, Q.Q4_0)
    r = subprocess.run([sys.executable, "-m", "gen", "sample", "a red circle", "--model",
                        str(tmp_path / "flux-Q4_0.gguf"), "--base", str(folder), "--steps", "2", "--height", "16",
                        "--width", "16", "--out", str(tmp_path / "o.png"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.png").is_file()
    r = subprocess.run([sys.executable, "-m", "gen", "info", str(tmp_path / "flux-Q4_0.gguf")], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "architecture: flux" in r.stdout and "Q4_0" in r.stdout, r.stderr


def test_gguf_load_errors(flux_bfl, tmp_path):
    folder = flux_bfl[0]
    write_gguf(tmp_path / "llama.gguf", {"x.weight": torch.zeros(2, 32)}, None, arch="llama")
    with pytest.raises(GenError, match="architecture 'llama'.*flux, sd3, sdxl, sd1"):
        quiet_pipeline(tmp_path / "llama.gguf", base=folder)
    writer = gguf.GGUFWriter(str(tmp_path / "tq.gguf"), "flux")  # TQ1_0 bytes: a type gen does not read
    block, size = gguf.GGML_QUANT_SIZES[Q.TQ1_0]
    writer.add_tensor("img_in.weight", np.zeros((2, size), np.uint8), raw_dtype=Q.TQ1_0)
    for k in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        k()
    with pytest.raises(GenError, match=r"img_in.weight is TQ1_0, a GGUF quant type gen does not read; it reads .*Q4_K"):
        quiet_pipeline(tmp_path / "tq.gguf", base=folder)
    write_gguf(tmp_path / "sdxl.gguf", {"input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, None, arch="sdxl")
    with pytest.raises(GenError, match="sdxl.gguf holds only the UNet: add --text-encoder clip_l.safetensors"):
        quiet_pipeline(tmp_path / "sdxl.gguf")
    r = subprocess.run([sys.executable, "-m", "gen", "sample", "x", "--model", str(tmp_path / "tq.gguf"), "--base",
                        str(folder), "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert r.returncode == 2 and "TQ1_0" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    no_gguf = "import sys\nsys.modules['gguf'] = None\nfrom gen.cli import main\nsys.exit(main())"  # not installed
    r = subprocess.run([sys.executable, "-c", no_gguf, "sample", "x", "--model", str(tmp_path / "tq.gguf"), "--base",
                        str(folder)], capture_output=True, text=True)
    assert r.returncode == 2 and "pip install 'gen[gguf]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
