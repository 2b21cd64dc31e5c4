"""The speed model: seconds per forward and video frames per second of a placement.

FLOPs per block (matmul at the FP8 or bf16 rate, attention at the bf16 rate or, quantised, at the FP8
rate, the element-wise traffic at the memory bandwidth) against the bytes each layer needs over the host
link, simulated layer by layer with two prefetch slots per stream exactly as ``liveavatar.runtime.offload``
orders the copies. Hardware numbers are parameters (``Hardware``); constants marked CALIBRATED are fitted to the measurements of
``benchmarks/planner_vs_measured.py``.

A placement's forwards take one of three paths (`forward_path`, `liveavatar.runtime.compile`): "eager";
"compiled" regions (fused element-wise work, the host issuing a few region calls per layer), which
every placement gets on a CUDA GPU; and "graphs", one CUDA-graph replay per forward, for the resident
placements. The compiled paths have their own constants (ESTIMATED from the eager profile, to be refitted
to ``benchmarks/gpu_fast_path.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from liveavatar.runtime.placement import Placement
from liveavatar.runtime.planner.hardware import Hardware
from liveavatar.runtime.planner.memory import (FP8_DEQUANT_BYTES, FP8_INPUT_QUANT_BYTES, DiTInventory, LayerUnit,
                                               Workload)

# Memory traffic per element of an FP8 KV window dequantised for every attention call (codes -> fp32,
# times the scale, -> bf16: 1 + 4 + 4 + 4 + 4 + 2 bytes).
FP8_KV_DEQUANT_BYTES = 19
# Conv work of the Wan 2.1 decoder per output pixel (derived from its layer widths, base_dim 96).
VAE_DECODE_FLOPS_PER_PIXEL = 8.45e6
# CALIBRATED: achieved fraction of peak FLOP/s of the DiT's bf16 matmuls, its FP8 matmuls (with their
# fused activation quantiser) and its attention; the element-wise traffic (norms, modulation, RoPE,
# residuals, key concatenation; ~410 B counted from the block's code, plus what eager mode adds) per block
# token x width per layer; a per-forward overhead. The VAE decode of a block: conv efficiency plus a fixed
# per-block cost (it runs frame by frame, many small calls). Fitted to the H100 runs in
# benchmarks/RESULTS.md (704*384 per forward: bf16 0.362 s, FP8 0.336 s, 512x512 FP8 + FP8 KV 0.390 s;
# the streaming decode alone, bf16, 2026-12-07: 0.211 s per block at 704*384 and 0.083 s at 384*256).
MATMUL_EFFICIENCY = 0.55
FP8_MATMUL_EFFICIENCY = 0.35
ATTENTION_EFFICIENCY = 0.55
ELEMENTWISE_BYTES_PER_TOKEN_DIM = 600.0
FORWARD_OVERHEAD_S = 0.01
VAE_EFFICIENCY = 0.138
VAE_DECODE_OVERHEAD_S = 0.010
# CALIBRATED: the decode on the graphs path (the compiled steady step in channels_last_3d, replayed as a CUDA
# graph, no per-call host cost): 0.0958 s per 704*384 block on an H100 (2026-12-07). A placement that streams
# DiT layers still compiles the step, without graphs: on an H200 0.0889 s against 0.0870 with them at 704*384
# (0.0349 against 0.0338 at 384*256), so that path decodes at the graphs path's rate less 2 %.
GRAPHS_VAE_EFFICIENCY = 0.289
COMPILED_VAE_EFFICIENCY = GRAPHS_VAE_EFFICIENCY * 0.0870 / 0.0889
# CALIBRATED: host time to issue one block's kernels, and the extra per FP8 linear (its quantiser call);
# a layer takes at least this long however small the block (384*256 runs: 0.168 s per bf16 forward).
HOST_SECONDS_PER_LAYER = 0.004
HOST_SECONDS_PER_FP8_LINEAR = 0.0001
# ESTIMATED for the compiled paths, from the eager kernel profile of one 704*384 block on an H200 (GEMMs
# 410 ms bf16 / 215 ms FP8 for 4 x 75.7 TFLOP, attention 280 ms; issue 10): the GEMM and attention kernels
# reach these fractions of peak once the element-wise work between them is fused, and that work falls to
# about 80 B per token x width per layer (norms, modulation, RoPE, residuals, the FP8 quantiser) besides
# the key/value window traffic counted separately. The host issues ~25 calls per layer (regions and the
# attention glue), or one replay per forward.
COMPILED_MATMUL_EFFICIENCY = 0.74
# CALIBRATED (the FP8 GEMMs with their activation quantiser, on the graphs path): an H100's 704*384 forward
# took 0.1925 s with the keys concatenated and 0.181 s with the joined KV layout (2026-12-07, FP8 weights, bf16
# attention; the model: 0.1925 and 0.1845 s); it gives the H200's 0.753 s DiT block (concatenating) as 0.740 s.
COMPILED_FP8_MATMUL_EFFICIENCY = 0.48
COMPILED_ATTENTION_EFFICIENCY = 0.57
COMPILED_ELEMENTWISE_BYTES_PER_TOKEN_DIM = 80.0
COMPILED_HOST_SECONDS_PER_LAYER = 0.001
# CALIBRATED on an H100 (benchmarks/RESULTS.md, 2026-12-07; one 704*384 block's self-attention per layer,
# 3168 x 15312, 40 heads of 128) for the quantised self-attention (``--attention int8|fp8``, INT8/FP8 Q·Kᵀ and
# FP8 P·V): its Triton kernel reached 609 (int8) and 643 (fp8) TFLOPS at 128-key tiles, 0.31 of the FP8 peak
# (cuDNN's bf16 kernel: 552 TFLOPS, 0.56 of the bf16 peak, as COMPILED_ATTENTION_EFFICIENCY says); its passes
# over a call's tensors took 0.33 ms: Q read and written once at one byte, K and V ~14 bytes per element
# (the mean and channel-maxima reductions read them at under full bandwidth, then the cast).
QUANTISED_ATTENTION_EFFICIENCY = 0.31
QUANTISE_QUERY_BYTES = 3
QUANTISE_KEY_VALUE_BYTES = 14
GRAPH_HOST_SECONDS_PER_LAYER = 0.0
FORWARD_PATHS = ("eager", "compiled", "graphs")


def forward_path(placement: Placement, *, compiled: bool = True) -> str:
    """The path a placement's forwards take: CUDA graphs when resident (and compiled), else the compiled
    regions, or eager without the compiler."""
    if not compiled:
        return "eager"
    return "graphs" if placement.resident else "compiled"


def attention_runs(work: Workload, hw: Hardware) -> str:
    """The self-attention a workload's mode runs on ``hw``: the quantised kernel needs FP8 tensor cores, else
    bf16 (`liveavatar.models.quantised_attention`)."""
    return work.attention if hw.has_fp8_matmul else "bf16"


def _layer_compute_s(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware, unit: LayerUnit,
                     *, keys: int, path: str) -> float:
    eager = path == "eager"
    tokens, dim = work.block_tokens, inv.dim
    matmul_flops = 2 * tokens * unit.token_matmul_elements + 2 * inv.text_len * unit.context_matmul_elements
    if placement.weight_dtype == "fp8" and hw.has_fp8_matmul:
        efficiency = FP8_MATMUL_EFFICIENCY if eager else COMPILED_FP8_MATMUL_EFFICIENCY
        matmul_s = matmul_flops / (hw.fp8_flops * efficiency)
        elementwise = FP8_INPUT_QUANT_BYTES * 2 * tokens * (unit.token_matmul_elements / dim) if eager else 0.0
    else:
        matmul_s = matmul_flops / (hw.bf16_flops * (MATMUL_EFFICIENCY if eager else COMPILED_MATMUL_EFFICIENCY))
        elementwise = (FP8_DEQUANT_BYTES + 5) * unit.fp8_elements if placement.weight_dtype == "fp8" else 0
    quantised = attention_runs(work, hw) != "bf16"
    self_flops, text_flops = 4 * tokens * keys * dim, 4 * tokens * inv.text_len * dim  # text: always bf16
    attention_s = (text_flops + (0 if quantised else self_flops)) / (
        hw.bf16_flops * (ATTENTION_EFFICIENCY if eager else COMPILED_ATTENTION_EFFICIENCY))
    if quantised:
        attention_s += self_flops / (hw.fp8_flops * QUANTISED_ATTENTION_EFFICIENCY)
        elementwise += (QUANTISE_QUERY_BYTES * tokens + QUANTISE_KEY_VALUE_BYTES * keys) * dim
    per_token_dim = ELEMENTWISE_BYTES_PER_TOKEN_DIM if eager else COMPILED_ELEMENTWISE_BYTES_PER_TOKEN_DIM
    elementwise += per_token_dim * tokens * dim
    if not placement.joins_cond:  # the window and the cond rows concatenated for every attention call
        elementwise += 4 * work.run_dtype_bytes * keys * dim
    if placement.kv_dtype == "fp8":
        elementwise += FP8_KV_DEQUANT_BYTES * (keys - work.geometry.cond_tokens) * 2 * dim
    gpu_s = matmul_s + attention_s + elementwise / hw.hbm_bytes_per_s
    # Small blocks are bound by the host issuing the layer's ~150 kernels (more for FP8 linears), fewer
    # region calls once compiled, nothing but a replay with graphs.
    if path == "graphs":
        host_s = GRAPH_HOST_SECONDS_PER_LAYER
    elif path == "compiled":
        host_s = COMPILED_HOST_SECONDS_PER_LAYER
    else:
        host_s = HOST_SECONDS_PER_LAYER + (HOST_SECONDS_PER_FP8_LINEAR * unit.fp8_linears
                                           if placement.weight_dtype == "fp8" else 0.0)
    return max(gpu_s, host_s)


def simulate_forward(compute_s: list[float], fetch: list[list[float]], writeback_s: list[float],
                     *, forwards: int = 3) -> float:
    """Seconds per forward in steady state with prefetching over one host link.

    compute_s[i]: compute time of layer i. fetch[p][i]: seconds the host→device copy of stream p needs
    before layer i (0 = nothing); each stream has two GPU slots, so its m-th copy reuses the slot of its
    (m-2)-th copy and starts only once that layer has run and written back. Copies run one at a time on
    the link in the order layers need them; write-backs (device→host) run on the other direction.
    """
    layers = len(compute_s)
    link_free = d2h_free = 0.0
    layer_end = 0.0
    slot_free = [[0.0, 0.0] for _ in fetch]
    copies = [0 for _ in fetch]
    forward_start = 0.0
    for _ in range(forwards):
        forward_start = layer_end
        for i in range(layers):
            ready = 0.0
            for p, stream in enumerate(fetch):
                if stream[i] <= 0:
                    continue
                slot = copies[p] % 2
                start = max(link_free, slot_free[p][slot])
                link_free = start + stream[i]
                ready = max(ready, link_free)
                copies[p] += 1
            start = max(layer_end, ready)
            layer_end = start + compute_s[i]
            done = layer_end
            if writeback_s[i] > 0:
                d2h_free = max(d2h_free, layer_end) + writeback_s[i]
                done = d2h_free
            for p, stream in enumerate(fetch):
                if stream[i] > 0:
                    slot_free[p][(copies[p] - 1) % 2] = done
    return layer_end - forward_start


@dataclass(frozen=True)
class SpeedEstimate:
    """A placement's steady state: seconds per forward (and its compute alone), host->GPU bytes per forward,
    seconds per block, video frames per second, and the forward path it assumes."""

    forward_s: float
    compute_s: float
    h2d_bytes_per_forward: int
    block_s: float
    fps: float
    path: str = "eager"


def estimate_speed(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware, *,
                   path: str | None = None) -> SpeedEstimate:
    """Steady-state time per forward (full KV window) and video frames per second on ``path`` (default:
    the one the placement gets with the compiler on, `forward_path`)."""
    path = path or forward_path(placement)
    if path not in FORWARD_PATHS:
        raise ValueError(f"forward path must be one of {', '.join(FORWARD_PATHS)}; got {path!r}")
    geometry = work.geometry
    cond, keys = geometry.cond_tokens, work.kv_tokens + geometry.cond_tokens
    compute = [_layer_compute_s(inv, work, placement, hw, unit, keys=keys, path=path) for unit in inv.layers]
    compute[0] += FORWARD_OVERHEAD_S
    b = work.run_dtype_bytes
    kv_bytes = 2 * inv.dim * (1 if placement.kv_dtype == "fp8" else b)
    weights_fetch = [inv.layers[i].nbytes(placement.weight_dtype, b) / hw.h2d_bytes_per_s
                     if placement.is_streamed(i) else 0.0 for i in range(inv.num_layers)]
    window_fetch = ((work.kv_tokens - work.block_tokens) * kv_bytes if placement.kv_location == "host" else 0)
    window_fetch += cond * 2 * inv.dim * b if placement.cond_location == "host" else 0
    window = [window_fetch / hw.h2d_bytes_per_s] * inv.num_layers
    writeback_bytes = work.block_tokens * kv_bytes if placement.kv_location == "host" else 0
    writeback = [writeback_bytes / hw.d2h_bytes_per_s] * inv.num_layers
    forward_s = simulate_forward(compute, [weights_fetch, window], writeback)
    decode_flops = work.video_frames_per_block * work.height * work.width * VAE_DECODE_FLOPS_PER_PIXEL
    if path == "graphs":  # the compiled steady step, replayed
        decode_s = decode_flops / (hw.bf16_flops * GRAPHS_VAE_EFFICIENCY)
    elif path == "compiled":  # the compiled steady step, called
        decode_s = decode_flops / (hw.bf16_flops * COMPILED_VAE_EFFICIENCY)
    else:
        decode_s = VAE_DECODE_OVERHEAD_S + decode_flops / (hw.bf16_flops * VAE_EFFICIENCY)
    # One GPU (or one rank of a pipeline): its steps, plus the decode where the output is made.
    block_s = work.kv_sets_per_gpu * forward_s + (decode_s if work.is_output else 0.0)
    h2d = int(sum(inv.layers[i].nbytes(placement.weight_dtype, b) for i in placement.streamed_layers)
              + window_fetch * inv.num_layers)
    return SpeedEstimate(forward_s=forward_s, compute_s=sum(compute), h2d_bytes_per_forward=h2d, block_s=block_s,
                         fps=work.video_frames_per_block / block_s, path=path)
