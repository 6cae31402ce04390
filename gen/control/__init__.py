"""ControlNet conditioning: extra inputs a family's denoiser call takes (DESIGN.md, "control").

A `Control` is one ControlNet, its hint image, a weight and the fraction of the run it acts in. Each step, every
ControlNet whose window covers the step runs on the same input as the denoiser and its residuals (a UNet's down and
mid residuals, a Flux transformer's block samples) are summed and handed to the denoiser, as diffusers' pipelines and
MultiControlNetModel do: step i of n is kept where start <= i / n and (i + 1) / n <= end. What differs per family
(the ControlNet class, its call, whether the hint goes in as pixels or VAE latents) is the family's
(`control_*` in gen/families). The sampling side: gen.control.run; preprocessors: gen.control.hints; files:
gen.control.files; the PNG recipe's fields: gen.control.fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gen.errors import GenError

RESIZE_MODES = {"just-resize": "default", "crop-and-resize": "crop", "resize-and-fill": "fill"}  # -> diffusers' names


@dataclass
class Control:
    """One ControlNet: `model` (a folder, a single file or a loaded diffusers ControlNet), `image` (a path, PIL
    image, array or tensor in [0, 1]), its `weight` and the fractions of the run it starts and ends at; `module`:
    a preprocessor run on the image first (gen.control.hints.MODULES; "none": the image is the hint); `mode`: a
    union ControlNet's mode, by name ("depth") or index (the family's control_modes), None for other ControlNets."""

    model: object
    image: object
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    module: str = "none"
    mode: str | int | None = None

    def check(self) -> None:
        from gen.control.hints import MODULES

        for what, v in (("weight", self.weight), ("start", self.start), ("end", self.end)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GenError(f"ControlNet {what} must be a number, not {v!r}")
        if not 0 <= self.weight <= 2:
            raise GenError(f"ControlNet weight must be in [0, 2], not {self.weight:g}")
        if not 0 <= self.start < self.end <= 1:
            raise GenError(f"ControlNet start and end must be 0 <= start < end <= 1, not {self.start:g}, {self.end:g}")
        if self.mode is not None and (isinstance(self.mode, bool) or not isinstance(self.mode, (str, int))):
            raise GenError(f"a ControlNet mode is a name or an index, not {self.mode!r}")
        if self.module not in MODULES:
            raise GenError(f"unknown ControlNet preprocessor {self.module!r}; known: {', '.join(MODULES)}")


SYNTAX = "[MODULE:]MODEL:IMAGE[:WEIGHT[:START:END]][:mode=MODE]"


def parse(text: str) -> Control:
    """`[MODULE:]MODEL:IMAGE[:WEIGHT[:START:END]][:mode=MODE]` (gen sample --control)."""
    from gen.control.hints import MODULES

    parts = text.split(":")
    modes = [p for p in parts if p.startswith("mode=")]
    parts = [p for p in parts if not p.startswith("mode=")]
    if len(modes) > 1 or modes and not modes[0][5:]:
        raise GenError(f"--control {text!r}: give one mode=MODE (a union ControlNet's mode, e.g. mode=depth)")
    module = parts.pop(0) if len(parts) >= 3 and parts[0] in MODULES else "none"
    if len(parts) not in (2, 3, 5) or not all(parts[:2]):
        raise GenError(f"--control {text!r}: expected {SYNTAX}")
    try:
        numbers = [float(p) for p in parts[2:]]
    except ValueError:
        raise GenError(f"--control {text!r}: WEIGHT, START and END must be numbers") from None
    c = Control(parts[0], parts[1], *numbers, module=module, mode=modes[0][5:] if modes else None)
    c.check()
    return c


# ---- gen sample (gen/cli.py) --------------------------------------------------------------------------------------
def add_flags(p) -> None:
    p.add_argument("--control", action="append", default=None, metavar=SYNTAX,
                   help="a ControlNet (folder or original-layout file) steering by a hint image, at WEIGHT (default 1) "
                        "from START to END (fractions of the steps, default 0 1); MODULE makes the hint first (canny, "
                        "invert, blur, tile, grayscale); mode= picks a union ControlNet's mode (depth, canny, ...); "
                        "repeat to sum several")
    p.add_argument("--control-resize", default=None, choices=tuple(RESIZE_MODES),
                   help="how hint images meet the size (A1111's resize modes; default just-resize)")


def from_args(args) -> dict:
    """The pipeline arguments of --control and --control-resize; the hint images are read now (a bad one fails
    before any model loads)."""
    from gen.control.hints import hint_image

    controls = [c if isinstance(c, Control) else parse(c) for c in args.control or []]
    for c in controls:
        if isinstance(c.model, (str, Path)) and not Path(c.model).exists():
            raise GenError(f"the ControlNet {c.model}: no such file or folder")
        hint_image(c.image)
    return dict(control=controls or None, control_resize=args.control_resize or "just-resize")


def recorded(workflow: dict) -> dict:
    """The recipe fields of the workflow's ControlNets (their files by absolute path)."""
    controls = [dict(module=c.module, model=str(Path(c.model).resolve()), image=str(Path(c.image).resolve()),
                     weight=c.weight, start=c.start, end=c.end, mode=c.mode) for c in workflow["control"] or []]
    return dict(controls=controls, control_resize=workflow["control_resize"])


def apply_recipe(r, args) -> None:
    """--from: the recipe's ControlNets where no --control is given."""
    if args.control is None:
        if r.controls_unnamed:
            raise GenError(f"{args.recipe} uses the ControlNet {r.controls_unnamed[0]!r}, which gen cannot find by "
                           "name; pass --control MODEL:IMAGE[:WEIGHT[:START:END]] for each of its ControlNets")
        args.control = [Control(c["model"], c["image"], c["weight"], c["start"], c["end"], c["module"],
                                c.get("mode"))
                        for c in r.controls] or None
    if args.control_resize is None and r.controls:
        args.control_resize = r.control_resize
