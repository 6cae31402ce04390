"""The maths shared by training and sampling, one module per objective; the single owner of time
conventions. A formulation also states the diffusers scheduler config that samples it."""

from __future__ import annotations

from dataclasses import fields

from gen.errors import GenError
from gen.formulations.ddpm import DDPM
from gen.formulations.flow import Flow

Formulation = DDPM | Flow
FORMULATIONS = {"ddpm": DDPM, "flow": Flow}


def to_dict(f: Formulation) -> dict:
    return {"type": f.kind, **{x.name: getattr(f, x.name) for x in fields(f) if x.init}}


def from_dict(d: dict) -> Formulation:
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in FORMULATIONS:
        raise GenError(f"unknown formulation type {kind!r}; expected one of {sorted(FORMULATIONS)}")
    try:
        return FORMULATIONS[kind](**d)
    except TypeError as e:
        raise GenError(f"bad {kind} formulation settings: {e}") from None


def from_scheduler_config(cfg: dict) -> Formulation:
    """Reads the objective off a diffusers scheduler config (for folders that gen did not write)."""
    # A live scheduler's config has no _class_name; flow schedulers have a shift and no betas.
    if "FlowMatch" in cfg.get("_class_name", "") or ("shift" in cfg and "beta_start" not in cfg):
        return Flow(shift=cfg.get("shift", 1.0), num_train_timesteps=cfg.get("num_train_timesteps", 1000))
    return DDPM(prediction_type=cfg.get("prediction_type", "epsilon"),
                beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
                beta_start=cfg.get("beta_start", 0.00085), beta_end=cfg.get("beta_end", 0.012),
                num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)))
