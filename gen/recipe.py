"""Generation recipes: what `gen sample` writes into each PNG and reads back with `--from`, and the prompt
files of `--prompts`.

A PNG's recipe is AUTOMATIC1111's `parameters` text chunk, which A1111's create_infotext (modules/processing.py)
writes and parse_generation_parameters (modules/infotext_utils.py) reads: the prompt, a `Negative prompt:` line,
then one line of `Key: value` fields joined by ", ", where a value holding `,` `:` or a newline is written as a
JSON string. The fields A1111 knows keep A1111's meaning (its sampler and schedule names, `Model hash`,
`<lora:NAME:SCALE>` in the prompt and `Lora hashes`), so A1111 and Forge read gen's images right; the `gen ...`
fields hold what A1111 has no field for, so that `gen sample --from` makes the same image again.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from gen.control import fields as control_fields
from gen.errors import GenError

log = logging.getLogger("gen")

# A1111's re_param: `Key: value` or `Key: "JSON string"`, up to a comma or the end of the line.
FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net: <lora:NAME:SCALE> in a prompt
GEN_LORA = re.compile(r"gen LoRA (\d+)")
GEN_EMBEDDING = re.compile(r"gen embedding (\d+)")
# Fields a recipe is read from; the others (A1111's VAE, ...) are named in a warning.
READ = {"Steps", "Sampler", "Schedule type", "Eta DDIM", "CFG scale", "gen guidance", "Seed", "Size", "Model hash", "Model",
        "Lora hashes", "Version", "gen sampler", "gen schedule", "gen guidance rescale", "gen guidance interval",
        "gen cache interval", "gen model", "Denoising strength", "Clip skip", "Emphasis", "Mask blur",
        "Inpaint area", "Masked area padding", "Hires upscale", "Hires steps", "Hires upscaler", "gen init image",
        "gen mask", "gen weights", "gen VAE tile", "TI hashes", "gen IP-Adapter", "gen IP image", "gen IP scale",
        "gen image encoder"}
HIRES_UPSCALERS = {"latent": "Latent", "image": "Lanczos"}  # gen's name -> A1111's


@dataclass
class Recipe:
    """One image's generation settings; None: not recorded (the model's default applies)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None  # gen's name; A1111's recipes leave it to `a1111_sampler`
    schedule: str | None = None  # gen's name of a named schedule (gen.sampling.names); None: the model's own
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cache_interval: int = 1
    model: str | None = None  # the model folder gen loaded (None: the bundled default)
    model_name: str | None = None
    model_hash: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)  # (file, scale): gen's own recipes
    lora_tags: list[tuple[str, float]] = field(default_factory=list)  # (name, scale) of <lora:...> in the prompt
    lora_hashes: dict[str, str] = field(default_factory=dict)
    embeddings: list[str] = field(default_factory=list)  # the embedding files the prompts used (gen's own)
    ti_hashes: dict[str, str] = field(default_factory=dict)  # A1111's `TI hashes`: name -> short hash, same order
    a1111_sampler: tuple[str, str | None, float] | None = None  # Sampler, Schedule type, Eta DDIM
    by_gen: bool = True
    clip_skip: int = 1
    weighting: bool = True  # A1111's `Emphasis:` Original (True) or None
    init_image: str | None = None  # img2img / inpainting source and mask files (gen's own fields)
    mask: str | None = None
    strength: float | None = None  # `Denoising strength` of img2img, or of the hires pass
    mask_blur: float = 0
    inpaint_padding: int | None = None  # `Inpaint area: Only masked` with `Masked area padding`
    hires_scale: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str = "latent"
    weights: str | None = None  # gen/quant's storage option (fp8, nf4, fp4, int8, full); None: as the files store them
    vae_tile: int | None = None  # the VAE's tile in pixels under --vae-tiling (it moves pixels near the seams)
    ip_adapter: str | None = None  # the IP-Adapter file, its image prompt, weight and encoder folder (gen.ip_adapter)
    ip_image: str | None = None
    ip_scale: float | None = None
    image_encoder: str | None = None
    controls: list[dict] = field(default_factory=list)  # ControlNets: module, model, image, weight, start, end
    control_resize: str = "just-resize"
    controls_unnamed: list[str] = field(default_factory=list)  # ControlNets a recipe names without their files


