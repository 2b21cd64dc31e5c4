"""Which rank of a multi-GPU run does what: the timestep-pipeline layout. Pure bookkeeping (no torch).

The denoising steps of every block are spread over the ranks that hold a DiT, each running a consecutive
share (the reference's ``causal_s2v_pipeline_tpp.py`` runs step i on rank i); a block passes from rank to
rank, and the last rank (the output rank) decodes it and owns the output (mp4, events, progress), like
the reference's VAE rank 4.

* ``world_size > steps``: step i on rank i; the last rank only decodes and writes (5 ranks, 4 steps is
  the reference's layout). Ranks between the last step and the output rank hold a DiT but have no step
  to run at this step count: they pass blocks through (a server built for 4 steps serving a 3-step
  request), and a launch that would start with such a rank is told so.
* ``world_size <= steps``: every rank holds a DiT; the output rank runs the last steps and decodes too.
  Uneven shares go to the earlier ranks (the output rank also decodes): 3 ranks x 4 steps = {0, 1}, {2},
  {3} + decode; 2 ranks x 4 steps = {0, 1}, {2, 3} + decode.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepLayout:
    """The ranks of a pipeline: ``world_size`` processes, the last of which owns the output;
    ``output_denoises``: the output rank holds a DiT and runs steps too."""

    world_size: int
    output_denoises: bool

    def __post_init__(self):
        if self.world_size < 2:
            raise ValueError(f"a pipeline needs at least 2 ranks (got {self.world_size})")

    @classmethod
    def for_steps(cls, world_size: int, num_steps: int) -> "StepLayout":
        """The layout a launch for ``num_steps`` steps gets: a decode-only output rank when there are more
        ranks than steps."""
        return cls(world_size, output_denoises=world_size <= num_steps)

    @property
    def output_rank(self) -> int:
        return self.world_size - 1

    @property
    def dit_ranks(self) -> tuple[int, ...]:
        """Ranks that hold a DiT."""
        return tuple(range(self.world_size if self.output_denoises else self.world_size - 1))

    def steps(self, num_steps: int) -> tuple[tuple[int, ...], ...]:
        """The steps of every rank (in rank order) for a ``num_steps``-step run."""
        ranks = self.dit_ranks
        used = min(len(ranks), num_steps)
        share, extra = divmod(num_steps, used)
        shares, first = [], 0
        for index in range(len(ranks)):
            count = share + (index < extra) if index < used else 0
            shares.append(tuple(range(first, first + count)))
            first += count
        if not self.output_denoises:
            shares.append(())
        return tuple(shares)

    def idle_ranks(self, num_steps: int) -> tuple[int, ...]:
        """DiT ranks with no step at this step count (they only pass blocks on)."""
        return tuple(rank for rank, steps in zip(self.dit_ranks, self.steps(num_steps)) if not steps)

    def roles(self, num_steps: int) -> list[str]:
        """One phrase per rank: ``steps 0-1``, ``step 2 + decode, output``, ``idle (passes blocks on)``."""
        phrases = []
        for rank, steps in enumerate(self.steps(num_steps)):
            parts = [steps_phrase(steps)] if steps else []
            if rank == self.output_rank:
                parts.append("decode + output")
            phrases.append(" + ".join(parts) if parts else "idle (passes blocks on)")
        return phrases

    def describe(self, num_steps: int) -> str:
        return ", ".join(f"rank {rank}: {role}" for rank, role in enumerate(self.roles(num_steps)))


def steps_phrase(steps: tuple[int, ...]) -> str:
    """``step 2`` or ``steps 0-1``."""
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
