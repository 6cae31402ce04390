"""gen.sampling's samplers and schedules against diffusers' schedulers with the same settings, on tiny random
SD-1.x, SDXL and Flux models: max abs difference <= 1e-4 on [0, 1] images. (k-diffusion's package is not the
reference here: its import pulls clean-fid, kornia, wandb, torchvision and more.)

Starting noise: gen's named schedules start at noise * sigma_max (k-diffusion's and A1111's convention), which is
diffusers' init_noise_sigma for "linspace" spacing; diffusers' DPM-Solver schedulers work on x_t = sqrt(abar) x, where
that start is noise * sigma_max / sqrt(sigma_max^2 + 1): given as their latents, drawn from the same generator."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, DPMSolverSDEScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FluxPipeline, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)

from gen.sampling import k, schedules
from gen.sampling.model import BrownianNoise, Denoiser, GeneratorNoise
from tests.conftest import diffusers_pipeline, quiet_pipeline

PROMPT, SEED, STEPS, GUIDANCE, SIZE = "a red circle", 3, 5, 4.0, 32
TOL = 1e-4


@pytest.fixture(scope="module")
def theirs(sd_folder):
    return diffusers_pipeline(StableDiffusionPipeline, sd_folder)


@pytest.fixture(scope="module")
def ours(sd_folder):
    return quiet_pipeline(sd_folder)


def diffusers_start(pipe, vp: bool):
    """The generator after it drew the starting noise, and that noise as diffusers' latents for gen's start."""
    g = torch.Generator("cpu").manual_seed(SEED)
    noise = torch.randn((1, 4, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor), generator=g)
    if not vp:  # init_noise_sigma (sigma_max with linspace spacing) is applied by the pipeline
        return g, noise
    s = pipe.scheduler
    s.set_timesteps(STEPS)
    sigma = float(s.sigmas[0])
    return g, noise * sigma / (sigma ** 2 + 1) ** 0.5


# (gen's sampler, gen's schedule, diffusers' scheduler, its settings): each with timestep_spacing="linspace", whose
# timesteps run from T - 1 to 0 as the named schedules' sigmas run from sigma_max to sigma_min
SD_CASES = [
    ("euler", "karras", EulerDiscreteScheduler, dict(use_karras_sigmas=True)),  # dpm++2m with exponential sigmas
    # has none: DPMSolverMultistep rounds its timesteps to integers; diffusers' beta sigmas are Beta quantiles of
    # sigma, not of the timestep as ComfyUI's and A1111's (and gen's) beta schedule
    ("euler", "exponential", EulerDiscreteScheduler, dict(use_exponential_sigmas=True)),
    ("euler", "normal", EulerDiscreteScheduler, {}),
    ("euler-a", "normal", EulerAncestralDiscreteScheduler, {}),
    ("heun", "karras", HeunDiscreteScheduler, dict(use_karras_sigmas=True)),
    ("dpm2", "karras", KDPM2DiscreteScheduler, dict(use_karras_sigmas=True)),
    ("dpm2-a", "karras", KDPM2AncestralDiscreteScheduler, dict(use_karras_sigmas=True)),
    ("lms", "karras", LMSDiscreteScheduler, dict(use_karras_sigmas=True)),
    ("dpm++2m", "karras", DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    ("dpm++sde", "karras", DPMSolverSDEScheduler, dict(use_karras_sigmas=True, noise_sampler_seed=SEED)),
]


@pytest.mark.parametrize("sampler,schedule,cls,settings", SD_CASES, ids=[f"{a}-{b}" for a, b, _, _ in SD_CASES])
def test_sd_sampler_and_schedule_equal_diffusers(theirs, ours, sampler, schedule, cls, settings):
    theirs.scheduler = cls.from_config(theirs.folder_scheduler_config, timestep_spacing="linspace", **settings)
    g, latents = diffusers_start(theirs, cls is DPMSolverMultistepScheduler)
    ref = theirs(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, generator=g,
                 latents=latents, output_type="np").images[0]
    got = ours(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, seed=SEED,
               sampler=sampler, schedule=schedule, output_type="np").images[0]
    diff = float(np.abs(ref - got).max())
    print(f"parity sd {sampler} {schedule} vs {cls.__name__}: max abs diff {diff:.2e}")
    # dpm++sde: 1.38e-4, not a maths difference (see the test below): diffusers accumulates the beta schedule's
    # cumprod in float32, gen (as LDM's and A1111's alphas_cumprod) in float64, so sigma_max is 2.6e-7 apart, and a
    # Brownian tree's increments move by ~sqrt of the change in their ends (~2e-3 in the noise)
    assert ref.std() > 0.01 and diff <= (1.5e-4 if sampler == "dpm++sde" else TOL)


def guided(pipe, ours):
    """gen's Denoiser over diffusers' UNet and text encoder with classifier-free guidance, as the pipeline runs it."""
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    emb = torch.cat([uncond, cond])

    def predict(x, t):
        u, c = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=emb).sample.chunk(2)
        return u + GUIDANCE * (c - u)

    return Denoiser(predict, ours.formulation)


def decoded(pipe, latents):
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


# The SDE samplers given diffusers' noise: DPMSolverMultistep draws N(0, I) from the generator at each step
SDE_CASES = [
    (k.dpmpp_2m_sde, dict(algorithm_type="sde-dpmsolver++")),
    (k.dpmpp_2m_sde_heun, dict(algorithm_type="sde-dpmsolver++", solver_type="heun")),
    # none for dpm++3m-sde: diffusers' third-order SDE step is not k-diffusion's (0.165 apart)
]


@pytest.mark.parametrize("fn,settings", SDE_CASES, ids=[fn.__name__ for fn, _ in SDE_CASES])
def test_sde_samplers_with_diffusers_noise_equal_diffusers(theirs, ours, fn, settings):
    theirs.scheduler = DPMSolverMultistepScheduler.from_config(
        theirs.folder_scheduler_config, timestep_spacing="linspace", use_karras_sigmas=True, **settings)
    g, latents = diffusers_start(theirs, True)
    ref = theirs(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, generator=g,
                 latents=latents, output_type="latent").images
    ms = guided(theirs, ours)
    sigmas = schedules.karras(ms, STEPS)
    assert torch.allclose(sigmas, theirs.scheduler.sigmas.float(), rtol=1e-5)  # the same Karras schedule
    g = torch.Generator("cpu").manual_seed(SEED)
    x = torch.randn(latents.shape, generator=g) * sigmas[0]
    with torch.no_grad():
        got = fn(ms, x, sigmas, GeneratorNoise(x, g))
    diff = float((decoded(theirs, ref) - decoded(theirs, got)).abs().max())
    print(f"parity sd {fn.__name__} karras vs DPMSolverMultistep {settings}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_dpmpp_sde_on_diffusers_sigma_table_equals_diffusers(theirs, ours):
    """dpm++sde is DPMSolverSDEScheduler's maths: on diffusers' own float32-cumprod sigma table (whose sigmas the
    Brownian tree is sampled at), gen's sampler function and noise give diffusers' image to 1e-4."""
    theirs.scheduler = DPMSolverSDEScheduler.from_config(theirs.folder_scheduler_config, timestep_spacing="linspace",
                                                         use_karras_sigmas=True, noise_sampler_seed=SEED)
    g, latents = diffusers_start(theirs, False)
    ref = theirs(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, generator=g,
                 latents=latents, output_type="latent").images
    ms = guided(theirs, ours)
    abar = theirs.scheduler.alphas_cumprod
    assert not torch.equal(abar, ours.formulation.alphas_cumprod)  # the float32 cumprod is another table
    ms.sigmas = ((1 - abar) / abar).sqrt().double()
    ms.log_sigmas = ms.sigmas.log()
    sigmas = schedules.karras(ms, STEPS)
    assert torch.equal(sigmas, torch.cat([theirs.scheduler.sigmas[::2], torch.zeros(1)]))  # diffusers' karras
    x = latents * sigmas[0]
    with torch.no_grad():
        got = k.dpmpp_sde(ms, x, sigmas, BrownianNoise(x, float(sigmas[-2]), float(sigmas[0]), [SEED]))
    diff = float((decoded(theirs, ref) - decoded(theirs, got)).abs().max())
    print(f"parity sd dpmpp_sde karras on diffusers' sigma table: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_flux_euler_on_the_simple_schedule_equals_diffusers(flux_folder):
    """On Flux, the simple schedule (every T/n-th sigma of the table, shifted by exp(mu) for the image size) is
    FluxPipeline's own, through gen's sampler functions rather than diffusers' scheduler."""
    theirs = diffusers_pipeline(FluxPipeline, flux_folder)
    sampler = "euler"
    ours = quiet_pipeline(flux_folder)
    guidance = 3.5 if ours.denoiser.config.guidance_embeds else None
    ref = theirs(PROMPT, num_inference_steps=4, guidance_scale=guidance or 0.0, height=16, width=16,
                 generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    got = ours(PROMPT, num_inference_steps=4, guidance_scale=guidance, height=16, width=16, seed=SEED,
               sampler=sampler, schedule="simple", output_type="np").images[0]
    diff = float(np.abs(ref - got).max())
    print(f"parity flux {flux_folder.parent.name} {sampler} simple: max abs diff {diff:.2e}")
    assert ref.std() > 0.01 and diff <= TOL


SDXL_CASES = [("euler", "karras", EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
              ("dpm++2m", "karras", DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
              ("dpm2-a", "karras", KDPM2AncestralDiscreteScheduler, dict(use_karras_sigmas=True))]


@pytest.mark.parametrize("sampler,schedule,cls,settings", SDXL_CASES, ids=[a for a, _, _, _ in SDXL_CASES])
def test_sdxl_sampler_and_schedule_equal_diffusers(sdxl_folder, sampler, schedule, cls, settings):
    theirs = diffusers_pipeline(StableDiffusionXLPipeline, sdxl_folder)
    theirs.scheduler = cls.from_config(theirs.folder_scheduler_config, timestep_spacing="linspace", **settings)
    g, latents = diffusers_start(theirs, cls is DPMSolverMultistepScheduler)
    ref = theirs(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, generator=g,
                 latents=latents, output_type="np").images[0]
    got = quiet_pipeline(sdxl_folder)(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                                      width=SIZE, seed=SEED, sampler=sampler, schedule=schedule,
                                      output_type="np").images[0]
    diff = float(np.abs(ref - got).max())
    print(f"parity sdxl {sampler} {schedule} vs {cls.__name__}: max abs diff {diff:.2e}")
    assert ref.std() > 0.01 and diff <= TOL


@pytest.mark.parametrize("sampler,schedule,cls,settings", [
    ("lcm", "lcm", LCMScheduler, {}),
    ("euler", "trailing", EulerDiscreteScheduler, dict(timestep_spacing="trailing")),
    ("euler-a", "trailing", EulerAncestralDiscreteScheduler, dict(timestep_spacing="trailing")),
], ids=["lcm", "euler-trailing", "euler-a-trailing"])
def test_four_step_samplers_equal_diffusers_pipeline(theirs, ours, sampler, schedule, cls, settings):
    """Few-step sampling (LCM, SDXL-Lightning/Hyper-SD's trailing Euler) from the seed alone, as diffusers runs it."""
    theirs.scheduler = cls.from_config(theirs.folder_scheduler_config, **settings)
    kw = dict(num_inference_steps=4, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="np")
    ref = theirs(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    got = ours(PROMPT, seed=SEED, sampler=sampler, schedule=schedule, **kw).images[0]
    diff = float(np.abs(ref - got).max())
    print(f"parity sd 4-step {sampler} {schedule} vs {cls.__name__}: max abs diff {diff:.2e}")
    assert ref.std() > 0.01 and diff <= TOL


def test_an_lcm_scheduler_folder_samples_as_diffusers_pipeline_with_it(sd_folder, tmp_path, caplog):
    """A folder saved with an LCMScheduler (an LCM-LoRA fused in) defaults to gen's lcm sampler on the lcm schedule
    (the folder's original_inference_steps) at 4 steps, guidance 1, without a warning: diffusers' image with that
    scheduler; gen's save keeps the scheduler."""
    pipe = diffusers_pipeline(StableDiffusionPipeline, sd_folder)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=25)
    pipe.save_pretrained(tmp_path / "lcm")
    with caplog.at_level(logging.WARNING, logger="gen"):
        ours = quiet_pipeline(tmp_path / "lcm")
    assert not caplog.records, caplog.text
    d = ours.defaults
    assert (d["sampler"], d["schedule"], d["steps"], d["guidance"]) == ("lcm", "lcm", 4, 1.0)
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="np",
               generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    got = ours(PROMPT, height=SIZE, width=SIZE, seed=SEED, output_type="np").images[0]
    other = ours(PROMPT, height=SIZE, width=SIZE, seed=SEED, output_type="np", schedule="normal").images[0]
    diff = float(np.abs(ref - got).max())
    print(f"parity sd LCMScheduler folder (lcm, 4 steps, guidance 1): max abs diff {diff:.2e}, "
          f"on the normal schedule {float(np.abs(ref - other).max()):.2e}")
    assert ref.std() > 0.01 and diff <= TOL < float(np.abs(ref - other).max())
    ours.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "LCMScheduler" and saved["original_inference_steps"] == 25
