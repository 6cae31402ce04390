"""The resident model behind `gen serve`: one Pipeline, one request on it at a time in arrival order, the
pipeline calls `gen sample` makes (same defaults, seeds and PNG recipe), progress and interrupt."""

from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gen import recipe
from gen.errors import GenError
from gen.serve.preview import Previews

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
    """Slots (one per device) granted in arrival order (threading.Lock promises no order): requests run first come
    first served, each on the first device free; `waiting` counts those queued or running."""

    def __init__(self, slots: int = 1):
        self._cond, self._next, self._head, self._free = threading.Condition(), 0, 0, list(range(slots))
        self._running = 0

    @property
    def waiting(self) -> int:
        return self._next - self._head + self._running

    @contextmanager
    def slot(self):
        """The index of a free slot, held until the block ends."""
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._head == ticket and self._free)
            self._head, self._running, index = self._head + 1, self._running + 1, self._free.pop(0)
            self._cond.notify_all()
        try:
            yield index
        finally:
            with self._cond:
                self._free.append(index)
                self._free.sort()
                self._running -= 1
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


class Worker:
    """One device: its resident Pipeline (the model it last ran), the LoRAs applied, the progress of its request."""

    def __init__(self, index: int, device: str | None):
        self.index, self.device, self.pipe, self.name, self.active, self.gone = index, device, None, None, None, _never
        self.state = dict(job="", step=0, steps=0, started=0.0, interrupted=False)
        self.previews = Previews()

    def step(self, module, args, kwargs) -> None:
        """Before each denoiser call: stop if interrupted or the client has gone, else count a step and keep its
        input for a preview."""
        if self.state["interrupted"] or self.gone():
            raise Interrupted
        self.state["step"] += 1
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        if isinstance(x, torch.Tensor):
            self.previews.record(x)


