"""The samplers added after the first set (deis, unipc bh2/bh1, tcd, restart, euler/dpm++2m cfg++, res_multistep,
er_sde): parity with diffusers' schedulers where diffusers has them, on the tiny SD-1.x model of test_ksampling
(max abs difference <= 1e-4 on [0, 1] images); for the rest, Gaussian data, whose denoiser and probability-flow
ODE solution are known exactly, for epsilon, v and flow models; and the pipeline path on tiny SD-1.x and Flux."""

import math

import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler, TCDScheduler, UniPCMultistepScheduler

from gen.formulations import DDPM, Flow
from gen.sampling import k, names, schedules
from gen.samplers import folder_defaults
from gen.sampling.model import Denoiser, GeneratorNoise
from tests.conftest import quiet_pipeline
from tests.test_ksampling import GUIDANCE, PROMPT, SEED, SIZE, STEPS, TOL, decoded, diffusers_start, guided
from tests.test_ksampling import ours, theirs  # noqa: F401  (module fixtures: the tiny SD-1.x pipelines)

KW = dict(guidance_scale=GUIDANCE, height=SIZE, width=SIZE)


@pytest.mark.parametrize("fn,cls,settings", [
    (k.unipc, UniPCMultistepScheduler, dict(solver_order=3)),
    # bh1 ending at sigma 0 is NaN in diffusers 0.42 (its B(h) = h is infinite there): it ends on sigma_min here
    (k.unipc_bh1, UniPCMultistepScheduler, dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")),
    (k.deis, DEISMultistepScheduler, dict(solver_order=3)),
], ids=["unipc-bh2", "unipc-bh1", "deis"])
def test_multistep_solvers_equal_diffusers_on_karras_sigmas(theirs, ours, fn, cls, settings):  # noqa: F811
    """gen's function over diffusers' own Karras sigmas (ending on sigma_min, repeated, the last step stays there)."""
    theirs.scheduler = cls.from_config(theirs.folder_scheduler_config, timestep_spacing="linspace",
                                       use_karras_sigmas=True, **settings)
    g, latents = diffusers_start(theirs, True)
    ref = theirs(PROMPT, num_inference_steps=STEPS, generator=g, latents=latents, output_type="latent", **KW).images
    ms = guided(theirs, ours)
    sigmas = theirs.scheduler.sigmas.float()
    assert torch.allclose(sigmas[:STEPS], schedules.karras(ms, STEPS)[:STEPS], rtol=1e-5)
    x = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(SEED)) * sigmas[0]
    with torch.no_grad():
        got = fn(ms, x, sigmas, None) / (sigmas[-1] ** 2 + 1) ** 0.5  # the VE x back to diffusers' x_t
    diff = float((decoded(theirs, ref) - decoded(theirs, got)).abs().max())
    print(f"parity sd {fn.__name__} karras vs {cls.__name__} {settings}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_unipc_through_the_pipeline_equals_diffusers(theirs, ours):  # noqa: F811
    """`--sampler unipc --scheduler karras` (bh2, order 3) is diffusers' pipeline with that UniPC scheduler."""
    theirs.scheduler = UniPCMultistepScheduler.from_config(theirs.folder_scheduler_config, solver_order=3,
                                                           timestep_spacing="linspace", use_karras_sigmas=True)
    g, latents = diffusers_start(theirs, True)
    ref = theirs(PROMPT, num_inference_steps=STEPS, generator=g, latents=latents, output_type="np", **KW).images[0]
    got = ours(PROMPT, num_inference_steps=STEPS, seed=SEED, sampler="uni_pc_bh2", schedule="karras",
               output_type="np", **KW).images[0]
    diff = float(np.abs(ref - got).max())
    print(f"parity sd unipc karras (pipeline) vs UniPCMultistepScheduler: max abs diff {diff:.2e}")
    assert ref.std() > 0.01 and diff <= TOL


def test_four_step_tcd_equals_diffusers_pipeline(theirs, ours):  # noqa: F811
    """TCD (gamma 0.3, its noise from the image's generator) on the lcm schedule, 4 steps, from the seed alone."""
    theirs.scheduler = TCDScheduler.from_config(theirs.folder_scheduler_config)
    kw = dict(num_inference_steps=4, output_type="np", **KW)
    ref = theirs(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), eta=0.3, **kw).images[0]
    got = ours(PROMPT, seed=SEED, sampler="tcd", schedule="lcm", **kw).images[0]
    eta0 = theirs(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), eta=0.0, **kw).images[0]
    diff = float(np.abs(ref - got).max())
    print(f"parity sd 4-step tcd lcm vs TCDScheduler: max abs diff {diff:.2e}")
    assert ref.std() > 0.01 and diff <= TOL < float(np.abs(eta0 - got).max())


