"""Sampler names -> diffusers schedulers configured for the model's formulation."""

from __future__ import annotations

import inspect
import logging

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       HeunDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

from gen.errors import GenError
from gen.formulations import Formulation

log = logging.getLogger("gen")

# name -> (formulation kind, scheduler class, settings that define the sampler)
SAMPLERS = {
    "ddpm": ("ddpm", DDPMScheduler, {}),
    "ddim": ("ddpm", DDIMScheduler, {}),
    "pndm": ("ddpm", PNDMScheduler, {"skip_prk_steps": True}),
    "dpm++2m": ("ddpm", DPMSolverMultistepScheduler,
                {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpm++2m-karras": ("ddpm", DPMSolverMultistepScheduler,
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "euler": ("ddpm", EulerDiscreteScheduler, {}),
    "euler-a": ("ddpm", EulerAncestralDiscreteScheduler, {}),
    "heun": ("ddpm", HeunDiscreteScheduler, {}),
    "unipc": ("ddpm", UniPCMultistepScheduler, {}),
    "flow-euler": ("flow", FlowMatchEulerDiscreteScheduler, {}),
    "flow-heun": ("flow", FlowMatchHeunDiscreteScheduler, {}),
}

# Step spacing for folders gen creates (SD's convention; trailing when the schedule ends at SNR 0).
_DDPM_SPACING = dict(timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def names_for(kind: str) -> list[str]:
    return [n for n, (k, _, _) in SAMPLERS.items() if k == kind]


def check_sampler(name: str, formulation: Formulation) -> None:
    valid = names_for(formulation.kind)
    if name not in SAMPLERS:
        raise GenError(f"unknown sampler {name!r}; valid for this {formulation.kind} model: {', '.join(valid)}")
    if SAMPLERS[name][0] != formulation.kind:
        raise GenError(f"sampler {name!r} is for {SAMPLERS[name][0]} models, but this model is a "
                       f"{formulation.kind} model; valid: {', '.join(valid)}")


def check_schedule(scheduler, params: tuple[str, ...], why: str) -> None:
    """A one-line GenError where this scheduler's set_timesteps cannot take `params`, which the model's schedule
    needs (`why` says what), naming the samplers whose schedulers can."""
    def takes(cls) -> bool:
        return set(params) <= set(inspect.signature(cls.set_timesteps).parameters)

    if takes(type(scheduler)):
        return
    name, kind = next(((n, k) for n, (k, cls, _) in SAMPLERS.items() if cls is type(scheduler)),
                      (type(scheduler).__name__, "flow"))
    able = [n for n, (k, cls, _) in SAMPLERS.items() if k == kind and takes(cls)]
    raise GenError(f"sampler {name!r} cannot take {why}; samplers that can: {', '.join(able)}")


def make_scheduler(name: str, formulation: Formulation, base_config: dict | None = None):
    """A fresh scheduler: the folder's scheduler config (step spacing etc.), the formulation's maths,
    then the sampler's own settings, in that order of precedence."""
    check_sampler(name, formulation)
    _, cls, settings = SAMPLERS[name]
    if base_config is None:
        base_config = _DDPM_SPACING if formulation.kind == "ddpm" else {}
        if formulation.kind == "ddpm" and formulation.zero_terminal_snr:
            base_config = {**base_config, "timestep_spacing": "trailing", "steps_offset": 0}
    # Passed as kwargs so that diffusers' from_config still drops the source's unset defaults
    # (`_use_default_values`), exactly as `NewScheduler.from_config(pipe.scheduler.config)` does.
    return cls.from_config(base_config, **{**formulation.scheduler_config(), **settings})


def default_sampler(formulation: Formulation) -> str:
    return "flow-euler" if formulation.kind == "flow" else "dpm++2m"


def sampler_name(scheduler_config: dict, formulation: Formulation) -> str | None:
    """The table name of a folder's scheduler; None where gen has no sampler for it (LCMScheduler, TCDScheduler,
    ...: the caller says which it uses instead)."""
    cls_name = scheduler_config.get("_class_name")
    if cls_name == "DPMSolverMultistepScheduler":
        return "dpm++2m-karras" if scheduler_config.get("use_karras_sigmas") else "dpm++2m"
    for name, (kind, cls, _) in SAMPLERS.items():
        if cls.__name__ == cls_name and kind == formulation.kind:
            return name
    return None


# gen's sampler -> the name AUTOMATIC1111 and Forge give the same algorithm in a PNG's `Sampler:` field
# (A1111's modules/sd_samplers_kdiffusion.py and sd_samplers_timesteps.py), with the fields it needs there.
A1111_SAMPLERS = {
    "ddpm": ("DDIM", {"Eta DDIM": 1}),  # DDIM at eta 1 is DDPM's ancestral step (Song et al. 2021, sec. 4.1)
    "ddim": ("DDIM", {}),
    "pndm": ("PLMS", {}),  # PNDM without its Runge-Kutta warm-up (skip_prk_steps) is PLMS
    "dpm++2m": ("DPM++ 2M", {}),
    "dpm++2m-karras": ("DPM++ 2M", {}),  # Karras is its `Schedule type:`
    "euler": ("Euler", {}),
    "euler-a": ("Euler a", {}),
    "heun": ("Heun", {}),
    "unipc": ("UniPC", {}),
    "flow-euler": ("Euler", {}),  # Forge's names for the same steps on flow models
    "flow-heun": ("Heun", {}),
}
# A1111's samplers that step over timesteps and ignore `Schedule type:`; its others take one, and an absent
# one means the sampler's own default (Karras for DPM++ 2M), so gen always writes it for them.
A1111_TIMESTEP_SAMPLERS = ("DDIM", "PLMS", "UniPC")
_SIGMA_FLAGS = (("use_karras_sigmas", "Karras"), ("use_exponential_sigmas", "Exponential"), ("use_beta_sigmas", "Beta"))


def a1111_fields(name: str, formulation: Formulation, base_config: dict | None = None) -> dict:
    """`Sampler:` and, where A1111 reads one, `Schedule type:` (modules/sd_schedulers.py labels) for a sampler
    as gen configures it: Karras/Exponential/Beta sigmas by name, evenly spaced timesteps as Uniform (SGM Uniform
    where spacing is trailing), a flow model's shifted linear sigmas as Simple."""
    check_sampler(name, formulation)
    label, extra = A1111_SAMPLERS[name]
    fields = {"Sampler": label}
    if label not in A1111_TIMESTEP_SAMPLERS:
        config = make_scheduler(name, formulation, base_config).config
        flagged = [text for key, text in _SIGMA_FLAGS if config.get(key)]
        spacing = "SGM Uniform" if config.get("timestep_spacing") == "trailing" else "Uniform"
        fields["Schedule type"] = flagged[0] if flagged else "Simple" if formulation.kind == "flow" else spacing
    return fields | extra


def from_a1111(sampler: str, schedule: str | None, eta_ddim: float, kind: str) -> str:
    """gen's sampler for an A1111 `Sampler:` / `Schedule type:` / `Eta DDIM:` (old names such as
    "DPM++ 2M Karras" carry the schedule in the name, as before A1111 1.9)."""
    if sampler.endswith(" Karras"):
        sampler, schedule = sampler[:-len(" Karras")], "Karras"
    found = [n for n, (label, _) in A1111_SAMPLERS.items() if label == sampler and SAMPLERS[n][0] == kind]
    if not found:
        raise GenError(f"the recipe's sampler {sampler!r} has no counterpart in gen for a {kind} model; "
                       f"pass --sampler NAME ({', '.join(names_for(kind))})")
    if sampler == "DPM++ 2M" and schedule in (None, "Automatic", "Karras"):  # Karras is its default
        return "dpm++2m-karras"
    name = ("ddpm" if eta_ddim == 1 else "ddim") if sampler == "DDIM" else found[0]
    evenly_spaced = (None, "Automatic", "Uniform", "SGM Uniform", "Simple")
    if sampler not in A1111_TIMESTEP_SAMPLERS and schedule not in evenly_spaced:
        log.warning("the recipe's schedule type %s is not gen's: %s uses the model's timestep spacing", schedule, name)
    return name
