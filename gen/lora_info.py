"""`gen info` for a LoRA file: its layout, adapted layers per component, rank, alpha, base model and recipe."""

from __future__ import annotations

import re
from pathlib import Path

from gen.lora_formats import LoraFile, is_text, num, read


def base_of(metadata: dict) -> str:
    for key in ("gen.base_model", "ss_sd_model_name", "ss_base_model_version", "modelspec.architecture"):
        if metadata.get(key):
            return metadata[key]
    return "not recorded"


def _spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{num(lo)}" if lo == hi else f"{num(lo)}..{num(hi)} (varies by layer)"


def _targets(lora: LoraFile) -> str:
    """Which kinds of layer are adapted: the distinct last parts of the layer names."""
    kinds = set()
    for layers in lora.factors.values():
        for name in layers:
            m = re.search(r"(?:^|[._])((?:self_|cross_)?attn\d?|ff|mlp|proj_in|proj_out)(?:[._]|$)", name)
            kinds.add(name[m.start(1):] if m else name)
    return ", ".join(sorted(kinds)[:12]) + (", ..." if len(kinds) > 12 else "")


def describe(path: str | Path) -> str:
    """`gen info` for a LoRA file: layout, targets, rank, alpha, base model and recipe from its header."""
    lora = read(path)
    every = [f for layers in lora.factors.values() for f in layers.values()]
    comps = sorted(lora.factors, key=lambda c: (is_text(c), c))  # the denoiser first
    parts = ", ".join(f"{(lora.prefixes.get(c) or c).rstrip('_')} {len(lora.factors[c])}" for c in comps)
    kind = " (DoRA)" if every[0].magnitude is not None else f" ({every[0].algo})" if hasattr(every[0], "algo") else ""
    lines = [f"LoRA file {path}", f"  layout: {lora.layout}{kind}",
             f"  targets: {len(every)} layers ({parts})", f"  layer kinds: {_targets(lora)}",
             f"  rank: {_spread([f.rank for f in every])}",
             f"  alpha: {_spread([f.rank if f.alpha is None else f.alpha for f in every])}"
             + ("" if any(f.alpha is not None for f in every) else " (not stored: alpha = rank)"),
             f"  scale alpha/rank: {_spread([round(f.scale, 6) for f in every])}",
             f"  base model: {base_of(lora.metadata)}"]
    if lora.metadata.get("gen.recipe"):
        lines.append(f"  recipe: {lora.metadata['gen.recipe'][:500]}")
    return "\n".join(lines)
