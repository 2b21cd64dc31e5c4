"""The flow-matching Euler schedule of the causal pipelines (no diffusers dependency).

The reference builds diffusers' ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)``
and calls ``set_timesteps(steps)``. The shift is applied twice: once when the scheduler is
constructed (it fixes sigma_max/sigma_min of the training grid) and once more to the inference
linspace. With 4 steps this gives t = [1000, 857.69, 602.15, 8.93] (the last step sits close to 0
because of the double shift). ``--sample_shift`` is ignored by the reference, so ``shift`` is fixed.

The update is diffusers' Euler step, including its dtype behaviour: the sample is up-cast to float32,
the 0-d float32 sigma difference times the model output takes the model output's dtype (so in a
bfloat16 run both the sigma difference and the product are rounded to bfloat16), the sum is float32
and is cast back to the model output's dtype. In a float32 run this is plainly
``x + (sigma[i+1] - sigma[i]) * v`` in float32. No fresh noise is ever drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
REFERENCE_SHIFT = 3.0


def _shift(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Timesteps (model inputs) and sigmas of an ``num_steps``-step run, both float32 on the CPU."""

    timesteps: torch.Tensor  # [num_steps]
    sigmas: torch.Tensor  # [num_steps + 1], ends with 0

    @classmethod
    def create(cls, num_steps: int, *, shift: float = REFERENCE_SHIFT,
               num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "FlowMatchSchedule":
        if num_steps < 1:
            raise ValueError(f"sample_steps must be at least 1 (got {num_steps})")
        # Construction: the training grid t/N for t = N..1 in float32, shifted in float32.
        train = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
        train_sigmas = _shift(train / num_train_timesteps, shift)
        sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
        # set_timesteps: a float64 linspace between them, shifted a second time, then float32.
        grid = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
        sigmas = torch.from_numpy(_shift(grid / num_train_timesteps, shift)).to(torch.float32)
        timesteps = sigmas * num_train_timesteps
        return cls(timesteps=timesteps, sigmas=torch.cat([sigmas, torch.zeros(1)]))

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def timestep(self, step: int) -> float:
        return float(self.timesteps[step])

    def step(self, step: int, sample: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """Euler update from sigma[step] to sigma[step + 1]; returns the new sample in ``velocity``'s dtype."""
        delta = (self.sigmas[step + 1] - self.sigmas[step]).to(device=velocity.device, dtype=velocity.dtype)
        return (sample.to(torch.float32) + (delta * velocity).to(torch.float32)).to(velocity.dtype)