def number(value) -> str:
    """A number as its shortest exact text (4.5, 7, 1e-05), so that reading it back gives the same float."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def quote(value) -> str:
    """A field value as A1111's quote() writes it: as is, or as a JSON string where it holds `,` `:` or a
    newline (here also where a leading quote or edge whitespace would not survive reading)."""
    text = number(value)
    if any(c in text for c in ",:\n") or text[:1] == '"' or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) as A1111's parse_generation_parameters reads them: the last line is
    the fields where at least 3 parse there; above it the prompt, and from a `Negative prompt:` line on the
    negative prompt, each line stripped and empty leading lines dropped."""
    *lines, last = text.strip().split("\n")
    if len(FIELD.findall(last)) < 3:
        lines, last = [*lines, last], ""
    parts, part = {"prompt": [], "negative": []}, "prompt"
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            part, line = "negative", line[len("Negative prompt:"):].strip()
        if parts[part] or line:
            parts[part].append(line)
    return "\n".join(parts["prompt"]), "\n".join(parts["negative"]), {k: unquote(v) for k, v in FIELD.findall(last)}


def lora_arg(text: str) -> tuple[str, float]:
    """PATH[:SCALE]: split at the last ':' only when what follows is a number, so C:\\x.safetensors stays a path."""
    path, sep, tail = text.rpartition(":")
    try:
        return (path, float(tail)) if sep and path else (text, 1.0)
    except ValueError:
        return text, 1.0


def _lora_name(path: str) -> str:
    return Path(path).stem


def _tags(loras: list[tuple[str, float]]) -> str:
    return " ".join(f"<lora:{_lora_name(p)}:{number(float(s))}>" for p, s in loras)


def infotext(r: Recipe, sampler_fields: dict) -> str:
    """The `parameters` text of an image: `sampler_fields` are A1111's Sampler / Schedule type / Eta DDIM
    (gen.sampling.names.a1111_fields); the LoRAs go into the prompt as A1111's tags and into `Lora hashes`."""
    prompt = " ".join(x for x in (r.prompt, _tags(r.loras)) if x)
    from gen.sampling.names import A1111_CFG_DIVISOR  # (torch: not at gen's start)

    scale = float(r.guidance) * A1111_CFG_DIVISOR.get(sampler_fields.get("Sampler"), 1)  # A1111's CFG scale
    fields = {"Steps": r.steps, **sampler_fields, "CFG scale": scale, "Seed": r.seed,
              "gen guidance": float(r.guidance) if scale != r.guidance else None,  # exact, where A1111's is scaled
              "Size": f"{r.width}x{r.height}", "Model hash": r.model_hash, "Model": r.model_name,
              "Lora hashes": ", ".join(f"{k}: {v}" for k, v in r.lora_hashes.items()) or None,
              "gen sampler": r.sampler, "gen schedule": r.schedule if r.schedule != "automatic" else None,
              "gen guidance rescale": float(r.guidance_rescale) if r.guidance_rescale else None,
              "gen guidance interval": (", ".join(number(float(x)) for x in r.guidance_interval)
                                        if tuple(r.guidance_interval) != (0.0, 1.0) else None),
              "gen cache interval": r.cache_interval if r.cache_interval != 1 else None,
              "gen model": r.model, "gen weights": r.weights if r.weights != "auto" else None,
              "gen VAE tile": r.vae_tile, **_workflow_fields(r), **control_fields.write(r.controls, r.control_resize),
              **{f"gen LoRA {i}": f"{p}:{number(float(s))}" for i, (p, s) in enumerate(r.loras, 1)},
              "TI hashes": ", ".join(f"{k}: {v}" for k, v in r.ti_hashes.items()) or None,
              **{f"gen embedding {i}": p for i, p in enumerate(r.embeddings, 1)}}
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {r.negative_prompt}" if r.negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _workflow_fields(r: Recipe) -> dict:
    """img2img, inpainting, hires fix, clip skip and emphasis in A1111's infotext names (None: not written)."""
    return {"Denoising strength": r.strength, "Clip skip": r.clip_skip if r.clip_skip != 1 else None,
            "Emphasis": None if r.weighting else "None",
            "Mask blur": r.mask_blur if r.mask is not None else None,
            "Inpaint area": "Only masked" if r.inpaint_padding is not None else None,
            "Masked area padding": r.inpaint_padding,
            "Hires upscale": r.hires_scale, "Hires steps": r.hires_steps,
            "Hires upscaler": HIRES_UPSCALERS[r.hires_upscaler] if r.hires_scale is not None else None,
            "gen init image": r.init_image, "gen mask": r.mask, "gen IP-Adapter": r.ip_adapter,
            "gen IP image": r.ip_image, "gen IP scale": r.ip_scale, "gen image encoder": r.image_encoder}