@pytest.mark.parametrize("scale", [GUIDANCE, 0.56], ids=["cfg", "below-1"])
def test_cfg_pp_samplers_step_along_the_unconditional_prediction(theirs, ours, scale):  # noqa: F811
    """gen's pipeline hands the CFG batch's unconditional half to the CFG++ samplers: its image is the one
    euler_cfg_pp gives with diffusers' UNet and text encoder wired by hand, and not Euler's. Also at CFG++'s own
    scales below 1 (A1111's CFG 7 / 12.5), where plain CFG would skip the unconditional pass: CFG++ still needs it."""
    cond, uncond = theirs.encode_prompt(PROMPT, "cpu", 1, True)
    emb = torch.cat([uncond, cond])
    ms = Denoiser(None, ours.formulation)

    def predict(x, t):
        u, c = theirs.unet(torch.cat([x] * 2), t, encoder_hidden_states=emb).sample.chunk(2)
        ms.keep_uncond(u)
        return u + scale * (c - u)

    ms.predict = predict
    sigmas = schedules.karras(ms, STEPS)
    side = SIZE // theirs.vae_scale_factor
    x = torch.randn((1, 4, side, side), generator=torch.Generator("cpu").manual_seed(SEED)) * sigmas[0]
    with torch.no_grad():
        ref = decoded(theirs, k.euler_cfg_pp(ms, x, sigmas, None)).permute(0, 2, 3, 1)[0].numpy()
    run = dict(num_inference_steps=STEPS, seed=SEED, schedule="karras", output_type="np", height=SIZE, width=SIZE,
               guidance_scale=scale)
    got = ours(PROMPT, sampler="euler_cfg_pp", **run).images[0]
    euler = ours(PROMPT, sampler="euler", **run).images[0]
    diff = float(np.abs(ref - got).max())
    print(f"euler cfg++ through the pipeline vs by hand: max abs diff {diff:.2e}; "
          f"vs euler {float(np.abs(euler - got).max()):.2e}")
    assert diff <= TOL < float(np.abs(euler - got).max())


S = 0.5  # Gaussian data N(0, S^2): D(x, sigma) and the probability-flow ODE's solution are known exactly


def gaussian(formulation) -> Denoiser:
    """The exact denoiser of N(0, S^2) data, as a model's epsilon, v or flow-velocity output."""
    ms = Denoiser(None, formulation)

    def predict(x_in, t):
        if ms.kind == "flow":
            s = (t / ms.T).to(x_in)
            return (x_in - (1 - s) * S ** 2 * x_in / ((1 - s) ** 2 * S ** 2 + s ** 2)) / s
        s = ms.sigma(t).to(x_in)
        c = (s * s + 1).rsqrt()
        x = x_in / c
        d = x * S ** 2 / (S ** 2 + s ** 2)
        return (x - d) / s if ms.prediction == "epsilon" else (x * c ** 2 - d) / (s * c)

    ms.predict = predict
    return ms


FORMULATIONS = [DDPM(), DDPM(prediction_type="v_prediction"), Flow(shift=3.0)]
ODE = [k.deis, k.unipc, k.unipc_bh1, k.res_multistep, k.dpmpp_2m_cfg_pp]
SDE = [k.er_sde, k.restart]


