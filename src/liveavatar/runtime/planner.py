"""Memory planner: predicts the GPU memory of every component of a run and picks the fastest placement
that fits the card, before anything is loaded.

The memory model (bytes, per phase of a run):

* DiT weights by dtype, counted from the model itself built on the meta device (so they follow the
  config exactly): bf16, or FP8 codes for the 460 eligible linears + bf16 for the rest (lora_fp8.md §2).
  Streamed layers live in pinned host memory; the GPU holds two slots of the largest streamed layer.
* KV sets, one per denoising step on this GPU: (infer_frames/4)·S tokens × 2·dim·layers × dtype bytes
  (819,200 B per token per set in bf16 at 14B). On the host they need two per-layer window slots on the GPU.
* The cond (sink) cache, shared by all steps: cond tokens × 2·dim·layers × 2 B (gpu, or host + 2 slots).
* Per-forward activations, from the shapes of one block forward (see ``forward_activation_bytes``).
* VAE: weights, the streaming decoder's carried state (walked from the decoder's layers) and the
  transient of decoding one latent frame.
* Set-up: the text encoder (11.36 GB bf16) and wav2vec2 run on the GPU and are freed before the DiT is
  loaded ("gpu_then_free"), or run on the CPU.

The speed model: FLOPs per block (matmul at the FP8 or bf16 rate, attention at the bf16 rate, the
element-wise traffic at the memory bandwidth) against the bytes each layer needs over the host link,
simulated layer by layer with two prefetch slots per stream exactly as `liveavatar.runtime.offload` orders
the copies. Hardware numbers are parameters (`Hardware`); constants marked CALIBRATED are fitted from the
measurements of ``benchmarks/planner_vs_measured.py``.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, astuple, dataclass, field, replace

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.geometry import size_for_area
from liveavatar.runtime.placement import Placement, spread_layers

GiB = 1 << 30
MiB = 1 << 20

# ---------------------------------------------------------------------------------------------------
# Calibration constants (bytes or efficiencies; see the module docstring).

# Live bytes per (block token x model width) in a bf16 run, counted from TransformerBlock.forward and
# rope.apply_rotation (CALIBRATED against measured peaks): while k is rotated (the block input, norm1's
# output, q/k/v, roped q and the fp32 rotation temporaries: 26) and while attending (16, without the
# concatenated keys/values and the roped cond keys, which are counted from their token counts).
ROPE_BYTES_PER_TOKEN_DIM = 26.0
ATTENTION_BYTES_PER_TOKEN_DIM = 16.0
# Live bytes per (cond token x width) for the roped copy of the cond keys while attending.
COND_ROPE_BYTES_PER_TOKEN_DIM = 2.0
# Live bytes per (block token x width) around the FFN (fp32 residual, norm2 output, modulated input, the
# block input); the FFN hidden itself is counted as 2 tensors of tokens x ffn_dim.
FFN_BYTES_PER_TOKEN_DIM = 12.0
# FP8 W8A8 quantises each linear input through an fp32 copy: 4 B + 1 B per input element.
FP8_INPUT_QUANT_BYTES = 5
# FP8 weight-only dequantises a weight through fp32 into the run dtype: 4 B + 2 B per weight element.
FP8_DEQUANT_BYTES = 6
# Memory traffic per element of an FP8 KV window dequantised for every attention call (codes -> fp32,
# times the scale, -> bf16: 1 + 4 + 4 + 4 + 4 + 2 bytes).
FP8_KV_DEQUANT_BYTES = 19
# CALIBRATED: live bytes per element of one decoded latent frame's full-resolution feature map
# (base_dim channels × temporal factor frames × H × W) while the VAE decodes it.
VAE_DECODE_TRANSIENT_BYTES_PER_ELEMENT = 22.0
# Conv work of the Wan 2.1 decoder per output pixel (derived from its layer widths, base_dim 96).
VAE_DECODE_FLOPS_PER_PIXEL = 8.45e6
# Parameters of the pieces that are not the DiT (checkpoints.md §3-5); bytes follow the run dtype.
VAE_PARAMS = 126_892_531
TEXT_ENCODER_PARAMS = 5_680_910_336
AUDIO_ENCODER_PARAMS = 315_472_545
# Memory the CUDA context, cuBLAS/cuDNN handles and kernels take outside PyTorch's allocator.
CUDA_CONTEXT_BYTES = 640 * MiB
# CALIBRATED: reserved / allocated - 1 of the caching allocator at the peak.
ALLOCATOR_FRAGMENTATION = 0.03
DEFAULT_HEADROOM_BYTES = 1 * GiB
DEFAULT_HEADROOM_FRACTION = 0.05
# CALIBRATED: achieved fraction of peak FLOP/s of the DiT's bf16 matmuls, its FP8 matmuls (with their
# fused activation quantiser) and its attention; the element-wise traffic (norms, modulation, RoPE,
# residuals, key concatenation; ~410 B counted from the block's code, plus what eager mode adds) per block
# token x width per layer; a per-forward overhead. The VAE decode of a block: conv efficiency plus a fixed
# per-block cost (it runs frame by frame, many small calls). Fitted to the H100 runs in
# benchmarks/RESULTS.md (704*384 per forward: bf16 0.362 s, FP8 0.336 s, 512x512 FP8 + FP8 KV 0.390 s;
# decode 0.32 s per block at 704*384 and 0.14 s at 384*256).
MATMUL_EFFICIENCY = 0.55
FP8_MATMUL_EFFICIENCY = 0.35
ATTENTION_EFFICIENCY = 0.55
ELEMENTWISE_BYTES_PER_TOKEN_DIM = 600.0
FORWARD_OVERHEAD_S = 0.01
VAE_EFFICIENCY = 0.10
VAE_DECODE_OVERHEAD_S = 0.043
# CALIBRATED: host time to issue one block's kernels, and the extra per FP8 linear (its quantiser call);
# a layer takes at least this long however small the block (384*256 runs: 0.168 s per bf16 forward).
HOST_SECONDS_PER_LAYER = 0.004
HOST_SECONDS_PER_FP8_LINEAR = 0.0001
# Standard --size areas as (width, height), largest first: the "nearest setting that fits" walks down this list.
STANDARD_SIZES = ((720, 400), (704, 384), (688, 368), (384, 256))


# ---------------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class Hardware:
    """Peak rates of a GPU and its host link; the planner applies the efficiencies above."""

    name: str
    bf16_flops: float
    fp8_flops: float | None  # None: no FP8 tensor cores (FP8 weights run weight-only)
    hbm_bytes_per_s: float
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    memory_bytes: int | None = None

    @property
    def has_fp8_matmul(self) -> bool:
        return self.fp8_flops is not None


HARDWARE_PRESETS = {
    "h100": Hardware("NVIDIA H100 80GB HBM3", 989e12, 1979e12, 3.35e12, 50e9, 50e9, 81559 * MiB),
    "h200": Hardware("NVIDIA H200", 989e12, 1979e12, 4.8e12, 50e9, 50e9, 143771 * MiB),
    "a100": Hardware("NVIDIA A100 80GB", 312e12, None, 2.0e12, 25e9, 25e9, 81920 * MiB),
    "rtx4090": Hardware("RTX 4090-class (24 GB, ~25 GB/s host link, ~330 TFLOP/s FP8)",
                        165e12, 330e12, 1.0e12, 25e9, 25e9, 24564 * MiB),
}
_DEVICE_NAME_PRESETS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("4090", "rtx4090"))


def detect_hardware(device_index: int | None = None) -> Hardware | None:
    """The preset matching the current CUDA GPU (its name and total memory), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device_index is None else device_index
    properties = torch.cuda.get_device_properties(index)
    for needle, key in _DEVICE_NAME_PRESETS:
        if needle in properties.name:
            return replace(HARDWARE_PRESETS[key], name=properties.name, memory_bytes=properties.total_memory)
    fp8 = torch.cuda.get_device_capability(index) >= (8, 9)
    generic = HARDWARE_PRESETS["h100" if fp8 else "a100"]
    return replace(generic, name=f"{properties.name} (rates of {generic.name})", memory_bytes=properties.total_memory)