def from_text(text: str, source: str = "the recipe") -> Recipe:
    """A Recipe from a `parameters` text written by gen or by A1111 (or a tool that writes its layout)."""
    prompt, negative, f = parse(text)

    def get(key, kind, default=None):
        if key not in f:
            return default
        try:
            value = kind(f[key])
            if kind is float and not math.isfinite(value):
                raise ValueError
            return value
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise GenError(f"{source}: the field {key!r} is {f[key]!r}, not {what}") from None

    r = Recipe(negative_prompt=negative, steps=get("Steps", int), guidance=get("CFG scale", float),
               seed=get("Seed", int), sampler=f.get("gen sampler"), schedule=f.get("gen schedule"),
               model=f.get("gen model"),
               model_name=f.get("Model"), model_hash=f.get("Model hash"), by_gen="gen sampler" in f,
               guidance_rescale=get("gen guidance rescale", float, 0.0),
               cache_interval=get("gen cache interval", int, 1), clip_skip=get("Clip skip", int, 1),
               weighting=f.get("Emphasis", "Original") != "None", init_image=f.get("gen init image"),
               mask=f.get("gen mask"), strength=get("Denoising strength", float),
               mask_blur=get("Mask blur", float, 0.0), hires_scale=get("Hires upscale", float),
               hires_steps=get("Hires steps", int) or None, weights=f.get("gen weights"),
               vae_tile=get("gen VAE tile", int), ip_adapter=f.get("gen IP-Adapter"), ip_image=f.get("gen IP image"),
               ip_scale=get("gen IP scale", float), image_encoder=f.get("gen image encoder"))
    if f.get("Inpaint area") == "Only masked":
        r.inpaint_padding = get("Masked area padding", int, 32)  # A1111's default padding
    if "Hires upscaler" in f:  # A1111's Latent (...) modes upscale the latents, its other upscalers the image
        r.hires_upscaler = "latent" if f["Hires upscaler"].startswith("Latent") else "image"
    if "Size" in f:
        size = re.fullmatch(r"(\d+)x(\d+)", f["Size"])
        if not size:
            raise GenError(f"{source}: the field 'Size' is {f['Size']!r}, not WIDTHxHEIGHT")
        r.width, r.height = int(size[1]), int(size[2])
    if "gen guidance interval" in f:
        try:
            r.guidance_interval = tuple(float(x) for x in f["gen guidance interval"].split(","))
        except ValueError:
            r.guidance_interval = ()
        if len(r.guidance_interval) != 2:
            raise GenError(f"{source}: the field 'gen guidance interval' is {f['gen guidance interval']!r}, "
                           "not START, END")
    from gen.sampling.names import a1111_guidance

    r.guidance = get("gen guidance", float, a1111_guidance(f.get("Sampler"), r.guidance))
    if "Sampler" in f and r.sampler is None:
        r.a1111_sampler = (f["Sampler"], f.get("Schedule type"), get("Eta DDIM", float, 0.0))
    r.lora_hashes = _hashes(f.get("Lora hashes", ""))
    numbered = sorted((int(m[1]), v) for k, v in f.items() if (m := GEN_LORA.fullmatch(k)))
    r.loras = [lora_arg(v) for _, v in numbered]
    r.ti_hashes = _hashes(f.get("TI hashes", ""))
    numbered = sorted((int(m[1]), v) for k, v in f.items() if (m := GEN_EMBEDDING.fullmatch(k)))
    r.embeddings = [v for _, v in numbered]
    r.controls, r.control_resize, r.controls_unnamed = control_fields.read(f, source)
    r.prompt = _prompt_without_tags(prompt, r, source)
    unread = [k for k in f if k not in READ and not GEN_LORA.fullmatch(k) and not GEN_EMBEDDING.fullmatch(k)
              and not control_fields.known(k)]
    if unread:
        log.warning("%s: gen does not apply the fields %s", source, ", ".join(unread))
    return r


def _hashes(text: str) -> dict[str, str]:
    """`name: hash, ...` (A1111's Lora hashes and TI hashes) as a dict."""
    return dict(x.strip().rsplit(": ", 1) for x in text.split(",") if ": " in x)


