"""Low-memory LoRA training (train/swap.py): train.blocks_to_swap keeps the frozen base's last blocks in host memory
and copies them to the device per block in the forward and per saved weight in the backward; train.activation_offload
keeps what gradient checkpointing saves in host memory. On a CPU the copies are real .to() copies, and the gradients
equal the run without either bitwise, for Flux, SD3, a UNet and gen's DiT; a swapped LoRA run resumes bitwise and ends
with the adapters of the unswapped run; where they cannot apply they are refused in one line."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from torch.multiprocessing.reductions import StorageWeakRef

from gen.cli import main as gen_main
from gen.errors import GenError
from tests.conftest import tiny_flux_components, tiny_sd3_components
from tests.train import test_sdxl_train
from tests.train.test_sdxl_train import args, assert_same_checkpoints, settings, straight_and_resumed
from train.config import load_config
from train.data import TrainData, loader
from train.loop import train
from train.lora import LoraTask
from gen.memory import blocks
from train.swap import offload_context

CONFIGS = {"flux": "configs/lora-sd3-flux.yaml", "sd3": "configs/lora-sd3-flux.yaml", "unet": "configs/lora-sd.yaml",
           "dit": "configs/lora-sd.yaml"}
images = test_sdxl_train.images  # a fixture: captioned pictures of several sizes
LORA = {"lora.rank": 4, "lora.alpha": 8, "lora.targets": "attn+ff", "lora.save_dtype": "fp32"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, sd_folder, dit_folder):
    root = tmp_path_factory.mktemp("swap-bases")
    FluxPipeline(**tiny_flux_components(root, guidance_embeds=True)).save_pretrained(root / "flux")
    StableDiffusion3Pipeline(**tiny_sd3_components()).save_pretrained(root / "sd3")
    return {"flux": root / "flux", "sd3": root / "sd3", "unet": sd_folder, "dit": dit_folder}


def step(family, base, images, tmp, swap=0, ckpt=False, offload=False, **more):
    """One micro-batch's loss and backward of a fresh LoRA task (the same adapters every time; zero weights, LoRA's
    B and the DiT's adaLN-Zero gates, made random so that every weight moves the gradients): (adapter gradients,
    the task)."""
    cfg = load_config(CONFIGS[family], extra=settings(base, images, tmp, **{
        **{k.replace(".", "__"): v for k, v in LORA.items()}, "train__blocks_to_swap": swap,
        "train__gradient_checkpointing": ckpt, "train__activation_offload": offload, **more}))
    torch.manual_seed(0)
    task = LoraTask(cfg, torch.device("cpu"))
    model = task.model.train()
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if not p.any():
            p.data.normal_(0, 0.1, generator=g)
    if ckpt:
        model.enable_gradient_checkpointing()
    batch = next(iter(loader(TrainData(cfg.data, cfg.train.seed), 2, 0, 1, 0)))
    copies = []  # the "device" copies of the swapped weights the forward made (weak: autograd must not keep them)
    for b in task.swap.blocks if task.swap else ():
        b.register_forward_pre_hook(lambda m, a: copies.extend(StorageWeakRef(p.data.untyped_storage())
                                                               for p in m.parameters() if not p.requires_grad))
    with offload_context(offload, torch.device("cpu")):
        loss = task.loss(model, batch, torch.Generator().manual_seed(2))
    task.forward_fetches = task.swap.fetches if task.swap else 0
    task.copies_kept = [not c.expired() for c in copies]
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, task


@pytest.mark.parametrize("family", ["flux", "sd3", "unet", "dit"])
def test_gradients_equal_without_swap_and_offload(family, bases, images, tmp_path):
    base = bases[family]
    want, plain = step(family, base, images, tmp_path)
    n = len(blocks(plain.model.denoiser))
    some = max(n - 1, 1)  # the tiny SD3 has one block
    for swap, ckpt, offload in ((some, False, False), (n, True, False), (some, True, True), (0, True, True)):
        got, task = step(family, base, images, tmp_path, swap, ckpt, offload)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"{family} swap {swap} ckpt {ckpt} offload {offload}: {k}"
        if swap:
            s = task.swap
            assert s.resident == 0 and task.copies_kept and not any(task.copies_kept)  # each copy freed after its block
            host = [p for ps in s.host for p in ps]
            assert host and all(p.device.type == "cpu" and not p.requires_grad for p in host)
            # the backward fetched saved weights again (with checkpointing: the recomputed forward too)
            assert s.fetches > task.forward_fetches >= len(host)
            trainable = [p for b in s.blocks for p in b.parameters() if p.requires_grad]
            assert trainable and all(p.grad is not None for p in trainable)


def test_an_fp8_base_swaps_too(bases, images, tmp_path):
    """lora.base_weights=fp8: the swapped blocks' stored bytes visit the device, the layers upcast them there."""
    want, _ = step("flux", bases["flux"], images, tmp_path, ckpt=True, lora__base_weights="fp8")
    got, task = step("flux", bases["flux"], images, tmp_path, 2, True, True, lora__base_weights="fp8")
    assert any(p.dtype == torch.uint8 for ps in task.swap.host for p in ps)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_swapped_flux_lora_resumes_bitwise_with_the_adapters_of_an_unswapped_run(bases, images, tmp_path):
    more = LORA | {"train.gradient_checkpointing": True, "train.blocks_to_swap": 1, "train.activation_offload": True}
    a, b = straight_and_resumed(CONFIGS["flux"], bases["flux"], images, tmp_path, more, LoraTask, steps=2)
    assert_same_checkpoints(a, b, 2)
    plain = settings(bases["flux"], images, tmp_path / "plain", **{k.replace(".", "__"): v for k, v in LORA.items()},
                     train__gradient_checkpointing=True, train__max_steps=2, train__checkpoint_every=1)
    train(load_config(CONFIGS["flux"], extra=plain), LoraTask)
    assert_same_checkpoints(a, tmp_path / "plain", 2)


