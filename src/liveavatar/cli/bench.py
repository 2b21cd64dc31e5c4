"""``liveavatar bench``: the engine timed at full size with random weights (``run_benchmark``), under the
placement that the ``plan`` flags plan or pin."""
from __future__ import annotations

import argparse
import json
import sys

from liveavatar.cli.flags import add_flag, add_no_compile_flag, byte_amount
from liveavatar.cli.plan import add_plan_arguments, inventory_from_args, plan_from_args, workload_from_args
from liveavatar.errors import InputError
from liveavatar.runtime.bench import run_benchmark
from liveavatar.runtime.compile import GRAPHS_ENV
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.planner.policy import Pins, Plan, plan_cpu_run


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_plan_arguments(parser)
    bench = parser.add_argument_group("benchmark")
    add_flag(bench, "blocks", type=int, default=8, metavar="N", help="blocks measured after the warm-up (default 8)")
    add_flag(bench, "warmup-blocks", type=int, default=2, metavar="N", help="blocks run first, not timed (default 2)")
    add_flag(bench, "device", help="cuda, cuda:N or cpu (default: CUDA when available)")
    add_flag(bench, "memory-cap", metavar="SIZE", help="cap this process's GPU memory (set_per_process_memory_"
             "fraction), e.g. 22GiB; the planner plans for the cap")
    add_flag(bench, "seed", type=int, default=0, help="seed of the random weights and conditioning")
    add_flag(bench, "load-weights", action="store_true", help="load the DiT from --ckpt_dir's shards with the "
             "engine's streaming loader instead of random weights (the build time is then the load time)")
    add_flag(bench, "lora", metavar="PATH", help="with --load-weights: the LoRA file merged while loading")
    add_flag(bench, "requests", type=int, default=1, metavar="N",
             help="requests run one after the other on the same engine; the figures are the last one's "
                  "(default 1; 2 measures a warm engine)")
    add_flag(bench, "quiet", action="store_true", help="no progress lines on stderr, only the report")
    add_no_compile_flag(bench)
    add_flag(bench, "no-cuda-graphs", action="store_true",
             help=f"compiled forwards without CUDA graph replays (also {GRAPHS_ENV}=0)")


def run_bench(args: argparse.Namespace) -> int:
    report = bench_from_args(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def bench_from_args(args: argparse.Namespace) -> dict:
    import torch

    from liveavatar.devices import configure_cuda_allocator, resolve_device

    device = resolve_device(args.device)
    if args.blocks < 1 or args.warmup_blocks < 0 or args.requests < 1:
        raise InputError("--blocks and --requests must be at least 1 and --warmup-blocks at least 0")
    if args.num_gpus != 1:
        raise InputError(f"--num_gpus {args.num_gpus}: bench times one GPU; the multi-GPU pipeline is timed by "
                         f"benchmarks/gpu_pipeline.py")
    if device.type == "cuda":
        configure_cuda_allocator()
        torch.cuda.set_device(device)
        if args.memory_cap:
            cap = byte_amount("memory-cap", args.memory_cap)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
            if args.vram_budget is None:
                args.vram_budget = args.memory_cap
    elif args.memory_cap:
        raise InputError("--memory-cap needs a CUDA device")
    elif args.config != "tiny" and not args.load_weights:
        raise InputError("bench: the full-size model needs a CUDA GPU; on the CPU use --config tiny")
    if args.load_weights and not args.ckpt_dir:
        raise InputError("--load-weights: give the checkpoint folder with --ckpt_dir")
    if args.lora and not args.load_weights:
        raise InputError("--lora: only with --load-weights (random weights have no LoRA to merge)")
    plan = plan_from_args(args) if device.type == "cuda" else _cpu_plan(args)
    if not plan.fits:
        raise InputError(plan.refusal())
    return run_benchmark(plan, device=device, blocks=args.blocks, warmup_blocks=args.warmup_blocks,
                         config_name=args.config, ckpt_dir=args.ckpt_dir, seed=args.seed,
                         compile=False if args.no_compile else None,
                         cuda_graphs=False if args.no_cuda_graphs else None, requests=args.requests,
                         weights_dir=args.ckpt_dir if args.load_weights else None, lora=args.lora,
                         say=None if args.quiet else _say)


def _say(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


def _cpu_plan(args: argparse.Namespace) -> Plan:
    """On the CPU the placement is what the flags pin (default: everything resident); no GPU budget."""
    work = workload_from_args(args, num_gpus=1, device_type="cpu")
    pins = Pins(weight_dtype=args.weights or "bf16", kv_dtype=args.kv_dtype or "bf16",
                kv_location=args.kv_location or "gpu", cond_location=args.cond_location or "gpu",
                streamed_layers=args.stream_layers or 0, text_encoder=args.text_encoder)
    return plan_cpu_run(inventory_from_args(args), work, pins)


def format_report(report: dict) -> str:
    def gib(value):
        return "n/a" if value is None else f"{value:.2f} GiB"

    lines = [
        f"bench: {report['config']} DiT, {report['width']}x{report['height']}, {report['infer_frames']}-frame clips, "
        f"{report['sample_steps']} steps, {report['dtype']} on {report['device']} (torch {report['torch']})",
        f"placement: {Placement(**report['placement']).describe()}",
        f"loop: {report['loop']}",
        f"video FPS: {report['fps']:.2f} over {report['measured_blocks']} blocks after {report['warmup_blocks']} "
        f"warm-up blocks ({report['block_s']:.3f} s per block)",
        f"time to first frame: {report['ttff_s']:.2f} s; per forward: "
        + ("n/a" if report["forward_s"] is None else f"{report['forward_s']:.4f} s"),
        f"peak GPU memory: {gib(report['peak_gib'])} allocated, {gib(report['peak_reserved_gib'])} reserved "
        f"(planner predicted {gib(report['predicted_peak_gib'])} allocated)",
        f"peak host RSS: {report['host_rss_peak_gib']:.2f} GiB (planner predicted "
        f"{report['predicted_host_peak_gib']:.2f} GiB), {report['pinned_gib']:.2f} GiB pinned (predicted "
        f"{report['predicted_pinned_gib']:.2f}); {report['weights']} weights, build {report['build_s']:.1f} s",
        f"fast path: {report['fast_path']}; decode {'overlapped' if report['decode_overlapped'] else 'in line'}; "
        f"attention {report['attention']}",
    ]
    if report["compiles"] is not None:
        first = (f"first request: {report['first_request_compiles']} graphs compiled in "
                 f"{report['first_request_compile_s']:.1f} s, first frame after "
                 f"{report['first_request_ttff_s']:.2f} s; last request: " if report["requests"] > 1 else "")
        lines.append(f"compiler: {first}{report['compiles']} graphs compiled in {report['compile_s']:.1f} s, "
                     f"{report['compiles_after_first_block']} after the first block, {report['graph_breaks']} graph "
                     f"breaks" + (f"; fell back to eager: {report['compile_fallback']}"
                                  if report["compile_fallback"] else ""))
    if report["cuda_graphs"] is not None:
        graphs = report["cuda_graphs"]
        lines.append(f"CUDA graphs: {graphs['captures']} captured, {graphs['replays']} replays, "
                     f"{graphs['direct']} forwards without a graph" + (f" (capture failed: {graphs['failed']})"
                                                                        if graphs["failed"] else ""))
    return "\n".join(lines)
