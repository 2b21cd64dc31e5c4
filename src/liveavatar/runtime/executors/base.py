"""What the sampling loop asks of an executor."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class BlockJob:
    """Block ``block`` of clip ``clip``: its initial noise [16, 3, h, w], its audio features
    [1, 25, C, frames_per_block], its absolute latent-frame index and the rolling sink's RoPE offset of
    every denoising step (``ref_rope_offsets[step]``, drawn by the loop in the order one device draws them)."""

    clip: int
    block: int
    start_frame: int
    noise: torch.Tensor
    audio: torch.Tensor
    ref_rope_offsets: tuple[int, ...]


class BlockExecutor(Protocol):
    """Runs the DiT for the loop.

    ``prefill`` (re)fills the sink; it is ordered with the submitted blocks: blocks submitted before it
    see the old sink, blocks after it the new one. ``submit`` hands over a block; ``collect`` returns the
    clean latents [16, 3, h, w] of the oldest block not collected yet. Up to ``depth`` blocks may be in
    flight (submitted, not collected): 1 for an executor that denoises on submit, more for a pipeline
    whose stages work on several blocks at once.
    """

    depth: int

    def prefill(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None: ...

    def submit(self, job: BlockJob) -> None: ...

    def collect(self) -> torch.Tensor: ...


ForwardHook = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]
"""Called after every DiT forward with (clip, block, step, input latents, predicted velocity)."""


class ExecutorFactory(ABC):
    """Builds a request's `BlockExecutor` once the engine has allocated the caches of `local_steps`."""

    def local_steps(self, num_steps: int) -> Sequence[int]:
        """The denoising steps this process runs, whose KV sets the engine allocates (none: no caches)."""
        return range(num_steps)

    @abstractmethod
    def __call__(self, model, caches, schedule, text_kv, *, on_forward: ForwardHook | None = None,
                 graphs=None) -> BlockExecutor: ...
