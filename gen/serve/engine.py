"""The resident model behind `gen serve`: one Pipeline, one request on it at a time in arrival order, the
pipeline calls `gen sample` makes (same defaults, seeds and PNG recipe), progress and interrupt."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from gen import recipe
from gen.errors import GenError

log = logging.getLogger("gen")
DEFAULT_NAME = "gen-default"  # the bundled model, as gen's recipes name it


@dataclass
class Limits:
    size: int = 2048  # largest width or height
    steps: int = 150
    images: int = 8  # batch_size * n_iter
    body: int = 50 * 2 ** 20  # request body bytes


@dataclass
class Job:
    """One request in gen's terms (None: the model's default, as for `gen sample`)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None or -1: random
    width: int | None = None
    height: int | None = None
    sampler: str | None = None  # gen's, A1111's or ComfyUI's name
    schedule: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    image: object = None  # PIL images: img2img source and inpainting mask
    mask: object = None
    strength: float | None = None
    mask_blur: float = 0
    padding: int | None = None  # repaint only the mask's box grown by this (A1111's "only masked")
    model: str | None = None  # a model name (Engine.models()); None: the one loaded


@dataclass
class Made:
    png: bytes
    infotext: str
    seed: int


class Interrupted(Exception):
    pass


class Queue:
    """A lock granted in arrival order (threading.Lock promises no order): requests run one at a time, first come
    first served; `waiting` counts those queued or running."""

    def __init__(self):
        self._cond, self._next, self._serving = threading.Condition(), 0, 0

    @property
    def waiting(self) -> int:
        return self._next - self._serving

    def __enter__(self):
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def _folder_entries(folder: Path | None, models: bool) -> dict[str, Path]:
    """Name -> path of what a configured folder holds: .safetensors files (LoRAs: by stem) and, for models,
    diffusers folders (with model_index.json). Names come only from this listing, so no name reaches outside."""
    if folder is None:
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        if p.suffix == ".safetensors" and p.is_file():
            out[p.name if models else p.stem] = p
        elif models and (p / "model_index.json").is_file():
            out[p.name] = p
    return out


