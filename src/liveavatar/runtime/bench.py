"""The engine's benchmark: the real sampling loop at full size with random weights, timed and measured.

The DiT (the 14B release's configuration, or the tiny one) and the VAE are built on the meta device and
materialised unit by unit directly on the target device in the run dtype, with random weights (no
checkpoint, never a full host copy); the DiT is placed as the plan says: FP8 linears, streamed layers,
KV sets and cond cache on the GPU or in pinned host memory. Conditioning is synthetic (random text
context, audio features, reference and motion latents: the encoders are set-up cost and not timed), and
`liveavatar.runtime.sampler.sample` runs it: sink prefill, 4-step blocks with one KV set per step, the
sink refresh before clip 1 and the streaming VAE decode of every block.

Reported: video FPS over the blocks after the warm-up, time to first frame (from the start of the loop:
prefill, first block, its decode), per-forward time (median over forwards inside a block, so without
the decode), peak allocated and reserved GPU memory, peak host RSS, and the planner's prediction.
"""
from __future__ import annotations

import math
import resource
import statistics
import time

from liveavatar.geometry import LATENT_CHANNELS
from liveavatar.runtime.planner.hardware import GiB
from liveavatar.runtime.planner.memory import phase_peaks, transformer_config_for


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
    says (no host copy), and its layer streamer."""
    import torch

    from liveavatar.models.transformer import CausalS2VTransformer
    from liveavatar.runtime.layer_streaming import place_dit

    with torch.device("meta"):
        model = CausalS2VTransformer(config)
    streamer = place_dit(model, placement, device,
                         materialize=lambda name, module: random_init_(module, device, dtype, generator))
    return model.eval().requires_grad_(False), streamer


def random_vae(config_name: str | None, device, dtype, generator):
    """The Wan 2.1 VAE (narrow for the tiny config) with random weights on ``device``."""
    import torch

    from liveavatar.models.vae import VAEConfig, WanVAE

    with torch.device("meta"):
        vae = WanVAE(VAEConfig(base_dim=8) if config_name == "tiny" else VAEConfig())
    random_init_(vae, device, dtype, generator)
    return vae.eval().requires_grad_(False)


def run_benchmark(plan, *, device, blocks: int, warmup_blocks: int, config_name: str | None = None,
                  ckpt_dir=None, seed: int = 0) -> dict:
    """Build the random full-size engine under `plan.placement`, run warm-up + measured blocks through the
    sampling loop, return the measurements (see the module docstring)."""
    import torch

    from liveavatar.runtime.engine import Engine
    from liveavatar.runtime.sampler import VideoFrames

    work, placement = plan.workload, plan.placement
    dtype = torch.float32 if work.run_dtype_bytes == 4 else torch.bfloat16
    cuda = device.type == "cuda"
    generator = torch.Generator(device).manual_seed(seed)
    config = transformer_config_for(ckpt_dir, config_name)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model, layer_streamer = random_dit(config, placement, device, dtype, generator)
    vae = random_vae(config_name, device, dtype, generator)
    build_s = _synchronized(cuda, start)
    engine = Engine(model, vae, None, None, placement=placement, device=device, dtype=dtype,
                    layer_streamer=layer_streamer)

    total_blocks = warmup_blocks + blocks
    request, conditioning = synthetic_request(work, config, vae, total_blocks, device=device, dtype=dtype, seed=seed)
    geometry = request.geometry
    forward_marks: list[tuple[int, object]] = []
    # Peak allocated memory per window between forwards: the first (KV sets, sink prefill, first forward),
    # the other steps (a forward and an Euler update), and step 0 of later blocks (plus the VAE decode
    # of the block before it).
    windows = {"load": torch.cuda.max_memory_allocated(device) if cuda else None,
               "prefill": None, "denoise": None, "decode": None}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def on_forward(clip, block, step, x, velocity):
        forward_marks.append((clip * geometry.blocks_per_clip + block, _mark(cuda)))
        if cuda:
            window = "prefill" if len(forward_marks) == 1 else "denoise" if step > 0 else "decode"
            windows[window] = max(windows[window] or 0, torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)

    loop_start = time.perf_counter()
    frame_marks: list[tuple[float, int, int]] = []  # (time, frames, blocks done) per batch of decoded frames
    blocks_done = 0
    conditioning.text_kv = model.text_kv(conditioning.text)
    events = engine.run(request, conditioning, on_forward=on_forward)
    for event in events:
        if not isinstance(event, VideoFrames):
            blocks_done += 1
            continue
        event.frames.cpu()  # a consumer needs the frames on the host; this also synchronises
        frame_marks.append((time.perf_counter(), event.count, blocks_done))
        if blocks_done >= total_blocks:
            break
    events.close()
    if cuda:
        windows["decode"] = max(windows["decode"] or 0, torch.cuda.max_memory_allocated(device))
    if warmup_blocks == 0:
        first, measured = (loop_start, 0, 0), frame_marks
    else:
        index = next(i for i, mark in enumerate(frame_marks) if mark[2] >= warmup_blocks)
        first, measured = frame_marks[index], frame_marks[index + 1:]
    measured_s = frame_marks[-1][0] - first[0]
    measured_frames = sum(count for _, count, _ in measured)
    measured_blocks = frame_marks[-1][2] - first[2]

    forward_s = _forward_times(forward_marks, cuda, warmup_blocks)
    predicted = bench_phase_peaks(plan)
    report = {
        "fps": measured_frames / measured_s,
        "ttff_s": frame_marks[0][0] - loop_start,
        "forward_s": statistics.median(forward_s) if forward_s else None,
        "block_s": measured_s / measured_blocks,
        "peak_gib": max(windows.values()) / GiB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB if cuda else None,
        "phase_peaks_gib": {k: v / GiB for k, v in windows.items()} if cuda else None,
        "predicted_phase_peaks_gib": {k: v / GiB for k, v in predicted.items()},
        "host_rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
        "predicted_peak_gib": max(predicted.values()) / GiB,
        "predicted_fps": plan.speed.fps if plan.budget_bytes is not None else None,
        "build_s": build_s,
        "measured_blocks": measured_blocks,
        "warmup_blocks": warmup_blocks,
        "frames_measured": measured_frames,
        "loop": "liveavatar.runtime.sampler.sample (real sampling loop, synthetic conditioning)",
        "placement": placement.to_json(),
        "streamed_layer_copies": layer_streamer.copies if layer_streamer else 0,
        "kv_host_fetched_gb": streamer.fetched_bytes / 1e9 if (streamer := engine.cache_set.streamer) else 0.0,
        "config": config_name or "14b",
        "height": work.height, "width": work.width, "infer_frames": work.infer_frames,
        "sample_steps": work.sample_steps, "mode": work.mode, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    return report


def synthetic_request(work, config, vae, blocks: int, *, device, dtype, seed: int):
    """A request of the benchmark's size, long enough for ``blocks`` blocks, and its synthetic conditioning
    (a random prompt embedding, audio features and sink latents shaped as the mode makes them: the
    encoders are set-up cost, not timed); ``text_kv`` is left for the caller's DiT to fill in."""
    import torch

    import numpy as np
    from PIL import Image

    from liveavatar.geometry import AUDIO_SAMPLE_RATE, FPS
    from liveavatar.request import WaveformAudio, resolve_request
    from liveavatar.runtime.conditioning import ReferenceLatents, WholeFileAudio, motion_history
    from liveavatar.runtime.engine import Conditioning

    num_clips = math.ceil(blocks / work.geometry.blocks_per_clip)
    silence = np.zeros(int((num_clips + 1) * work.infer_frames / FPS * AUDIO_SAMPLE_RATE), np.float32)
    request = resolve_request(Image.new("RGB", (work.width, work.height)), WaveformAudio(silence), "",
                              size=work.width * work.height, infer_frames=work.infer_frames,
                              sample_steps=work.sample_steps, num_clip=num_clips, base_seed=seed, mode=work.mode)
    geometry = request.geometry
    g = torch.Generator("cpu").manual_seed(seed)
    text = torch.randn(32, config.text_dim, generator=g).to(device, dtype)
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
    return request, Conditioning(None, reference, audio, text)


def bench_phase_peaks(plan) -> dict[str, int]:
    """The planner's GPU peaks for what the benchmark allocates: every phase but the set-up (encoders),
    without the audio encoder, which the benchmark does not load."""
    peaks = phase_peaks([c for c in plan.components if not c.name.startswith("audio encoder")])
    return {phase: peak for phase, peak in peaks.items() if phase != "setup"}


def _mark(cuda: bool):
    import torch

    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


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
