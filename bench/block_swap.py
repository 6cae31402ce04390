"""Block swap and activation offload cost (train/swap.py): one LoRA training step (forward + backward, gradient
checkpointing) of a Flux-architecture transformer with random weights, all-resident vs train.blocks_to_swap=N vs
+ train.activation_offload: seconds per step, the ratio to resident, the allocator's peak, the frozen weight bytes
the formula (bench/train_memory.py low_memory_rows) leaves on the device, and the adapters' gradients' max abs
diff to resident (0 expected).

    .venv/bin/python bench/block_swap.py --device cuda --size small   # bench/gpu.py's swap step (bf16)
    .venv/bin/python bench/block_swap.py                              # CPU plumbing: tiny, fp32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from the repo root without installing

import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from gen.memory import blocks  # noqa: E402
from train.swap import BlockSwap, offload_context  # noqa: E402

diffusers_logging.set_verbosity_error()  # .to(bf16) warns about fp32 modules that Flux has none of
SIZES = {  # FluxTransformer2DModel configs; tokens: (image, text) at 512 px / 512 T5 tokens for small
    "tiny": (dict(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)), (64, 16)),
    "small": (dict(in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=8,
                   joint_attention_dim=1024, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)), (1024, 512)),
}


def build(size: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel
    from peft import inject_adapter_in_model

    from gen.families import get
    from gen.lora import lora_config

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**SIZES[size][0]).to(dtype).requires_grad_(False)
    inject_adapter_in_model(lora_config(get("flux").lora_targets, rank=16, parts="attn"), model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).mul_(0.02).float()
            p.requires_grad_(True)
    model.enable_gradient_checkpointing()
    return model.train()


def inputs(size: str, device: str, dtype: torch.dtype) -> dict:
    c, (n_img, n_txt) = SIZES[size]
    g = torch.Generator().manual_seed(1)
    side = int(n_img ** 0.5)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                         indexing="ij"), -1)
    kw = dict(hidden_states=torch.randn(1, n_img, c["in_channels"], generator=g),
              encoder_hidden_states=torch.randn(1, n_txt, c["joint_attention_dim"], generator=g),
              pooled_projections=torch.randn(1, c["pooled_projection_dim"], generator=g), timestep=torch.tensor([0.5]),
              img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3))
    return {k: v.to(device, dtype if k not in ("img_ids", "txt_ids", "timestep") else torch.float32)
            for k, v in kw.items()} | {"return_dict": False}


def run(size: str, device: str, swap: int, offload: bool, repeats: int) -> tuple[float, int, dict]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build(size, dtype)
    swapper = BlockSwap(model, swap, torch.device(device)) if swap else None
    if not swapper:
        model.to(device)
    kw = inputs(size, device, dtype)
    cuda = device.startswith("cuda")

    def step():
        model.zero_grad(set_to_none=True)
        with offload_context(offload, torch.device(device)):
            out = model(**kw)[0]
        out.float().pow(2).mean().backward()

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / repeats
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return seconds, peak, grads


def resident_weights(size: str, swap: int, dtype: torch.dtype) -> int:
    """The frozen weight bytes on the device, as bench/train_memory.py counts them."""
    with torch.device("meta"):
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(**SIZES[size][0]).to(dtype)
    found = blocks(model)
    nbytes = [sum(p.numel() * p.element_size() for p in b.parameters()) for _, b in found[len(found) - swap:]]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - sum(nbytes) + max(nbytes, default=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args(argv)
    with torch.device("meta"):
        from diffusers import FluxTransformer2DModel

        n = len(blocks(FluxTransformer2DModel(**SIZES[a.size][0])))
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    print(f"Flux-architecture transformer ({a.size}, {n} blocks) + LoRA rank 16, one training step, checkpointed, "
          f"{str(dtype).removeprefix('torch.')}, {a.device}")
    base = None
    for swap, offload in ((0, False), (n // 2, False), (n - 1, False), (n - 1, True)):
        seconds, peak, grads = run(a.size, a.device, swap, offload, a.repeats)
        base = base or (seconds, grads)
        diff = max(float((grads[k] - base[1][k]).abs().max()) for k in grads)
        print(f"  blocks_to_swap {swap:>2}{' + activation_offload' if offload else '':<22} {seconds:8.3f} s/step "
              f"({seconds / base[0]:.2f}x)  peak {peak / 2**20:9.1f} MiB  formula's resident weights "
              f"{resident_weights(a.size, swap, dtype) / 2**20:9.1f} MiB  grad max abs diff {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
