"""The timestep pipeline on N GPUs with full-size random weights: per-rank peak memory against the planner,
FPS and time to first frame against the prediction, the cost of one hop, the frames against one GPU, and
a kill-a-rank drill.

    PYTHONPATH=src python benchmarks/gpu_pipeline.py --ranks 5        # the reference's layout (4 + decode)
    PYTHONPATH=src python benchmarks/gpu_pipeline.py --ranks 2,4,5    # several layouts, one GPU set
    PYTHONPATH=src python benchmarks/gpu_pipeline.py --config tiny --device cpu --ranks 2 --size 64*64
    PYTHONPATH=src python benchmarks/gpu_pipeline.py --ranks 2 --share-gpu --vram-budget 36GiB --size 384*256

``--share-gpu`` (benchmark only, for machines that lend one GPU): every rank runs on GPU 0, each planned
with ``--vram-budget`` (required; ranks x budget must fit the card). Per-rank peaks (each process's own
allocator), the frames against one GPU and the kill drill mean what they mean on N GPUs; FPS, TTFF and the
hop time do not (the ranks share one GPU's compute and the hop never leaves it).

For each rank count: every rank is planned (`plan_step_ranks`, on this machine's GPU and --vram-budget) and
spawned with the 14B DiT built from the same seed (so every rank and the one-GPU run hold the same
weights); a block-sized message goes round the ranks to time one hop; then the real sampling loop runs
warm-up + measured blocks on synthetic conditioning (as `liveavatar bench`), then a second run is cut by
SIGKILL of rank 1 (the drill: time until the output rank raises, until every rank has exited, and the
message). Last, one GPU runs the same request with the same weight and KV dtypes, every layer resident
(with ``--share-gpu`` on the whole card, the ranks gone), and the decoded frames are compared with each
pipeline's, against a bound: 0 levels of 255 eager or on CPU processes (where the pipeline gives one device's
bits), `COMPILED_GPU_FRAME_BOUND` compiled on GPUs; past it the script exits 1. Peaks exclude the set-up (the
encoders are not loaded). A compact table closes the output; JSON goes to $OUT/gpu_pipeline.json.
Expected wall time on H100/H200s: about 2 minutes per rank count plus 1 minute for the one-GPU run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from liveavatar.devices import configure_cuda_allocator, resolve_dtype
from liveavatar.geometry import size_for_area
from liveavatar.io.video_writer import pixels_to_uint8
from liveavatar.runtime.bench import bench_phase_peaks, random_dit, random_vae, synthetic_request
from liveavatar.runtime.compile import resolve_fast_path
from liveavatar.runtime.distributed import LocalRanks, RankFailure
from liveavatar.runtime.engine import Engine
from liveavatar.runtime.executors.step_ranks import StepRanks
from liveavatar.runtime.multi_gpu import run_stage
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.planner.hardware import CPU_HARDWARE, HARDWARE_PRESETS, GiB, detect_hardware
from liveavatar.runtime.planner.memory import Workload, dit_inventory, transformer_config_for
from liveavatar.runtime.planner.step_ranks import plan_step_ranks
from liveavatar.runtime.planner.policy import Pins, make_plan, resolve_budget
from liveavatar.runtime.sampler import VideoFrames
from liveavatar.options import parse_size
from liveavatar.settings import parse_vram_budget

# Levels of 255 the compiled pipeline's frames may differ from a compiled one-GPU run's on GPUs: the compiled
# path's own difference from eager on one GPU (max 11 at 384*256 on an H100; two ranks sharing one H200 gave 4
# against a resident one-GPU run; benchmarks/RESULTS.md). Eager, and compiled on CPU processes, it is 0.
COMPILED_GPU_FRAME_BOUND = 11

RELAY_TAG = 1
RELAY_MESSAGES = 20
PEAK_REPORT_S = 0.5


@dataclass(frozen=True)
class RandomStage:
    """A worker rank with the benchmark's random DiT (`run_stage` calls ``load``); the fields are
    `StageSpec`'s."""

    config_name: str | None
    placement: Placement
    device: str
    dtype: str
    seed: int
    threads: int | None = None
    compile: bool | None = None

    def load(self, device, dtype):
        config = transformer_config_for(None, self.config_name)
        return random_dit(config, self.placement, device, dtype, torch.Generator(device).manual_seed(self.seed))