# ---------------------------------------------------------------------------------------------------
# What is being planned


@dataclass(frozen=True)
class Workload:
    """The shape of a run: video size, clip length, steps and GPUs."""

    height: int
    width: int
    infer_frames: int = 48
    sample_steps: int = 4
    num_gpus: int = 1
    mode: str = "streaming"
    run_dtype_bytes: int = 2

    @functools.cached_property
    def geometry(self):
        from liveavatar.geometry import ClipGeometry

        return ClipGeometry(self.height, self.width, self.infer_frames)

    @property
    def block_tokens(self) -> int:
        return self.geometry.block_tokens

    @property
    def kv_tokens(self) -> int:
        return self.geometry.kv_tokens

    @property
    def video_frames_per_block(self) -> int:
        return self.geometry.frames_per_block

    @property
    def dit_gpus(self) -> int:
        """GPUs running DiT steps (one step each, as TPP; a GPU beyond the steps decodes)."""
        return min(self.num_gpus, self.sample_steps)

    @property
    def kv_sets_per_gpu(self) -> int:
        return math.ceil(self.sample_steps / self.dit_gpus)

    @property
    def vae_on_dit_gpu(self) -> bool:
        return self.num_gpus <= self.sample_steps

    def describe(self) -> str:
        g = self.geometry
        gpus = f", {self.num_gpus} GPUs" if self.num_gpus > 1 else ""
        return (f"{self.width}x{self.height} ({g.frame_tokens} tokens/frame), {self.infer_frames}-frame clips, "
                f"{self.sample_steps} steps{gpus}")