def _prompt_without_tags(prompt: str, r: Recipe, source: str) -> str:
    """The prompt as encoded: gen's own recipes lose the LoRA tags gen appended; others lose every extra-network
    tag, as A1111 takes them out before encoding, and their LoRA tags are kept in `r.lora_tags`."""
    if r.by_gen:
        tags = _tags(r.loras)
        return "" if prompt == tags else prompt[:-len(tags) - 1] if tags and prompt.endswith(" " + tags) else prompt
    prompt, tags = extra_networks(prompt, source)
    r.lora_tags += tags
    return prompt


def extra_networks(prompt: str, source: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's extra-network tags taken out of a prompt, as A1111 does before encoding: (the prompt left, the
    (name, scale) of each <lora:NAME:SCALE>); other kinds of tag are named in a warning."""
    tags = []
    for kind, args in EXTRA_NETWORK.findall(prompt):
        if kind == "lora":
            name, _, rest = args.partition(":")
            try:
                tags.append((name, float(rest.split(":")[0]) if rest else 1.0))
            except ValueError:
                raise GenError(f"{source}: the LoRA tag <lora:{args}> has no number for its scale") from None
        else:
            log.warning("%s: gen does not apply <%s:%s> in the prompt", source, kind, args)
    return EXTRA_NETWORK.sub("", prompt), tags


def read_png(path: str | Path) -> Recipe:
    """The recipe in a PNG's `parameters` text chunk."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise GenError(f"--from {path}: no such file")
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get("parameters")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise GenError(f"--from {path}: not a readable image ({e})") from None
    if not isinstance(text, str):
        raise GenError(f"--from {path}: the image holds no recipe (no PNG 'parameters' text chunk, as gen and "
                       "AUTOMATIC1111 write)")
    return from_text(text, str(path))


def _png_info(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


def write_png(image, path: str | Path, text: str) -> None:
    """Saves a PIL image with `text` as its `parameters` chunk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # renamed into place: an interrupted write leaves no broken PNG
    image.save(str(tmp), format="PNG", pnginfo=_png_info(text))
    os.replace(tmp, path)


def png_bytes(image, text: str) -> bytes:
    """The PNG file `write_png` writes, as bytes (what `gen serve` sends)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(text))
    return buffer.getvalue()


# ---- hashes --------------------------------------------------------------------------------------------
_CACHE_LOCK = threading.Lock()  # the model is hashed in a thread while the LoRAs are hashed in the main one