def bench_rank(group, spec: RandomStage) -> None:
    """A worker rank: relay the hop-timing messages, report its peak memory to the store while it serves
    its steps."""
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    upstream = group.link_from(group.rank - 1 if group.rank else group.world_size - 1, RELAY_TAG)
    downstream = group.link_to(group.rank + 1, RELAY_TAG)
    for _ in range(RELAY_MESSAGES):
        downstream.send(*upstream.recv(device))
    downstream.flush()
    if device.type == "cuda":
        def report():
            while True:
                group.store.set(f"bench/peak/{group.rank}", str(torch.cuda.max_memory_allocated(device)))
                time.sleep(PEAK_REPORT_S)
        threading.Thread(target=report, daemon=True).start()
    run_stage(group, spec)


def hop_seconds(group, work: Workload, config, device, dtype) -> float:
    """Median time of one hop: a block's latents and audio features round the ranks, divided by the hops."""
    g = work.geometry
    payload = {"x": torch.randn(16, 3, g.latent_height, g.latent_width, device=device, dtype=dtype),
               "audio": torch.randn(1, config.audio_layers, config.audio_dim, g.frames_per_block, dtype=dtype)}
    to_first, from_last = group.link_to(0, RELAY_TAG), group.link_from(group.world_size - 2, RELAY_TAG)
    times = []
    for index in range(RELAY_MESSAGES):
        start = time.perf_counter()
        to_first.send({"index": index}, payload)
        from_last.recv(device)
        times.append(time.perf_counter() - start)
    to_first.flush()
    return float(np.median(times[2:])) / group.world_size


def run_loop(engine, request, conditioning, blocks: int, warmup: int, *, kill=None):
    """Run the loop; return (time to first frame, seconds per block after the warm-up, uint8 frames).
    ``kill()`` is called after the first decoded block (the drill)."""
    start = time.perf_counter()
    marks, frames, done = [], [], 0
    events = engine.run(request, conditioning)
    try:
        for event in events:
            if not isinstance(event, VideoFrames):
                done += 1
                continue
            frames.append(pixels_to_uint8(event.frames))  # to the host: also synchronises
            marks.append((time.perf_counter(), done))
            if kill is not None:
                kill()
                kill = None
            if done >= warmup + blocks:
                break
    finally:
        events.close()
    first = next(mark for mark in marks if mark[1] >= warmup)
    return marks[0][0] - start, (marks[-1][0] - first[0]) / max(1, marks[-1][1] - first[1]), np.concatenate(frames)