class Engine:
    def __init__(self, model: str | None = None, models_dir: str | None = None, loras_dir: str | None = None,
                 limits: Limits | None = None, **load_kwargs):
        self.models_dir, self.loras_dir = (Path(d).resolve() if d else None for d in (models_dir, loras_dir))
        for flag, d in (("--models-dir", self.models_dir), ("--loras-dir", self.loras_dir)):
            if d is not None and not d.is_dir():
                raise GenError(f"{flag} {d}: no such folder")
        self.limits, self.load_kwargs = limits or Limits(), load_kwargs
        self.queue, self.pipe, self.name, self.active, self._gone = Queue(), None, None, None, _never
        self.state = dict(job="", step=0, steps=0, started=0.0, interrupted=False)
        self.extra = {}  # a --model path outside --models-dir, trusted as the command line's
        if model is not None and model not in self.models():
            path = Path(model).resolve()
            if not path.exists():
                raise GenError(f"--model {model}: no such file or folder, nor a model in --models-dir")
            self.extra[path.name] = path
            model = path.name
        self.load(model or DEFAULT_NAME)

    # ---- names clients may use ----------------------------------------------------------------------------
    def models(self) -> dict[str, Path | None]:
        return {DEFAULT_NAME: None, **self.extra, **_folder_entries(self.models_dir, True)}

    def loras(self) -> dict[str, Path]:
        return _folder_entries(self.loras_dir, False)

    def model_path(self, name: str) -> Path | None:
        name = name.split(" [")[0]  # A1111's titles: "NAME [HASH]"
        models = self.models()
        if name not in models:
            raise GenError(f"unknown model {name!r}; GET /sdapi/v1/sd-models lists them")
        return models[name]

    def load(self, name: str) -> None:
        """Makes `name` the resident model (the caller holds the queue, or nothing runs yet)."""
        from gen.pipeline import DEFAULT_MODEL, Pipeline

        path, previous = self.model_path(name), self.name
        self.pipe, self.name, self.active = None, None, None  # the old one freed before the new one loads
        try:
            pipe = Pipeline.from_pretrained(path, **self.load_kwargs)
        except Exception:
            if previous is not None:  # back to the model that worked, then the request fails
                self.load(previous)
            raise
        pipe.progress = False
        pipe.denoiser.register_forward_pre_hook(self._step)
        self.pipe, self.name, self.path = pipe, name.split(" [")[0], path
        self.hash = recipe.HashInBackground(path or DEFAULT_MODEL)
        log.info("serving %s", self.name)

    def _step(self, module, args) -> None:
        """Before each denoiser call: stop if interrupted or the client has gone, else count a step."""
        if self.state["interrupted"] or self._gone():
            raise Interrupted
        self.state["step"] += 1

    def interrupt(self) -> None:
        if self.state["job"]:
            self.state["interrupted"] = True

    # ---- requests -----------------------------------------------------------------------------------------
    def check(self, job: Job) -> None:
        """The server's limits, before a request queues: one GenError each."""
        lim = self.limits
        for key in ("width", "height"):
            v = getattr(job, key)
            if v is not None and not (isinstance(v, int) and 0 < v <= lim.size):
                raise GenError(f"{key} must be at most {lim.size} (this server's --max-size), not {v}")
        for image in (job.image, job.mask):
            if image is not None and max(image.size) > lim.size:
                raise GenError(f"an input image of {image.size[0]}x{image.size[1]} is over this server's --max-size "
                               f"{lim.size}")
        if job.steps is not None and not 1 <= job.steps <= lim.steps:
            raise GenError(f"steps must be in [1, {lim.steps}] (this server's --max-steps), not {job.steps}")
        n = job.batch_size * job.n_iter
        if job.batch_size < 1 or job.n_iter < 1 or n > lim.images:
            raise GenError(f"a request may make 1 to {lim.images} images (this server's --max-images), not {n}")

    def _lora_files(self, prompt: str) -> tuple[str, list[tuple[str, float]]]:
        prompt, tags = recipe.extra_networks(prompt, "the prompt")
        known = self.loras()
        for name, _ in tags:
            if name not in known:
                raise GenError(f"unknown LoRA {name!r}; GET /sdapi/v1/loras lists them")
        return " ".join(prompt.split()), [(str(known[n]), s) for n, s in tags]

    def _use_loras(self, loras: list[tuple[str, float]]) -> None:
        if loras == self.active:
            return
        self.active = None  # unknown until loaded, should a load fail
        self.pipe.unload_lora()
        for path, scale in loras:
            self.pipe.load_lora(path, scale=scale)
        self.active = loras

    def generate(self, job: Job, gone=lambda: False) -> tuple[list[Made], dict]:
        """The images of a job (fewer if interrupted) and what A1111 returns as `info`; `gone()` says whether the
        client has disconnected: then the job is dropped when its turn comes, or stopped at its next step."""
        self.check(job)
        prompt, loras = self._lora_files(job.prompt)
        with self.queue:
            if gone():
                log.info("a client left before its turn; its request is dropped")
                return [], {}
            self.state.update(job=f"job {time.time():.0f}", step=0, started=time.time(), interrupted=False)
            self._gone = gone
            try:
                if job.model is not None and job.model.split(" [")[0] != self.name:
                    self.load(job.model)
                self._use_loras(loras)
                return self._run(job, prompt, loras)
            finally:
                self.state.update(job="", interrupted=False)
                self._gone = _never

    def _run(self, job: Job, prompt: str, loras) -> tuple[list[Made], dict]:
        from gen.samplers import own_schedule
        from gen.sampling import names

        pipe, d = self.pipe, self.pipe.defaults
        sized = job.image is None or job.padding is not None  # else img2img keeps its source's size
        run = dict(prompt=prompt, negative_prompt=job.negative_prompt or None,
                   num_inference_steps=_first(job.steps, d["steps"]), guidance_scale=_first(job.guidance, d["guidance"]),
                   height=_first(job.height, d["height"] if sized else None), guidance_interval=(0.0, 1.0),
                   width=_first(job.width, d["width"] if sized else None), cache_interval=1,
                   sampler=_first(job.sampler, d["sampler"]), schedule=_first(job.schedule, own_schedule(d, job.sampler)),
                   guidance_rescale=d.get("guidance_rescale", 0.0), num_images_per_prompt=job.batch_size,
                   image=job.image, mask_image=job.mask, strength=job.strength, mask_blur=job.mask_blur,
                   padding_mask_crop=job.padding)
        sampler, schedule, fields = names.recorded(run["sampler"], run["schedule"], pipe.formulation,
                                                   pipe.scheduler_config)
        seed = job.seed if job.seed is not None and job.seed >= 0 else random.randrange(2 ** 32)
        self.state["steps"] = run["num_inference_steps"] * job.n_iter
        source = dict(strength=_first(job.strength, 1.0 if job.mask else 0.8), mask_blur=job.mask_blur,
                      inpaint_padding=job.padding) if job.image is not None else {}
        base = recipe.Recipe(prompt=prompt, negative_prompt=job.negative_prompt or "", steps=run["num_inference_steps"],
                             guidance=run["guidance_scale"], sampler=sampler, schedule=schedule,
                             guidance_rescale=run["guidance_rescale"], model=str(self.path) if self.path else None,
                             model_name=self.path.name if self.path else DEFAULT_NAME, loras=loras,
                             lora_hashes={recipe.lora_alias(p): recipe.lora_hash(p) for p, _ in loras},
                             weights=pipe.weights, vae_tile=pipe.vae_tiling, **source)
        made = []
        try:
            for i in range(job.n_iter):
                out = pipe(**run, seed=seed + i * job.batch_size)
                for image, image_seed in zip(out.images, out.seeds):
                    r = replace(base, seed=image_seed, width=image.width, height=image.height,
                                model_hash=self.hash.result())
                    text = recipe.infotext(r, fields)
                    made.append(Made(recipe.png_bytes(image, text), text, image_seed))
        except Interrupted:
            log.info("interrupted after %d images", len(made))
        info = dict(prompt=prompt, negative_prompt=job.negative_prompt or "", seed=seed,
                    all_seeds=[m.seed for m in made], width=run["width"], height=run["height"], sampler_name=sampler,
                    scheduler=schedule or "automatic", cfg_scale=run["guidance_scale"], steps=run["num_inference_steps"],
                    batch_size=job.batch_size, sd_model_name=base.model_name, sd_model_hash=self.hash.result(),
                    denoising_strength=source.get("strength"), infotexts=[m.infotext for m in made], clip_skip=1,
                    index_of_first_image=0, version="gen")
        return made, info


def decode_image(data: str | bytes, what: str, limits: Limits, mode: str = "RGB"):
    """A PIL image from base64 text (a data: URL or bare) or bytes; its size checked before it is decoded."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str):
        try:
            data = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
        except (binascii.Error, ValueError):
            raise GenError(f"{what} is not base64 image data") from None
    try:
        image = Image.open(io.BytesIO(data))
        if max(image.size) > limits.size:
            raise GenError(f"{what} is {image.size[0]}x{image.size[1]}, over this server's --max-size {limits.size}")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, GenError):
            raise
        raise GenError(f"{what} is not a readable image ({e})") from None
    if mode == "alpha" and "A" in image.getbands():  # OpenAI's mask: edit where it is transparent
        from PIL import ImageOps

        return ImageOps.invert(image.getchannel("A"))
    return image.convert("L" if mode in ("L", "alpha") else mode)


def _never() -> bool:
    return False


def _first(*values):
    return next((v for v in values if v is not None), None)
