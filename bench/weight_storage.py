"""Memory, speed and image quality of stored weights (gen/quant): fp8 and GGUF vs full precision, on a Flux model.

    python bench/weight_storage.py [--size small|tiny] [--steps 4] [--repeats 3] [--dtype fp32|bf16]

Builds one random Flux-architecture model (diffusers classes; "small": bench/sample_vs_diffusers.py's
flux-small, a 384-wide transformer of 2 double + 4 single blocks and a 16-channel 8x VAE, sampled at 128 px;
"tiny": the tests' model, at 16 px), saves it as a diffusers folder, and writes its transformer as the files
people share, in BFL's layout: bf16; fp8 e4m3fn and e5m2 (every tensor but the RMSNorm scales, as flux1-dev-fp8);
ComfyUI's scaled fp8 (per-tensor scale_weight); GGUF Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0, quantized by gguf's own
quantizer (gguf-py has none for K-quants, so those are tested for dequantization only, tests/test_quant_gguf.py).
Each loads with --base (the folder's text encoders and VAE) and samples the same prompt and seed; `--weights fp8`
stores the folder's transformer and text encoders as e4m3fn, `--weights nf4|fp4|int8` quantizes their Linear layers
with bitsandbytes (gen/quant/bnb.py; bytes with its quantization statistics). Reported per variant: the transformer's parameter
bytes (stored weights at their stored size), the fastest sampling time of --repeats, taken round robin over the
variants (the least disturbed by other work on a shared machine), and the PSNR of the image against the
full-precision folder's image (same dtype).
Figures: bench/results/weight_storage_cpu.txt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import torch  # noqa: E402

SIZES = {"small": 128, "tiny": 16}  # image side in pixels
GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
PREFIX = "model.diffusion_model."


def build(size: str, folder: Path) -> None:
    """The model: sample_vs_diffusers' flux-small preset ("small"), or the tests' tiny Flux ("tiny")."""
    if size == "small":
        from bench.sample_vs_diffusers import build_folder

        return build_folder("flux-small", SIZES[size], folder)
    from diffusers import FluxPipeline

    from tests.conftest import tiny_flux_components

    FluxPipeline(**tiny_flux_components(folder.parent)).save_pretrained(folder)


def variants(folder: Path, tmp: Path) -> dict[str, dict]:
    """name -> Pipeline.from_pretrained keyword arguments, the files written into `tmp`."""
    import gguf
    from gguf import quants
    from safetensors.torch import load_file, save_file

    from gen.pipeline import Pipeline

    Pipeline.from_pretrained(folder).save_pretrained(tmp / "whole.safetensors", single_file=True)
    bfl = {k: v for k, v in load_file(tmp / "whole.safetensors").items() if k.startswith(PREFIX)}
    out = {"full precision (folder)": dict(path=folder), "--weights fp8 (folder)": dict(path=folder, weights="fp8"),
           **{f"--weights {k} (folder)": dict(path=folder, weights=k) for k in ("nf4", "fp4", "int8")}}
    save_file({k: v.to(torch.bfloat16) for k, v in bfl.items()}, tmp / "bf16.safetensors")
    out["bf16 file"] = dict(path=tmp / "bf16.safetensors", base=folder)
    for name, dtype, scaled in (("fp8 e4m3fn", torch.float8_e4m3fn, False), ("fp8 e5m2", torch.float8_e5m2, False),
                                ("scaled fp8 (ComfyUI)", torch.float8_e4m3fn, True)):
        tensors = {}
        for k, v in bfl.items():
            if k.endswith(".scale"):  # RMSNorm scales stay high precision
                tensors[k] = v
            elif scaled and v.dim() == 2:
                s = v.abs().max().float() / 448
                tensors[k], tensors[k[:-len("weight")] + "scale_weight"] = (v / s).to(dtype), s.reshape(())
            else:
                tensors[k] = v.to(dtype)
        if scaled:
            tensors[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=dtype)
        file = tmp / f"{name.split(' (')[0].replace(' ', '-')}.safetensors"
        save_file(tensors, file)
        out[name] = dict(path=file, base=folder)
    for qname in GGUF_TYPES:
        qtype = gguf.GGMLQuantizationType[qname]
        writer = gguf.GGUFWriter(str(tmp / f"{qname}.gguf"), "flux")
        for k, v in bfl.items():
            a = v.float().numpy()
            if a.ndim == 2 and a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
                writer.add_tensor(k[len(PREFIX):], quants.quantize(a, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(k[len(PREFIX):], a)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        out[f"GGUF {qname}"] = dict(path=tmp / f"{qname}.gguf", base=folder)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"), help="folder for the figures")
    args = ap.parse_args()
    from gen.pipeline import Pipeline
    from gen.quant.store import parameter_bytes
    from tests.conftest import psnr

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    side = SIZES[args.size]
    call = dict(prompt=["a red circle left of a blue square"], num_inference_steps=args.steps, seed=7,
                output_type="np", height=side, width=side)
    lines = [f"Flux-architecture model ({args.size}), {side}x{side} px, {args.steps} steps, compute {dtype} on "
             f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, fastest of {args.repeats}; "
             "PSNR against the full-precision folder's image",
             f"{'storage':26s} {'transformer bytes':>18s} {'vs full':>8s} {'seconds':>8s} {'PSNR dB':>8s}"]
    print(lines[0])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(args.size, tmp / "folder")
        pipes = {name: Pipeline.from_pretrained(device=device, dtype=dtype, **kwargs)
                 for name, kwargs in variants(tmp / "folder", tmp).items()}
        times = {name: [] for name in pipes}
        images = {}
        for _ in range(args.repeats):  # round robin: a burst of other work on the machine slows every variant
            for name, pipe in pipes.items():
                pipe.progress = False
                t = time.perf_counter()
                images[name] = pipe(**call).images
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    ref, full = images[next(iter(pipes))], parameter_bytes(next(iter(pipes.values())).denoiser)
    for name, pipe in pipes.items():
        nbytes = parameter_bytes(pipe.denoiser)
        lines.append(f"{name:26s} {nbytes:>18,d} {nbytes / full:>7.2f}x {min(times[name]):>8.3f} "
                     f"{psnr(images[name], ref):>8.1f}")
        print(lines[-1])
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"weight_storage_{'gpu' if device == 'cuda' else 'cpu'}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
