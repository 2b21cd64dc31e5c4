"""``generate`` on several GPUs (or CPU processes), in either launch form:

* ``liveavatar generate --num_gpus 4 ...`` (or ``--gpus 0,1,2,3``): this process is the output rank (the
  last) and spawns the others;
* ``torchrun --nproc_per_node 4 -m liveavatar generate ...``: every process is one rank (several nodes
  meet through torchrun's rendezvous); the last rank writes the output, the others serve their steps and
  print nothing.

Every rank is planned before anything loads (`plan_step_ranks`), so a setting that cannot fit on some rank
is refused once, with the numbers, by the output rank.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from liveavatar.devices import dtype_bytes, dtype_name, resolve_device, runs_on_cpu
from liveavatar.errors import InputError
from liveavatar.request import Request
from liveavatar.settings import GenerationSettings

REFERENCE_MULTI_GPU_FLAGS = ("num_gpus_dit", "enable_vae_parallel", "ulysses_size")


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process with more than one rank."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def is_quiet_rank() -> bool:
    """A torchrun rank other than the output rank: its errors are reported by the output rank."""
    world = torchrun_world()
    return world is not None and world[0] != world[1] - 1


def reference_gpus(args) -> tuple[int | None, str | None]:
    """What the reference's multi-GPU flags (``--num_gpus_dit 4 --enable_vae_parallel --ulysses_size 1``)
    come to here: the number of ranks they ask for (None when they ask for none), and one notice line."""
    given = [name for name in REFERENCE_MULTI_GPU_FLAGS if getattr(args, name) is not None]
    if not given:
        return None, None
    spelled = " ".join(f"--{name}" if getattr(args, name) is True else f"--{name} {getattr(args, name)}"
                       for name in given)
    dit = args.num_gpus_dit
    asked = None if dit is None else dit + (1 if args.enable_vae_parallel else 0)
    world = torchrun_world()
    if world is not None:
        meaning = f"the {world[1]} ranks torchrun started run the timestep pipeline"
        asked = None
    elif args.num_gpus is not None or args.gpus is not None or asked is None:
        meaning = "the pipeline's GPUs come from --num_gpus/--gpus (one GPU without them)"
        asked = None
    elif asked == 1:
        meaning = "runs on one GPU"
    else:
        meaning = f"runs as --num_gpus {asked}: each GPU runs a share of the steps, the last one decodes"
    if args.ulysses_size not in (None, 1):
        meaning += (f"; --ulysses_size {args.ulysses_size} is not used: rather than splitting each step's tokens "
                    f"{args.ulysses_size} ways, each GPU runs whole denoising steps on the whole sequence, so the "
                    f"first frame comes no sooner than on one GPU and each GPU holds a whole step's activations "
                    f"and KV cache")
    return asked, f"{spelled}: {meaning}"


def rank_count(settings: GenerationSettings) -> int:
    """The ranks of this run: torchrun's world, else what --num_gpus/--gpus spawn."""
    world = torchrun_world()
    return world[1] if world is not None else settings.ranks


def layout_report(settings: GenerationSettings, request: Request) -> dict:
    """The ``--dry-run`` view of the ranks: their count and what each does."""
    from liveavatar.runtime.step_layout import StepLayout

    ranks = rank_count(settings)
    if ranks == 1:
        return {"num_gpus": 1}
    layout = StepLayout.for_steps(ranks, request.options.sample_steps)
    return {"num_gpus": ranks, "ranks": layout.roles(request.options.sample_steps)}


def cpu_rank_notices(settings: GenerationSettings) -> list[str]:
    """Several ranks on a machine without a GPU run on the CPU, as one process does: one notice says so."""
    ranks = rank_count(settings)
    if ranks == 1 or settings.device is not None or not runs_on_cpu(None):
        return []
    return [f"no CUDA GPU here: the {ranks} ranks run on the CPU (give --device cpu to say so, or run on a "
            f"machine with GPUs)"]


