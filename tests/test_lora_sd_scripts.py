"""sd-scripts' own LoRA code against gen, for SD3 (networks/lora_sd3.py) and Flux (networks/lora_flux.py): its
LoRANetwork names every layer of its own denoiser (library/sd3_models.py MMDiT, tiny and SD3.5-M-shaped: qk norms,
dual attention in block 0, a last context block without output; library/flux_models.py Flux, tiny, with guidance)
with the embedders and final layers (emb_dims / in_dims), and of the text encoders, T5 included (train_t5xxl;
transformers' models, T5 with T5-XXL's gated MLP); a random LoRA on all of them is saved, and sd-scripts merges it
into its models (create_network_from_weights + merge_to). gen reads the same file onto the diffusers transformer
holding the same base weights and onto the same text encoders: every layer matches, and the fused weights are
sd-scripts' merged weights (the transformer's in diffusers' names).

sd-scripts runs in a subprocess from the mirror of its repository (skipped where the mirror is absent), with stub
modules for what it imports but never calls here (einops, cv2, torchvision)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen import families
from gen.families.mmdit_keys import flux_links, sd3_links, to_diffusers
from gen.lora import inject, match, remove_adapters
from gen.lora_formats import read

MIRROR = Path("/work/.mirror/kohya-ss+sd-scripts/repo")

PRELUDE = r'''
import importlib.machinery, sys, types
import diffusers, transformers  # their optional-package checks run before the stubs exist
from diffusers import AutoencoderKL  # noqa: F401
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
for name in ("einops", "cv2", "torchvision", "torchvision.transforms"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.modules["einops"].rearrange = sys.modules["einops"].repeat = None
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import save_file

out = sys.argv[2]
torch.manual_seed(0)
save = lambda sd, name: save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, f"{out}/{name}")
clip = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
            vocab_size=99)
t5 = T5EncoderModel(T5Config(d_model=80, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=99,
                             feed_forward_proj="gated-gelu"))  # T5-XXL v1.1's gated MLP


def run(module, model, texts, **options):
    """A random LoRA on every layer sd-scripts names, saved; then merged by sd-scripts into fresh text encoders
    and the model; prints the layer counts."""
    with torch.no_grad():
        for p in (*model.parameters(), *model.buffers()):  # SD3's pos_embed is torch.empty until a file fills it
            p.normal_(0, 0.1)
    save(model.state_dict(), "base.safetensors")
    for i, t in enumerate(texts):
        t.save_pretrained(f"{out}/te{i + 1}")
    network = module.LoRANetwork(texts, model, lora_dim=2, alpha=3, train_t5xxl=True, **options)
    network.apply_to(texts, model, apply_text_encoder=True, apply_unet=True)  # registers the LoRA modules
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.3)
    save(network.state_dict(), "lora.safetensors")  # what save_weights writes, less its hash fields
    texts = [type(t).from_pretrained(f"{out}/te{i + 1}") for i, t in enumerate(texts)]  # fresh, unpatched copies
    merging, weights = module.create_network_from_weights(1.0, f"{out}/lora.safetensors", None, texts, model,
                                                          for_inference=True)
    merging.merge_to(texts, model, weights)
    save(model.state_dict(), "merged.safetensors")
    for i, t in enumerate(texts):
        save(t.state_dict(), f"merged_te{i + 1}.safetensors")
    print(len(network.unet_loras), len(network.text_encoder_loras))
'''

SD3 = r'''
from library import sd3_models
from networks import lora_sd3
params = sd3_models.SD3Params(patch_size=2, depth=2, num_patches=64, pos_embed_max_size=8, adm_in_channels=64,
                              qk_norm="rms", x_block_self_attn_layers=[0], context_embedder_in_features=80,
                              context_embedder_out_features=128, model_type="sd3_5m")
texts = [CLIPTextModelWithProjection(CLIPTextConfig(**clip)) for _ in range(2)] + [t5]
run(lora_sd3, sd3_models.create_sd3_mmdit(params), texts, emb_dims=[2] * 6)
'''

FLUX = r'''
from library import flux_models
from networks import lora_flux
params = flux_models.FluxParams(in_channels=16, vec_in_dim=32, context_in_dim=80, hidden_size=32, mlp_ratio=4.0,
                                num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[4, 4, 8], theta=10000,
                                qkv_bias=True, guidance_embed=True)
run(lora_flux, flux_models.Flux(params), [CLIPTextModel(CLIPTextConfig(**clip)), t5], in_dims=[2] * 5)
'''


def sd_scripts(root: Path, body: str) -> tuple[Path, list[int]]:
    if not (MIRROR / "HEAD").exists():
        pytest.skip("no mirror of kohya-ss/sd-scripts here")
    src, out = root / "src", root / "out"
    src.mkdir()
    out.mkdir()
    archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "HEAD", "library", "networks"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(src)], input=archive, check=True)
    run = subprocess.run([sys.executable, "-c", PRELUDE + body, str(src), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return out, [int(n) for n in run.stdout.strip().splitlines()[-1].split()]


def fused_like_sd_scripts(out: Path, family, links, models: dict) -> dict:
    """gen reads the file, matches every layer onto `models` (the denoiser loaded with the base weights) and fuses
    it; each model's weights must be sd-scripts' merged ones, and exactly the matched layers move. Returns the
    matched layers per component."""
    base, merged = load_file(out / "base.safetensors"), load_file(out / "merged.safetensors")
    models["denoiser"].load_state_dict(to_diffusers(links, base), strict=True)
    matched = match(read(out / "lora.safetensors"), models, family)  # raises unless every layer lands on a module
    wants = {"denoiser": to_diffusers(links, merged)}
    for i, comp in enumerate(c for c in models if c != "denoiser"):
        wants[comp] = load_file(out / f"merged_te{i + 1}.safetensors")
    worst = 0.0
    for comp, model in models.items():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        inject(model, matched[comp], "sd_scripts")
        for m in model.modules():
            if hasattr(m, "merge") and hasattr(m, "lora_A"):
                m.merge(adapter_names=["sd_scripts"])
        remove_adapters(model)
        want, got = wants[comp], model.state_dict()
        changed = {k for k in want if not torch.equal(want[k], before[k])}  # what sd-scripts' merge moved
        assert changed == {f"{name}.weight" for name in matched[comp]}, comp
        worst = max(worst, max((got[k] - want[k]).abs().max().item() for k in want))
    assert worst < 1e-5, worst
    return matched


def text_encoders(out: Path, classes) -> dict:
    return {f"text_encoder{'_' + str(i + 1) if i else ''}": cls.from_pretrained(out / f"te{i + 1}")
            for i, cls in enumerate(classes)}


def test_an_sd_scripts_sd3_lora_fuses_to_sd_scripts_merged_weights(tmp_path):
    """The MMDiT (27 layers, 37 diffusers modules), both CLIPs and T5 (lora_te3_): every layer."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    out, (unet_layers, text_layers) = sd_scripts(tmp_path, SD3)
    lora = read(out / "lora.safetensors")
    assert {p: len(lora.factors[c]) for c, p in lora.prefixes.items()} == {
        "lora_unet_": 27, "lora_te1_": 12, "lora_te2_": 12, "lora_te3_": 14}  # 2 layers: 6 each; T5: q k v o wi_0 wi_1 wo
    assert lora.count() == unet_layers + text_layers
    family = families.get("sd3")
    config = family.transformer_config({k: list(v.shape) for k, v in load_file(out / "base.safetensors").items()}, {})
    models = {"denoiser": SD3Transformer2DModel(**config),
              **text_encoders(out, (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel))}
    matched = fused_like_sd_scripts(out, family, sd3_links(config), models)
    assert len(matched["denoiser"]) == 27 + 2 * 5  # each of the 5 fused qkv layers is 3 diffusers modules


