"""`gen serve`: one resident Pipeline behind AUTOMATIC1111's and OpenAI's image APIs and a web page.

This module only declares the command; FastAPI, uvicorn and the model import when it runs (the `serve` extra)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: AUTOMATIC1111's API (/sdapi/v1), OpenAI's images "
                       "API (/v1/images) and a web page at /")
    p.add_argument("--model", default=None, help="the model loaded first: a name in --models-dir, or a folder or "
                   ".safetensors file (default: the bundled model)")
    p.add_argument("--models-dir", default=None, metavar="FOLDER",
                   help="the models clients may switch to (model folders and .safetensors files in it, by name)")
    p.add_argument("--loras-dir", default=None, metavar="FOLDER",
                   help="the LoRAs a prompt may name as <lora:NAME:WEIGHT> (.safetensors files in it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", default=None, help="require this key on every request: `Authorization: Bearer "
                   "KEY`, or HTTP basic auth with KEY as the password (default: the GEN_API_KEY variable, else none)")
    p.add_argument("--max-size", type=int, default=2048, metavar="PX", help="largest width or height (2048)")
    p.add_argument("--max-steps", type=int, default=150, help="most sampling steps a request may ask (150)")
    p.add_argument("--max-images", type=int, default=8, help="most images one request may ask (8)")
    p.add_argument("--max-body-mb", type=float, default=50, help="largest request body in MiB (50)")
    p.add_argument("--device", default=None, help="the device to run on (default: cuda if there is one, else cpu)")
    p.add_argument("--devices", default=None, metavar="DEV,DEV,...",
                   help="a model on each of these devices (e.g. cuda:0,cuda:1) behind the one queue: each request runs "
                        "on the first one free, in arrival order")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--attention", default=None, choices=("triton", "xformers", "sdpa", "math", "auto"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import os

    from gen.errors import GenError

    if args.devices is not None and args.device is not None:
        raise GenError("give --device or --devices, not both")
    devices = [d.strip() for d in args.devices.split(",")] if args.devices is not None else [args.device]
    if args.devices is not None and not all(devices):
        raise GenError(f"--devices {args.devices!r}: a comma-separated list of devices, e.g. cuda:0,cuda:1")
    from importlib.util import find_spec

    if not all(find_spec(m) for m in ("fastapi", "uvicorn", "multipart")):
        raise GenError("gen serve needs FastAPI, uvicorn and python-multipart: pip install 'gen[serve]'")
    import uvicorn

    from gen.serve.app import create_app
    from gen.serve.engine import Engine, Limits

    limits = Limits(size=args.max_size, steps=args.max_steps, images=args.max_images,
                    body=int(args.max_body_mb * 2 ** 20))
    engine = Engine(args.model, models_dir=args.models_dir, loras_dir=args.loras_dir, limits=limits,
                    devices=devices, dtype=args.dtype, attention=args.attention)
    app = create_app(engine, api_key=args.api_key or os.environ.get("GEN_API_KEY"))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