def hash_cache() -> Path:
    """Where file hashes are kept between runs, as A1111's cache.json keeps them: a multi-GB checkpoint is read
    once, not on every `gen sample`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gen" / "hashes.json"


def sha256(path: str | Path, start: int = 0) -> str:
    """The sha256 of a file's bytes from `start` on; cached by path, size and modification time."""
    path = Path(path).resolve()
    st = path.stat()
    key, stamp = f"{path}@{start}", [st.st_size, st.st_mtime_ns]
    cache_file = hash_cache()
    with _CACHE_LOCK:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if isinstance(cache.get(key), dict) and cache[key].get("stamp") == stamp:
        return cache[key]["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(1 << 20):
            if _EXITING.is_set():
                raise InterruptedError("the interpreter is exiting")
            h.update(chunk)
    with _CACHE_LOCK:  # re-read: another thread may have added its entry meanwhile
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[key] = {"stamp": stamp, "sha256": h.hexdigest()}
        try:  # a cache that cannot be written (read-only home) costs a re-hash next time, nothing else
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return h.hexdigest()


def model_hash(path: str | Path) -> str:
    """`Model hash:`. For a single file A1111's: the first 10 hex digits of its sha256. For a model folder, which
    A1111 has no hash for: the first 10 of the sha256 of the `sha256sum` listing of its *.safetensors files
    (`HEX  RELATIVE/PATH` lines, sorted by path), so the folder's name and place do not count; symbolic links
    followed (a hub cache's snapshot folders are links). docs/sampling.md's shell command gives the same: stray
    pickle files, which gen never loads from a folder holding safetensors, do not count."""
    path = Path(path)
    if path.is_file():
        return sha256(path)[:10]
    files = sorted((Path(root) / name).relative_to(path).as_posix()
                   for root, _, names in os.walk(path, followlinks=True) for name in names
                   if name.endswith(".safetensors") and (Path(root) / name).is_file())
    listing = "".join(f"{sha256(path / f)}  {f}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:10]


_EXITING = threading.Event()  # set at exit: a hash in progress stops at its next 1 MiB
_HASHING: set[threading.Thread] = set()


@atexit.register
def _stop_hashing() -> None:
    """A hash thread still reading at exit stops and is joined before the interpreter finalizes: a daemon thread
    killed there once aborted a `gen sample` that had already printed its error ("terminate called without an
    active exception", exit -6 instead of 2)."""
    _EXITING.set()
    for thread in list(_HASHING):
        thread.join(timeout=5)


class HashInBackground:
    """The model's hash (gen.recipe.model_hash), computed in a daemon thread while the first images are sampled:
    it never holds back an exit (SIGTERM, Ctrl-C, an error: at exit it stops within one 1 MiB read), and where it
    fails (an unreadable file) the images are written all the same, without a `Model hash`, and a warning says
    why."""

    def __init__(self, path: str | Path):
        self.path, self.value, self.done = Path(path), None, threading.Event()
        thread = threading.Thread(target=self._run, name="gen-model-hash", daemon=True)
        _HASHING.add(thread)
        thread.start()

    def _run(self) -> None:
        try:
            self.value = model_hash(self.path)
        except InterruptedError:
            pass  # exiting
        except Exception as e:  # noqa: BLE001 -- any failure only costs the recipe its hash
            log.warning("the model hash is unknown: could not hash %s (%s: %s); the images are written without "
                        "one", self.path, type(e).__name__, e)
        finally:
            _HASHING.discard(threading.current_thread())
            self.done.set()

    def result(self) -> str | None:
        self.done.wait()
        return self.value


def lora_hash(path: str | Path) -> str:
    """A1111's short hash of a LoRA file (extensions-builtin/Lora/network.py): the header's `sshs_model_hash`
    where kohya's scripts wrote one, else the addnet hash (modules/hashes.py addnet_hash_safetensors: sha256
    of the bytes after the safetensors header), first 12 hex digits; a non-safetensors file's whole sha256. For a
    LoRA folder (diffusers' and peft's), the hash of the weights file in it that gen loads."""
    from gen.io import read_metadata
    from gen.lora_formats import weights_file

    path = weights_file(Path(path))
    if path.suffix != ".safetensors":
        return sha256(path)[:12]
    recorded = read_metadata(path).get("sshs_model_hash")
    if recorded:
        return recorded[:12]
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return sha256(path, 8 + header)[:12]


def lora_alias(path: str | Path) -> str:
    """The name `Lora hashes` gives a LoRA: A1111 drops `:` and `,` from it."""
    return _lora_name(str(path)).replace(":", "").replace(",", "")


# ---- --prompts files -----------------------------------------------------------------------------------
JOB_KEYS = {"prompt": str, "negative_prompt": str, "seed": int, "width": int, "height": int, "steps": int,
            "guidance": float}
_AT_LEAST = {"seed": 0, "width": 1, "height": 1, "steps": 1, "guidance": 0}


def read_prompts(path: str | Path) -> list[tuple[int, dict]]:
    """`--prompts FILE`: (line number, settings) for each line. A .jsonl file holds a JSON object a line with
    "prompt" and any of JOB_KEYS; any other file a prompt a line. Blank lines are skipped; a bad line raises
    a GenError that names it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise GenError(f"--prompts {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise GenError(f"--prompts {path} is not UTF-8 text (byte {e.start})") from None
    jsonl = path.suffix.lower() == ".jsonl"
    jobs = [(n, _job(line, f"{path.name} line {n}") if jsonl else {"prompt": line.strip()})
            for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not jobs:
        raise GenError(f"--prompts {path} holds no prompts")
    return jobs


def _job(line: str, where: str) -> dict:
    try:
        job = json.loads(line)
    except json.JSONDecodeError as e:
        raise GenError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(job, dict) or not isinstance(job.get("prompt"), str):
        raise GenError(f'{where}: expected a JSON object with a "prompt" string, like {{"prompt": "a red circle"}}')
    for key, value in job.items():
        kind = JOB_KEYS.get(key)
        if kind is None:
            raise GenError(f"{where}: unknown key {key!r}; the keys are {', '.join(JOB_KEYS)}")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if kind is str and not isinstance(value, str) or kind is not str and not numeric \
                or kind is int and value != int(value):
            what = {str: "a string", int: "an integer", float: "a number"}[kind]
            raise GenError(f"{where}: {key} must be {what}, not {value!r}")
        if key in _AT_LEAST and value < _AT_LEAST[key]:
            raise GenError(f"{where}: {key} must be >= {_AT_LEAST[key]}, not {value!r}")
        if kind is int:
            job[key] = int(value)
    return job
