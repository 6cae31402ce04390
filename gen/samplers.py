"""Sampler names -> diffusers schedulers configured for the model's formulation, and the sampling loop over them
(`denoise`; gen/sampling runs the k-diffusion-style samplers)."""

from __future__ import annotations

import inspect

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       HeunDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

from tqdm.auto import tqdm

from gen.errors import GenError
from gen.formulations import Formulation
from gen.guidance import SkipLayers, guided_prediction

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


def folder_defaults(scheduler_config: dict, formulation: Formulation) -> dict:
    """The sampling defaults a folder's scheduler sets: its sampler's name; for an LCMScheduler folder (an LCM-LoRA
    fused into the model), gen's lcm sampler on the lcm schedule at 4 steps and guidance 1 (no CFG), so its image is
    diffusers' StableDiffusionPipeline's with that scheduler at guidance <= 1; a TCDScheduler folder the same with
    gen's tcd (diffusers' TCD at eta 0.3); {} where gen has no sampler for it."""
    distilled = {"LCMScheduler": "lcm", "TCDScheduler": "tcd"}.get(scheduler_config.get("_class_name"))
    if distilled and formulation.kind == "ddpm":
        return dict(sampler=distilled, schedule="lcm", steps=4, guidance=1.0)
    name = sampler_name(scheduler_config, formulation)
    return {"sampler": name} if name else {}


def own_schedule(defaults: dict, sampler: str | None) -> str | None:
    """The folder's default schedule, which goes with its default sampler only (None: a sampler given)."""
    return defaults.get("schedule") if sampler is None else None


def saved_scheduler(name: str, formulation: Formulation, base_config: dict | None):
    """The scheduler a saved folder records for its default sampler; where that is one of gen.sampling's without a
    diffusers scheduler (an LCMScheduler folder's lcm), the folder's own scheduler."""
    if name not in SAMPLERS and base_config and base_config.get("_class_name"):
        import diffusers

        return getattr(diffusers, base_config["_class_name"]).from_config(base_config)
    return make_scheduler(name, formulation, base_config)


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


def denoise(predict, scheduler, latents: torch.Tensor, cond: dict, uncond_cond: dict | None, scale: float,
            rescale: float = 0.0, interval: tuple[float, float] = (0.0, 1.0), generator=None,
            progress_bar: dict | None = None, first: int = 0, after_step=None,
            skip_layers: SkipLayers | None = None) -> torch.Tensor:
    """The sampling loop: `predict(x, t, cond)` over the scheduler's timesteps from index `first` on (img2img),
    with CFG in one batched forward where `uncond_cond` (the negative and positive conditioning, concatenated)
    is given; `after_step(i, latents) -> latents` after each step (inpainting's blend); skip-layer guidance on
    the guided steps it covers (a third, conditional pass with `predict(..., skip_layers=...)`).
    `progress_bar`: tqdm keyword arguments for a bar over the steps (None: no bar)."""
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scale_input = getattr(scheduler, "scale_model_input", None)  # FlowMatch schedulers need none
    timesteps = scheduler.timesteps[first:]
    bar = {"desc": "sampling", "leave": False, **progress_bar} if progress_bar is not None else {"disable": True}
    for i, t in enumerate(tqdm(timesteps, **bar)):
        pred = guided_prediction(predict, latents, t, i, len(timesteps), cond, uncond_cond, scale, rescale, interval,
                                 skip_layers, scale_input)
        latents = scheduler.step(pred, t, latents, return_dict=False, **step_kwargs)[0]
        if after_step is not None:
            latents = after_step(first + i, latents)
    return latents
