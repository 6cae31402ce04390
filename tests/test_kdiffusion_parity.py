"""gen.sampling.k against the reference implementations of the samplers diffusers lacks: k-diffusion's
sampling.py (tests/vendor/k_diffusion, the PyPI package's file verbatim) on the same denoiser, sigmas and noise
(per-image generators for the ancestral samplers, per-image Brownian trees for the SDE ones), in float64: max abs
difference <= 1e-5. The denoiser is gen's own model wrapper (Denoiser) over a small nonlinear epsilon model, so
both sides call the same D(x, sigma); only the sampler maths differ.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from gen.formulations import DDPM
from gen.sampling import k, names, schedules
from gen.sampling.model import BrownianNoise, Denoiser, GeneratorNoise
from tests.conftest import quiet_pipeline
from tests.vendor.k_diffusion import sampling as kd

TOL = 1e-5
PROMPT = "a red circle"
SEEDS = [3, 4]  # one per image: image k's noise is its own generator's / Brownian tree's


def model() -> Denoiser:
    """gen's DDPM (epsilon) wrapper over a nonlinear model: the exact denoiser of N(1, 0.5^2) data plus
    0.1 sin(3 x_in), as the model's epsilon output."""
    ms = Denoiser(None, DDPM())

    def predict(x_in, t):
        sigma = ms.sigma(t).to(x_in)
        x = x_in * (sigma ** 2 + 1).sqrt()
        denoised = 1 + 0.25 / (0.25 + sigma ** 2) * (x - 1) + 0.1 * torch.sin(3 * x_in)
        return (x - denoised) / sigma

    ms.predict = predict
    return ms


def start(ms, sigmas):
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(SEEDS), 4, 4, 4, generator=g, dtype=torch.float64) * sigmas[0]


def ancestral_noise(x):
    return GeneratorNoise(x, [torch.Generator().manual_seed(s) for s in SEEDS])


def brownian_gen(x, sigmas):
    return BrownianNoise(x, float(sigmas[sigmas > 0].min()), float(sigmas.max()), SEEDS)


def brownian_kd(x, sigmas):
    return kd.BrownianTreeNoiseSampler(x, float(sigmas[sigmas > 0].min()), float(sigmas.max()), seed=SEEDS)


# (gen's sampler, k-diffusion's, gen kwargs, k-diffusion kwargs, noise: None | "ancestral" | "sde")
CASES = [
    (k.euler, kd.sample_euler, {}, {}, None),
    (k.euler_ancestral, kd.sample_euler_ancestral, {}, {}, "ancestral"),
    (k.euler_ancestral, kd.sample_euler_ancestral, {"eta": 0.5}, {"eta": 0.5}, "ancestral"),
    (k.heun, kd.sample_heun, {}, {}, None),
    (k.dpm_2, kd.sample_dpm_2, {}, {}, None),
    (k.dpm_2_ancestral, kd.sample_dpm_2_ancestral, {}, {}, "ancestral"),
    (k.lms, kd.sample_lms, {}, {}, None),
    (k.dpmpp_2s_ancestral, kd.sample_dpmpp_2s_ancestral, {}, {}, "ancestral"),
    (k.dpmpp_sde, kd.sample_dpmpp_sde, {}, {}, "sde"),
    (k.dpmpp_2m, kd.sample_dpmpp_2m, {}, {}, None),
    (k.dpmpp_2m_sde, kd.sample_dpmpp_2m_sde, {}, {}, "sde"),
    (k.dpmpp_2m_sde_heun, kd.sample_dpmpp_2m_sde, {}, {"solver_type": "heun"}, "sde"),
    (k.dpmpp_2m_sde, kd.sample_dpmpp_2m_sde, {"eta": 0.0}, {"eta": 0.0}, "sde"),
    (k.dpmpp_3m_sde, kd.sample_dpmpp_3m_sde, {}, {}, "sde"),
    (k.dpmpp_3m_sde, kd.sample_dpmpp_3m_sde, {"eta": 0.5}, {"eta": 0.5}, "sde"),
]


