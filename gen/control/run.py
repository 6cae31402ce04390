"""The sampling side of ControlNets: loading them for a pipeline, their hints, and the denoiser call that adds their
summed residuals at the steps each covers."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from gen.control import RESIZE_MODES, Control
from gen.errors import GenError


def load(pipe, model, allow_pickle: bool = False):
    """The ControlNet module of `model` (a path or a loaded ControlNet), checked against the pipeline's family, on
    its device and dtype; loaded paths are kept on the pipeline for its next calls."""
    from gen.control.files import load_file

    cache = pipe.__dict__.setdefault("_controlnets", {})
    key = str(Path(model).resolve()) if isinstance(model, (str, Path)) else id(model)
    net = cache.get(key) if isinstance(model, (str, Path)) else model
    if net is None:
        net = cache[key] = load_file(model, allow_pickle, base=pipe.denoiser)
    fam = pipe.family
    name = model if isinstance(model, (str, Path)) else type(net).__name__
    if type(net).__name__ not in fam.control_classes:
        takes = " or ".join(fam.control_classes) or "none"
        raise GenError(f"the ControlNet {name} is a {type(net).__name__}, for another model family; a {fam.title} "
                       f"model takes {takes}")
    why = fam.control_fits(net, pipe.denoiser)
    if why:
        raise GenError(f"the ControlNet {name} does not fit this {fam.title} model: {why}")
    fam.control_attach(net, pipe.denoiser)
    if net.dtype != pipe.dtype:  # diffusers warns on any cast, even to the dtype it has
        net.to(dtype=pipe.dtype)
    return net.to(pipe.device).eval().requires_grad_(False)


def mode_index(fam, net, c: Control) -> int | None:
    """The index of `c.mode` (a name or an index) among the union ControlNet's modes (fam.control_modes); None for
    a single-mode ControlNet given none."""
    modes = fam.control_modes(net)
    name = c.model if isinstance(c.model, (str, Path)) else type(net).__name__
    if modes is None:
        if c.mode is not None:
            raise GenError(f"the ControlNet {name} is not a union model: it has no mode {c.mode!r}; drop mode=")
        return None
    listed = ", ".join(f"{m} ({i})" for i, m in enumerate(modes))
    if c.mode is None:
        raise GenError(f"the ControlNet {name} is a union model: pick its mode with mode=NAME; it has {listed}")
    key = str(c.mode).lower()
    if key in modes:
        return modes.index(key)
    if key.isdigit() and int(key) < len(modes):
        return int(key)
    raise GenError(f"the union ControlNet {name} has no mode {c.mode!r}; it has {listed}")


class Controlled:
    """The denoiser with its ControlNets: `predict(x, t, cond, **kw)` adds their summed residuals to the call;
    `at_step(i, n)` (called by gen.guidance.guided_prediction) sets which of them act at step i of n."""

    def __init__(self, pipe, predict, controls: list[Control], nets: list, hints: list[torch.Tensor]):
        self.family, self.predict = pipe.family, predict
        self.items = list(zip(controls, nets, hints))
        self.modes = [mode_index(self.family, net, c) for c, net in zip(controls, nets)]
        self.keep = [True] * len(self.items)
        self.tiled = {}  # (net, batch) -> its hint tiled to the batch (the CFG batch doubles it), made once
        self.encoded = {}  # id(tiled hint) -> (it, its encoding by the net's hint encoder), made once (encoded_once)

    def at_step(self, i: int, n: int) -> None:
        self.keep = [not (i / n < c.start or (i + 1) / n > c.end) for c, _, _ in self.items]

    def __call__(self, x, t, cond, **kwargs):
        total = {}
        for j, ((c, net, hint), keep) in enumerate(zip(self.items, self.keep)):
            if not keep or not c.weight:  # diffusers runs it at scale 0: its residuals are zeros
                continue
            if (j, x.shape[0]) not in self.tiled:
                self.tiled[j, x.shape[0]] = hint.repeat(x.shape[0] // hint.shape[0], *[1] * (hint.ndim - 1))
            hint = self.tiled[j, x.shape[0]]
            with encoded_once(net, self.encoded):
                out = self.family.control_call(net, x, t, cond, hint, float(c.weight), self.modes[j])
            total = {k: _add(total.get(k), v) for k, v in out.items()}
        return self.predict(x, t, cond, **kwargs, **total)


class _EncodedOnce(torch.nn.Module):
    """A hint encoder that hands back what it made of the same hint tensor before (`cache`: id -> (hint, encoding))."""

    def __init__(self, encoder: torch.nn.Module, cache: dict):
        super().__init__()
        object.__setattr__(self, "encoder", encoder)  # not a submodule: the net's own stays where it is
        self.cache = cache

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        hit = self.cache.get(id(hint))
        if hit is None or hit[0] is not hint:
            hit = self.cache[id(hint)] = (hint, self.encoder(hint))
        return hit[1]


@contextmanager
def encoded_once(net, cache: dict):
    """While it lasts, a UNet ControlNet's hint encoder (controlnet_cond_embedding, full-resolution convolutions: in
    ControlNetModel and ControlNetUnionModel) encodes each hint once: the hint is the same at every step, so the
    encoding is too (diffusers encodes it again at every step; same result, bit for bit). Other nets: unchanged."""
    encoder = getattr(net, "controlnet_cond_embedding", None)
    if not isinstance(encoder, torch.nn.Module) or isinstance(encoder, _EncodedOnce):
        yield
        return
    net.controlnet_cond_embedding = _EncodedOnce(encoder, cache)
    try:
        yield
    finally:
        net.controlnet_cond_embedding = encoder


def _add(a, b):
    """Residuals summed as MultiControlNetModel sums them (tensors, or tuples of tensors; None: none)."""
    if a is None:
        return b
    if isinstance(b, torch.Tensor):
        return a + b
    return None if b is None else [x + y for x, y in zip(a, b)]


def prepare(pipe, controls: list[Control], height: int, width: int, n: int, generator, resize: str,
            allow_pickle: bool = False) -> tuple[list, list[torch.Tensor]]:
    """(the ControlNets, their hints, as the family's control_hint makes them: pixels in [0, 1] (1, 3, H, W), or VAE
    latents (Flux: a posterior sample per image from its generator, drawn before the noise as diffusers draws it))."""
    from diffusers.image_processor import VaeImageProcessor

    from gen.control.hints import hint_image

    if resize not in RESIZE_MODES:
        raise GenError(f"unknown ControlNet resize mode {resize!r}; choose from {', '.join(RESIZE_MODES)}")
    fam = pipe.family
    if not fam.control_classes:
        raise GenError(f"gen has no ControlNet support for {fam.title} models")
    processor = VaeImageProcessor(vae_scale_factor=pipe.size_multiple, do_convert_rgb=True,
                                  do_normalize=fam.control_latent_hint)
    nets, hints = [], []
    for c in controls:
        c.check()
        nets.append(load(pipe, c.model, allow_pickle))
        mode_index(fam, nets[-1], c)  # a wrong mode fails before any hint is encoded
        image = processor.preprocess(hint_image(c.image, c.module), height=height, width=width,
                                     resize_mode=RESIZE_MODES[resize]).float()
        hints.append(fam.control_hint(pipe, nets[-1], image, generator, n).to(pipe.device, pipe.dtype))
    return nets, hints
