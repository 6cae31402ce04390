"""AUTOMATIC1111's API (modules/api/api.py, /sdapi/v1/...), the fields its clients send, mapped onto Engine jobs."""

from __future__ import annotations

import base64
import json
import time

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from gen.errors import GenError
from gen.sampling.names import a1111_guidance
from gen.serve.engine import Engine, Job, decode_image

AUTOMATIC = (None, "", "automatic", "Automatic")  # A1111's schedule "Automatic": the sampler's own, as gen sample's


class Txt2Img(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img fields gen uses; the others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None  # None: the model's default
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    cfg_scale: float | None = None
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    override_settings: dict = {}
    send_images: bool = True


class Img2Img(Txt2Img):
    init_images: list[str] = []
    mask: str | None = None
    denoising_strength: float = 0.75
    mask_blur: float = 4
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0


def _job(engine: Engine, r: Txt2Img, **workflow) -> Job:
    sampler = r.sampler_name or r.sampler_index
    return Job(prompt=r.prompt, negative_prompt=r.negative_prompt, steps=r.steps,
               guidance=a1111_guidance(sampler, r.cfg_scale), seed=r.seed,
               width=r.width, height=r.height, sampler=sampler,
               schedule=None if r.scheduler in AUTOMATIC else r.scheduler, batch_size=r.batch_size, n_iter=r.n_iter,
               model=r.override_settings.get("sd_model_checkpoint"), **workflow)


def disconnected(request: Request):
    """A check, callable from the request's worker thread, of whether its client has gone."""
    import anyio

    return lambda: anyio.from_thread.run(request.is_disconnected)


def _response(engine: Engine, job: Job, r: Txt2Img, request: Request) -> dict:
    made, info = engine.generate(job, disconnected(request))
    images = [base64.b64encode(m.png).decode() for m in made] if r.send_images else []
    return {"images": images, "parameters": r.model_dump(exclude={"init_images", "mask"}), "info": json.dumps(info)}


def router(engine: Engine) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")

    @api.post("/txt2img")
    def txt2img(r: Txt2Img, request: Request):
        return _response(engine, _job(engine, r), r, request)

    @api.post("/img2img")
    def img2img(r: Img2Img, request: Request):
        from PIL import ImageOps

        if not r.init_images:
            raise GenError("img2img needs init_images (one base64 image)")
        image = decode_image(r.init_images[0], "init_images[0]", engine.limits)
        mask = decode_image(r.mask, "mask", engine.limits, "L") if r.mask else None
        if mask is not None and r.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        job = _job(engine, r, image=image, mask=mask, strength=r.denoising_strength,
                   mask_blur=r.mask_blur if mask is not None else 0,
                   padding=r.inpaint_full_res_padding if mask is not None and r.inpaint_full_res else None)
        return _response(engine, job, r, request)

    @api.get("/sd-models")
    def sd_models():
        return [{"title": name, "model_name": name.rsplit(".", 1)[0] if name.endswith(".safetensors") else name,
                 "hash": None, "sha256": None, "filename": name, "config": None} for name in engine.models()]

    @api.get("/loras")
    def loras():
        return [{"name": name, "alias": name, "path": path.name, "metadata": {}} for name, path in engine.loras().items()]

    @api.get("/samplers")
    def samplers():
        from gen.sampling.names import SAMPLERS

        kind = engine.pipe.formulation.kind
        return [{"name": s.a1111, "aliases": [s.name, *([s.comfy] if s.comfy else [])], "options": {}}
                for s in SAMPLERS if s.a1111 and kind in s.kinds]

    @api.get("/schedulers")
    def schedulers():
        from gen.sampling.names import SCHEDULES

        return [{"name": name, "label": a1111, "aliases": [comfy] if comfy else None, "default_rho": -1,
                 "need_inner_model": False} for name, (a1111, comfy) in SCHEDULES.items() if a1111]

    @api.get("/options")
    def get_options():
        return {"sd_model_checkpoint": engine.name, "sd_checkpoint_hash": engine.hash.result(),
                "samples_format": "png"}

    @api.post("/options")
    def set_options(options: dict):
        name = options.get("sd_model_checkpoint")
        if name is not None:
            engine.model_path(name)  # unknown names fail before queueing
            with engine.queue.slot() as index:
                engine.use(name, engine.workers[index])
        return None

    @api.get("/progress")
    def progress(request: Request, skip_current_image: bool = False):
        worker = engine.running()
        s = worker.state
        done = min(1.0, s["step"] / s["steps"]) if s["job"] and s["steps"] else 0.0
        elapsed = time.time() - s["started"]
        eta = elapsed / done - elapsed if done else 0.0
        png = None if skip_current_image or not s["job"] else worker.previews.png()
        return {"progress": done, "eta_relative": eta, "current_image": base64.b64encode(png).decode() if png else None,
                "textinfo": f"step {s['step']} of {s['steps']}" if s["job"] else None,
                "state": {"skipped": False, "interrupted": s["interrupted"], "job": s["job"],
                          "job_count": engine.queue.waiting, "job_timestamp": "", "job_no": 0,
                          "sampling_step": s["step"], "sampling_steps": s["steps"]}}

    @api.post("/interrupt")
    def interrupt():
        engine.interrupt()
        return {}

    return api