def idle_rank_notices(settings: GenerationSettings, request: Request) -> list[str]:
    """A notice when some rank would have no step to run (more ranks than steps + 1)."""
    from liveavatar.runtime.step_layout import StepLayout

    ranks = rank_count(settings)
    if ranks == 1:
        return []
    idle = StepLayout.for_steps(ranks, request.options.sample_steps).idle_ranks(request.options.sample_steps)
    if not idle:
        return []
    who = f"ranks {', '.join(map(str, idle))} only pass" if len(idle) > 1 else f"rank {idle[0]} only passes"
    return [f"{ranks} ranks for {request.options.sample_steps} steps: {who} blocks on (one step per rank plus a decode "
            f"rank is {request.options.sample_steps + 1} ranks; more are not faster)"]


def plan_ranks(settings: GenerationSettings, request: Request, world_size: int, *, on_cpu: bool):
    """Every rank's plan for this run, on GPUs like the current one (``--vram-budget`` caps each)."""
    from liveavatar.runtime.planner.hardware import CPU_HARDWARE, HARDWARE_PRESETS, detect_hardware
    from liveavatar.runtime.planner.memory import Workload, dit_inventory, transformer_config_for
    from liveavatar.runtime.planner.step_ranks import plan_step_ranks
    from liveavatar.runtime.planner.policy import Pins, default_host_budget, resolve_budget

    run_dtype_bytes = dtype_bytes(dtype_name(settings.dtype, "cpu" if on_cpu else "cuda"))
    work = Workload.of(request.geometry, request.options, run_dtype_bytes=run_dtype_bytes, num_gpus=world_size)
    inventory = dit_inventory(transformer_config_for(settings.ckpt_dir))
    pins = Pins(weight_dtype=None if settings.weights == "auto" else settings.weights,
                text_encoder="cpu" if settings.t5_cpu else None)
    if on_cpu:
        return plan_step_ranks(inventory, work, CPU_HARDWARE, None, budget_source="CPU run (no GPU budget)", pins=pins)
    hardware = detect_hardware() or HARDWARE_PRESETS["h100"]
    budget, source = resolve_budget(vram_budget=settings.vram_budget)
    return plan_step_ranks(inventory, work, hardware, budget, budget_source=source, pins=pins,
                         host_budget_bytes=default_host_budget())


def generate_on_ranks(settings: GenerationSettings, request: Request, output: Path, *,
                      progress: bool) -> Path | None:
    """Run ``generate`` as one rank of a pipeline (torchrun) or as the output rank spawning the others.
    Returns the mp4 path on the output rank, None on the other ranks."""
    if torchrun_world() is not None:
        return _torchrun_rank(settings, request, output, progress=progress)
    import torch

    from liveavatar.runtime.distributed import gpu_devices

    on_cpu = runs_on_cpu(settings.device)
    if on_cpu:
        devices = [torch.device("cpu")] * settings.ranks
    else:
        devices = gpu_devices(settings.gpus, settings.num_gpus if settings.gpus is None else None)
        torch.cuda.set_device(devices[-1])  # the output rank's GPU: the budget is read there
    plan = plan_ranks(settings, request, len(devices), on_cpu=on_cpu).check()
    _print_plan(plan, progress and not on_cpu)
    from liveavatar.api import LiveAvatarPipeline

    pipe = LiveAvatarPipeline.from_layout(settings.checkpoint_layout, dtype=settings.dtype, devices=devices,
                                          placement=[rank.placement for rank in plan.ranks],
                                          sample_steps=request.options.sample_steps, lora_alpha=settings.lora_alpha,
                                          compile=None if settings.compile else False)
    return _generate_and_close(pipe, settings, request, output, progress=progress)


