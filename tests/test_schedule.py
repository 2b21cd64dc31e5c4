import json

import pytest
import torch

from liveavatar.runtime.schedule import FlowMatchSchedule


def _loop_manifests(fixtures_dir):
    return [json.loads(p.read_text()) for p in sorted(fixtures_dir.glob("B_*.json"))]


def test_schedule_matches_every_loop_fixture(fixtures_dir):
    manifests = _loop_manifests(fixtures_dir)
    assert manifests, "no B fixtures found"
    for manifest in manifests:
        recorded = manifest["scheduler"]
        schedule = FlowMatchSchedule.create(recorded["steps"], shift=recorded["shift"],
                                            num_train_timesteps=recorded["num_train_timesteps"])
        assert schedule.timesteps.tolist() == recorded["timesteps"]
        assert schedule.sigmas.tolist() == recorded["sigmas"]


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_schedule_shape_and_endpoints_for_any_step_count(steps):
    schedule = FlowMatchSchedule.create(steps)
    assert schedule.num_steps == steps
    assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas.numel() == steps + 1
    assert schedule.sigmas[0].item() == 1.0 and schedule.sigmas[-1].item() == 0.0
    assert bool((schedule.sigmas[1:] < schedule.sigmas[:-1]).all())
    assert torch.equal(schedule.timesteps, schedule.sigmas[:-1] * 1000)
    if steps > 1:  # the double shift puts the last timestep at 1000 * shift(shift(0.001)) = 8.93
        assert schedule.timesteps[-1].item() == pytest.approx(8.928571, abs=1e-5)


def _diffusers_style_step(sample, velocity, sigma, sigma_next):
    # What diffusers' FlowMatchEulerDiscreteScheduler.step does: 0-d float32 sigmas, float32 sample.
    prev = sample.to(torch.float32) + (sigma_next - sigma) * velocity
    return prev.to(velocity.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_rounds_like_diffusers(dtype):
    schedule = FlowMatchSchedule.create(4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 16, generator=gen).to(dtype)
    for i in range(schedule.num_steps):
        v = torch.randn(16, 3, 8, 16, generator=gen).to(dtype)
        got = schedule.step(i, x, v)
        expected = _diffusers_style_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
        assert got.dtype == dtype
        assert torch.equal(got, expected)
        x = got


def test_float32_step_is_the_plain_euler_update():
    schedule = FlowMatchSchedule.create(4)
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    for i in range(4):
        assert torch.equal(schedule.step(i, x, v), x + (schedule.sigmas[i + 1] - schedule.sigmas[i]) * v)


def test_bfloat16_step_rounds_the_sigma_difference():
    schedule = FlowMatchSchedule.create(4)
    x = torch.zeros(1, dtype=torch.bfloat16)
    v = torch.ones(1, dtype=torch.bfloat16)
    for i in range(4):
        delta = (schedule.sigmas[i + 1] - schedule.sigmas[i]).item()
        assert schedule.step(i, x, v).item() == torch.tensor(delta).to(torch.bfloat16).item()
        assert schedule.step(i, x, v).item() != delta


def test_zero_steps_is_an_error():
    with pytest.raises(ValueError, match="sample_steps"):
        FlowMatchSchedule.create(0)
