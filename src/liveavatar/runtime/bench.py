"""The engine's benchmark: the real sampling loop at full size with random weights, timed and measured.

The DiT (the 14B release's configuration, or the tiny one) and the VAE are built on the meta device and
materialised unit by unit directly on the target device in the run dtype, with random weights (no
checkpoint, never a full host copy), or the DiT is loaded from a checkpoint folder (``weights_dir``, with
its LoRA) by the engine's own streaming loader; the DiT is placed as the plan says: FP8 linears, streamed
layers, KV sets and cond cache on the GPU or in pinned host memory. Conditioning is synthetic (random text
context, audio features, reference and motion latents: the encoders are set-up cost and not timed), and
`liveavatar.runtime.sampler.sample` runs it: sink prefill, 4-step blocks with one KV set per step, the
sink refresh before clip 1 and the streaming VAE decode of every block.

Reported: video FPS over the blocks after the warm-up, time to first frame (from the start of the loop:
prefill, first block, its decode), per-forward time (median over forwards inside a block, so without
the decode), peak allocated and reserved GPU memory and peak host RSS per phase (sampled every few
milliseconds), the pinned bytes, and the planner's predictions of all of them.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from liveavatar.geometry import DROPPED_LEADING_FRAMES, LATENT_CHANNELS
from liveavatar.runtime.planner.hardware import GiB
from liveavatar.runtime.planner.host import COMPILE_WORKERS_NAME
from liveavatar.runtime.planner.memory import phase_peaks, transformer_config_for
from liveavatar.runtime.rss import RssSampler

# What the benchmark does not do of a real run: no encoders are read or run (synthetic conditioning), no mp4.
NOT_BENCHED = ("audio encoder", "text encoder", "wav2vec2", "audio:", "decoded frames")


def random_init_(module, device, dtype, generator) -> None:
    """Replace every (meta) parameter and buffer of `module` by random values made on `device` in
    `dtype`: matrices and kernels N(0, 1/fan_in), biases N(0, 0.02²), gains 1, modulations N(0, 1/dim)."""
    import torch
    from torch import nn

    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for name, tensor in list(store.items()):
                if tensor is None:
                    continue
                shape = tuple(tensor.shape)
                if name == "bias":
                    value = torch.randn(shape, device=device, dtype=dtype, generator=generator).mul_(0.02)
                elif len(shape) <= 1 or name in ("gamma", "weights"):  # gains, VAE norms, audio layer mix
                    value = torch.ones(shape, device=device, dtype=dtype)
                else:
                    fan_in = math.prod(shape[1:]) if "modulation" not in name else shape[-1]
                    value = torch.randn(shape, device=device, dtype=dtype, generator=generator).mul_(fan_in ** -0.5)
                store[name] = nn.Parameter(value, requires_grad=False) if store is owner._parameters else value


def random_dit(config, placement, device, dtype, generator):
    """The DiT of ``config`` with random weights, materialised unit by unit on ``device`` as ``placement``
    says (no host copy), and its layer streamer (None when no layer streams)."""
    import torch

    from liveavatar.models.transformer import CausalS2VTransformer
    from liveavatar.runtime.layer_streaming import place_dit

    with torch.device("meta"):
        model = CausalS2VTransformer(config)
    streamer = place_dit(model, placement, device,
                         materialize=lambda name, module: random_init_(module, device, dtype, generator))
    return model.eval().requires_grad_(False), streamer


def build_random_models(placement, *, config, vae_config, device, dtype, seed: int = 0):
    """The DiT (``config``) and the VAE with random weights, made on ``device`` and placed as ``placement``
    says; returns (DiT, VAE, layer streamer or None, seconds)."""
    import torch


    generator = torch.Generator(device).manual_seed(seed)
    start = time.perf_counter()
    model, layer_streamer = random_dit(config, placement, device, dtype, generator)
    vae = random_vae(vae_config, device=device, dtype=dtype, generator=generator)
    return model, vae, layer_streamer, _synchronized(device.type == "cuda", start)


def random_vae(vae_config, *, device, dtype, generator):
    """The VAE of ``vae_config`` with random weights, made on ``device``."""
    import torch

    from liveavatar.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(vae_config)
    random_init_(vae, device, dtype, generator)
    return vae.eval().requires_grad_(False)


@dataclass
class SyntheticRequest:
    """A request of a workload's size lasting ``total_blocks`` blocks, with synthetic conditioning."""

    request: object
    reference: object
    audio: object
    text_dim: int
    generator: object
    total_blocks: int

    def conditioning(self, model, device, dtype):
        """Its conditioning with a fresh random prompt (text K/V) each time, as served requests have."""
        import torch

        from liveavatar.runtime.engine import Conditioning

        text = torch.randn(32, self.text_dim, generator=self.generator).to(device, dtype)
        # Without a DiT here (an output rank that only decodes) the pipeline's ranks make the text K/V.
        return Conditioning(None if model is None else model.text_kv(text), self.reference, self.audio, text=text)


