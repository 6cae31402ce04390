"""sd-scripts' own SD3 LoRA code against gen: its networks/lora_sd3.py LoRANetwork names every layer of its own
MMDiT (library/sd3_models.py, a tiny SD3.5-M-shaped one: qk norms, dual attention in block 0, a last context block
without output; with emb_dims, the embedders and final layer too), a random LoRA on all of them is saved, and
sd-scripts merges it into its MMDiT (create_network_from_weights + merge_to). gen reads the same file onto the
diffusers SD3Transformer2DModel holding the same base weights: every layer matches, and the fused weights are
sd-scripts' merged weights in diffusers' names.

sd-scripts runs in a subprocess from the mirror of its repository (skipped where the mirror is absent), with stub
modules for what it imports but never calls here (einops, cv2, torchvision)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen import families
from gen.families.mmdit_keys import sd3_links, to_diffusers
from gen.lora import inject, match, remove_adapters
from gen.lora_formats import read

MIRROR = Path("/work/.mirror/kohya-ss+sd-scripts/repo")

SD_SCRIPTS = r'''
import importlib.machinery, sys, types
import diffusers, transformers  # their optional-package checks run before the stubs exist
from diffusers import AutoencoderKL  # noqa: F401
from transformers import CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401
for name in ("einops", "cv2", "torchvision", "torchvision.transforms"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.modules["einops"].rearrange = sys.modules["einops"].repeat = None
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import save_file
from library import sd3_models
from networks import lora_sd3

out = sys.argv[2]
torch.manual_seed(0)
params = sd3_models.SD3Params(patch_size=2, depth=2, num_patches=64, pos_embed_max_size=8, adm_in_channels=64,
                              qk_norm="rms", x_block_self_attn_layers=[0], context_embedder_in_features=80,
                              context_embedder_out_features=128, model_type="sd3_5m")
mmdit = sd3_models.create_sd3_mmdit(params)
with torch.no_grad():
    for p in (*mmdit.parameters(), *mmdit.buffers()):  # pos_embed is torch.empty until a checkpoint fills it
        p.normal_(0, 0.1)
save = lambda sd, name: save_file({k: v.detach().contiguous() for k, v in sd.items()}, f"{out}/{name}")
save(mmdit.state_dict(), "base.safetensors")
network = lora_sd3.LoRANetwork([], mmdit, lora_dim=2, alpha=3, emb_dims=[2] * 6)
network.apply_to([], mmdit, apply_text_encoder=False, apply_unet=True)  # registers the LoRA modules
with torch.no_grad():
    for n, p in network.named_parameters():
        p.normal_(0, 0.3)
save(network.state_dict(), "lora.safetensors")  # what save_weights writes, less its hash fields
merging, weights = lora_sd3.create_network_from_weights(1.0, f"{out}/lora.safetensors", None, [], mmdit,
                                                        for_inference=True)
merging.merge_to([], mmdit, weights)
save(mmdit.state_dict(), "merged.safetensors")
print(len(network.unet_loras))
'''


@pytest.fixture(scope="module")
def sd_scripts_run(tmp_path_factory):
    if not (MIRROR / "HEAD").exists():
        pytest.skip("no mirror of kohya-ss/sd-scripts here")
    root = tmp_path_factory.mktemp("sd-scripts")
    src, out = root / "src", root / "out"
    src.mkdir()
    out.mkdir()
    archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "HEAD", "library", "networks"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(src)], input=archive, check=True)
    run = subprocess.run([sys.executable, "-c", SD_SCRIPTS, str(src), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return out, int(run.stdout.strip().splitlines()[-1])


def test_an_sd_scripts_sd3_lora_fuses_to_sd_scripts_merged_weights(sd_scripts_run):
    from diffusers import SD3Transformer2DModel

    out, made = sd_scripts_run
    base, merged = load_file(out / "base.safetensors"), load_file(out / "merged.safetensors")
    family = families.get("sd3")
    config = family.transformer_config({k: list(v.shape) for k, v in base.items()}, {})
    links = sd3_links(config)
    model = SD3Transformer2DModel(**config)
    model.load_state_dict(to_diffusers(links, base), strict=True)
    lora = read(out / "lora.safetensors")
    assert made == lora.count() == 27  # 19 block layers (qkv, proj, mlp, adaLN; attn2) + 8 embedder/final ones
    matched = match(lora, {"denoiser": model}, family)  # raises unless every layer lands on a module
    assert len(matched["denoiser"]) == 27 + 2 * 5  # each of the 5 fused qkv layers is 3 diffusers modules
    inject(model, matched["denoiser"], "sd_scripts")
    for m in model.modules():
        if hasattr(m, "merge") and hasattr(m, "lora_A"):
            m.merge(adapter_names=["sd_scripts"])
    remove_adapters(model)
    want, got, before = to_diffusers(links, merged), model.state_dict(), to_diffusers(links, base)
    changed = {k for k in want if not torch.equal(want[k], before[k])}  # what sd-scripts' merge moved
    assert changed == {f"{name}.weight" for name in matched["denoiser"]}
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-5, worst