def test_where_they_cannot_apply_they_are_refused_in_one_line(bases, images, tmp_path, capsys):
    base = bases["dit"]
    full = settings(base, images, tmp_path / "full", model__init_from_base=True, train__blocks_to_swap=1)
    assert gen_main(["train", "configs/finetune-sd3-flux.yaml", *args(full)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.blocks_to_swap" in err[0] and "full fine-tune" in err[0]
    lora = settings(base, images, tmp_path / "lora", **{k.replace(".", "__"): v for k, v in LORA.items()})
    for more, words in (({"train.distributed": "fsdp", "train.blocks_to_swap": 1}, "one process"),
                        ({"train.activation_offload": True}, "gradient_checkpointing=true"),
                        ({"train.blocks_to_swap": -1}, "invalid value -1")):
        with pytest.raises(GenError, match=words):
            train(load_config(CONFIGS["dit"], extra=lora | more), LoraTask)
    with pytest.raises(GenError, match="has 2 blocks; give 0 .off. to 2, not 3"):
        LoraTask(load_config(CONFIGS["dit"], extra=lora | {"train.blocks_to_swap": 3}), torch.device("cpu"))


def test_the_training_memory_table_counts_fp8_swapped_blocks_and_offload():
    """bench/train_memory.py's low-memory rows (Flux-dev LoRA at 512 px): each option lowers the predicted peak, to
    the 24 / 12 / 8 GB cards the issue names (kohya's steps), the swapped blocks' weights leaving all but one."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import train_memory as tm

    rows = dict(tm.low_memory_rows())
    peaks = [m.peak for m in rows.values()]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    gb = 1e9
    assert rows["bf16 base, data.cache"].peak > 24 * gb > rows["fp8 base"].peak
    assert rows["fp8 base + blocks_to_swap 28 + activation_offload"].peak < 12 * gb
    assert rows["fp8 base + blocks_to_swap 42 + activation_offload"].peak < 8 * gb
    fp8, swapped = rows["fp8 base"], rows["fp8 base + blocks_to_swap 28"]
    assert swapped.activations == fp8.activations and swapped.optimizer == fp8.optimizer
