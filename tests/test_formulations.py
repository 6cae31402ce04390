"""Analytic checks of the formulations and the sampler table, against diffusers' own schedulers."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from gen.errors import GenError
from gen.formulations import DDPM, Flow, from_dict, from_scheduler_config, to_dict
from gen.samplers import denoise
from gen.samplers import SAMPLERS, check_sampler, make_scheduler


@pytest.mark.parametrize("kw", [{}, {"prediction_type": "v_prediction", "zero_terminal_snr": True},
                                {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}])
def test_ddpm_schedule_matches_diffusers(kw):
    f = DDPM(**kw)
    ref = DDPMScheduler(**f.scheduler_config())
    assert torch.allclose(f.alphas_cumprod, ref.alphas_cumprod, atol=1e-6)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(f.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5)
    if f.prediction_type == "v_prediction":
        assert torch.allclose(f.target(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-5)
    else:
        assert torch.equal(f.target(x0, noise, t), noise)


def test_zero_terminal_snr_ends_at_pure_noise():
    f = DDPM(prediction_type="v_prediction", zero_terminal_snr=True)
    assert f.alphas_cumprod[-1] == 0
    assert f.snr(torch.tensor([999]))[0] == 0
    with pytest.raises(GenError, match="v_prediction"):
        DDPM(zero_terminal_snr=True)


def test_min_snr_weights():
    f = DDPM()
    t = torch.tensor([0, 500, 999])
    w = f.loss_weight(t, 5.0)
    snr = f.snr(t)
    assert torch.allclose(w, snr.clamp(max=5.0) / snr)
    assert torch.equal(f.loss_weight(t, None), torch.ones(3))
    v = DDPM(prediction_type="v_prediction").loss_weight(t, 5.0)
    assert torch.allclose(v, snr.clamp(max=5.0) / (snr + 1))


def test_flow_convention_and_shift_match_diffusers():
    f = Flow(shift=3.0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xs = f.interpolate(x0, noise, sigma)
    assert torch.equal(xs[0], x0[0]) and torch.equal(xs[2], noise[2])
    # the target is the velocity d x_sigma / d sigma
    eps = 1e-3
    fd = (f.interpolate(x0, noise, sigma + eps) - f.interpolate(x0, noise, sigma - eps)) / (2 * eps)
    assert torch.allclose(fd, f.target(x0, noise), atol=1e-3)
    ref = FlowMatchEulerDiscreteScheduler(**f.scheduler_config())
    ref.set_timesteps(10)
    # diffusers spaces sigmas linearly from 1 down to the (shifted) smallest training sigma, then shifts
    unshifted = torch.linspace(1.0, f.shift_sigma(torch.tensor(1 / f.num_train_timesteps)).item(), 10)
    assert torch.allclose(ref.sigmas[:-1], f.shift_sigma(unshifted), atol=1e-5)
    ref_x = ref.scale_noise(x0[:1], ref.timesteps[3:4], noise[:1])
    assert torch.allclose(ref_x, f.interpolate(x0[:1], noise[:1], ref.sigmas[3:4]), atol=1e-5)
    assert torch.allclose(f.model_timestep(ref.sigmas[3]), ref.timesteps[3])


def test_logit_normal_timesteps():
    s = Flow(logit_mean=0.0, logit_std=1.0).sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1
    assert abs(s.median().item() - 0.5) < 0.02
    shifted = Flow(shift=3.0).sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert shifted.median() > 0.7  # shift > 1 spends more time near noise


@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sampler_integrates_true_velocity_exactly(sampler, shift):
    """A model that returns the true velocity toward one data point must land on that point."""
    f = Flow(shift=shift)
    x_data = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def true_velocity(x, t, cond):  # x_sigma = (1-s) x0 + s n  =>  v = n - x0 = (x - x0) / s
        sigma = t / f.num_train_timesteps
        return (x - x_data) / sigma.clamp(min=1e-8)

    scheduler = make_scheduler(sampler, f)
    scheduler.set_timesteps(7)
    out = denoise(true_velocity, scheduler, noise.clone(), {}, None, 1.0)
    assert torch.allclose(out, x_data, atol=1e-4)
    assert not torch.allclose(noise, x_data, atol=1e-1)


def test_sampler_table_errors_list_valid_names():
    with pytest.raises(GenError, match="valid for this ddpm model: ddpm, ddim"):
        check_sampler("nope", DDPM())
    with pytest.raises(GenError, match="flow-euler, flow-heun"):
        check_sampler("ddim", Flow())
    for name, (kind, cls, _) in SAMPLERS.items():
        f = Flow(shift=2.0) if kind == "flow" else DDPM(prediction_type="v_prediction")
        s = make_scheduler(name, f)
        assert isinstance(s, cls)
        assert s.config.get("shift", 2.0) == 2.0
        assert s.config.get("prediction_type", "v_prediction") == "v_prediction"


def test_formulation_round_trips_through_dict_and_scheduler_config():
    for f in (DDPM(prediction_type="v_prediction"), Flow(shift=2.5, logit_std=0.8)):
        assert from_dict(to_dict(f)) == f
    assert from_scheduler_config(dict(make_scheduler("ddim", DDPM()).config)) == DDPM()
    assert from_scheduler_config(dict(make_scheduler("flow-euler", Flow(shift=2.0)).config)).shift == 2.0
    with pytest.raises(GenError):
        from_dict({"type": "nope"})