def _id(case):
    ours, _, kw, _, _ = case
    return ours.__name__ + "".join(f"-{key}{value}" for key, value in kw.items())


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_sampler_equals_k_diffusion(case, schedule):
    ours, theirs, kw, kd_kw, noise = case
    ms = model()
    sigmas = schedules.SCHEDULES[schedule](ms, 8).double()
    x = start(ms, sigmas)
    with torch.no_grad():
        ref_noise = {"ancestral": ancestral_noise(x), "sde": brownian_kd(x, sigmas)}.get(noise)
        ref = theirs(lambda x, sigma: ms(x, sigma[0]), x, sigmas, disable=True, **kd_kw,
                     **({"noise_sampler": ref_noise} if noise else {}))
        gen_noise = {"ancestral": ancestral_noise(x), "sde": brownian_gen(x, sigmas)}.get(noise)
        got = ours(ms, x, sigmas, gen_noise, **kw)
    plain = k.euler(ms, x, sigmas, None)
    diff = float((got - ref).abs().max())
    print(f"k-diffusion parity {_id(case)} {schedule} 8 steps: max abs diff {diff:.2e} "
          f"(vs euler {float((got - plain).abs().max()):.2e}, |x| {float(ref.abs().max()):.2f})")
    assert ref.abs().max() > 0.1 and diff <= TOL
    if ours is not k.euler:  # the comparison can fail: each sampler lands somewhere Euler does not
        assert float((got - plain).abs().max()) > 100 * TOL


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [8, 10, 12])
def test_dpm_fast_equals_k_diffusion(steps, eta):
    """A1111's "DPM fast": steps model calls from sigma_max to sigma_min (where both end), orders 3, ..., 2, 1."""
    ms = model()
    sigmas = schedules.karras(ms, steps).double()
    x = start(ms, sigmas)
    ends = -sigmas[0].log(), -sigmas[-2].log()  # k-diffusion's t = -log sigma, in float64 as gen's
    calls = []
    with torch.no_grad():
        ref = kd.DPMSolver(lambda x, sigma: ms(x, sigma[0])).dpm_solver_fast(x, *ends, steps, eta=eta,
                                                                           noise_sampler=ancestral_noise(x))
        got = k.dpm_fast(ms, x, sigmas, ancestral_noise(x), callback=lambda i, _: calls.append(i), eta=eta)
    diff = float((got - ref).abs().max())
    print(f"k-diffusion parity dpm_fast eta {eta} {steps} calls: max abs diff {diff:.2e}")
    assert diff <= TOL and calls == list(range(steps))
    assert float((got - k.euler(ms, x, sigmas, None)).abs().max()) > 100 * TOL


@pytest.mark.parametrize("eta,order", [(0.0, 3), (0.0, 2), (1.0, 3)])
def test_dpm_adaptive_equals_k_diffusion(eta, order):
    """A1111's "DPM adaptive": its own step sizes (PID-controlled), the same accepted and rejected steps."""
    ms = model()
    sigmas = schedules.karras(ms, 8).double()
    x = start(ms, sigmas)
    ends = -sigmas[0].log(), -sigmas[-2].log()
    calls = []
    with torch.no_grad():
        ref, info = kd.DPMSolver(lambda x, sigma: ms(x, sigma[0])).dpm_solver_adaptive(
            x, *ends, order=order, eta=eta, noise_sampler=ancestral_noise(x))
        got = k.dpm_adaptive(ms, x, sigmas, ancestral_noise(x), callback=lambda i, _: calls.append(i), eta=eta,
                             order=order)
    diff = float((got - ref).abs().max())
    print(f"k-diffusion parity dpm_adaptive eta {eta} order {order}: max abs diff {diff:.2e}, {info['nfe']} calls "
          f"({info['n_accept']} steps accepted, {info['n_reject']} rejected)")
    assert diff <= TOL and len(calls) == info["nfe"] > 8


def test_dpm_fast_and_adaptive_by_their_a1111_names_sample_a_tiny_sd(sd_folder):
    """Through the pipeline, by A1111's names on A1111's default (Uniform) schedule: an image, not noise: within
    reach of a 40-step Euler image, as a 6-step Euler image is."""
    pipe = quiet_pipeline(sd_folder)
    kw = dict(height=16, width=16, seed=5, output_type="np", guidance_scale=3.0)
    ref = pipe(PROMPT, num_inference_steps=40, sampler="euler", schedule="uniform", **kw).images[0]
    euler_err = float(np.abs(pipe(PROMPT, num_inference_steps=6, sampler="euler", schedule="uniform",
                                  **kw).images[0] - ref).max())
    for name in ("DPM fast", "DPM adaptive"):
        s, sched = names.from_a1111(name, "Automatic", 0.0, "ddpm")
        got = pipe(PROMPT, num_inference_steps=6, sampler=s, schedule=sched, **kw).images[0]
        err = float(np.abs(got - ref).max())
        print(f"sd {name} ({s}, {sched}) vs euler 40 steps: max abs diff {err:.2e} (euler 6: {euler_err:.2e})")
        assert np.isfinite(got).all() and got.std() > 0.01 and err < 2 * euler_err + 0.02


def test_gens_brownian_noise_is_k_diffusions_brownian_tree_noise():
    """Per-image trees, seeded per image: the same increments as k-diffusion's sampler with a list of seeds, and
    image 1's increments those a tree seeded with its seed alone gives."""
    ms = model()
    sigmas = schedules.karras(ms, 5).double()
    x = start(ms, sigmas)
    ours, theirs = brownian_gen(x, sigmas), brownian_kd(x, sigmas)
    alone = kd.BrownianTreeNoiseSampler(x[1:], float(sigmas[-2]), float(sigmas[0]), seed=[SEEDS[1]])
    for a, b in zip(sigmas[:-2], sigmas[1:-1]):
        got = ours(a, b)
        assert torch.allclose(got, theirs(a, b), atol=1e-12) and torch.allclose(got[1:], alone(a, b), atol=1e-12)
        assert 0.5 < float(got.std()) < 1.5


def test_vendored_sampling_is_the_pypi_packages_file():
    """The vendored reference is k-diffusion's file, byte for byte below its header (where the package is installed:
    `pip install --no-deps k-diffusion==0.1.1.post1`)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    installed = (Path(spec.submodule_search_locations[0]) / "sampling.py").read_text()
    vendored = Path(kd.__file__).read_text()
    assert vendored.endswith(installed) and len(vendored) - len(installed) < 2000
