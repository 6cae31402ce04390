"""Tiny stand-ins for what the documentation's commands name, and the runner tests/test_docs_run.py uses.

Each page's commands run in a folder of their own (its "world") where every name the page uses is a link to a tiny
stand-in built once per session: `sdxl-folder`, `FLUX.1-dev`, `PATH/TO/sd-1.5`, `sd_xl_base_1.0.safetensors`,
`my-images`, `runs/lora-sd/lora.safetensors`, ... (NAMES). Every `gen` there is a shim (`world/bin/gen`) that hands
its argv, folder, environment and stdin/stdout/stderr to a zygote: a process that imported gen, torch, diffusers
and transformers once and forks a child per command, which runs gen's real `main` and exits with its code (8 s of
imports saved per command; the bash line, pipes and redirections are real). The child first shrinks heavy settings
(`shrink`: steps, sizes, max_steps) by appending arguments, which override the ones written before them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ["--steps", "2", "--no-progress"]  # appended to every `gen sample`
SIZE = ["--height", "32", "--width", "32"]  # where the command names a size (Flux packs 32 px; img2img keeps src's)
# appended to every `gen train` / `gen lora` (train.resume=none: the docs' lines are alternatives on one run folder)
TRAIN = ["train.resume=none", "train.max_steps=1", "train.batch_size=1", "train.grad_accum=1",
         "train.checkpoint_every=1", "data.resolution=16", "data.num_images=4", "validation.prompts=[]",
         "sampling.steps=1", "log.progress=false", "log.tracker=none", "lora.rank=2", "lora.alpha=2",
         "lora.num_class_images=1"]
PLACEHOLDER = ["model.base=sd15", "data.path=my-images"]  # what `gen lora CONFIG ... key=value` leaves out
SMALLER = {"unet-folder": ["model.preset=tiny"], "dit-shapes": ["model.preset=DiT-T/2"]}  # recipe -> a smaller model


def shrink(argv: list[str]) -> list[str]:
    """`gen ARGV` at a test's size: the docs' placeholders (`...`, `[--optional flag]`) dropped, then settings
    appended where the command is one that samples or trains."""
    words = [w.strip("[]") if w.startswith("[-") or w.endswith("]") and "=" not in w else w for w in argv]
    dotted = "..." in words[2:]
    words = words[:2] + [w for w in words[2:] if w != "..."]  # `gen sample ...`: "..." is the prompt
    sub = words[0] if words else ""
    if sub == "sample" and "--help" not in words:
        return words + SAMPLE + (SIZE if "--height" in words and "--hires" not in words else [])
    if sub in ("train", "lora") and len(words) > 1 and words[1] not in ("merge", "--list", "--print-config") \
            and "--print-config" not in words:
        if sub == "train" and dotted:
            words += ["data.source=shapes"]
        elif dotted:
            words += PLACEHOLDER
        keys = [k for k in TRAIN if sub == "lora" or not k.startswith("lora.")]
        if any(w.startswith("train.blocks_to_swap=") for w in words):  # the tiny Flux has 2 blocks
            keys.append("train.blocks_to_swap=1")
        return words + keys + [k for recipe, more in SMALLER.items() if recipe in words[1] for k in more]
    if words[:2] == ["data", "cache"]:
        return words + [k for k in TRAIN if k.startswith(("data.", "log.", "train.batch"))]
    if words[:2] == ["eval", "adherence"]:
        return words + ["--n", "2" if "--diversity" in words else "1", "--steps", "2"]
    return words


# ---- the zygote: one process with gen imported, forking a child per command -------------------------------------

def serve(path: str) -> None:
    """Answers shims on the unix socket `path` until killed: fork, run gen's main in the child, send its code."""
    import importlib
    import threading

    from gen import cli

    for module in ("diffusers", "transformers", "train.loop", "train.lora"):  # what every command imports, once
        importlib.import_module(module)
    _warm(cli)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(msg)
        pid = os.fork()
        if pid == 0:
            listener.close()
            code = 1
            try:
                for i, fd in enumerate(fds):
                    os.dup2(fd, i)
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(request["env"])
                sys.argv = ["gen", *request["argv"]]
                code = cli.main(shrink(request["argv"]))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        for fd in fds:
            os.close(fd)
        threading.Thread(target=_answer, args=(conn, pid), daemon=True).start()


def _warm(cli) -> None:
    """Samples a tiny UNet and DiT model once, so the modules a first call imports lazily (2,000 of them: peft,
    diffusers' pipelines and schedulers, scipy; 5 s) are imported before the forks. Single-threaded (OMP_NUM_THREADS=1)
    and done before any fork, so no thread pool is copied half-alive."""
    import contextlib
    import tempfile

    from gen.models.tiny import tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for kind in ("unet", "dit"):
            tiny_pipeline(kind).save_pretrained(f"{tmp}/{kind}")
            cli.main(["sample", "warm", "--model", f"{tmp}/{kind}", "--out", f"{tmp}/{kind}.png", *SAMPLE])


