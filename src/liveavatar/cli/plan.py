"""``liveavatar plan``: the memory plan that the flags describe, as a table or one JSON object; with
``--num_gpus N`` one plan per rank of the timestep pipeline and the pipeline's speed.

The flags are also ``bench``'s: it runs the placement they plan.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace

from liveavatar.cli.flags import add_attention_flag, add_flag, byte_amount
from liveavatar.devices import dtype_bytes, dtype_name
from liveavatar.errors import InputError
from liveavatar.geometry import ClipGeometry, size_for_area
from liveavatar.options import DEFAULT_SIZE, DEFAULTS, Mode, RequestOptions
from liveavatar.runtime.planner.hardware import HARDWARE_PRESETS, GiB, detect_hardware
from liveavatar.runtime.planner.memory import (ALLOCATOR_FRAGMENTATION, DiTInventory, Workload, dit_inventory,
                                               transformer_config_for)
from liveavatar.runtime.planner.speed import attention_runs
from liveavatar.runtime.planner.step_ranks import StepRanksPlan, plan_step_ranks
from liveavatar.runtime.planner.policy import (DEFAULT_HEADROOM_BYTES, DEFAULT_HEADROOM_FRACTION, Pins, Plan,
                                               default_host_budget, format_gib, make_plan, resolve_budget)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_argument_group("what to plan")
    add_flag(shape, "size", default=DEFAULT_SIZE, help="target AREA as W*H; the aspect ratio follows --image, "
             f"else W*H itself (default {DEFAULT_SIZE} -> {DEFAULT_SIZE.replace('*', 'x')})")
    add_flag(shape, "image", metavar="PATH", help="reference image whose aspect ratio the size follows")
    add_flag(shape, "infer_frames", type=int, default=DEFAULTS.infer_frames, metavar="N",
             help="video frames per clip (default %(default)s)")
    add_flag(shape, "sample_steps", type=int, default=DEFAULTS.sample_steps, metavar="N",
             help="denoising steps (default %(default)s)")
    add_flag(shape, "num_gpus", type=int, default=1, metavar="N",
             help="GPUs of the timestep pipeline (N>1: each GPU runs a share of the steps, the last one "
                  "decodes; default 1); the budget flags are per GPU")
    add_flag(shape, "mode", default=DEFAULTS.mode, choices=tuple(Mode), help="pipeline behaviour")
    add_attention_flag(shape)
    add_flag(shape, "dtype", choices=("bfloat16", "float32"), help="run dtype (default bfloat16; bench on the "
             "CPU: float32, as generate)")
    add_flag(shape, "config", choices=("14b", "tiny"), help="DiT size (default: --ckpt_dir's config.json, "
             "else the 14B release)")
    add_flag(shape, "ckpt_dir", metavar="DIR", help="checkpoint folder whose config.json to read")
    add_flag(shape, "audio-seconds", type=float, default=60.0, metavar="S", help="length of the audio, whose "
             "waveform and features stay in host memory (default %(default)s)")

    card = parser.add_argument_group("the GPU")
    add_flag(card, "gpu-memory", metavar="SIZE", help="the card's memory, e.g. 24GiB (default: detected)")
    add_flag(card, "vram-budget", metavar="SIZE", help="cap on the memory the run may use, e.g. 22GiB")
    add_flag(card, "headroom", metavar="SIZE", help="memory kept free for misprediction (default "
             f"max({DEFAULT_HEADROOM_BYTES / GiB:g} GiB, {DEFAULT_HEADROOM_FRACTION * 100:g}%% of the budget))")
    add_flag(card, "host-memory", metavar="SIZE", help="host RAM the run may use, e.g. 32GiB (default: what "
             "this machine or its cgroup has available, when planning for this machine's GPU; else unchecked)")
    add_flag(card, "hardware", choices=sorted(HARDWARE_PRESETS), help="rates of a card to plan for "
             "(default: the detected GPU)")
    add_flag(card, "h2d-gbps", type=float, metavar="GB/S", help="host<->GPU bandwidth (e.g. a measured one)")

    pins = parser.add_argument_group("pin a placement choice (default: the planner chooses)")
    add_flag(pins, "weights", choices=("bf16", "fp8"), help="DiT weight dtype")
    add_flag(pins, "kv-dtype", choices=("bf16", "fp8"), help="KV-cache dtype")
    add_flag(pins, "kv-location", choices=("gpu", "host"), help="where the KV sets live")
    add_flag(pins, "cond-location", choices=("gpu", "host"), help="where the sink (cond) cache lives")
    add_flag(pins, "stream-layers", type=int, metavar="N", help="DiT blocks streamed from host memory")
    add_flag(pins, "text-encoder", choices=("gpu_then_free", "cpu"), help="where the prompt is encoded")
    add_flag(parser, "json", action="store_true", help="print one JSON object")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan (a table, or one JSON object); exit 1 when nothing fits."""
    plan = plan_from_args(args) if args.num_gpus == 1 else plan_from_args(args, step_ranks=True)
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        print(plan_table(plan) if isinstance(plan, Plan) else step_ranks_table(plan))
    return 0 if plan.fits else 1


