"""The ASGI app of `gen serve`: the API key and body-size guard on every request, errors as one JSON object each
(OpenAI's shape under /v1, A1111's elsewhere), the two API routers and the page at /."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from gen.errors import GenError
from gen.serve import a1111, openai_api
from gen.serve.engine import Engine

log = logging.getLogger("gen")
PAGE = Path(__file__).parent / "static" / "index.html"


def error(request: Request, status: int, message: str, kind: str) -> JSONResponse:
    if request.url.path.startswith("/v1/"):
        body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    else:
        body = {"error": kind, "detail": message}
    headers = {"WWW-Authenticate": 'Basic realm="gen serve"'} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _authorized(header: str | None, key: str) -> bool:
    """`Bearer KEY` (OpenAI's clients), or HTTP basic auth with KEY as the password (A1111's clients, browsers)."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), key.encode())


class Guard:
    """The API key and the body size, checked on every request before any route (a plain ASGI middleware:
    Starlette's BaseHTTPMiddleware would hide a client's disconnect from the routes)."""

    def __init__(self, app, engine: Engine, api_key: str | None):
        self.app, self.engine, self.api_key = app, engine, api_key

    def refusal(self, request: Request) -> JSONResponse | None:
        if self.api_key and not _authorized(request.headers.get("authorization"), self.api_key):
            return error(request, 401, "this server needs its API key: Authorization: Bearer KEY", "unauthorized")
        if request.method in ("POST", "PUT", "PATCH"):
            length, limit = request.headers.get("content-length"), self.engine.limits.body
            if length is None or not length.isdigit():
                return error(request, 411, "a request body needs a Content-Length", "length_required")
            if int(length) > limit:
                return error(request, 413, f"the request body is {int(length)} bytes, over this server's "
                             f"--max-body-mb ({limit} bytes)", "too_large")
        return None

    async def __call__(self, scope, receive, send):
        refusal = self.refusal(Request(scope)) if scope["type"] == "http" else None
        await (refusal or self.app)(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="gen serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, engine=engine, api_key=api_key)

    @app.exception_handler(GenError)
    async def bad_input(request: Request, e: GenError):
        return error(request, 400, str(e), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        return error(request, 422, f"{where}: {first['msg']}", "invalid_request_error")

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):  # the request fails, the server goes on
        log.exception("request %s failed", request.url.path)
        return error(request, 500, f"{type(e).__name__}: {e}", "server_error")

    app.include_router(a1111.router(engine))
    app.include_router(openai_api.router(engine))

    @app.get("/")
    def page():
        return FileResponse(PAGE)

    return app