@pytest.fixture(scope="module", params=FORMULATIONS, ids=["eps", "v", "flow"])
def gaussian_run(request):
    """(denoiser, 30 sigmas, starting x, the ODE's exact end, Euler's error)."""
    ms = gaussian(request.param)
    sigmas = schedules.karras(ms, 30) if ms.kind == "ddpm" else schedules.simple(ms, 30)
    x = torch.randn(4096, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    exact = x * S / (S ** 2 + float(sigmas[0]) ** 2) ** 0.5 if ms.kind == "ddpm" else x * S
    return ms, sigmas, x, exact, float((k.euler(ms, x, sigmas, None) - exact).abs().max())


@pytest.mark.parametrize("fn", ODE, ids=[f.__name__ for f in ODE])
def test_ode_samplers_solve_the_gaussian_ode_better_than_euler(gaussian_run, fn):
    """Higher-order solvers end within a quarter of Euler's error of the exact solution (without an unconditional
    pass, dpm++2m cfg++ is dpm++2m)."""
    ms, sigmas, x, exact, euler_err = gaussian_run
    err = float((fn(ms, x, sigmas, None) - exact).abs().max())
    print(f"gaussian {ms.kind}/{ms.prediction} {fn.__name__}: max error {err:.2e} (euler {euler_err:.2e})")
    assert err < euler_err / 4


@pytest.mark.parametrize("fn", SDE, ids=[f.__name__ for f in SDE])
def test_stochastic_samplers_draw_the_gaussian(gaussian_run, fn):
    """The SDE and restart samplers end at N(0, S^2) (std within 4%), far from their starting noise."""
    ms, sigmas, x, exact, _ = gaussian_run
    got = fn(ms, x, sigmas, GeneratorNoise(x, torch.Generator().manual_seed(1)))
    print(f"gaussian {ms.kind}/{ms.prediction} {fn.__name__}: std {float(got.std()):.4f} (data {S})")
    assert abs(float(got.std()) - S) < 0.04 * S and float((got - exact).abs().max()) > 0.1


@pytest.mark.parametrize("fn", [k.unipc, k.deis, k.er_sde, k.tcd, k.restart], ids=lambda f: f.__name__)
def test_samplers_run_on_bfloat16_latents(fn):
    """fp16/bf16 models sample in their dtype: the coefficients stay float64 (linalg.solve takes no half floats)."""
    ms = gaussian(DDPM())
    sigmas = schedules.karras(ms, 8)
    x = torch.randn(256, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    ref = fn(ms, x, sigmas, GeneratorNoise(x, torch.Generator().manual_seed(1)))
    xb = x.bfloat16()
    got = fn(ms, xb, sigmas.bfloat16(), GeneratorNoise(xb, torch.Generator().manual_seed(1)))
    assert got.dtype == torch.bfloat16 and float((got.float() - ref).abs().max()) < 0.1


def test_euler_cfg_pp_without_an_unconditional_pass_is_euler(gaussian_run):
    ms, sigmas, x, _, _ = gaussian_run
    assert torch.allclose(k.euler_cfg_pp(ms, x, sigmas, None), k.euler(ms, x, sigmas, None), atol=1e-6)


@pytest.mark.parametrize("sampler,steps", [("er_sde", 6), ("Restart", 20)])
def test_stochastic_samplers_give_image_k_of_a_batch_as_seed_plus_k_alone(ours, sampler, steps):  # noqa: F811
    run = dict(num_inference_steps=steps, schedule="karras", sampler=sampler, output_type="np", height=16, width=16,
               guidance_scale=GUIDANCE)
    batch = ours(PROMPT, seed=SEED, num_images_per_prompt=2, **run).images
    alone = ours(PROMPT, seed=SEED + 1, **run).images[0]
    assert np.abs(batch[1] - alone).max() <= 1e-5 < np.abs(batch[0] - batch[1]).max()


NEW = ["deis", "unipc", "unipc-bh1", "tcd", "restart", "euler-cfg++", "dpm++2m-cfg++", "res-multistep", "er-sde"]


def test_every_new_sampler_samples_flux_and_the_ode_ones_agree_with_many_euler_steps(flux_folder):
    """Every new sampler by gen's name on tiny Flux. Flux takes no CFG batch at its default scale, but the CFG++ ones
    make the unconditional pass all the same (as ComfyUI's, disable_cfg1_optimization) and step along it: not their
    bases' images; the other ODE ones agree with many Euler steps."""
    pipe = quiet_pipeline(flux_folder)
    kw = dict(height=16, width=16, seed=SEED, output_type="np")
    ref = pipe(PROMPT, num_inference_steps=40, sampler="euler", **kw).images[0]
    euler_err = float(np.abs(pipe(PROMPT, num_inference_steps=8, sampler="euler", **kw).images[0] - ref).max())
    for name in NEW:
        got = pipe(PROMPT, num_inference_steps=8, sampler=name, **kw).images[0]
        err = float(np.abs(got - ref).max())
        print(f"flux {flux_folder.name} {name} 8 steps vs euler 40: max abs diff {err:.2e} (euler 8: {euler_err:.2e})")
        assert np.isfinite(got).all() and got.std() > 0.01
        if names.BY_NAME[name].cfg_pp:
            base = pipe(PROMPT, num_inference_steps=8, sampler=name.replace("-cfg++", ""), **kw).images[0]
            assert np.abs(got - base).max() > 1e-3  # equal to 1e-6 without the unconditional pass
        elif names.BY_NAME[name].fn in ODE:  # the tiny random transformer's ODE is nearly straight: Euler's order
            assert err < 2 * euler_err


def test_names_and_table():
    for name, fn in [("DEIS", k.deis), ("uni_pc", k.unipc_bh1), ("uni_pc_bh2", k.unipc), ("TCD", k.tcd),
                     ("Restart", k.restart), ("euler_cfg_pp", k.euler_cfg_pp), ("dpmpp_2m_cfg_pp", k.dpmpp_2m_cfg_pp),
                     ("res_multistep", k.res_multistep), ("er_sde", k.er_sde)]:
        s, _ = names.sampler(name)
        assert s.fn is fn and s.kinds == ("ddpm", "flow"), name
    table = names.table()
    assert all(n in table for n in ("uni_pc_bh2", "res_multistep", "er_sde", "Restart", "dpmpp_2m_cfg_pp"))
    assert names.from_a1111("Restart", "Automatic", 0.0, "ddpm") == ("restart", "karras")
    tcd_folder = folder_defaults({"_class_name": "TCDScheduler"}, DDPM())
    assert tcd_folder == dict(sampler="tcd", schedule="lcm", steps=4, guidance=1.0)
    assert math.isclose(float(schedules.karras_sigmas(3, 0.1, 10.0)[0]), 10.0, rel_tol=1e-6)


def test_dpm_fast_steps_a_flow_model_evenly_in_its_log_snr():
    """dpm-fast's steps on a flow model start at sigma_max and fall evenly in log((1 - sigma) / sigma), DPM-Solver's
    spacing, from -5 on (even in -log sigma, k-diffusion's, a flow model's sigma > 0.5 got 2 of 11 steps); an
    epsilon model's stay even in -log sigma (k-diffusion's, test_kdiffusion_parity)."""
    from gen.sampling import dpm_solver

    for formulation, even in [(Flow(shift=3.0), lambda s: ((1 - s) / s).log()), (DDPM(), lambda s: -s.log())]:
        ms, calls = gaussian(formulation), []

        def model(x, sigma, ms=ms):
            calls.append(float(sigma))
            return ms(x, sigma)

        model.kind = ms.kind
        sigmas = schedules.simple(ms, 30) if ms.kind == "flow" else schedules.karras(ms, 30)
        x = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        dpm_solver.dpm_fast(model, x, sigmas, None)
        starts = torch.tensor([calls[i] for i in list(range(0, 27, 3)) + [27, 29]], dtype=torch.float64)
        gaps = even(starts[1:]).diff() if ms.kind == "flow" else even(starts).diff()
        print(f"dpm-fast {ms.kind}: step starts {[round(float(s), 4) for s in starts]}")
        assert len(calls) == 30 and abs(starts[0] - float(sigmas[0])) < 1e-5
        assert float((gaps - gaps.mean()).abs().max()) < 1e-4 * float(gaps.mean().abs())
        if ms.kind == "flow":
            assert abs(float(even(starts[1:2])) - (-5 + float(gaps.mean()))) < 1e-4 and (starts > 0.5).sum() >= 5