def measure_pipeline(ranks: int, args, work: Workload, hardware, budget, source, dtype,
                     device) -> tuple[dict, np.ndarray | None]:
    config = transformer_config_for(None, args.config)
    inventory = dit_inventory(config)
    plan = plan_step_ranks(inventory, replace(work, num_gpus=ranks), hardware, budget, budget_source=source,
                         pins=Pins(weight_dtype=args.weights))
    report = {"ranks": ranks, "layout": plan.layout.describe(work.sample_steps), "fits": plan.fits,
              "predicted_fps": plan.fps, "predicted_hop_ms": plan.hop_s * 1e3,
              "placements": [rank.placement.describe() for rank in plan.ranks]}
    if not plan.fits:
        report["refusal"] = plan.refusal()
        return report, None
    devices = [torch.device("cpu")] * ranks if device.type == "cpu" else [torch.device("cuda", 0)] * ranks \
        if args.share_gpu else [torch.device("cuda", index) for index in range(ranks)]
    threads = torch.get_num_threads() if device.type == "cpu" else None
    dtype_name = str(dtype).removeprefix("torch.")
    started = time.perf_counter()
    local = LocalRanks(ranks, ranks - 1, bench_rank, {
        rank: (RandomStage(args.config, plan.ranks[rank].placement, str(devices[rank]), dtype_name, args.seed,
                           threads, compile=args.compile),) for rank in range(ranks - 1)}, timeout=timedelta(minutes=5))
    output_device = devices[-1]
    if output_device.type == "cuda":
        torch.cuda.set_device(output_device)
        torch.cuda.reset_peak_memory_stats(output_device)
    report["hop_ms"] = hop_seconds(local.group, work, config, output_device, dtype) * 1e3
    step_ranks = StepRanks(local.group, plan.layout, output_device, ranks=local)
    output_placement = plan.ranks[-1].placement
    model, streamer = random_dit(config, output_placement, output_device, dtype,
                                 torch.Generator(output_device).manual_seed(args.seed)) \
        if plan.layout.output_denoises else (None, None)
    vae = random_vae(vae_config(args.config), device=output_device, dtype=dtype,
                     generator=torch.Generator(output_device).manual_seed(args.seed + 1))
    engine = Engine(model, vae, None, None, placement=output_placement, device=output_device, dtype=dtype,
                    layer_streamer=streamer, step_ranks=step_ranks,
                    fast_path=resolve_fast_path(output_device, compile=args.compile))
    synthetic = synthetic_request(config, vae, work, device=output_device, dtype=dtype,
                                  total_blocks=args.warmup_blocks + args.blocks, seed=args.seed)
    request, conditioning = synthetic.request, synthetic.conditioning(model, output_device, dtype)
    report["build_s"] = time.perf_counter() - started
    ttff, block_s, frames = run_loop(engine, request, conditioning, args.blocks, args.warmup_blocks)
    report.update(ttff_s=ttff, block_s=block_s, fps=work.video_frames_per_block / block_s)
    if output_device.type == "cuda":
        peaks = [int(local.group.store.get(f"bench/peak/{rank}")) for rank in range(ranks - 1)]
        peaks.append(torch.cuda.max_memory_allocated(output_device))
        report["peak_gib"] = [peak / GiB for peak in peaks]
    report["predicted_peak_gib"] = [max(bench_phase_peaks(rank).values()) / GiB for rank in plan.ranks]
    report["drill"] = kill_drill(engine, request, conditioning, local)
    step_ranks.close()
    del engine, model, vae, streamer
    if output_device.type == "cuda":
        torch.cuda.empty_cache()
    return report, frames


def kill_drill(engine, request, conditioning, local: LocalRanks) -> dict:
    """SIGKILL rank 1 (rank 0 with two ranks) after the first decoded block of a new run."""
    victim = 1 if len(local.processes) > 1 else 0
    killed = {}

    def kill():
        os.kill(local.processes[victim].pid, signal.SIGKILL)
        killed["at"] = time.perf_counter()

    message = None
    try:
        run_loop(engine, request, conditioning, 10**6, 0, kill=kill)
    except RankFailure as failure:
        message = str(failure)
    raised = time.perf_counter()
    engine.step_ranks.close(RankFailure(message or "drill"))
    deadline = time.monotonic() + 60
    while any(process.is_alive() for process in local.processes.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"victim": victim, "message": message, "raised_after_s": raised - killed["at"],
            "all_exited_after_s": time.perf_counter() - killed["at"],
            "left": sum(process.is_alive() for process in local.processes.values())}


def vae_config(config_name: str | None):
    """The Wan 2.1 VAE's configuration (narrow for the tiny config)."""
    from liveavatar.models.vae import VAEConfig

    return VAEConfig(base_dim=8) if config_name == "tiny" else VAEConfig()