def synthetic_request(config, vae, work, *, device, dtype, total_blocks: int, seed: int = 0) -> SyntheticRequest:
    """Random audio features, reference and motion latents shaped as ``work`` makes them (the encoders are
    set-up cost, not timed here)."""
    import torch

    import numpy as np
    from PIL import Image

    from liveavatar.geometry import AUDIO_SAMPLE_RATE, FPS
    from liveavatar.options import RequestOptions
    from liveavatar.request import WaveformAudio, resolve_request
    from liveavatar.runtime.conditioning import ReferenceLatents, WholeFileAudio, motion_history

    clip_seconds = work.infer_frames / FPS
    num_clips = math.ceil(total_blocks / work.geometry.blocks_per_clip)
    silence = np.zeros(int((num_clips + 1) * clip_seconds * AUDIO_SAMPLE_RATE), np.float32)
    options = RequestOptions(size=work.width * work.height, infer_frames=work.infer_frames,
                             sample_steps=work.sample_steps, num_clip=num_clips, base_seed=seed, mode=work.mode,
                             attention=work.attention)
    request = resolve_request(Image.new("RGB", (work.width, work.height)), WaveformAudio(silence), "", options)
    geometry = request.geometry
    g = torch.Generator("cpu").manual_seed(seed)
    audio = WholeFileAudio(torch.randn(1, config.audio_layers, config.audio_dim, num_clips * work.infer_frames,
                                       generator=g).to(dtype), geometry)
    picture = torch.rand(1, 3, 1, work.height, work.width, generator=g).mul_(2).sub_(1).to(device, dtype)
    history = motion_history(picture, work.mode)
    motion_latents = (history.shape[2] - 1) // vae.config.temporal_factor + 1
    reference = ReferenceLatents(ref=torch.randn(1, LATENT_CHANNELS, 1, geometry.latent_height, geometry.latent_width,
                                                 generator=g).to(device),
                                 motion=torch.randn(1, LATENT_CHANNELS, motion_latents, geometry.latent_height,
                                                    geometry.latent_width, generator=g).to(device),
                                 history=history)
    return SyntheticRequest(request, reference, audio, config.text_dim, g, total_blocks)


def run_benchmark(plan, *, device, blocks: int, warmup_blocks: int, config_name: str | None = None,
                  ckpt_dir=None, seed: int = 0, compile: bool | None = None, cuda_graphs: bool | None = None,
                  requests: int = 1, overlap_decode: bool | None = None, weights_dir=None, lora=None,
                  say: Callable[[str], None] | None = None) -> dict:
    """Build the full-size engine under `plan.placement` (random weights, or the DiT of ``weights_dir`` with
    ``lora`` merged), run ``requests`` requests of warm-up + measured blocks through the sampling loop,
    return the measurements of the last one (see the module docstring) with the compiler's counters and the
    first request's time to first frame. ``say`` gets a line per phase and per decoded block."""
    with RssSampler() as rss:
        return _run_benchmark(plan, rss, device=device, blocks=blocks, warmup_blocks=warmup_blocks,
                              config_name=config_name, ckpt_dir=ckpt_dir, seed=seed, compile=compile,
                              cuda_graphs=cuda_graphs, requests=requests, overlap_decode=overlap_decode,
                              weights_dir=weights_dir, lora=lora, say=say or (lambda line: None))