def plan_from_args(args: argparse.Namespace, *, step_ranks: bool = False) -> Plan | StepRanksPlan:
    """The plan the ``plan`` / ``bench`` flags describe, for the card they name or the one detected; with
    ``pipeline``, one plan per rank of ``--num_gpus`` (each on a card like that one)."""
    work = workload_from_args(args, num_gpus=args.num_gpus if step_ranks else 1)
    inventory = inventory_from_args(args)
    hardware = HARDWARE_PRESETS[args.hardware] if args.hardware else detect_hardware()
    gpu_memory, vram_budget = byte_amount("gpu-memory", args.gpu_memory), byte_amount("vram-budget", args.vram_budget)
    budget, source = resolve_budget(vram_budget=vram_budget, gpu_memory=gpu_memory, hardware=hardware,
                                    detect=args.hardware is None)
    if hardware is None:
        hardware = replace(HARDWARE_PRESETS["rtx4090"], name=f"{HARDWARE_PRESETS['rtx4090'].name} rates "
                           f"(no GPU detected; pick another with --hardware)", memory_bytes=gpu_memory)
    if args.h2d_gbps:
        hardware = replace(hardware, h2d_bytes_per_s=args.h2d_gbps * 1e9, d2h_bytes_per_s=args.h2d_gbps * 1e9)
    host = byte_amount("host-memory", args.host_memory)
    if host is None and args.hardware is None and gpu_memory is None and detect_hardware() is not None:
        host = default_host_budget()
    if args.stream_layers is not None and not 0 <= args.stream_layers <= inventory.num_layers:
        raise InputError(f"--stream-layers {args.stream_layers}: the DiT has {inventory.num_layers} blocks")
    pins = Pins(weight_dtype=args.weights, kv_dtype=args.kv_dtype, kv_location=args.kv_location,
                cond_location=args.cond_location, streamed_layers=args.stream_layers, text_encoder=args.text_encoder)
    planner = plan_step_ranks if step_ranks else make_plan
    return planner(inventory, work, hardware, budget, budget_source=source,
                   headroom_bytes=byte_amount("headroom", args.headroom), host_budget_bytes=host, pins=pins)


def workload_from_args(args: argparse.Namespace, *, num_gpus: int, device_type: str = "cuda") -> Workload:
    options = RequestOptions(size=args.size, infer_frames=args.infer_frames, sample_steps=args.sample_steps,
                             mode=args.mode, attention=args.attention)
    if num_gpus < 1:
        raise InputError(f"--num_gpus {num_gpus}: must be at least 1")
    if args.audio_seconds < 0:
        raise InputError(f"--audio-seconds {args.audio_seconds}: must be at least 0")
    geometry = ClipGeometry(*_dims_from_size(args.size, options.size, args.image), options.infer_frames)
    return Workload.of(geometry, options, run_dtype_bytes=dtype_bytes(dtype_name(args.dtype, device_type)),
                       num_gpus=num_gpus, audio_seconds=args.audio_seconds)


def inventory_from_args(args: argparse.Namespace) -> DiTInventory:
    return dit_inventory(transformer_config_for(args.ckpt_dir, args.config))


def _dims_from_size(text: str, area: int, image: str | None) -> tuple[int, int]:
    """(height, width): the reference's size search for the area, with the image's aspect ratio or W*H's."""
    if image:
        from liveavatar.io.media import load_image

        picture = load_image(image)
        return size_for_area(picture.height, picture.width, area)
    width, height = (int(n) for n in re.findall(r"\d+", text)[:2])
    return size_for_area(height, width, area)


def step_ranks_table(plan: StepRanksPlan) -> str:
    """A pipeline's plan: every rank's table (its role, components, peak and speed), then the pipeline's
    steady state."""
    first = plan.ranks[0]
    lines = [f"plan: {plan.work.describe()} on {plan.layout.world_size} x {first.hardware.name}",
             f"layout: {plan.layout.describe(plan.work.sample_steps)}", ""]
    for rank, (role, rank_plan) in enumerate(zip(plan.roles, plan.ranks)):
        lines.append(f"== rank {rank}: {role}")
        lines += plan_table(rank_plan, header=False, holds_dit=rank_plan.workload.holds_dit).splitlines()
        lines.append("")
    per_rank = ", ".join(f"rank {rank} {p.speed.block_s:.3f} s" for rank, p in enumerate(plan.ranks))
    lines.append(f"pipeline: {plan.fps:.2f} video FPS in steady state: one block per {plan.block_s:.3f} s = the "
                 f"slowest rank (rank {plan.bottleneck}) + {plan.hop_s * 1000:.1f} ms per hop (per block: {per_rank})")
    if not plan.fits:
        lines.append("refused: " + plan.refusal())
    return "\n".join(lines)