def _answer(conn, pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    conn.sendall(struct.pack("i", os.waitstatus_to_exitcode(status)))
    conn.close()


def client(argv: list[str]) -> int:
    """The `gen` shim: this command, run by the zygote with this process's stdio; its exit code."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.environ["GEN_DOCS_ZYGOTE"])
        msg = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(s, [msg], [0, 1, 2])
        data = b""
        while len(data) < 4:
            chunk = s.recv(4 - len(data))
            if not chunk:
                return 1
            data += chunk
    code = struct.unpack("i", data)[0]
    return code if code >= 0 else 128 - code




# ---- the stand-ins ------------------------------------------------------------------------------------------------

# name in the docs -> stand-in (a key of build()'s answer); a world links each name to its stand-in
NAMES = {
    "sd-folder": "sd", "sd15": "sd", "PATH": "sd", "BASE": "sd", "FOLDER": "sd", "PATH/TO/sd-1.5": "sd",
    "lcm-folder": "lcm", "sdxl-folder": "sdxl", "sdxl-base": "sdxl", "PATH/TO/sdxl-base": "sdxl",
    "sd3-folder": "sd3", "sd35-folder": "sd35", "sd3.5-folder": "sd35", "sd3.5-large-folder": "sd35-large",
    "flux-dev-folder": "flux-dev", "FLUX.1-dev": "flux-dev", "flux-folder": "flux-dev",
    "flux-schnell-folder": "flux-schnell",
    "sd_xl_base_1.0.safetensors": "sdxl.safetensors", "model.safetensors": "sd.safetensors",
    "FILE.safetensors": "sd.safetensors", "sd21-768.safetensors": "sd.safetensors",
    "sd3.5_medium.safetensors": "sd3.safetensors", "flux-finetune.safetensors": "flux-bfl.safetensors",
    "flux1-dev-fp8.safetensors": "flux-fp8.safetensors", "flux1-dev-Q4_K.gguf": "flux-Q4_K.gguf",
    "style.safetensors": "lora-sd.safetensors", "LORA.safetensors": "lora-sd.safetensors",
    "OTHER.safetensors": "lora-sd.safetensors", "runs/lora-subject/lora.safetensors": "lora-sd.safetensors",
    "lycoris_dora.safetensors": "lora-sd-dora.safetensors", "sd_scripts_sdxl.safetensors": "lora-sdxl.safetensors",
    "sd_scripts_sd3.safetensors": "lora-sd3.safetensors", "kohya_flux_t5.safetensors": "lora-flux.safetensors",
    "xlabs_flux.safetensors": "lora-xlabs.safetensors", "mystyle.safetensors": "mystyle.safetensors",
    "embeddings": "embeddings", "my-images": "images", "IMAGES": "images", "images": "images",
    "PATH/TO/images": "images", "PATH/TO/my-dog": "images", "data/my-images": "images", "HELDOUT": "images",
    "src.png": "src.png", "photo.png": "src.png", "mask.png": "mask.png", "a1111.png": "a1111.png",
    "outputs/42.png": "42.png", "prompts.txt": "prompts.txt", "prompts.jsonl": "prompts.jsonl",
    "configs/my.yaml": "my.yaml", "bench": "bench", ".venv": "venv",
    "sdxl": "sdxl", "flux-dev": "flux-dev", "my-sdxl-folder": "sdxl", "PATH/TO/FLUX.1-dev": "flux-dev",
    "control_sd15_canny.safetensors": "control-sd15.safetensors",
    "control_v11p_sd15_canny.safetensors": "control-sd15.safetensors", "canny-sdxl": "control-sdxl",
    "depth-sdxl": "control-sdxl", "flux-canny": "control-flux", "house.png": "house.png", "edges.png": "src.png",
    "depth.png": "src.png", "face.png": "src.png", "union-sdxl": "control-union-sdxl",
    "flux-union": "control-union-flux", "instantx-flux-union.safetensors": "control-union-flux.safetensors",
    "sd3.5_large_controlnet_canny.safetensors": "control-sd35.safetensors",
    "instantx-sd3-canny.safetensors": "control-sd3.safetensors",
    "controlnet-canny-sdxl.safetensors": "control-sdxl.safetensors", "models": "ip-sd15", "sdxl_models": "ip-sdxl",
    "flux-ip-adapter": "ip-flux", "clip-vit-large-patch14": "ip-flux-encoder",
    "pairs": "pairs",
}


def build(root: Path, gen) -> dict[str, Path]:
    """Every stand-in under `root`; `gen(*argv)` runs a gen command (through the zygote) for those gen makes."""
    import numpy as np
    import torch
    from diffusers import (FluxPipeline, LCMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)
    from PIL import Image, PngImagePlugin
    from safetensors.torch import load_file, save_file

    from tests.conftest import (quiet_pipeline, tiny_flux_components, tiny_sd3_components, tiny_sd_components,
                                tiny_sdxl_components)
    from tests.test_lora_dora import sd_layers
    from tests.test_controlnet_sd35 import large
    from tests.test_lora_dora import write as dora_file
    from tests.test_lora_xlabs import xlabs_file
    from tests.test_quant_fp8 import E4M3, fp8_file
    from tests.test_quant_gguf import Q, write_gguf
    from train.data.shapes import write_folder

    out = {"bench": ROOT / "bench", "venv": Path(sys.prefix)}
    root.mkdir(parents=True, exist_ok=True)
    none = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folders = {"sd": lambda: StableDiffusionPipeline(**tiny_sd_components(), **none),
               "lcm": lambda: StableDiffusionPipeline(**tiny_sd_components() | {"scheduler": LCMScheduler(
                   beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)}, **none),
               "sdxl": lambda: StableDiffusionXLPipeline(**tiny_sdxl_components()),
               "sd3": lambda: StableDiffusion3Pipeline(**tiny_sd3_components()),
               "sd35": lambda: StableDiffusion3Pipeline(**sd35_components()),
               "sd35-large": lambda: StableDiffusion3Pipeline(**large(tiny_sd3_components())),
               "flux-dev": lambda: FluxPipeline(**tiny_flux_components(root / "t5-dev")),
               "flux-schnell": lambda: FluxPipeline(**tiny_flux_components(root / "t5-schnell", False))}
    for name, make in folders.items():
        make().save_pretrained(root / name)
        out[name] = root / name
    for name in ("sd", "sdxl", "sd3", "flux-dev"):
        out[f"{name.split('-')[0]}.safetensors"] = root / f"{name.split('-')[0]}.safetensors"
        quiet_pipeline(root / name).save_pretrained(out[f"{name.split('-')[0]}.safetensors"], single_file=True)
    prefix = "model.diffusion_model."
    bfl = {k[len(prefix):]: v.float() for k, v in load_file(out["flux.safetensors"]).items() if k.startswith(prefix)}
    save_file(bfl, root / "flux-bfl.safetensors")
    save_file(fp8_file(bfl, E4M3, False)[0], root / "flux-fp8.safetensors")
    write_gguf(root / "flux-Q4_K.gguf", bfl, Q.Q4_K)
    xlabs_file(quiet_pipeline(root / "flux-dev").denoiser.config, root / "lora-xlabs.safetensors")
    dora_file(root / "lora-sd-dora.safetensors", sd_layers(quiet_pipeline(root / "sd")))
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(2, 32)}, root / "mystyle.safetensors")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(1, 128)}, root / "embeddings" / "easynegative.safetensors")  # the bundled
    write_folder(root / "images", 4, seed=1)
    write_folder(root / "pairs", 4, seed=1, size=32, control=True)  # images + control images (stage=controlnet)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "src.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "mask.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, Schedule type: Karras, "
                                "CFG scale: 7, Seed: 5, Size: 32x32, Model: sd15")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "a1111.png", pnginfo=info)
    (root / "prompts.txt").write_text("a red circle\n\na blue square\n")
    (root / "prompts.jsonl").write_text('{"prompt": "a red circle", "seed": 3}\n{"prompt": "a blue square", '
                                        '"negative_prompt": "blurry", "width": 32, "height": 32, "steps": 2}\n')
    (root / "my.yaml").write_text("# dit-shapes on a folder of images, a tiny DiT\nmodel: {base: default, denoiser: "
                                  "dit, preset: DiT-T/2}\ndata: {source: folder, path: my-images, resolution: 16}\n"
                                  "train: {output_dir: runs/my}\n")
    for key, (base, extra) in {"lora-sd": ("sd", []),
                               "lora-sdxl": ("sdxl", ["lora.text_encoder=true"]),
                               "lora-sd3": ("sd3", ["lora.text_encoder=true"]), "lora-flux": ("flux-dev", [])}.items():
        config = "configs/lora-sd3-flux.yaml" if base.startswith(("sd3", "flux")) else "configs/lora-sd.yaml"
        gen("lora", str(ROOT / config), f"model.base={root / base}", f"data.path={root / 'images'}",
            f"train.output_dir={root / 'runs' / key}", "lora.format=kohya", *extra)
        out[f"{key}.safetensors"] = root / "runs" / key / "lora.safetensors"
    gen("sample", "a red circle", "--model", str(root / "sd"), "--seed", "42", "--out", str(root / "42.png"))
    out |= controls_and_adapters(root)
    gen("sample", "a house", "--model", str(root / "sd"), "--control",
        f"canny:{root / 'control-sd15.safetensors'}:{root / 'src.png'}", *SAMPLE, "--out", str(root / "house.png"))
    return out | {p.name: p for p in root.iterdir() if p.is_file()} | {"images": root / "images",
                                                                       "embeddings": root / "embeddings",
                                                                       "pairs": root / "pairs"}


def controls_and_adapters(root: Path) -> dict[str, Path]:
    """ControlNets (an original-layout SD-1 file, an SDXL and a Flux folder, SDXL and Flux union folders, a lone
    InstantX-layout Flux union file) and h94-layout IP-Adapters (SD-1 and
    SDXL, sharing one image encoder as h94's models/image_encoder) and an XLabs-layout Flux one for the stand-in bases."""
    from diffusers import ControlNetModel, FluxControlNetModel, SD3ControlNetModel

    from gen.control.files import to_original
    from tests.conftest import quiet_pipeline
    from tests.test_controlnet_sd35 import release_file
    from tests.test_controlnet_union import tiny_flux_union, tiny_sdxl_union
    from tests.test_ip_adapter import h94_adapter
    from tests.test_ip_adapter_flux import xlabs_adapter

    sd, sdxl = quiet_pipeline(root / "sd").denoiser, quiet_pipeline(root / "sdxl").denoiser
    to_original(ControlNetModel.from_unet(sd, conditioning_embedding_out_channels=(8, 16)),
                root / "control-sd15.safetensors")
    ControlNetModel.from_unet(sdxl, conditioning_embedding_out_channels=(8, 16)).save_pretrained(root / "control-sdxl")
    FluxControlNetModel.from_transformer(quiet_pipeline(root / "flux-dev").denoiser, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2).save_pretrained(
        root / "control-flux")
    tiny_sdxl_union(sdxl).save_pretrained(root / "control-union-sdxl")
    tiny_flux_union(quiet_pipeline(root / "flux-dev").denoiser).save_pretrained(root / "control-union-flux")
    SD3ControlNetModel.from_transformer(quiet_pipeline(root / "sd3").denoiser, num_layers=1,
                                        num_extra_conditioning_channels=0,
                                        load_weights_from_transformer=False).save_pretrained(root / "control-sd3")
    release_file(root / "control-sd35.safetensors")  # Stability's SD3.5 layout, for the sd35-large base
    for name in ("control-union-flux", "control-sdxl", "control-sd3"):  # the lone files people share
        shutil.copy(root / name / "diffusion_pytorch_model.safetensors", root / f"{name}.safetensors")
    h94_adapter(root / "ip-sd15", sd, "ip-adapter_sd15.safetensors")
    h94_adapter(root / "ip-sdxl", sdxl, "ip-adapter_sdxl_vit-h.safetensors")
    xlabs_adapter(root / "ip-flux", quiet_pipeline(root / "flux-dev").denoiser)  # XLabs' file, its encoder beside
    return {name: root / name for name in ("control-sdxl", "control-flux", "control-union-sdxl", "control-union-flux",
                                           "ip-sd15", "ip-sdxl", "ip-flux")} | {"ip-flux-encoder": root / "ip-flux" /
                                                                                  "image_encoder"}


def sd35_components() -> dict:
    """The tiny SD3 with 10 blocks: the docs' skip-layer guidance skips 7, 8 and 9."""
    from diffusers import SD3Transformer2DModel

    from tests.conftest import tiny_sd3_components

    parts = tiny_sd3_components()
    return parts | {"transformer": SD3Transformer2DModel.from_config({**parts["transformer"].config, "num_layers": 10})}


def world(folder: Path, standins: dict[str, Path], zygote: str) -> dict[str, str]:
    """A page's folder: each NAME a link to its stand-in, configs/ (gen's and my.yaml), bin/gen the shim; returns
    the environment its commands run in."""
    for name, key in sorted(NAMES.items()):
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if any(other.startswith(name + "/") for other in NAMES):  # PATH, and PATH/TO/...: a folder of links
            link.mkdir()
            for part in standins[key].iterdir():
                (link / part.name).symlink_to(part)
        else:
            link.symlink_to(standins[key])
    for config in (ROOT / "configs").iterdir():
        (folder / "configs" / config.name).symlink_to(config)
    (folder / "bin").mkdir()
    shim = folder / "bin" / "gen"
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom tests.docs_standins import client\n"
                    "sys.exit(client(sys.argv[1:]))\n")
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{folder / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT), "GEN_DOCS_ZYGOTE": zygote, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


if __name__ == "__main__":  # `python -m tests.docs_standins serve SOCKET` | `... gen ARGV` (a shim without a file)
    serve(sys.argv[2]) if sys.argv[1] == "serve" else sys.exit(client(sys.argv[2:]))
