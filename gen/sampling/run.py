"""The pipeline's side of the k-diffusion-style samplers: which implementation a name and schedule take, the
sigmas for a model, and the sampling run (guidance through gen.guidance, noise per image)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from gen.errors import GenError
from gen.formulations import Formulation
from gen.guidance import guided_prediction
from gen.sampling import k, names, schedules
from gen.sampling.model import BrownianNoise, Denoiser, GeneratorNoise


def route(name: str, schedule: str | None, formulation: Formulation) -> tuple[str | None, names.Sampler, str]:
    """(gen.samplers' diffusers name, or None for the k-diffusion path; the Sampler; gen's schedule name).
    One-line GenErrors for unknown names and for what the formulation cannot take."""
    s, sched = names.sampler(name, schedule)
    names.check(s, sched, formulation.kind)
    if sched == "automatic" and formulation.kind in (s.diffusers or {}):
        return s.diffusers[formulation.kind], s, sched
    return None, s, sched


def sigmas(pipe, sched: str, steps: int, latents: torch.Tensor, ms: Denoiser) -> tuple[torch.Tensor, float]:
    """(sigmas, the initial noise's multiplier): the model's own schedule and diffusers' spacings from its Euler
    scheduler (so they equal diffusers'), the named ones from gen.sampling.schedules."""
    from gen.samplers import make_scheduler

    if sched == "automatic" or sched in names.SPACINGS:
        scheduler = make_scheduler("euler" if ms.kind == "ddpm" else "flow-euler", pipe.formulation,
                                   pipe.scheduler_config)
        if sched != "automatic":
            scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing=sched,
                                                    steps_offset=0 if sched == "trailing" else 1)
        scheduler.set_timesteps(**pipe.family.scheduler_kwargs(scheduler, steps, latents))
        out = scheduler.sigmas.float().cpu()
        return out, ms.noise_scale(float(out[0]), scheduler.config.get("timestep_spacing"))
    if ms.kind == "flow":  # the resolution-dependent shift (Flux) where the model's own schedule takes it
        scheduler = make_scheduler("flow-euler", pipe.formulation, pipe.scheduler_config)
        mu = pipe.family.scheduler_kwargs(scheduler, steps, latents).get("mu")
        if mu is not None and scheduler.config.get("use_dynamic_shifting"):
            ms.set_shift(mu if scheduler.config.get("time_shift_type") == "linear" else math.exp(mu))
    fn = schedules.SCHEDULES[sched]
    if fn in (schedules.align_your_steps, schedules.align_your_steps_comfyui):
        out = fn(ms, steps, "sdxl" if pipe.family.name == "sdxl" else "sd1")
    else:  # an LCMScheduler folder's distillation steps
        extra = (pipe.scheduler_config or {}).get("original_inference_steps") if fn is schedules.lcm else None
        out = fn(ms, steps) if extra is None else fn(ms, steps, extra)
    # the lcm schedule is LCMScheduler's, whose x_T is the N(0, 1) noise itself: sqrt(sigma^2 + 1) noise here
    return out, ms.noise_scale(float(out[0]), None if sched == "lcm" else "named")


def noise_for(s: names.Sampler, x: torch.Tensor, sig: torch.Tensor, generators, seeds: list[int]):
    """The sampler's noise: a Brownian tree per image (seeded with the image's seed) for SDE samplers, the
    images' own generators for ancestral ones."""
    kind = k.NOISE.get(s.fn)
    if kind == "sde":
        return BrownianNoise(x, float(sig[sig > 0].min()), float(sig.max()), seeds)
    return GeneratorNoise(x, generators) if kind else None


def tree_seeds(generators, seeds: list[int], n: int) -> list[int]:
    """Each image's seed (its generator's initial seed where the caller passed generators)."""
    if seeds:
        return list(seeds)
    gens = generators if isinstance(generators, list) else [generators] * n
    return [g.initial_seed() for g in gens]


def prepare(pipe, sched: str, steps: int, latents: torch.Tensor, img2img: bool) -> tuple[Denoiser, torch.Tensor, float]:
    """(the model wrapper, its sigmas, the initial noise's multiplier), before any encoding (it may refuse)."""
    if img2img:
        raise GenError("img2img and inpainting take the diffusers-scheduler samplers for now (euler, euler-a, heun, "
                       "dpm++2m, ddim, ... on the model's own schedule): leave --scheduler out or pick one of those")
    ms = Denoiser(None, pipe.formulation)
    return (ms, *sigmas(pipe, sched, steps, latents, ms))


def run(s: names.Sampler, plan, predict, latents, cond, both, scale, rescale, interval, skip_layers, generators,
        seeds, progress_bar) -> torch.Tensor:
    """gen.samplers.denoise's counterpart for the k-diffusion-style samplers: the same guided prediction (step i is
    the sampler's step, whatever number of model calls it takes)."""
    ms, sig, noise_scale = plan
    n = len(sig) - 1
    ms.predict = lambda x, t: guided_prediction(predict, x, t, ms.step, n, cond, both, scale, rescale, interval,
                                                skip_layers, keep_uncond=ms.keep_uncond)
    return sample(s, ms, latents, sig, noise_scale, generators, seeds, progress_bar)


def sample(s: names.Sampler, ms: Denoiser, latents: torch.Tensor, sig: torch.Tensor, noise_scale: float,
           generators, seeds: list[int], progress_bar: dict | None = None) -> torch.Tensor:
    """Runs sampler `s` over `sig` from N(0, 1) `latents`; `ms` wraps the guided prediction."""
    sig = sig.to(latents.device)
    x = latents * noise_scale
    noise = noise_for(s, x, sig.cpu(), generators, tree_seeds(generators, seeds, x.shape[0]))
    bar = tqdm(total=len(sig) - 1, **({"desc": "sampling", "leave": False, **progress_bar}
                                      if progress_bar is not None else {"disable": True}))

    def step(i, _):
        ms.step = i + 1
        bar.update()

    ms.step = 0
    with bar:
        return s.fn(ms, x, sig.to(latents.dtype), noise, callback=step)
