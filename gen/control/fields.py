"""ControlNets in the PNG recipe: sd-webui-controlnet's `ControlNet N: "Module: canny, Model: NAME, Weight: 1, Resize
Mode: Just Resize, Guidance Start: 0, Guidance End: 1"` fields (A1111 and Forge read them), and gen's own `gen
ControlNet N` field holding the model and hint files, which `gen sample --from` replays. No torch import here."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gen.errors import GenError

A1111_RESIZE = {"just-resize": "Just Resize", "crop-and-resize": "Crop and Resize", "resize-and-fill": "Resize and Fill"}
A1111_FIELD = re.compile(r"ControlNet (\d+)")
GEN_FIELD = re.compile(r"gen ControlNet (\d+)")


def _number(v: float) -> str:
    return f"{float(v):g}"


def write(controls: list[dict], resize: str) -> dict:
    """The recipe fields of `controls` (dicts: module, model, image, weight, start, end, mode; paths resolved)."""
    out = {}
    for i, c in enumerate(controls):
        out[f"ControlNet {i}"] = (f"Module: {c['module']}, Model: {Path(c['model']).stem}, Weight: "
                                  f"{_number(c['weight'])}, Resize Mode: {A1111_RESIZE[resize]}, Guidance Start: "
                                  f"{_number(c['start'])}, Guidance End: {_number(c['end'])}")
        if c.get("mode") is not None:  # sd-webui-controlnet's and Forge's union field
            out[f"ControlNet {i}"] += f", Union Control Type: {c['mode']}"
        out[f"gen ControlNet {i}"] = json.dumps([c["model"], c["image"]])
    return out


def read(fields: dict, source: str) -> tuple[list[dict], str, list[str]]:
    """(controls, resize mode, names of ControlNets recorded without gen's file field) from a recipe's fields."""
    controls, resize, nameless = [], "just-resize", []
    for key in sorted((k for k in fields if A1111_FIELD.fullmatch(k)), key=lambda k: int(k.split()[1])):
        values = dict(part.split(": ", 1) for part in fields[key].split(", ") if ": " in part)
        try:
            c = dict(module=values.get("Module", "none"), weight=float(values.get("Weight", 1)),
                     start=float(values.get("Guidance Start", 0)), end=float(values.get("Guidance End", 1)),
                     mode=values.get("Union Control Type"))
        except ValueError:
            raise GenError(f"{source}: the field {key!r} is {fields[key]!r}, with a weight or guidance start/end "
                           "that is not a number") from None
        resize = {v: k for k, v in A1111_RESIZE.items()}.get(values.get("Resize Mode"), resize)
        files = fields.get(f"gen {key}")
        if files is None:
            nameless.append(values.get("Model", "?"))
            continue
        try:
            c["model"], c["image"] = json.loads(files)
        except (ValueError, TypeError):
            raise GenError(f"{source}: the field 'gen {key}' is {files!r}, not [MODEL, IMAGE]") from None
        controls.append(c)
    return controls, resize, nameless


def known(key: str) -> bool:
    """Whether a recipe field is one of these (so it is not named as unread)."""
    return bool(A1111_FIELD.fullmatch(key) or GEN_FIELD.fullmatch(key))
