"""LyCORIS adapters: LoHa (Hadamard product, Hyeon-Woo et al. 2022) and LoKr (Kronecker product, Yeh et al. 2024)
as peft's own LoHa/LoKr layers, in the LyCORIS/kohya file layout that ComfyUI, A1111 and sd-scripts read.

    LoHa  dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / dim        keys <kohya name>.hada_w1_a ... .hada_w2_b, .alpha
    LoKr  dW = kron(w1, w2) * alpha / dim, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 likewise (lokr_w2...)

`dim` is the inner rank (w1_b's rows for LoHa; for LoKr the rank of a decomposed factor, w2's then w1's); a LoKr
whose two factors are both whole matrices has no rank and scale 1, as LyCORIS and ComfyUI compute it. peft names
its parameters as LyCORIS does (`hada_w1_a`, `lokr_w1`, ...) and scales by alpha / r, so a file's tensors become
the parameters of peft layers as they are, with r and alpha set to give the file's scale; a file of any LoKr
structure (whole or decomposed factors) loads, not only the ones peft would create.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gen.errors import GenError

ALGOS = ("loha", "lokr")
HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# kohya-layout key suffix -> the part's name (what Factor tensors are keyed by)
KOHYA_PARTS = {f".{name}": name for name in HADA + LOKR}
NETWORK_MODULE = "lycoris.kohya"  # ss_network_module of files LyCORIS' kohya wrapper writes


@dataclass
class LycorisFactor:
    """One LoHa/LoKr-adapted layer: its tensors by LyCORIS name, and alpha (None: scale 1)."""
    weights: dict[str, torch.Tensor]
    alpha: float | None = None
    magnitude = None  # never DoRA (keeps the LoRA Factor's surface for describe/write)

    @property
    def algo(self) -> str:
        return "loha" if "hada_w1_a" in self.weights else "lokr"

    @property
    def rank(self) -> int:
        w = self.weights
        if self.algo == "loha":
            return w["hada_w1_b"].shape[0]
        for key in ("lokr_w2_b", "lokr_w1_b"):  # LyCORIS' and ComfyUI's choice of dim
            if key in w:
                return w[key].shape[0]
        return 0  # both factors whole: no rank

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or not self.rank else self.alpha / self.rank

    def check(self, source: str, name: str) -> None:
        w, need = self.weights, []
        if self.algo == "loha":
            need = [k for k in HADA[:4] if k not in w]
        else:
            for f in ("w1", "w2"):
                if f"lokr_{f}" not in w and not {f"lokr_{f}_a", f"lokr_{f}_b"} <= set(w):
                    need.append(f"lokr_{f} (or lokr_{f}_a + lokr_{f}_b)")
        if need:
            raise GenError(f"{source}: layer {name!r} lacks {', '.join(need)}")

    def delta(self) -> torch.Tensor:
        """dW as a (out, in * k...) matrix, by LyCORIS' formula (linear layers and 1x1 convolutions; the tucker
        forms of k x k convolutions, hada_t1/lokr_t2, are peft's to compute)."""
        w = {k: v.float() for k, v in self.weights.items()}
        if self.algo == "loha":
            d = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        else:
            w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
            w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
            d = torch.kron(w1, w2.flatten(1))
        return d * self.scale


def adapter_config(algo: str, target_modules, rank: int, alpha: float | None = None):
    """peft's LoHaConfig / LoKrConfig for training (the second factor starts at zero: a fresh adapter changes
    nothing)."""
    from peft import LoHaConfig, LoKrConfig

    if algo not in ALGOS:
        raise GenError(f"unknown LyCORIS algorithm {algo!r}; choose from {', '.join(ALGOS)}")
    cls = LoHaConfig if algo == "loha" else LoKrConfig
    return cls(r=rank, alpha=rank if alpha is None else alpha, target_modules=target_modules)


def is_layer(m: nn.Module) -> bool:
    from peft.tuners.lycoris_utils import LycorisLayer

    return isinstance(m, LycorisLayer)


def extract_layer(m: nn.Module, adapter_name: str) -> LycorisFactor | None:
    """A peft LoHa/LoKr layer's adapter as a LycorisFactor (alpha so that alpha / rank is peft's scale)."""
    if adapter_name not in m._available_adapters:
        return None
    names = HADA if hasattr(m, "hada_w1_a") else LOKR
    weights = {n: getattr(m, n)[adapter_name].detach() for n in names if adapter_name in getattr(m, n)}
    f = LycorisFactor(weights)
    scale = m.alpha[adapter_name] / m.r[adapter_name]
    if not f.rank:  # whole factors carry no scale in the file: fold peft's into w1
        f.weights["lokr_w1"] = f.weights["lokr_w1"] * scale
    else:
        f.alpha = scale * f.rank
    return f


def shape_problem(f: LycorisFactor, layer: nn.Module) -> str | None:
    """A description when `f`'s dW cannot be `layer`'s weight update (element count and output size)."""
    w = layer.weight
    try:
        d = f.delta() if not {"hada_t1", "lokr_t2"} & set(f.weights) else None
    except RuntimeError as e:
        return f"its factors do not multiply ({str(e).splitlines()[0]})"
    if d is not None and (d.shape[0] != w.shape[0] or d.numel() != w.numel()):
        return f"{f.algo} update {tuple(d.shape)} but the layer's weight is {tuple(w.shape)}"
    return None


def inject(model: nn.Module, factors: dict[str, LycorisFactor], adapter_name: str) -> None:
    """Adds `factors` ({layer name in the model: LycorisFactor}, one algorithm) to `model` as peft adapter
    `adapter_name`: peft creates its layers, then each takes the file's tensors (and structure) and scale."""
    from peft import inject_adapter_in_model

    algos = {f.algo for f in factors.values()}
    if len(algos) > 1:
        raise GenError("a file mixing LoHa and LoKr layers in one model is not supported")
    inject_adapter_in_model(adapter_config(algos.pop(), sorted(factors), rank=1), model, adapter_name=adapter_name)
    for name, f in factors.items():
        layer = model.get_submodule(name)
        names = HADA if f.algo == "loha" else LOKR
        ref = layer.get_base_layer().weight
        for n in names:
            params = getattr(layer, n)
            if n in f.weights:
                params[adapter_name] = nn.Parameter(f.weights[n].to(ref.device, ref.dtype), requires_grad=False)
            elif adapter_name in params:
                del params[adapter_name]
        layer.r[adapter_name] = f.rank or 1
        layer.alpha[adapter_name] = f.scale * (f.rank or 1)
        layer.scaling[adapter_name] = f.scale
