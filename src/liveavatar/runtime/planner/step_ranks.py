"""The plan of a multi-GPU timestep pipeline: one `Plan` per rank and the pipeline's speed.

Each rank is planned on its own GPU budget with what its role holds (`RankRole`): a DiT rank its weights
(FP8/bf16, streamed layers if needed), the KV sets of its steps, its cond cache, its text K/V and the
activations; the output rank the encoders at set-up, the VAE, the decode (and a DiT with the last steps
when there are no more ranks than steps). Blocks flow through the ranks, so in steady state one block
leaves per the slowest rank's time per block plus one hop.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from liveavatar.geometry import LATENT_CHANNELS, LATENT_FRAMES_PER_BLOCK
from liveavatar.runtime.step_layout import StepLayout
from liveavatar.runtime.planner.hardware import Hardware
from liveavatar.runtime.planner.memory import DiTInventory, RankRole, Workload
from liveavatar.runtime.planner.policy import MemoryPlanError, Pins, Plan, format_gib, make_plan

# A hop's fixed cost (store round trips, polling, the synchronous copies through host memory) and the rate
# of gloo over TCP for the block's bytes, staged through host memory at both ends. The fixed cost is fitted
# to the hops measured on a GPU with 2 ranks sharing an H100 at 384*256 (benchmarks/gpu_pipeline.py, issue 20;
# the bytes' terms below make 0.4 ms of them): 4.2 and 4.3 ms since each tensor is copied once into the
# message and each GPU rank runs one torch thread (11 ms before). The link rate is an estimate. On a 2-core
# CPU the same hop takes 4.4 ms, 1.1 ms with one torch thread per rank (OpenMP's spinning threads share the
# cores).
HOP_OVERHEAD_S = 0.0038
HOST_LINK_BYTES_PER_S = 2e9
# wav2vec2-large: 25 hidden states of 1024 per video frame travel with every block.
AUDIO_FEATURE_ELEMENTS_PER_FRAME = 25 * 1024


@dataclass
class StepRanksPlan:
    """Every rank's plan (rank order) and the pipeline's steady state."""

    layout: StepLayout
    work: Workload
    ranks: list[Plan]
    hop_s: float
    nearest: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(plan.fits for plan in self.ranks)

    @property
    def roles(self) -> list[str]:
        return self.layout.roles(self.work.sample_steps)

    @property
    def block_s(self) -> float:
        """Seconds per block in steady state: the slowest rank's work per block plus one hop."""
        return max(plan.speed.block_s for plan in self.ranks) + self.hop_s

    @property
    def fps(self) -> float:
        return self.work.video_frames_per_block / self.block_s

    @property
    def bottleneck(self) -> int:
        return max(range(len(self.ranks)), key=lambda rank: self.ranks[rank].speed.block_s)

    def check(self) -> "StepRanksPlan":
        """Raises `MemoryPlanError` naming each rank that does not fit, its numbers and the nearest setting."""
        if not self.fits:
            raise MemoryPlanError(self.refusal())
        return self

    def refusal(self) -> str:
        failing = [f"rank {rank} ({self.roles[rank]}): {plan.reason}" for rank, plan in enumerate(self.ranks)
                   if not plan.fits]
        nearest = "; ".join(self.nearest) if self.nearest else "none of the smaller standard settings"
        budget = self.ranks[0].budget_source
        return (f"{self.work.describe()} does not fit {budget} on every rank: {'; '.join(failing)}. "
                f"Nearest setting that fits: {nearest}.")

    def to_json(self) -> dict:
        return {"fits": self.fits, "num_gpus": self.layout.world_size, "fps": round(self.fps, 3),
                "block_s": round(self.block_s, 4), "hop_s": round(self.hop_s, 4), "bottleneck_rank": self.bottleneck,
                "nearest": self.nearest,
                "ranks": [{"rank": rank, "role": role, **plan.to_json()}
                          for rank, (role, plan) in enumerate(zip(self.roles, self.ranks))]}


def hop_seconds(work: Workload, hw: Hardware) -> float:
    """One block's hop between ranks: latents and audio features, device -> host -> TCP -> host -> device."""
    g = work.geometry
    nbytes = work.run_dtype_bytes * (LATENT_CHANNELS * LATENT_FRAMES_PER_BLOCK * g.latent_height * g.latent_width
                                     + AUDIO_FEATURE_ELEMENTS_PER_FRAME * g.frames_per_block)
    staging = nbytes / hw.d2h_bytes_per_s + nbytes / hw.h2d_bytes_per_s
    return HOP_OVERHEAD_S + nbytes / HOST_LINK_BYTES_PER_S + staging


def plan_step_ranks(inv: DiTInventory, work: Workload, hw: Hardware, budget_bytes: int | None, *,
                  budget_source: str = "", headroom_bytes: int | None = None, host_budget_bytes: int | None = None,
                  pins: Pins = Pins(), suggest: bool = True) -> StepRanksPlan:
    """Plan each of ``work.num_gpus`` ranks on a GPU of ``budget_bytes`` (the ranks of one node share
    ``host_budget_bytes`` of pinned host memory equally). A pipeline that does not fit on some rank gets
    the nearest settings that would: more GPUs (fewer steps per rank), then that rank's own nearest."""
    layout = StepLayout.for_steps(work.num_gpus, work.sample_steps)
    host_share = None if host_budget_bytes is None else host_budget_bytes // work.num_gpus
    plans = []
    for rank, steps in enumerate(layout.steps(work.sample_steps)):
        role = RankRole(steps=len(steps), holds_dit=rank in layout.dit_ranks, output=rank == layout.output_rank)
        plans.append(make_plan(inv, replace(work, role=role), hw, budget_bytes, budget_source=budget_source,
                               headroom_bytes=headroom_bytes, host_budget_bytes=host_share, pins=pins,
                               suggest=suggest))
    plan = StepRanksPlan(layout, work, plans, hop_seconds(work, hw))
    if suggest and not plan.fits:
        for count in range(work.num_gpus + 1, work.sample_steps + 2):
            wider = plan_step_ranks(inv, replace(work, num_gpus=count), hw, budget_bytes, budget_source=budget_source,
                                  headroom_bytes=headroom_bytes, host_budget_bytes=host_budget_bytes, pins=pins,
                                  suggest=False)
            if wider.fits:
                plan.nearest.append(f"--num_gpus {count} ({wider.layout.describe(work.sample_steps)}; "
                                    f"peak {format_gib(max(p.predicted_peak_bytes for p in wider.ranks))}, "
                                    f"{wider.fps:.1f} FPS)")
                break
        worst = max((p for p in plans if not p.fits), key=lambda p: p.predicted_peak_bytes)
        plan.nearest += worst.nearest
    return plan