def _run_benchmark(plan, rss: RssSampler, *, device, blocks, warmup_blocks, config_name, ckpt_dir, seed,
                   compile, cuda_graphs, requests, overlap_decode, weights_dir, lora, say) -> dict:
    import torch

    from liveavatar.models.vae import VAEConfig
    from liveavatar.runtime.compile import resolve_fast_path
    from liveavatar.runtime.engine import Engine
    from liveavatar.runtime.loading import load_placed_dit

    work, placement = plan.workload, plan.placement
    dtype = torch.float32 if work.run_dtype_bytes == 4 else torch.bfloat16
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    host_start = rss.take()
    vae_config = VAEConfig(base_dim=8) if config_name == "tiny" else VAEConfig()
    say(f"{work.width}x{work.height}, {str(dtype).removeprefix('torch.')} on {device}, {placement.describe()}; "
        + (f"loading the DiT from {weights_dir}" if weights_dir is not None else "building random weights"))
    if weights_dir is not None:
        start = time.perf_counter()
        model, layer_streamer = load_placed_dit(weights_dir, placement, device=device, dtype=dtype, lora=lora)
        vae = random_vae(vae_config, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(seed))
        build_s = _synchronized(cuda, start)
    else:
        model, vae, layer_streamer, build_s = build_random_models(
            placement, config=transformer_config_for(ckpt_dir, config_name), device=device, dtype=dtype, seed=seed,
            vae_config=vae_config)
    load_peak = torch.cuda.max_memory_allocated(device) if cuda else None
    host_load = rss.take()
    synthetic = synthetic_request(model.config, vae, work, device=device, dtype=dtype, total_blocks=warmup_blocks + blocks,
                                  seed=seed)
    engine = Engine(model, vae, None, None, placement=placement, device=device, dtype=dtype,
                    layer_streamer=layer_streamer, overlap_decode=overlap_decode,
                    fast_path=resolve_fast_path(device, compile=compile, cuda_graphs=cuda_graphs))
    say(f"built in {build_s:.1f} s; {requests} x ({warmup_blocks} warm-up + {blocks} measured blocks)")
    runs = [measure_request(engine, synthetic.request, synthetic.conditioning(model, device, dtype),
                            warmup_blocks=warmup_blocks, total_blocks=synthetic.total_blocks, rss=rss, say=say)
            for _ in range(requests)]
    last = runs[-1]
    last.pop("latents")
    windows = {"load": load_peak, **last.pop("windows")}
    host_windows = {"load": host_load["VmRSS"], **{k: v["VmRSS"] for k, v in last["host_windows"].items()}}
    taken = max([host_load["Taken"], *(v["Taken"] for run in runs for v in run.pop("host_windows").values())])
    predicted = bench_phase_peaks(plan)
    predicted_host = bench_phase_peaks(plan, "host", loads_checkpoint=weights_dir is not None)
    streamer = engine.cache_set.streamer
    pinned = (layer_streamer.arena.nbytes if layer_streamer else 0) + (streamer.arena.nbytes if streamer else 0)
    return {
        **last,
        **engine_report(engine),
        "first_request_ttff_s": runs[0]["ttff_s"],
        "first_request_compiles": runs[0]["compiles"],
        "first_request_compile_s": runs[0]["compile_s"],
        "requests": requests,
        "peak_gib": max(v for v in windows.values() if v is not None) / GiB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB if cuda else None,
        "phase_peaks_gib": {k: v / GiB for k, v in windows.items()} if cuda else None,
        "predicted_phase_peaks_gib": {k: v / GiB for k, v in predicted.items()},
        "host_rss_peak_gib": max(host_windows.values()) / GiB,
        "host_rss_max_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
        "host_rss_start_gib": host_start["VmRSS"] / GiB,
        "host_taken_from_machine_gib": taken / GiB,
        "host_phase_peaks_gib": {k: v / GiB for k, v in host_windows.items()},
        "host_rss_parts_now_gib": {k: v / GiB for k, v in RssSampler.now().items()},
        "pinned_gib": pinned / GiB,
        "predicted_host_phase_peaks_gib": {k: v / GiB for k, v in predicted_host.items()},
        "predicted_host_peak_gib": max(predicted_host.values()) / GiB,
        "predicted_compile_workers_gib": (planned_compile_worker_bytes(plan) if engine.fast_path.compile else 0) / GiB,
        "predicted_pinned_gib": plan.host_pinned_bytes / GiB,
        "predicted_peak_gib": max(predicted.values()) / GiB,
        "predicted_fps": plan.speed.fps if plan.budget_bytes is not None else None,
        "predicted_path": plan.speed.path,
        "attention": engine.self_attention(work.attention).name,
        "build_s": build_s,
        "weights": "checkpoint" if weights_dir is not None else "random",
        "warmup_blocks": warmup_blocks,
        "loop": "liveavatar.runtime.sampler.sample (real sampling loop, synthetic conditioning)",
        "placement": placement.to_json(),
        "streamed_layer_copies": layer_streamer.copies if layer_streamer else 0,
        "kv_host_fetched_gb": streamer.fetched_bytes / 1e9 if streamer else 0.0,
        "config": config_name or ("14b" if model.config.dim == 5120 else "custom"),
        "height": work.height, "width": work.width, "infer_frames": work.infer_frames,
        "sample_steps": work.sample_steps, "mode": work.mode, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def engine_report(engine) -> dict:
    """The fast path an engine runs and what its compiler and CUDA graphs did."""
    path, graphs = engine.fast_path, engine.graphs
    return {
        "fast_path": path.name + (f" ({path.reason})" if path.reason else ""),
        "compile_fallback": engine.compile_fallback.error if engine.compile_fallback else None,
        "compile_cache": str(engine.compile_cache) if engine.compile_cache else None,
        "cuda_graphs": {"captures": graphs.captures, "replays": graphs.replays, "direct": graphs.direct,
                        "failed": graphs.failed} if graphs is not None else None,
        "decode_overlapped": engine.overlap_decode,
        "decoder": _decoder_report(engine),
    }


def _decoder_report(engine) -> dict | None:
    """What the VAE decoder's fast path did (None when it is eager)."""
    steady = engine.vae.steady_decoder if engine.vae is not None else None
    if steady is None:
        return None
    return {"compile_fallback": engine.decoder_fallback.error if engine.decoder_fallback else None,
            "sizes": len(steady.streams), "captures": steady.captures, "replays": steady.replays,
            "graphs_failed": steady.failed}


def measure_request(engine, request, conditioning, *, warmup_blocks: int, total_blocks: int,
                    decode: bool = True, keep_latents: bool = False, rss: RssSampler | None = None,
                    say: Callable[[str], None] = lambda line: None) -> dict:
    """One request through ``engine.run``: its timings (per block after the warm-up: between decoded
    frame batches, or with ``decode=False`` between clean blocks on the GPU's clock, also as a median),
    per-window peaks (of the host's RSS too, with a running ``rss`` sampler), the compiler's counters
    (None when the engine does not compile) and, with ``keep_latents``, every block's clean latents."""
    import torch

    from liveavatar.runtime.compile import compile_counters
    from liveavatar.runtime.sampler import VideoFrames

    device = engine.device
    cuda = device.type == "cuda"
    counters = compile_counters if engine.fast_path.compile else None
    geometry = request.geometry
    forward_marks: list[tuple[int, object]] = []
    # Peak allocated memory per window between forwards: the first (KV sets, sink prefill, first forward),
    # the other steps (a forward and an Euler update), and step 0 of later blocks (plus the VAE decode
    # of the block before it).
    windows = {"prefill": None, "denoise": None, "decode": None}
    host_windows = {window: dict.fromkeys(RssSampler.FIELDS, 0) for window in windows}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def host_peaks(window: str) -> None:
        if rss is not None:
            peaks = rss.take()
            host_windows[window] = {key: max(host_windows[window][key], peaks[key]) for key in peaks}

    def on_forward(clip, block, step, x, velocity):
        forward_marks.append((clip * geometry.blocks_per_clip + block, _mark(cuda)))
        window = "prefill" if len(forward_marks) == 1 else "denoise" if step > 0 else "decode"
        host_peaks(window)
        if cuda:
            windows[window] = max(windows[window] or 0, torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)

    at_start = counters() if counters else None
    at_first = None
    # Frames out once the warm-up blocks are decoded, and once every block is (the first block's first
    # frames are dropped; an overlapped decoder hands a block's frames out one block later).
    warm_frames = max(0, warmup_blocks * geometry.frames_per_block - DROPPED_LEADING_FRAMES)
    all_frames = total_blocks * geometry.frames_per_block - DROPPED_LEADING_FRAMES
    loop_start = time.perf_counter()
    frame_marks: list[tuple[float, int]] = []  # (time, frames out so far) per batch of decoded frames
    block_marks, latents = [], []  # per clean block: a GPU event (host time on the CPU), its latents
    first_block_s = None
    events = engine.run(request, conditioning, on_forward=on_forward, decode=decode)
    for event in events:
        if not isinstance(event, VideoFrames):
            block_marks.append(_mark(cuda))
            if keep_latents:
                latents.append(event.latents)
            if first_block_s is None:
                first_block_s = _synchronized(cuda, loop_start)
                at_first = counters() if counters and not decode else at_first
            if not decode and len(block_marks) >= total_blocks:
                break
            continue
        event.uint8()  # a consumer needs the frames on the host; this also synchronises
        if at_first is None and counters:  # the first block's decode compiled the decoder's step
            at_first = counters()
        frame_marks.append((time.perf_counter(), event.start + event.count))
        say(f"{event.start + event.count}/{all_frames} frames after {frame_marks[-1][0] - loop_start:.1f} s")
        if event.start + event.count >= all_frames:
            break
    events.close()
    host_peaks("decode")
    if cuda:
        windows["decode"] = max(windows["decode"] or 0, torch.cuda.max_memory_allocated(device))
    if decode:
        warm = [mark for mark in frame_marks if mark[1] <= warm_frames]
        first = warm[-1] if warm and warmup_blocks else (loop_start, 0)
        # A decoder one block late hands its last frames out at the flush, a decode after the last denoise,
        # while its earlier batches came while the next block denoised (their decodes slowed by sharing the
        # GPU): from a steady batch to the flush is not a whole number of block periods, so end at the batch
        # before the flush (measured on an H100: 0.706 s/block that way against 0.78 s of DiT alone).
        steady = frame_marks[:-1] if engine.decodes_one_block_late(request.options) and len(frame_marks) > 2 \
            else frame_marks
        last = steady[-1] if steady[-1][1] > first[1] else frame_marks[-1]
        measured_frames = last[1] - first[1]
        block_times = [(last[0] - first[0]) * geometry.frames_per_block / measured_frames]
        ttff_s = frame_marks[0][0] - loop_start
    else:
        block_times = _intervals(block_marks, cuda, max(1, warmup_blocks))
        measured_frames = len(block_times) * geometry.frames_per_block
        ttff_s = first_block_s
    block_s = statistics.fmean(block_times)
    forward_s = _forward_times(forward_marks, cuda, warmup_blocks)
    at_end = counters() if counters else None
    return {
        "fps": geometry.frames_per_block / block_s,
        "ttff_s": ttff_s,
        "first_block_s": first_block_s,
        "forward_s": statistics.median(forward_s) if forward_s else None,
        "block_s": block_s,
        "block_s_median": statistics.median(block_times) if not decode else None,
        "measured_blocks": round(measured_frames / geometry.frames_per_block),
        "frames_measured": measured_frames,
        "latents": latents,
        "windows": windows,
        "host_windows": host_windows,
        "compiles": None if at_end is None else at_end["compiles"] - at_start["compiles"],
        # After the first block (and its decode, when decoding): 0 once everything has compiled.
        "compiles_after_first_block": None if at_end is None else at_end["compiles"] - at_first["compiles"],
        "compile_s": None if at_end is None else round(at_end["compile_s"] - at_start["compile_s"], 2),
        "graph_breaks": None if at_end is None else at_end["graph_breaks"] - at_start["graph_breaks"],
        "compile_reasons": None if at_end is None else at_end["last_reasons"],
    }


def bench_phase_peaks(plan, where: str = "gpu", *, loads_checkpoint: bool = False) -> dict[str, int]:
    """The planner's peaks (GPU, or host) for what the benchmark's own process allocates: every phase but
    the set-up (encoders), without the pieces it does not have (`NOT_BENCHED`; the checkpoint's read
    buffer only when it loads one) and without Inductor's compile workers (other processes:
    `planned_compile_worker_bytes`)."""
    kept = [c for c in plan.components if not c.name.startswith((*NOT_BENCHED, COMPILE_WORKERS_NAME))
            and (loads_checkpoint or not c.name.startswith("checkpoint read buffer"))]
    return {phase: peak for phase, peak in phase_peaks(kept, where).items() if phase != "setup"}


def planned_compile_worker_bytes(plan) -> int:
    """The host bytes the plan gives Inductor's compile worker processes (0 on the CPU)."""
    return sum(c.nbytes for c in plan.components if c.name.startswith(COMPILE_WORKERS_NAME))


def kv_fp8_drift(work, *, weight_dtype: str, device, config_name: str | None = None, num_clips: int = 2,
                 seed: int = 0) -> dict:
    """How far FP8 KV sets move a run from KV sets in the run dtype, everything else equal: one random
    engine (resident, ``weight_dtype`` weights), the same ``num_clips`` request run with each, and the
    relative L2 difference of every predicted velocity and every decoded frame (max and mean over them),
    plus the largest elementwise difference of the frames (pixels in [-1, 1])."""
    import torch

    from liveavatar.models.vae import VAEConfig
    from liveavatar.runtime.engine import Engine
    from liveavatar.runtime.placement import Placement
    from liveavatar.runtime.sampler import VideoFrames

    dtype = torch.float32 if work.run_dtype_bytes == 4 else torch.bfloat16
    model, vae, _, _ = build_random_models(Placement(weight_dtype=weight_dtype),
                                           config=transformer_config_for(None, config_name), device=device,
                                           dtype=dtype, seed=seed,
                                           vae_config=VAEConfig(base_dim=8) if config_name == "tiny" else VAEConfig())
    synthetic = synthetic_request(model.config, vae, work, device=device, dtype=dtype, seed=seed,
                                  total_blocks=num_clips * work.geometry.blocks_per_clip)
    conditioning = synthetic.conditioning(model, device, dtype)  # one prompt for both runs
    runs = {}
    for kv_dtype in ("bf16", "fp8"):
        engine = Engine(model, vae, None, None, placement=Placement(weight_dtype=weight_dtype, kv_dtype=kv_dtype),
                        device=device, dtype=dtype)
        velocities, frames = [], []

        def keep(clip, block, step, x, velocity):
            velocities.append(velocity.float().cpu())

        for event in engine.run(synthetic.request, conditioning, on_forward=keep):
            if isinstance(event, VideoFrames):
                frames += list(event.frames.float().cpu().unbind(1))
        runs[kv_dtype] = velocities, frames
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def relative(ref: list, got: list) -> list[float]:
        return [float((b - a).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(ref, got)]

    velocity = relative(runs["bf16"][0], runs["fp8"][0])
    frame = relative(runs["bf16"][1], runs["fp8"][1])
    frame_abs = max(float((b - a).abs().max()) for a, b in zip(runs["bf16"][1], runs["fp8"][1]))
    return {"forwards": len(velocity), "frames": len(frame), "weights": weight_dtype, "num_clips": num_clips,
            "velocity_rel_l2_max": max(velocity), "velocity_rel_l2_mean": statistics.fmean(velocity),
            "frame_rel_l2_max": max(frame), "frame_rel_l2_mean": statistics.fmean(frame), "frame_abs_max": frame_abs,
            "height": work.height, "width": work.width, "config": config_name or "14b"}


def _mark(cuda: bool):
    import torch

    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _intervals(marks, cuda: bool, start: int) -> list[float]:
    """Seconds between consecutive marks, from mark ``start`` on."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 if cuda else b - a for a, b in zip(marks[start - 1:], marks[start:])]


def _forward_times(marks, cuda: bool, warmup_blocks: int) -> list[float]:
    """Seconds between consecutive forwards of the same block (after the warm-up)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    times = []
    for (block_a, a), (block_b, b) in zip(marks, marks[1:]):
        if block_a == block_b and block_a >= warmup_blocks:
            times.append(a.elapsed_time(b) / 1e3 if cuda else b - a)
    return times


def _synchronized(cuda: bool, start: float) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start
