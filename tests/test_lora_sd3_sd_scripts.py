"""sd-scripts' own SD3 LoRA code against gen: its networks/lora_sd3.py LoRANetwork names every layer of its own
MMDiT (library/sd3_models.py, a tiny SD3.5-M-shaped one: qk norms, dual attention in block 0, a last context block
without output; with emb_dims, the embedders and final layer too) and of CLIP-L, CLIP-G and T5 (train_t5xxl;
transformers' models, T5 with T5-XXL's gated MLP), a random LoRA on all of them is saved, and
sd-scripts merges it into its models (create_network_from_weights + merge_to). gen reads the same file onto the
diffusers SD3Transformer2DModel holding the same base weights and the same text encoders: every layer matches,
and the fused weights are sd-scripts' merged weights (the transformer's in diffusers' names).

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
save = lambda sd, name: save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, f"{out}/{name}")
save(mmdit.state_dict(), "base.safetensors")
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
clip = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
            vocab_size=99)
texts = [CLIPTextModelWithProjection(CLIPTextConfig(**clip)) for _ in range(2)]
texts.append(T5EncoderModel(T5Config(d_model=80, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=99,
                                     feed_forward_proj="gated-gelu")))  # T5-XXL v1.1's gated MLP
for i, t in enumerate(texts):
    t.save_pretrained(f"{out}/te{i + 1}")
network = lora_sd3.LoRANetwork(texts, mmdit, lora_dim=2, alpha=3, emb_dims=[2] * 6, train_t5xxl=True)
network.apply_to(texts, mmdit, apply_text_encoder=True, apply_unet=True)  # registers the LoRA modules
with torch.no_grad():
    for n, p in network.named_parameters():
        p.normal_(0, 0.3)
save(network.state_dict(), "lora.safetensors")  # what save_weights writes, less its hash fields
texts = [type(t).from_pretrained(f"{out}/te{i + 1}") for i, t in enumerate(texts)]  # fresh, unpatched copies
merging, weights = lora_sd3.create_network_from_weights(1.0, f"{out}/lora.safetensors", None, texts, mmdit,
                                                        for_inference=True)
merging.merge_to(texts, mmdit, weights)
save(mmdit.state_dict(), "merged.safetensors")
for i, t in enumerate(texts):
    save(t.state_dict(), f"merged_te{i + 1}.safetensors")
print(len(network.unet_loras), len(network.text_encoder_loras))
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
    return out, [int(n) for n in run.stdout.strip().splitlines()[-1].split()]


def fuse(model, factors) -> None:
    """gen's adapter on `model`, merged into its weights, the adapter layers removed."""
    inject(model, factors, "sd_scripts")
    for m in model.modules():
        if hasattr(m, "merge") and hasattr(m, "lora_A"):
            m.merge(adapter_names=["sd_scripts"])
    remove_adapters(model)


def test_an_sd_scripts_sd3_lora_fuses_to_sd_scripts_merged_weights(sd_scripts_run):
    """The MMDiT (27 layers, 37 diffusers modules), both CLIPs and T5 (lora_te3_, --train_t5xxl): every layer."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    out, (unet_layers, text_layers) = sd_scripts_run
    base, merged = load_file(out / "base.safetensors"), load_file(out / "merged.safetensors")
    family = families.get("sd3")
    config = family.transformer_config({k: list(v.shape) for k, v in base.items()}, {})
    links = sd3_links(config)
    models = {"denoiser": SD3Transformer2DModel(**config),
              **{f"text_encoder{s}": cls.from_pretrained(out / f"te{i}") for i, s, cls in (
                  (1, "", CLIPTextModelWithProjection), (2, "_2", CLIPTextModelWithProjection),
                  (3, "_3", T5EncoderModel))}}
    models["denoiser"].load_state_dict(to_diffusers(links, base), strict=True)
    lora = read(out / "lora.safetensors")
    assert lora.count() == unet_layers + text_layers and unet_layers == 27
    assert {p: len(lora.factors[c]) for c, p in lora.prefixes.items()} == {
        "lora_unet_": 27, "lora_te1_": 12, "lora_te2_": 12, "lora_te3_": 14}  # 2 layers: 6 each; T5: q k v o wi_0 wi_1 wo
    matched = match(lora, models, family)  # raises unless every layer lands on a module
    assert len(matched["denoiser"]) == 27 + 2 * 5  # each of the 5 fused qkv layers is 3 diffusers modules
    wants = {"denoiser": to_diffusers(links, merged),
             **{f"text_encoder{s}": load_file(out / f"merged_te{i}.safetensors") for i, s in ((1, ""), (2, "_2"), (3, "_3"))}}
    worst = 0.0
    for comp, model in models.items():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fuse(model, matched[comp])
        want, got = wants[comp], model.state_dict()
        changed = {k for k in want if not torch.equal(want[k], before[k])}  # what sd-scripts' merge moved
        assert changed == {f"{name}.weight" for name in matched[comp]}, comp
        worst = max(worst, max((got[k] - want[k]).abs().max().item() for k in want))
    assert worst < 1e-5, worst
