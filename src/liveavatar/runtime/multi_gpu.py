"""The ranks of a run on several GPUs (or CPU processes): spawned here or started by torchrun.

The output rank (the last) gets a `StepRanks` for its `Engine`; every other rank loads its DiT as its
`StageSpec` says and serves its denoising steps (`serve_stage`) until the output rank stops it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch

from liveavatar.devices import configure_cuda_allocator, resolve_dtype
from liveavatar.options import DEFAULTS
from liveavatar.runtime.compile import resolve_fast_path
from liveavatar.runtime.distributed import LocalRanks, RankGroup, run_rank
from liveavatar.runtime.engine import Engine
from liveavatar.runtime.executors.step_ranks import StepRanks, serve_stage
from liveavatar.runtime.loading import load_placed_dit
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.step_layout import StepLayout


@dataclass(frozen=True)
class StageSpec:
    """What a worker rank loads and where: its DiT (folder, LoRA, placement) on ``device`` in ``dtype``.
    ``threads``: torch's CPU threads (a CPU rank uses the spawning process's count, so that its matmuls
    split the same way and give the same bits; None: one on a GPU rank once its DiT is loaded)."""

    dit_dir: str
    placement: Placement
    device: str
    dtype: str
    lora: str | None = None
    lora_alpha: float | None = None
    threads: int | None = None
    compile: bool | None = None  # the fast path, as `resolve_fast_path` (None: on for CUDA GPUs)

    def load(self, device: torch.device, dtype: torch.dtype):
        """The placed DiT and its layer streamer (None when no layer streams)."""
        return load_placed_dit(self.dit_dir, self.placement, device=device, dtype=dtype, lora=self.lora,
                               lora_alpha=self.lora_alpha)


def run_stage(group: RankGroup, spec: StageSpec) -> None:
    """A worker rank: load the DiT (``spec.load``; a benchmark's spec may make random weights instead),
    then serve this rank's steps until the output rank stops the run."""
    device = torch.device(spec.device)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if device.type == "cuda":
        configure_cuda_allocator()
        torch.cuda.set_device(device)
    dtype = resolve_dtype(spec.dtype, device)
    with torch.no_grad():
        model, streamer = spec.load(device, dtype)
        if spec.threads is None and device.type == "cuda":
            # Loaded (a LoRA merge may run on the host); from here one thread, as torchrun gives each of its
            # processes: a GPU rank's host work is copies and Python, and OpenMP's spinning threads of one
            # rank take the cores another needs (a hop between two CPU processes: 4.4 ms with a thread per
            # core, 1.1 ms with one).
            torch.set_num_threads(1)
        # An engine of this rank's DiT only: it owns the caches (reused between requests) and the streamer.
        engine = Engine(model, None, None, None, placement=spec.placement, device=device, dtype=dtype,
                        layer_streamer=streamer, fast_path=resolve_fast_path(device, compile=spec.compile))
        serve_stage(group, model, engine.caches, device, graphs_for=engine.forward_graphs)


def spawn_step_ranks(specs: Sequence[StageSpec], output_device: torch.device, *,
                     sample_steps: int = DEFAULTS.sample_steps, timeout: timedelta | None = None) -> StepRanks:
    """Spawn ranks 0..N-2 (``specs``, one per worker rank) for an output rank in this process. The output
    rank holds a DiT and runs the last steps when the ranks are not more than ``sample_steps``.
    ``timeout``: the communicator's (default `comm_timeout()`)."""
    world_size = len(specs) + 1
    layout = StepLayout.for_steps(world_size, sample_steps)
    ranks = LocalRanks(world_size, layout.output_rank, run_stage, {rank: (spec,) for rank, spec in enumerate(specs)},
                       timeout=timeout)
    return StepRanks(ranks.group, layout, output_device, ranks=ranks)