def test_an_sd_scripts_flux_lora_fuses_to_sd_scripts_merged_weights(tmp_path):
    """Flux's double and single blocks (fused qkv, linear1 = qkv + mlp), the embedders (in_dims), CLIP-L as
    lora_te1_ and T5 as lora_te3_ (on Flux's text_encoder_2): every layer."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    out, (unet_layers, text_layers) = sd_scripts(tmp_path, FLUX)
    lora = read(out / "lora.safetensors")
    # 1 double block (10 layers) + 2 single blocks (3 each) + 8 embedder layers (in_dims; guidance included)
    assert {p: len(lora.factors[c]) for c, p in lora.prefixes.items()} == {
        "lora_unet_": 24, "lora_te1_": 12, "lora_te3_": 14}
    assert lora.count() == unet_layers + text_layers
    family = families.get("flux")
    shapes = {k: list(v.shape) for k, v in load_file(out / "base.safetensors").items()}
    config = family.transformer_config(shapes, {"axes_dims_rope": [4, 4, 8]})
    models = {"denoiser": FluxTransformer2DModel(**config), **text_encoders(out, (CLIPTextModel, T5EncoderModel))}
    matched = fused_like_sd_scripts(out, family, flux_links(config), models)
    assert len(matched["denoiser"]) == 24 + 2 * 2 + 3 * 2  # qkv: 3 modules; linear1: q, k, v and proj_mlp