@dataclass(frozen=True)
class LayerUnit:
    """Weights that stream together: one DiT block and the audio injector that follows it, if any."""

    fp8_elements: int = 0  # weight elements of FP8-eligible linears
    fp8_linears: int = 0
    other_elements: int = 0  # every other parameter (kept in the run dtype)
    token_matmul_elements: int = 0  # linear weight elements applied to every block token
    context_matmul_elements: int = 0  # linear weight elements applied to the text context

    def nbytes(self, weight_dtype: str, run_dtype_bytes: int = 2) -> int:
        if weight_dtype == "fp8":
            return self.fp8_elements + 4 * self.fp8_linears + run_dtype_bytes * self.other_elements
        return run_dtype_bytes * (self.fp8_elements + self.other_elements)

    def __add__(self, other: "LayerUnit") -> "LayerUnit":
        return LayerUnit(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class DiTInventory:
    """Parameter counts of the DiT per streaming unit, read from the model built on the meta device."""

    dim: int
    num_heads: int
    ffn_dim: int
    text_len: int
    layers: tuple[LayerUnit, ...]
    globals: LayerUnit

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total(self) -> LayerUnit:
        total = self.globals
        for unit in self.layers:
            total = total + unit
        return total

    @property
    def num_params(self) -> int:
        return self.total.fp8_elements + self.total.other_elements

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers (819,200 B in bf16 at 14B)."""
        return 2 * self.dim * self.num_layers * dtype_bytes


@functools.lru_cache(maxsize=8)
def dit_inventory(config) -> DiTInventory:
    """Counts the DiT's parameters per unit by building it on the meta device (no memory is used)."""
    import torch
    from torch import nn

    from liveavatar.models.transformer import CausalS2VTransformer
    from liveavatar.runtime.fp8 import keeps_bf16

    with torch.device("meta"):
        model = CausalS2VTransformer(config)
    slot_of_layer = {layer: slot for slot, layer in enumerate(config.audio_inject_layers)}
    layer_of_slot = {slot: layer for layer, slot in slot_of_layer.items()}
    counts = [dict.fromkeys(LayerUnit.__dataclass_fields__, 0) for _ in range(config.num_layers + 1)]

    def unit_index(name: str) -> int:
        parts = name.split(".")
        if parts[0] == "blocks":
            return int(parts[1])
        if parts[0] == "audio_injector" and parts[1] in ("injector", "injector_adain_layers"):
            return layer_of_slot[int(parts[2])]
        return config.num_layers  # the globals

    linear_weights = set()
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        linear_weights.add(f"{name}.weight")
        unit = counts[unit_index(name)]
        elements = module.weight.numel()
        if keeps_bf16(name):
            unit["other_elements"] += elements
        else:
            unit["fp8_elements"] += elements
            unit["fp8_linears"] += 1
        if name.startswith("blocks.") and name.endswith(("cross_attn.k", "cross_attn.v")):
            unit["context_matmul_elements"] += elements  # applied to the text_len context rows
        elif name.startswith("blocks.") or name.startswith("audio_injector.injector.") and \
                name.endswith((".q", ".o")):
            unit["token_matmul_elements"] += elements  # applied to every block token
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in linear_weights:
            counts[unit_index(name)]["other_elements"] += tensor.numel()
    units = [LayerUnit(**c) for c in counts]
    return DiTInventory(dim=config.dim, num_heads=config.num_heads, ffn_dim=config.ffn_dim,
                        text_len=config.text_len, layers=tuple(units[:-1]), globals=units[-1])


# ---------------------------------------------------------------------------------------------------
# Memory model


@dataclass(frozen=True)
class Component:
    """One line of the plan: what, where, in which dtype, how many bytes, during which phases."""

    name: str
    where: str  # "gpu" | "host"
    dtype: str
    nbytes: int
    phases: tuple[str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "where": self.where, "dtype": self.dtype, "bytes": self.nbytes,
                "gib": round(self.nbytes / GiB, 3), "phases": list(self.phases)}


# The order of a run as the pipeline does it: load the DiT (unit by unit), set up (encode the prompt, the
# audio and the reference with the DiT already resident), prefill the sink, then denoise and decode blocks.
PHASES = ("load", "setup", "prefill", "denoise", "decode")
AFTER_LOAD = PHASES[1:]
STEADY = PHASES[2:]


def forward_activation_bytes(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware, *,
                             tokens: int, keys: int, cond_tokens: int) -> int:
    """Peak live bytes of one DiT forward over `tokens` block tokens attending to `keys` keys.

    Attention phase: the larger of the rotation of k and the attention itself (the per-token working set,
    the concatenated keys and values, the re-roped cond keys and, for an FP8 KV set, its dequantised
    window). FFN phase: the residual stream plus two hidden tensors of ffn_dim.
    FP8 adds its per-call input copies (W8A8) or a dequantised weight (weight-only).
    """
    dim, b = inv.dim, work.run_dtype_bytes
    per_token = tokens * dim * b / 2  # the constants are for a bf16 run
    attention = max(ROPE_BYTES_PER_TOKEN_DIM * per_token,
                    ATTENTION_BYTES_PER_TOKEN_DIM * per_token + 2 * b * keys * dim
                    + COND_ROPE_BYTES_PER_TOKEN_DIM * cond_tokens * dim * b / 2)
    if placement.kv_dtype == "fp8":
        attention += 2 * b * (keys - cond_tokens) * dim
    ffn = FFN_BYTES_PER_TOKEN_DIM * per_token + 2 * b * tokens * inv.ffn_dim
    if placement.weight_dtype == "fp8":
        if hw.has_fp8_matmul:
            ffn += FP8_INPUT_QUANT_BYTES * tokens * inv.ffn_dim
        else:
            ffn += FP8_DEQUANT_BYTES * inv.ffn_dim * dim
    return int(max(attention, ffn))


@functools.lru_cache(maxsize=None)
def vae_state_elements(latent_h: int, latent_w: int) -> int:
    """Elements the streaming VAE decoder carries between calls: 2 frames of every causal conv's input,
    walked through the decoder's stages in order (an upsample's time conv runs before it doubles the
    resolution). 639 M at 704x384."""
    import torch

    from liveavatar.models.vae import CausalConv3d, Decoder3d, Upsample, VAEConfig

    with torch.device("meta"):
        decoder = Decoder3d(VAEConfig())
    pixels = latent_h * latent_w
    elements = 0
    for stage in (decoder.conv1, *decoder.middle, *decoder.upsamples, decoder.head):
        convs = [stage.time_conv] if isinstance(stage, Upsample) and stage.temporal else \
            [] if isinstance(stage, Upsample) else stage.modules()
        elements += sum(m.time_padding * m.in_channels * pixels for m in convs
                        if isinstance(m, CausalConv3d) and m.time_padding > 0)
        if isinstance(stage, Upsample):
            pixels *= 4
    return elements


def vae_decode_transient_bytes(height: int, width: int) -> int:
    from liveavatar.models.vae import VAEConfig

    config = VAEConfig()
    return int(VAE_DECODE_TRANSIENT_BYTES_PER_ELEMENT * config.base_dim * config.temporal_factor * height * width)


def memory_components(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware) -> list[Component]:
    """Every GPU and pinned-host allocation of a run under `placement`, with the phases it is live in."""
    b = work.run_dtype_bytes
    run_dtype = {2: "bf16", 4: "fp32"}.get(b, f"{8 * b}-bit")
    wdtype = placement.weight_dtype
    geometry = work.geometry
    cond = geometry.cond_tokens
    components: list[Component] = []

    streamed = set(placement.streamed_layers)
    resident_units = [u for i, u in enumerate(inv.layers) if i not in streamed]
    resident = sum(u.nbytes(wdtype, b) for u in resident_units) + inv.globals.nbytes(wdtype, b)
    components.append(Component(f"DiT weights, {len(resident_units)}/{inv.num_layers} layers resident",
                                "gpu", wdtype, resident, PHASES))
    if streamed:
        streamed_bytes = [inv.layers[i].nbytes(wdtype, b) for i in sorted(streamed)]
        components.append(Component(f"DiT weights, {len(streamed)} layers streamed (pinned)", "host", wdtype,
                                    sum(streamed_bytes), PHASES))
        components.append(Component("layer slots (2 x largest streamed layer)", "gpu", wdtype,
                                    2 * max(streamed_bytes), PHASES))
    # The load phase converts/merges one block at a time: one block in the run dtype is transient.
    components.append(Component("load transient (one block in the run dtype)", "gpu", run_dtype,
                                max(u.nbytes("bf16", b) for u in inv.layers), ("load",)))

    kv_dtype_bytes = 1 if placement.kv_dtype == "fp8" else b
    per_set = work.kv_tokens * inv.kv_bytes_per_token(kv_dtype_bytes)
    sets = work.kv_sets_per_gpu
    components.append(Component(f"KV sets ({sets} x {per_set / GiB:.2f} GiB, {work.kv_tokens} tokens)",
                                placement.kv_location, placement.kv_dtype, sets * per_set, STEADY))
    layer_bytes_per_token = 2 * inv.dim * kv_dtype_bytes
    if placement.kv_location == "host":
        components.append(Component("KV window slots (2 layers)", "gpu", placement.kv_dtype,
                                    2 * work.kv_tokens * layer_bytes_per_token, STEADY))
    cond_bytes = cond * inv.kv_bytes_per_token(b)
    components.append(Component(f"cond cache ({cond} tokens, shared by the steps)", placement.cond_location,
                                run_dtype, cond_bytes, STEADY))
    if placement.cond_location == "host":
        components.append(Component("cond slots (2 layers)", "gpu", run_dtype, 2 * cond * 2 * inv.dim * b, STEADY))

    components.append(Component("text keys/values (every layer, cached by the DiT)", "gpu", run_dtype,
                                2 * inv.text_len * inv.dim * inv.num_layers * b, STEADY))
    keys = work.kv_tokens + cond
    components.append(Component("forward activations (one block)", "gpu", run_dtype,
                                forward_activation_bytes(inv, work, placement, hw, tokens=work.block_tokens,
                                                         keys=keys, cond_tokens=cond), ("denoise",)))
    components.append(Component("sink prefill activations", "gpu", run_dtype,
                                forward_activation_bytes(inv, work, placement, hw, tokens=cond, keys=cond,
                                                         cond_tokens=cond), ("prefill",)))

    decodes_here = work.vae_on_dit_gpu
    components.append(Component("VAE weights", "gpu", run_dtype, VAE_PARAMS * b, AFTER_LOAD))
    components.append(Component("audio encoder (wav2vec2, kept on the device)", "gpu", run_dtype,
                                AUDIO_ENCODER_PARAMS * b, AFTER_LOAD))
    if decodes_here:
        state_phases = STEADY if work.mode == "streaming" else ("decode",)
        components.append(Component("VAE streaming decoder state", "gpu", run_dtype,
                                    vae_state_elements(geometry.latent_height, geometry.latent_width) * b,
                                    state_phases))
        components.append(Component("VAE decode transient (one latent frame)", "gpu", "fp32/" + run_dtype,
                                    vae_decode_transient_bytes(work.height, work.width), ("decode",)))
    encoder_where = "gpu" if placement.text_encoder == "gpu_then_free" else "host"
    components.append(Component("text encoder (encode, then free)", encoder_where, run_dtype,
                                TEXT_ENCODER_PARAMS * b, ("setup",)))
    components.append(Component("VAE encode transient (reference, motion)", "gpu", "fp32/" + run_dtype,
                                vae_decode_transient_bytes(work.height, work.width), ("setup",)))
    return components


def phase_peaks(components: list[Component]) -> dict[str, int]:
    """GPU bytes live in each phase. Set-up runs its pieces one after the other, so it takes their max."""
    peaks = {}
    for phase in PHASES:
        live = [c for c in components if c.where == "gpu" and phase in c.phases]
        if phase == "setup":
            persistent = sum(c.nbytes for c in live if len(c.phases) > 1)
            transient = max((c.nbytes for c in live if len(c.phases) == 1), default=0)
            peaks[phase] = persistent + transient
        else:
            peaks[phase] = sum(c.nbytes for c in live)
    return peaks


# ---------------------------------------------------------------------------------------------------
# Speed model


def _layer_compute_s(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware, unit: LayerUnit,
                     *, keys: int) -> float:
    tokens, dim = work.block_tokens, inv.dim
    matmul_flops = 2 * tokens * unit.token_matmul_elements + 2 * inv.text_len * unit.context_matmul_elements
    if placement.weight_dtype == "fp8" and hw.has_fp8_matmul:
        matmul_s = matmul_flops / (hw.fp8_flops * FP8_MATMUL_EFFICIENCY)
        elementwise = FP8_INPUT_QUANT_BYTES * 2 * tokens * (unit.token_matmul_elements / dim)
    else:
        matmul_s = matmul_flops / (hw.bf16_flops * MATMUL_EFFICIENCY)
        elementwise = (FP8_DEQUANT_BYTES + 5) * unit.fp8_elements if placement.weight_dtype == "fp8" else 0
    attention_flops = 4 * tokens * keys * dim + 4 * tokens * inv.text_len * dim
    attention_s = attention_flops / (hw.bf16_flops * ATTENTION_EFFICIENCY)
    elementwise += ELEMENTWISE_BYTES_PER_TOKEN_DIM * tokens * dim + 4 * work.run_dtype_bytes * keys * dim
    if placement.kv_dtype == "fp8":
        elementwise += FP8_KV_DEQUANT_BYTES * (keys - work.geometry.cond_tokens) * 2 * dim
    gpu_s = matmul_s + attention_s + elementwise / hw.hbm_bytes_per_s
    # Small blocks are bound by the host issuing the layer's ~150 kernels (more for FP8 linears).
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
    forward_s: float
    compute_s: float
    h2d_bytes_per_forward: int
    d2h_bytes_per_forward: int
    block_s: float
    fps: float


def estimate_speed(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware) -> SpeedEstimate:
    """Steady-state time per forward (full KV window) and video frames per second."""
    geometry = work.geometry
    cond, keys = geometry.cond_tokens, work.kv_tokens + geometry.cond_tokens
    compute = [_layer_compute_s(inv, work, placement, hw, unit, keys=keys) for unit in inv.layers]
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
    decode_s = VAE_DECODE_OVERHEAD_S + (work.video_frames_per_block * work.height * work.width
                                        * VAE_DECODE_FLOPS_PER_PIXEL / (hw.bf16_flops * VAE_EFFICIENCY))
    dit_s = work.kv_sets_per_gpu * forward_s
    block_s = dit_s + decode_s if work.vae_on_dit_gpu and work.num_gpus == 1 else max(dit_s, decode_s)
    h2d = int(sum(inv.layers[i].nbytes(placement.weight_dtype, b) for i in placement.streamed_layers)
              + window_fetch * inv.num_layers)
    return SpeedEstimate(forward_s=forward_s, compute_s=sum(compute), h2d_bytes_per_forward=h2d,
                         d2h_bytes_per_forward=writeback_bytes * inv.num_layers, block_s=block_s,
                         fps=work.video_frames_per_block / block_s)


# ---------------------------------------------------------------------------------------------------
# Choosing a placement


@dataclass(frozen=True)
class Pins:
    """Placement choices fixed by the user; None leaves the choice to the planner."""

    weight_dtype: str | None = None
    kv_dtype: str | None = None
    kv_location: str | None = None
    cond_location: str | None = None
    streamed_layers: int | None = None
    text_encoder: str | None = None

    def pinned(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def streamed_layer_choice(inv: DiTInventory, weight_dtype: str, count: int) -> tuple[int, ...]:
    """Which `count` blocks to stream: the lightest units first (blocks without an audio injector, so
    the two GPU slots stay small), spread evenly among them; heavier units only when needed."""
    sizes = [unit.nbytes(weight_dtype) for unit in inv.layers]
    light = [i for i, size in enumerate(sizes) if size == min(sizes)]
    heavy = [i for i, size in enumerate(sizes) if size != min(sizes)]

    def spread(candidates: list[int], k: int) -> list[int]:
        return [candidates[j] for j in spread_layers(k, len(candidates))]

    if count <= len(light):
        return tuple(spread(light, count))
    return tuple(sorted(light + spread(heavy, count - len(light))))


@dataclass
class Plan:
    """The planner's answer for one run."""

    workload: Workload
    hardware: Hardware
    placement: Placement
    fits: bool
    budget_bytes: int | None
    budget_source: str
    headroom_bytes: int
    components: list[Component]
    phases: dict[str, int]
    host_budget_bytes: int | None
    speed: SpeedEstimate
    baseline: SpeedEstimate
    reason: str = ""
    nearest: list[str] = field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> int:
        """Peak bytes allocated on the GPU over all phases."""
        return max(self.phases.values())

    @property
    def predicted_reserved_bytes(self) -> int:
        """Peak bytes the caching allocator reserves (allocated plus fragmentation)."""
        return int(self.predicted_peak_bytes * (1 + ALLOCATOR_FRAGMENTATION))

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def host_pinned_bytes(self) -> int:
        return sum(c.nbytes for c in self.components if c.where == "host" and c.phases != ("setup",))

    @property
    def slowdown(self) -> float:
        return self.speed.block_s / self.baseline.block_s

    def check(self) -> "Plan":
        """Raises `MemoryPlanError` with the numbers and the nearest setting that fits when it does not."""
        if not self.fits:
            raise MemoryPlanError(self.refusal())
        return self

    def refusal(self) -> str:
        nearest = "; ".join(self.nearest) if self.nearest else "none of the smaller standard settings"
        return (f"{self.workload.describe()} does not fit {self.budget_source}: {self.reason}. "
                f"Nearest setting that fits: {nearest}.")

    def to_json(self) -> dict:
        gib = lambda n: None if n is None else round(n / GiB, 3)  # noqa: E731
        return {
            "fits": self.fits,
            "predicted_peak_gib": gib(self.predicted_peak_bytes),
            "predicted_reserved_gib": gib(self.predicted_reserved_bytes),
            "peak_phase": self.peak_phase,
            "budget_gib": gib(self.budget_bytes),
            "budget_source": self.budget_source,
            "headroom_gib": gib(self.headroom_bytes),
            "placement": self.placement.to_json(),
            "phases_gib": {phase: gib(n) for phase, n in self.phases.items()},
            "components": [c.to_json() for c in self.components],
            "host_pinned_gib": gib(self.host_pinned_bytes),
            "host_budget_gib": gib(self.host_budget_bytes),
            "forward_s": round(self.speed.forward_s, 4),
            "fps": round(self.speed.fps, 3),
            "slowdown": round(self.slowdown, 3),
            "h2d_gb_per_forward": round(self.speed.h2d_bytes_per_forward / 1e9, 3),
            "workload": {"height": self.workload.height, "width": self.workload.width,
                         "infer_frames": self.workload.infer_frames, "sample_steps": self.workload.sample_steps,
                         "num_gpus": self.workload.num_gpus, "mode": self.workload.mode,
                         "frame_tokens": self.workload.geometry.frame_tokens,
                         "kv_tokens_per_set": self.workload.kv_tokens,
                         "cond_tokens": self.workload.geometry.cond_tokens},
            "hardware": asdict(self.hardware),
            "reason": self.reason,
            "nearest": self.nearest,
        }


class MemoryPlanError(LiveAvatarError):
    """No placement fits the GPU; the message has the numbers and the nearest setting that fits."""


def format_gib(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / GiB:.2f} GiB"


def default_headroom(budget_bytes: int) -> int:
    return max(DEFAULT_HEADROOM_BYTES, int(DEFAULT_HEADROOM_FRACTION * budget_bytes))


def default_host_budget() -> int | None:
    """Pinned host memory a run on this machine's GPU may take: 90% of what is available, or None (unlimited)
    when that is unknown."""
    available = available_host_memory()
    return None if available is None else int(0.9 * available)


def _evaluate(inv, work, hw, placement, budget, headroom, host_budget):
    components = memory_components(inv, work, placement, hw)
    phases = phase_peaks(components)
    reserved = max(phases.values()) * (1 + ALLOCATOR_FRAGMENTATION)
    pinned = sum(c.nbytes for c in components if c.where == "host" and c.phases != ("setup",))
    steady = max(n for phase, n in phases.items() if phase != "setup") * (1 + ALLOCATOR_FRAGMENTATION)
    fits_run = budget is None or steady + headroom <= budget
    fits_setup = budget is None or reserved + headroom <= budget
    fits_host = host_budget is None or pinned <= host_budget
    return components, phases, fits_run and fits_host, fits_setup


def make_plan(inv: DiTInventory, work: Workload, hw: Hardware, budget_bytes: int | None, *,
              budget_source: str = "", headroom_bytes: int | None = None, host_budget_bytes: int | None = None,
              pins: Pins = Pins(), suggest: bool = True) -> Plan:
    """The fastest placement that fits `budget_bytes` of GPU memory (None: unlimited), or a refusal with
    the nearest setting that fits."""
    headroom = default_headroom(budget_bytes or 0) if headroom_bytes is None else headroom_bytes
    fastest_weights = "fp8" if hw.has_fp8_matmul else "bf16"
    baseline_placement = Placement(weight_dtype=pins.weight_dtype or fastest_weights)
    baseline = estimate_speed(inv, work, baseline_placement, hw)

    candidates = []
    for weight_dtype in _choices(pins.weight_dtype, ("bf16", "fp8")):
        for kv_dtype in _choices(pins.kv_dtype, ("bf16", "fp8")):
            for kv_location in _choices(pins.kv_location, ("gpu", "host")):
                for cond_location in _choices(pins.cond_location, ("gpu", "host")):
                    counts = range(inv.num_layers + 1) if pins.streamed_layers is None else [pins.streamed_layers]
                    for count in counts:
                        placement = Placement(weight_dtype=weight_dtype, kv_dtype=kv_dtype, kv_location=kv_location,
                                              cond_location=cond_location,
                                              streamed_layers=streamed_layer_choice(inv, weight_dtype, count))
                        components, phases, fits, _ = _evaluate(inv, work, hw, placement, budget_bytes, headroom,
                                                                host_budget_bytes)
                        if fits:
                            candidates.append((estimate_speed(inv, work, placement, hw), placement))
                            break  # more streaming is never faster
    if candidates:
        # An FP8 KV cache changes the numerics beyond the reference's own FP8 scheme, so unless pinned it
        # is a memory measure only: used when no bf16 KV placement fits, never just for speed.
        lossless = [(speed, p) for speed, p in candidates if p.kv_dtype == "bf16"]
        candidates = lossless or candidates
        best_s = min(speed.block_s for speed, _ in candidates)
        near_best = [(speed, p) for speed, p in candidates if speed.block_s <= best_s * 1.01]
        speed, placement = min(near_best, key=lambda sp: (
            sp[1].kv_location == "host", sp[1].cond_location == "host",
            len(sp[1].streamed_layers), sp[0].block_s))
        placement = _with_text_encoder(inv, work, hw, placement, budget_bytes, headroom, host_budget_bytes, pins)
        components, phases, fits, fits_setup = _evaluate(inv, work, hw, placement, budget_bytes, headroom,
                                                         host_budget_bytes)
        reason = "" if fits_setup else "the set-up (text encoder) does not fit even on the CPU"
        return Plan(work, hw, placement, fits and fits_setup, budget_bytes, budget_source, headroom, components,
                    phases, host_budget_bytes, speed, baseline, reason)

    # Nothing fits: report the leanest placement's numbers.
    leanest = Placement(weight_dtype=pins.weight_dtype or "fp8", kv_dtype=pins.kv_dtype or "fp8",
                        kv_location=pins.kv_location or "host", cond_location=pins.cond_location or "host",
                        streamed_layers=streamed_layer_choice(
                            inv, pins.weight_dtype or "fp8",
                            inv.num_layers if pins.streamed_layers is None else pins.streamed_layers),
                        text_encoder=pins.text_encoder or "cpu")
    components, phases, _, _ = _evaluate(inv, work, hw, leanest, budget_bytes, headroom, host_budget_bytes)
    plan = Plan(work, hw, leanest, False, budget_bytes, budget_source, headroom, components, phases,
                host_budget_bytes, estimate_speed(inv, work, leanest, hw), baseline)
    needed = max(n for phase, n in phases.items() if phase != "setup") * (1 + ALLOCATOR_FRAGMENTATION) + headroom
    plan.reason = f"even the leanest placement ({leanest.describe()}) needs {format_gib(int(needed))} " \
                  f"incl. {format_gib(headroom)} headroom"
    if host_budget_bytes is not None and plan.host_pinned_bytes > host_budget_bytes:
        plan.reason += f" and {format_gib(plan.host_pinned_bytes)} of pinned host memory (available {format_gib(host_budget_bytes)})"
    if suggest:
        plan.nearest = nearest_fitting(inv, work, hw, budget_bytes, headroom=headroom,
                                       host_budget_bytes=host_budget_bytes, pins=pins)
    return plan


def _choices(pinned, options):
    return (pinned,) if pinned is not None else options


def _with_text_encoder(inv, work, hw, placement, budget, headroom, host_budget, pins) -> Placement:
    if pins.text_encoder is not None:
        return replace(placement, text_encoder=pins.text_encoder)
    on_gpu = replace(placement, text_encoder="gpu_then_free")
    if _evaluate(inv, work, hw, on_gpu, budget, headroom, host_budget)[3]:
        return on_gpu
    return replace(placement, text_encoder="cpu")


def plan_cpu_run(inv: DiTInventory, work: Workload, pins: Pins) -> Plan:
    """A CPU run: no GPU budget, so the placement is what `pins` fix and the planner's defaults elsewhere."""
    return make_plan(inv, work, CPU_HARDWARE, None, budget_source="CPU run (no GPU budget)", pins=pins)


def nearest_fitting(inv: DiTInventory, work: Workload, hw: Hardware, budget_bytes: int, *, headroom: int,
                    host_budget_bytes: int | None, pins: Pins) -> list[str]:
    """Closest settings that fit: the planner's own choice instead of the pinned placements, fewer frames
    per clip, or the next smaller standard --size (same aspect ratio)."""
    def fits(candidate_work: Workload, candidate_pins: Pins) -> Plan | None:
        plan = make_plan(inv, candidate_work, hw, budget_bytes, headroom_bytes=headroom,
                         host_budget_bytes=host_budget_bytes, pins=candidate_pins, suggest=False)
        return plan if plan.fits else None

    suggestions = []
    if pins.pinned():
        plan = fits(work, Pins())
        if plan:
            flags = ", ".join(f"{k}={v}" for k, v in pins.pinned().items())
            suggestions.append(f"drop the pinned {flags} (the planner's choice fits: "
                               f"{plan.placement.describe()}, {format_gib(plan.predicted_peak_bytes)})")
    for frames in range(work.infer_frames - 12, 0, -12):
        plan = fits(replace(work, infer_frames=frames), pins)
        if plan:
            suggestions.append(f"--infer_frames {frames} ({format_gib(plan.predicted_peak_bytes)}, {plan.placement.describe()})")
            break
    area = work.height * work.width
    for size_w, size_h in STANDARD_SIZES:
        if size_w * size_h >= area:
            continue
        height, width = size_for_area(work.height, work.width, size_w * size_h)
        plan = fits(replace(work, height=height, width=width), pins)
        if plan:
            suggestions.append(f"--size {size_w}*{size_h} -> {width}x{height} ({format_gib(plan.predicted_peak_bytes)}, "
                               f"{plan.placement.describe()})")
            break
    return suggestions


# ---------------------------------------------------------------------------------------------------
# Budgets and entry points


def resolve_budget(*, vram_budget: int | None = None, gpu_memory: int | None = None,
                   hardware: Hardware | None = None, detect: bool = True) -> tuple[int, str]:
    """GPU bytes the run's allocator may use, and where that number comes from: the smallest of
    --vram-budget, --gpu-memory minus the CUDA context, and the detected GPU's free memory (or, without a
    GPU, the preset card's memory minus the context)."""
    import torch

    limits = []
    if vram_budget is not None:
        limits.append((vram_budget, f"--vram-budget {vram_budget / GiB:.2f} GiB"))
    if gpu_memory is not None:
        limits.append((gpu_memory - CUDA_CONTEXT_BYTES, f"--gpu-memory {gpu_memory / GiB:.2f} GiB minus "
                                                        f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA context"))
    if detect and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        limits.append((free + torch.cuda.memory_reserved(),
                       f"free memory of the {name} ({total / GiB:.2f} GiB total)"))
    elif not limits and hardware is not None and hardware.memory_bytes is not None:
        limits.append((hardware.memory_bytes - CUDA_CONTEXT_BYTES, f"{hardware.name}: "
                       f"{hardware.memory_bytes / GiB:.2f} GiB minus {CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA context"))
    if not limits:
        raise InputError("no CUDA GPU detected: give the card's memory with --gpu-memory 24GiB (or --vram-budget, "
                         "or --hardware rtx4090)")
    return min(limits)


def available_host_memory() -> int | None:
    """MemAvailable of this machine (Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def transformer_config_for(ckpt_dir: str | os.PathLike | None, config_name: str | None = None):
    """The DiT config: `tiny`/`14b` by name, else the checkpoint's config.json, else the 14B release."""
    from liveavatar.models.transformer import CONFIG_NAME, TransformerConfig

    if config_name == "tiny":
        return TransformerConfig.tiny()
    if config_name is None and ckpt_dir is not None and os.path.isfile(os.path.join(ckpt_dir, CONFIG_NAME)):
        return TransformerConfig.from_dir(ckpt_dir)
    return TransformerConfig.full_14b()


# A CPU run: nothing crosses a host link (the rates only keep the speed model finite).
CPU_HARDWARE = Hardware("CPU (no GPU)", 1e12, None, 5e10, 1e15, 1e15)