def one_gpu_frames(args, work: Workload, hardware, budget, source, dtype, device, weights: str, kv_dtype: str):
    """The same request on one device, with the pipeline's weight and KV dtypes and every layer resident, as
    the ranks hold theirs (None when it cannot fit). A layer streamer would take the CUDA graphs away from the
    one-GPU run while the ranks replay theirs: an H100 run of 2026-12-07 that let it stream 4 layers (a 36 GiB
    budget) differed from the compiled pipeline by up to 11 levels of 255."""
    config = transformer_config_for(None, args.config)
    pins = Pins(weight_dtype=weights, kv_dtype=kv_dtype, streamed_layers=0)
    if device.type == "cpu":
        plan = make_plan(dit_inventory(config), work, CPU_HARDWARE, None, pins=pins)
    else:
        if args.share_gpu:  # the ranks have exited: the whole card is this run's
            budget, source = resolve_budget(vram_budget=None)
        plan = make_plan(dit_inventory(config), work, hardware, budget, budget_source=source, pins=pins)
    if not plan.fits:
        return None, plan.refusal()
    model, streamer = random_dit(config, plan.placement, device, dtype, torch.Generator(device).manual_seed(args.seed))
    vae = random_vae(vae_config(args.config), device=device, dtype=dtype,
                     generator=torch.Generator(device).manual_seed(args.seed + 1))
    engine = Engine(model, vae, None, None, placement=plan.placement, device=device, dtype=dtype,
                    layer_streamer=streamer, fast_path=resolve_fast_path(device, compile=args.compile))
    synthetic = synthetic_request(config, vae, work, device=device, dtype=dtype,
                                  total_blocks=args.warmup_blocks + args.blocks, seed=args.seed)
    request, conditioning = synthetic.request, synthetic.conditioning(model, device, dtype)
    _, block_s, frames = run_loop(engine, request, conditioning, args.blocks, args.warmup_blocks)
    return frames, {"placement": plan.placement.describe(), "fps": work.video_frames_per_block / block_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="5", help="rank counts to measure, e.g. 2,4,5 (default 5)")
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--infer_frames", type=int, default=48)
    parser.add_argument("--sample_steps", type=int, default=4)
    parser.add_argument("--config", choices=("14b", "tiny"), default=None, help="DiT size (default 14b)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    parser.add_argument("--weights", choices=("bf16", "fp8"), default=None, help="pin every rank's weight dtype")
    parser.add_argument("--vram-budget", default=None, help="cap per GPU, e.g. 40GiB")
    parser.add_argument("--blocks", type=int, default=8, help="measured blocks (default 8)")
    parser.add_argument("--warmup-blocks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                        help="every rank eager (default: the compiled fast path on GPUs, as generate)")
    parser.add_argument("--share-gpu", action="store_true",
                        help="benchmark only: every rank on GPU 0, each within --vram-budget (see above)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: use --config tiny --device cpu")
    configure_cuda_allocator()  # before any allocation, here and (inherited) in the spawned ranks
    counts = [int(n) for n in args.ranks.split(",")]
    if args.share_gpu and (device.type != "cuda" or not args.vram_budget):
        parser.error("--share-gpu needs --device cuda and a --vram-budget per rank (e.g. 36GiB for 2 ranks on 80 GB)")
    if args.share_gpu and max(counts) * parse_vram_budget(args.vram_budget) > \
            torch.cuda.get_device_properties(0).total_memory:
        parser.error(f"--share-gpu: {max(counts)} ranks x --vram-budget {args.vram_budget} exceed GPU 0's memory")
    if device.type == "cuda" and not args.share_gpu and max(counts) > torch.cuda.device_count():
        parser.error(f"--ranks {max(counts)}: this machine has {torch.cuda.device_count()} GPUs")
    dtype = resolve_dtype(args.dtype, device)
    torch.set_grad_enabled(False)
    width, height = (int(n) for n in re.findall(r"\d+", args.size)[:2])
    height, width = size_for_area(height, width, parse_size(args.size))
    work = Workload(height, width, args.infer_frames, args.sample_steps, 1, "streaming", dtype.itemsize)
    if device.type == "cpu":
        hardware, budget, source = CPU_HARDWARE, None, "CPU run"
    else:
        # The largest pipeline's output GPU: its free memory is the budget.
        torch.cuda.set_device(0 if args.share_gpu else max(counts) - 1)
        hardware = detect_hardware() or HARDWARE_PRESETS["h100"]
        cap = parse_vram_budget(args.vram_budget) if args.vram_budget else None
        budget, source = resolve_budget(vram_budget=cap)

    reports, frames = [], {}
    for ranks in counts:
        report, got = measure_pipeline(ranks, args, work, hardware, budget, source, dtype, device)
        reports.append(report)
        frames[ranks] = got
        print(json.dumps(report), flush=True)
    fitting = [r for r in reports if r["fits"]]
    one = {"note": "no pipeline fitted"}
    if fitting:
        first_placement = fitting[0]["placements"][0]
        weights = "fp8" if first_placement.startswith("fp8") else "bf16"
        kv_dtype = "fp8" if "KV fp8" in first_placement else "bf16"
        if device.type == "cuda":
            torch.cuda.set_device(0)
        reference, one = one_gpu_frames(args, work, hardware, budget, source, dtype,
                                        torch.device("cuda", 0) if device.type == "cuda" else device, weights, kv_dtype)
        compiled = resolve_fast_path(device, compile=args.compile).compile
        bound = COMPILED_GPU_FRAME_BOUND if compiled and device.type == "cuda" else 0
        for report in fitting:
            got = frames[report["ranks"]]
            if isinstance(one, dict) and reference is not None:
                count = min(len(got), len(reference))
                diff = np.abs(got[:count].astype(np.int16) - reference[:count].astype(np.int16))
                report["frame_diff"] = {"frames": count, "max_abs": int(diff.max()),
                                        "pixels_differing": float((diff > 0).mean()), "bound": bound}
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_pipeline_"))
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "size": f"{width}x{height}", "config": args.config or "14b", "one_gpu": one, "pipelines": reports,
              "shared_gpu": args.share_gpu}
    (out / "gpu_pipeline.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"JSON: {out / 'gpu_pipeline.json'}")
    beyond = [r["ranks"] for r in fitting if (diff := r.get("frame_diff")) and diff["max_abs"] > diff["bound"]]
    if beyond:
        print(f"error: the frames of {beyond} ranks differ from one GPU's past the bound", file=sys.stderr)
        return 1
    return 0


def table(result: dict) -> str:
    lines = [f"{result['device']}, {result['config']} DiT at {result['size']}, torch {result['torch']}; one GPU: "
             f"{result['one_gpu']}",
             "ranks | FPS meas/pred | TTFF s | hop ms meas/pred | peak GiB meas/pred per rank | frames vs 1 GPU | "
             "kill drill (raise s, all exit s, left)"]
    for r in result["pipelines"]:
        if not r["fits"]:
            lines.append(f"{r['ranks']} | refused: {r['refusal']}")
            continue
        peaks = " ".join(f"{m:.1f}/{p:.1f}" for m, p in zip(r.get("peak_gib", [float("nan")] * r["ranks"]),
                                                             r["predicted_peak_gib"]))
        diff = r.get("frame_diff")
        diff_text = "n/a" if diff is None else \
            f"max {diff['max_abs']} (bound {diff['bound']}), {diff['pixels_differing']:.2%} px"
        drill = r["drill"]
        lines.append(f"{r['ranks']} | {r['fps']:.2f}/{r['predicted_fps']:.2f} | {r['ttff_s']:.2f} | "
                     f"{r['hop_ms']:.2f}/{r['predicted_hop_ms']:.2f} | {peaks} | {diff_text} | "
                     f"{drill['raised_after_s']:.2f}, {drill['all_exited_after_s']:.2f}, {drill['left']} "
                     f"({drill['message']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
