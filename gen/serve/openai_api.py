"""OpenAI's images API (/v1/images/generations, /v1/images/edits) mapped onto Engine jobs; gen's own fields
(negative_prompt, steps, guidance, seed, sampler, scheduler) are accepted beside OpenAI's."""

from __future__ import annotations

import base64
import secrets
import time
from collections import OrderedDict

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from gen.errors import GenError
from gen.serve.a1111 import disconnected
from gen.serve.engine import Engine, Job, decode_image

KEPT = 64  # images served by URL (response_format "url"), the newest kept in memory


class Generation(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str
    n: int = 1
    size: str | None = None  # "WxH"; None or "auto": the model's default
    response_format: str = "b64_json"
    model: str | None = None  # a gen model name; OpenAI's own names (dall-e-3, gpt-image-1) mean the loaded one
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    sampler: str | None = None
    scheduler: str | None = None
    strength: float | None = None  # edits: how much of the schedule runs from the image


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "", "auto"):
        return None, None
    w, sep, h = size.partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise GenError(f"size must be WIDTHxHEIGHT (e.g. 512x512) or auto, not {size!r}")
    return int(w), int(h)


def router(engine: Engine) -> APIRouter:
    api = APIRouter(prefix="/v1/images")
    files: OrderedDict[str, bytes] = OrderedDict()

    def respond(request: Request, g: Generation, **workflow) -> dict:
        if g.response_format not in ("b64_json", "url"):
            raise GenError(f"response_format must be b64_json or url, not {g.response_format!r}")
        width, height = _size(g.size)
        model = g.model if g.model in engine.models() else None
        job = Job(prompt=g.prompt, negative_prompt=g.negative_prompt, steps=g.steps, guidance=g.guidance, seed=g.seed,
                  width=width, height=height, sampler=g.sampler, schedule=g.scheduler, batch_size=g.n, model=model,
                  strength=g.strength, **workflow)
        made, _ = engine.generate(job, disconnected(request))
        data = []
        for m in made:
            if g.response_format == "b64_json":
                data.append({"b64_json": base64.b64encode(m.png).decode(), "revised_prompt": None})
                continue
            key = secrets.token_urlsafe(12)
            files[key] = m.png
            while len(files) > KEPT:
                files.popitem(last=False)
            data.append({"url": str(request.url_for("image_file", key=key)), "revised_prompt": None})
        return {"created": int(time.time()), "data": data}

    @api.post("/generations")
    def generations(g: Generation, request: Request):
        return respond(request, g)

    @api.post("/edits")
    async def edits(request: Request):
        from starlette.concurrency import run_in_threadpool

        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        images = form.getlist("image") or form.getlist("image[]")
        if not images or isinstance(images[0], str):
            raise GenError("images/edits needs an image file (multipart field image)")
        image = decode_image(await images[0].read(), "image", engine.limits)
        mask = form.get("mask")
        if isinstance(mask, UploadFile):
            mask = decode_image(await mask.read(), "mask", engine.limits, "alpha")
            if mask.size != image.size:
                raise GenError(f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}")
        elif mask is not None:
            raise GenError("mask must be an image file")
        try:
            g = Generation(**{k: v for k, v in fields.items() if k not in ("image", "mask")})
        except ValidationError as e:
            error = e.errors()[0]
            raise GenError(f"images/edits: {error['loc'][0]}: {error['msg']}") from None
        return await run_in_threadpool(respond, request, g, image=image, mask=mask)

    @api.get("/files/{key}.png", name="image_file")
    def image_file(key: str):
        from fastapi import HTTPException
        from fastapi.responses import Response

        if key not in files:
            raise HTTPException(404, f"no image {key!r} here (the server keeps its newest {KEPT})")
        return Response(files[key], media_type="image/png")

    return api