class Engine:
    """The models and LoRAs clients may name, the limits, one queue, and a Worker per device behind it."""

    def __init__(self, model: str | None = None, models_dir: str | None = None, loras_dir: str | None = None,
                 limits: Limits | None = None, devices: list[str | None] | None = None, **load_kwargs):
        from gen.memory import resolve_device

        self.models_dir, self.loras_dir = (Path(d).resolve() if d else None for d in (models_dir, loras_dir))
        for flag, d in (("--models-dir", self.models_dir), ("--loras-dir", self.loras_dir)):
            if d is not None and not d.is_dir():
                raise GenError(f"{flag} {d}: no such folder")
        devices = devices or [None]
        for device in devices:
            if device is not None:
                resolve_device(device)  # a device that does not exist: one error before any load
        self.limits, self.load_kwargs, self.hashes = limits or Limits(), load_kwargs, {}
        self.workers = [Worker(i, d) for i, d in enumerate(devices)]
        self.queue = Queue(len(self.workers))
        self.extra = {}  # a --model path outside --models-dir, trusted as the command line's
        if model is not None and model not in self.models():
            path = Path(model).resolve()
            if not path.exists():
                raise GenError(f"--model {model}: no such file or folder, nor a model in --models-dir")
            self.extra[path.name] = path
            model = path.name
        self.name = model or DEFAULT_NAME  # what a request that names no model runs on
        for worker in self.workers:
            self.load(self.name, worker)
        self.hash_of(self.name)  # started now, ready by the first request

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

    @property
    def pipe(self):
        """A Pipeline of the model requests run on (its formulation lists the samplers)."""
        return next((w.pipe for w in self.workers if w.name == self.name), self.workers[0].pipe)

    @property
    def hash(self) -> recipe.HashInBackground:
        """The hash of the model requests run on."""
        return self.hash_of(self.name)

    def hash_of(self, name: str) -> recipe.HashInBackground:
        """A model's hash, computed in the background once a model."""
        from gen.pipeline import DEFAULT_MODEL

        if name not in self.hashes:
            self.hashes[name] = recipe.HashInBackground(self.model_path(name) or DEFAULT_MODEL)
        return self.hashes[name]

    def running(self) -> Worker:
        """The worker whose request has run longest (the first when none runs): the one /progress reports."""
        busy = [w for w in self.workers if w.state["job"]]
        return min(busy, key=lambda w: w.state["started"]) if busy else self.workers[0]

    def use(self, name: str, worker: Worker | None = None) -> None:
        """Makes `name` the model requests run on, loaded on `worker` (the caller holds its slot) unless there."""
        worker = worker or self.workers[0]
        if name.split(" [")[0] != worker.name:
            self.load(name, worker)
        self.name = worker.name

    def load(self, name: str, worker: Worker) -> None:
        """Loads `name` on `worker` (the caller holds its slot, or nothing runs yet)."""
        from gen.pipeline import Pipeline

        path, previous = self.model_path(name), worker.name
        worker.pipe, worker.name, worker.active = None, None, None  # the old one freed before the new one loads
        try:
            pipe = Pipeline.from_pretrained(path, device=worker.device, **self.load_kwargs)
        except Exception:
            if previous is not None:  # back to the model that worked, then the request fails
                self.load(previous, worker)
            raise
        pipe.progress = False
        pipe.denoiser.register_forward_pre_hook(worker.step, with_kwargs=True)
        worker.pipe, worker.name, worker.path = pipe, name.split(" [")[0], path
        log.info("serving %s on %s", worker.name, pipe.device)

    def interrupt(self) -> None:
        """Stops the running requests at their next step."""
        for worker in self.workers:
            if worker.state["job"]:
                worker.state["interrupted"] = True

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

    def _use_loras(self, worker: Worker, loras: list[tuple[str, float]]) -> None:
        if loras == worker.active:
            return
        worker.active = None  # unknown until loaded, should a load fail
        worker.pipe.unload_lora()
        for path, scale in loras:
            worker.pipe.load_lora(path, scale=scale)
        worker.active = loras

    def generate(self, job: Job, gone=lambda: False) -> tuple[list[Made], dict]:
        """The images of a job (fewer if interrupted) and what A1111 returns as `info`; `gone()` says whether the
        client has disconnected: then the job is dropped when its turn comes, or stopped at its next step."""
        self.check(job)
        prompt, loras = self._lora_files(job.prompt)
        with self.queue.slot() as index:
            if gone():
                log.info("a client left before its turn; its request is dropped")
                return [], {}
            worker = self.workers[index]
            worker.state.update(job=f"job {time.time():.0f}", step=0, started=time.time(), interrupted=False)
            worker.gone = gone
            try:
                self.use(job.model or self.name, worker)
                self._use_loras(worker, loras)
                return self._run(worker, job, prompt, loras)
            finally:
                worker.state.update(job="", interrupted=False)
                worker.gone = _never
                worker.previews.stop()

    def _run(self, worker: Worker, job: Job, prompt: str, loras) -> tuple[list[Made], dict]:
        from gen.samplers import own_schedule
        from gen.sampling import names

        pipe, d, path, started = worker.pipe, worker.pipe.defaults, worker.path, time.time()
        sized = job.image is None or job.padding is not None  # else img2img keeps its source's size
        run = dict(prompt=prompt, negative_prompt=job.negative_prompt or None,
                   num_inference_steps=_first(job.steps, d["steps"]), guidance_scale=_first(job.guidance, d["guidance"]),
                   height=_first(job.height, d["height"] if sized else None),
                   guidance_interval=pipe.guidance_interval,
                   width=_first(job.width, d["width"] if sized else None), cache_interval=1,
                   sampler=_first(job.sampler, d["sampler"]), schedule=_first(job.schedule, own_schedule(d, job.sampler)),
                   guidance_rescale=d.get("guidance_rescale", 0.0), num_images_per_prompt=job.batch_size,
                   image=job.image, mask_image=job.mask, strength=job.strength, mask_blur=job.mask_blur,
                   padding_mask_crop=job.padding)
        sampler, schedule, fields = names.recorded(run["sampler"], run["schedule"], pipe.formulation,
                                                   pipe.scheduler_config)
        seed = job.seed if job.seed is not None and job.seed >= 0 else random.randrange(2 ** 32)
        worker.state["steps"] = run["num_inference_steps"] * job.n_iter
        worker.previews.start(pipe, *(job.image.size[::-1] if run["height"] is None else (run["height"], run["width"])))
        source = dict(strength=_first(job.strength, 1.0 if job.mask else 0.8), mask_blur=job.mask_blur,
                      inpaint_padding=job.padding) if job.image is not None else {}
        base = recipe.Recipe(prompt=prompt, negative_prompt=job.negative_prompt or "", steps=run["num_inference_steps"],
                             guidance=run["guidance_scale"], sampler=sampler, schedule=schedule,
                             guidance_rescale=run["guidance_rescale"], guidance_interval=run["guidance_interval"],
                             model=str(path) if path else None,
                             model_name=path.name if path else DEFAULT_NAME, loras=loras,
                             lora_hashes={recipe.lora_alias(p): recipe.lora_hash(p) for p, _ in loras},
                             weights=pipe.weights, vae_tile=pipe.vae_tiling, **source)
        made = []
        try:
            for i in range(job.n_iter):
                out = pipe(**run, seed=seed + i * job.batch_size)
                for image, image_seed in zip(out.images, out.seeds):
                    r = replace(base, seed=image_seed, width=image.width, height=image.height,
                                model_hash=self.hash_of(worker.name).result())
                    text = recipe.infotext(r, fields)
                    made.append(Made(recipe.png_bytes(image, text), text, image_seed))
        except Interrupted:
            log.info("interrupted after %d images", len(made))
        info = dict(prompt=prompt, negative_prompt=job.negative_prompt or "", seed=seed,
                    all_seeds=[m.seed for m in made], width=run["width"], height=run["height"], sampler_name=sampler,
                    scheduler=schedule or "automatic", cfg_scale=run["guidance_scale"], steps=run["num_inference_steps"],
                    batch_size=job.batch_size, sd_model_name=base.model_name, sd_model_hash=self.hash_of(worker.name).result(),
                    denoising_strength=source.get("strength"), infotexts=[m.infotext for m in made], clip_skip=1,
                    index_of_first_image=0, version="gen",
                    gen_device=f"{worker.index}: {pipe.device}", gen_started=started, gen_finished=time.time())
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