def _torchrun_rank(settings: GenerationSettings, request: Request, output_path: Path, *,
                   progress: bool) -> Path | None:
    import torch

    from liveavatar.runtime.distributed import (RankFailure, check_same_kind, run_rank, torchrun_device,
                                                torchrun_group)
    from liveavatar.runtime.executors.step_ranks import StepRanks
    from liveavatar.runtime.multi_gpu import StageSpec, run_stage

    rank, world_size, local_rank = torchrun_world()
    output = rank == world_size - 1
    group = torchrun_group()
    if output:  # torchrun stops every rank with SIGTERM once one has failed: clean up and say why
        signal.signal(signal.SIGTERM, lambda signum, frame: _stopped_by_torchrun(group))
    else:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # leave quietly; the output rank reports
    try:
        on_cpu = runs_on_cpu(settings.device)
        device = torchrun_device(local_rank, cpu=on_cpu)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group.store.set(f"device/{rank}", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        plan = plan_ranks(settings, request, world_size, on_cpu=on_cpu).check()
    except Exception as error:
        group.fail(f"cannot start: {error}")
        raise
    if not output:
        spec = StageSpec(str(settings.checkpoint_layout.dit_dir), plan.ranks[rank].placement, str(device),
                         dtype_name(settings.dtype, device.type),
                         lora=None if settings.checkpoint_layout.lora is None else str(settings.checkpoint_layout.lora),
                         lora_alpha=settings.lora_alpha, compile=None if settings.compile else False)
        if run_rank(group, run_stage, spec):
            raise RankFailure(group.failure() or f"rank {rank} failed")  # not printed: the output rank reports
        return None
    try:
        group.join()
        names = [group.store.get(f"device/{r}").decode() for r in range(world_size)]
        check_same_kind(names, list(range(world_size)), flag=f"torchrun --nproc_per_node {world_size}")
        _print_plan(plan, progress and not on_cpu)
        from liveavatar.api import LiveAvatarPipeline

        step_ranks = StepRanks(group, plan.layout, device)
        pipe = LiveAvatarPipeline.from_layout(settings.checkpoint_layout, dtype=settings.dtype, step_ranks=step_ranks,
                                              placement=[rank_plan.placement for rank_plan in plan.ranks],
                                              lora_alpha=settings.lora_alpha,
                                              compile=None if settings.compile else False)
    except RankFailure:
        raise
    except BaseException as error:
        group.fail(f"failed: {error}")
        raise
    return _generate_and_close(pipe, settings, request, output_path, progress=progress)


def _generate_and_close(pipe, settings: GenerationSettings, request: Request, output_path: Path, *,
                        progress: bool) -> Path:
    try:
        output = pipe.generate(request, output=output_path, keep_partial=settings.keep_partial,
                               overwrite=settings.overwrite, progress=progress)
    except BaseException as error:
        pipe.close(failure=error)
        raise
    pipe.close()
    return output


def _print_plan(plan, enabled: bool) -> None:
    if enabled:
        peak = max(rank.predicted_peak_bytes for rank in plan.ranks) / 2**30
        print(f"plan: {plan.layout.describe(plan.work.sample_steps)}; predicted peak {peak:.1f} GiB on the fullest "
              f"rank, {plan.fps:.1f} FPS expected", file=sys.stderr)


def _stopped_by_torchrun(group):
    from liveavatar.runtime.distributed import RankFailure

    raise RankFailure(group.failure() or "stopped by torchrun (SIGTERM): a rank exited, torchrun's report "
                                             "names it")


def check_launch(settings: GenerationSettings) -> None:
    """A --device this machine lacks, and launch flags that contradict torchrun's own launch (dry runs too)."""
    if settings.device is not None:
        resolve_device(settings.device)
    if torchrun_world() is not None and (settings.num_gpus not in (None, 1) or settings.gpus is not None):
        raise InputError("--num_gpus/--gpus spawn ranks; under torchrun the ranks are torchrun's "
                         "(--nproc_per_node): leave them out")