def plan_table(plan: Plan, *, header: bool = True, holds_dit: bool = True) -> str:
    """The plan as ``liveavatar plan`` prints it: one line per component with its GPU and host bytes side by
    side, the peaks per phase, the verdicts, the speed (``header``: the plan of one GPU, not a pipeline rank)."""
    runs = attention_runs(plan.workload, plan.hardware)
    fallback = " (the attention runs in bf16: no FP8 tensor cores)" if runs != plan.workload.attention else ""
    lines = [f"plan: {plan.workload.describe()} on {plan.hardware.name}{fallback}"] if header else []
    lines += [f"budget: GPU {format_gib(plan.budget_bytes)} ({plan.budget_source}), headroom "
              f"{format_gib(plan.headroom_bytes)}; host {format_gib(plan.host_budget_bytes)}"
              + (f", headroom {format_gib(plan.host_headroom_bytes)}" if plan.host_budget_bytes is not None else ""),
              f"placement: {plan.placement.describe() if holds_dit else 'no DiT on this GPU'}"]
    lines += [f"note: {note}" for note in plan.notes]
    lines += ["", f"  {'component':<58} {'dtype':<9} {'GPU GiB':>7} {'host GiB':>9}  phases"]
    for c in plan.components:
        gpu = f"{c.nbytes / GiB:7.2f}" if c.where == "gpu" else f"{'-':>7}"
        host = f"{'-':>9}" if c.where == "gpu" else (f"({c.nbytes / GiB:.2f})".rjust(9) if c.reclaimable else
                                                      f"{c.nbytes / GiB:8.2f}{'p' if c.pinned else ' '}")
        lines.append(f"  {c.name:<58} {c.dtype:<9} {gpu} {host}  {_phase_span(c.phases)}")
    lines.append("  (p: pinned; in parentheses: file pages the kernel reclaims, not budgeted)")
    lines.append("")
    lines.append(f"  {'peak per phase':<16} {'GPU GiB (allocated)':>20} {'host GiB (pinned)':>20}")
    host_phases = plan.host_phases
    for phase, gpu_bytes in plan.phases.items():
        pinned = sum(c.nbytes for c in plan.components if c.pinned and phase in c.phases)
        lines.append(f"  {phase:<16} {gpu_bytes / GiB:>20.2f} {host_phases[phase] / GiB:>12.2f} ({pinned / GiB:.2f})")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  predicted GPU peak: {format_gib(plan.predicted_peak_bytes)} allocated ({plan.peak_phase}), "
                 f"{format_gib(plan.predicted_reserved_bytes)} reserved (+{ALLOCATOR_FRAGMENTATION:.0%} "
                 f"fragmentation) + {format_gib(plan.headroom_bytes)} headroom vs {format_gib(plan.budget_bytes)}")
    host = (f"  predicted host peak: {format_gib(plan.predicted_host_peak_bytes)} "
            f"({max(host_phases, key=host_phases.get)}), {format_gib(plan.host_pinned_bytes)} of it pinned")
    if plan.host_budget_bytes is not None:
        host += f" + {format_gib(plan.host_headroom_bytes)} headroom vs {format_gib(plan.host_budget_bytes)}: " + \
                ("fits" if plan.host_fits else "DOES NOT FIT")
    if plan.host_reclaimable_bytes:
        host += f"; up to {format_gib(plan.host_reclaimable_bytes)} more of reclaimable file pages while encoding"
    lines += [host, f"  verdict: {verdict}"]
    s = plan.speed
    if not header:
        lines.append(f"  time per block: {s.block_s:.3f} s ({plan.workload.kv_sets_per_gpu} x {s.forward_s:.3f} s per "
                     f"forward{' + decode' if plan.workload.is_output else ''})")
    else:
        lines.append(f"  expected speed: {s.forward_s:.3f} s per forward (compute {s.compute_s:.3f} s, "
                     f"{s.h2d_bytes_per_forward / 1e9:.2f} GB host->GPU per forward, {s.path} path), "
                     f"{s.fps:.2f} video FPS; "
                     f"slowdown {plan.slowdown:.2f}x vs everything resident ({plan.baseline.fps:.2f} FPS)")
    if not plan.fits and header:
        lines.append("")
        lines.append("refused: " + plan.refusal())
    return "\n".join(lines)


def _phase_span(phases: tuple[str, ...]) -> str:
    return phases[0] if len(phases) == 1 else f"{phases[0]}..{phases[-1]}"
