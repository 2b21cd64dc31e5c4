"""The memory model: the bytes of every piece of a run, where it lives and in which phases.

* DiT weights by dtype, counted from the model itself built on the meta device (so they follow the
  config exactly): bf16, or FP8 codes for the 460 eligible linears (``liveavatar.runtime.fp8``) + bf16
  for the rest. Streamed layers live in pinned host memory; the GPU holds two slots of the largest
  streamed layer.
* KV sets, one per denoising step on this GPU: (infer_frames/4)·S tokens × 2·dim·layers × dtype bytes
  (819,200 B per token per set in bf16 at 14B; FP8: 1 B codes plus one fp32 scale per token and layer).
  On the host they need two per-layer window slots on the GPU. On the GPU in the run dtype the sets hold
  copies of the cond rows beside their rings, one per pair of sets (`liveavatar.runtime.caches.joined`):
  + cond tokens × 2·dim·layers × dtype bytes per pair (and per odd set); the cond cache then keeps only
  the reference frame's un-roped keys (frame tokens × dim·layers × dtype bytes).
* The cond (sink) cache, shared by all steps: cond tokens × 2·dim·layers × 2 B (gpu, or host + 2 slots).
* Pinned host memory (streamed layers, host caches) as the arenas take it: the allocations packed into
  power-of-two chunks (``liveavatar.runtime.pinned_chunks``). The rest of the host's memory (the process,
  read buffers, the text encoder on the CPU, audio, frames) is ``liveavatar.runtime.planner.host``.
* Per-forward activations, from the shapes of one block forward (see ``forward_activation_bytes``).
* VAE: weights, the streaming decoder's carried state (walked from the decoder's layers) and the
  transient of decoding one latent frame.
* Set-up (after the load): wav2vec2 stays on the GPU; on a prompt-cache miss the text encoder (11.36 GB
  bf16) is loaded onto the GPU, encodes and is freed ("gpu_then_free"; the engine frees the caches of an
  earlier request first), or runs on the CPU.

Constants marked CALIBRATED are fitted to the measurements of ``benchmarks/planner_vs_measured.py``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import astuple, dataclass

from liveavatar.geometry import ClipGeometry
from liveavatar.options import DEFAULTS, Mode, RequestOptions
from liveavatar.runtime.pinned_chunks import packed_bytes
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.planner.hardware import GiB, Hardware

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
# CALIBRATED: live bytes per element of one decoded latent frame's full-resolution feature map
# (base_dim channels × temporal factor frames × H × W) while the VAE decodes it.
VAE_DECODE_TRANSIENT_BYTES_PER_ELEMENT = 22.0
# Parameters of the pieces that are not the DiT, as released (umT5-XXL encoder, Wan 2.1 VAE, wav2vec2);
# bytes follow the run dtype.
VAE_PARAMS = 126_892_531
TEXT_ENCODER_PARAMS = 5_680_910_336
AUDIO_ENCODER_PARAMS = 315_472_545
# CALIBRATED: reserved / allocated - 1 of the caching allocator at the peak.
ALLOCATOR_FRAGMENTATION = 0.03
# Audio a plan assumes when it is not told (its waveform and whole-file features stay on the host).
DEFAULT_AUDIO_SECONDS = 60.0


@dataclass(frozen=True)
class RankRole:
    """One rank of a multi-GPU pipeline (`liveavatar.runtime.step_layout`): the denoising steps (KV
    sets) it runs, whether it holds a DiT, and whether it is the output rank (encoders at set-up, the VAE,
    the decode)."""

    steps: int
    holds_dit: bool
    output: bool


@dataclass(frozen=True)
class Workload:
    """The shape of a run: video size, clip length, steps and GPUs. With ``num_gpus`` > 1 the memory and
    speed are those of one rank, ``role`` (`liveavatar.runtime.planner.step_ranks` plans every rank). A run's
    workload comes from `of`; the defaults are the request options' defaults."""

    height: int
    width: int
    infer_frames: int = DEFAULTS.infer_frames
    sample_steps: int = DEFAULTS.sample_steps
    num_gpus: int = 1
    mode: Mode = DEFAULTS.mode
    run_dtype_bytes: int = 2
    role: RankRole | None = None
    audio_seconds: float = DEFAULT_AUDIO_SECONDS  # its waveform and whole-file audio features stay on the host
    attention: str = "bf16"  # the blocks' self-attention: bf16, int8 or fp8 (liveavatar.models.quantised_attention)

    @classmethod
    def of(cls, geometry: ClipGeometry, options: RequestOptions, *, run_dtype_bytes: int, num_gpus: int = 1,
           audio_seconds: float = DEFAULT_AUDIO_SECONDS) -> "Workload":
        """The workload of a request of ``geometry`` and ``options`` on ``num_gpus`` ranks."""
        return cls(geometry.height, geometry.width, geometry.infer_frames, options.sample_steps, num_gpus,
                   options.mode, run_dtype_bytes, audio_seconds=audio_seconds, attention=options.attention)

    @functools.cached_property
    def geometry(self) -> ClipGeometry:
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
    def kv_sets_per_gpu(self) -> int:
        return self.sample_steps if self.role is None else self.role.steps

    @property
    def holds_dit(self) -> bool:
        return self.role is None or self.role.holds_dit

    @property
    def is_output(self) -> bool:
        """This GPU runs the encoders, holds the VAE and decodes."""
        return self.role is None or self.role.output

    def describe(self) -> str:
        g = self.geometry
        gpus = f", {self.num_gpus} GPUs" if self.num_gpus > 1 else ""
        return (f"{self.width}x{self.height} ({g.frame_tokens} tokens/frame), {self.infer_frames}-frame clips, "
                f"{self.sample_steps} steps{gpus}, {self.attention} attention")


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
    ffn_dim: int
    text_len: int
    layers: tuple[LayerUnit, ...]
    globals: LayerUnit
    largest_tensor_elements: int = 0  # the checkpoint's largest tensor (what one read holds on the host)
    audio_feature_width: int = 0  # wav2vec2 hidden states x width per video frame (the audio features)
    # Per layer, the tensors the layer streamer carves from its arena for that unit, in its order, as
    # (elements, bytes per element; 0: the run dtype's), with bf16 and with FP8 weights.
    streamed_tensors_bf16: tuple[tuple[tuple[int, int], ...], ...] = ()
    streamed_tensors_fp8: tuple[tuple[tuple[int, int], ...], ...] = ()

    def streamed_host_sizes(self, layers, weight_dtype: str, run_dtype_bytes: int) -> list[int]:
        """Bytes of every host allocation of the streamed ``layers`` (in order), as the streamer makes them."""
        tensors = self.streamed_tensors_fp8 if weight_dtype == "fp8" else self.streamed_tensors_bf16
        return [elements * (size or run_dtype_bytes) for layer in layers for elements, size in tensors[layer]]

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
    from liveavatar.runtime.fp8 import convert_to_fp8, keeps_bf16
    from liveavatar.runtime.layer_streaming import unit_modules

    with torch.device("meta"):
        model = CausalS2VTransformer(config)
    layer_of_slot = dict(enumerate(config.audio_inject_layers))
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
    largest = max(t.numel() for t in [*model.parameters(), *model.buffers()])
    model.to(torch.bfloat16)
    streamed_bf16 = tuple(_streamed_tensors(model, layer) for layer in range(config.num_layers))
    for layer in range(config.num_layers):
        for name, module in unit_modules(model, layer).items():
            convert_to_fp8(module, kernel="weight_only", prefix=name)
    streamed_fp8 = tuple(_streamed_tensors(model, layer) for layer in range(config.num_layers))
    return DiTInventory(dim=config.dim, ffn_dim=config.ffn_dim, text_len=config.text_len, layers=tuple(units[:-1]),
                        globals=units[-1], largest_tensor_elements=largest,
                        audio_feature_width=config.audio_layers * config.audio_dim,
                        streamed_tensors_bf16=streamed_bf16, streamed_tensors_fp8=streamed_fp8)


def _streamed_tensors(model, layer: int) -> tuple[tuple[int, int], ...]:
    """(elements, bytes per element or 0 for the run dtype) of unit `layer`'s tensors in the streamer's order
    (the model is on the meta device in bf16, so bf16 stands for the run dtype)."""
    import torch

    from liveavatar.runtime.layer_streaming import unit_modules, unit_tensors

    return tuple((t.numel(), 0 if t.dtype == torch.bfloat16 else t.element_size())
                 for *_, t in unit_tensors(unit_modules(model, layer)))


def transformer_config_for(ckpt_dir: str | os.PathLike | None, config_name: str | None = None):
    """The DiT config: `tiny`/`14b` by name, else the checkpoint's config.json, else the 14B release."""
    from liveavatar.models.transformer import CONFIG_NAME, TransformerConfig

    if config_name == "tiny":
        return TransformerConfig.tiny()
    if config_name is None and ckpt_dir is not None and os.path.isfile(os.path.join(ckpt_dir, CONFIG_NAME)):
        return TransformerConfig.from_dir(ckpt_dir)
    return TransformerConfig.full_14b()


@dataclass(frozen=True)
class Component:
    """One line of the plan: what, where, in which dtype, how many bytes, during which phases."""

    name: str
    where: str  # "gpu" | "host"
    dtype: str
    nbytes: int
    phases: tuple[str, ...]
    pinned: bool = False  # host memory pinned for copies (page-locked, never reclaimed)
    reclaimable: bool = False  # host file pages the kernel can drop under pressure (not budgeted)
    # One of a phase's steps that run one after the other (the set-up's encoders, the load's reads): the
    # phase takes the largest of them on top of everything else live in it.
    sequential: bool = False

    def to_json(self) -> dict:
        data = {"name": self.name, "where": self.where, "dtype": self.dtype, "bytes": self.nbytes,
                "gib": round(self.nbytes / GiB, 3), "phases": list(self.phases)}
        if self.where == "host":
            data.update(pinned=self.pinned, reclaimable=self.reclaimable)
        return data


# The order of a run as the pipeline does it: load the DiT (unit by unit), set up (encode the prompt, the
# audio and the reference with the DiT already resident), prefill the sink, then denoise and decode blocks.
PHASES = ("load", "setup", "prefill", "denoise", "decode")
AFTER_LOAD = PHASES[1:]
STEADY = PHASES[2:]


def forward_activation_bytes(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware, *,
                             tokens: int, keys: int, cond_tokens: int, joined: bool = False) -> int:
    """Peak live bytes of one DiT forward over `tokens` block tokens attending to `keys` keys.

    Attention phase: the larger of the rotation of k and the attention itself (the per-token working set,
    the concatenated keys and values, the re-roped cond keys and, for an FP8 KV set, its dequantised
    window). A ``joined`` KV set (`liveavatar.runtime.caches.joined`) concatenates nothing and re-ropes only
    the reference frame's keys (one latent frame of tokens) into its buffer.
    FFN phase: the residual stream plus two hidden tensors of ffn_dim.
    FP8 adds its per-call input copies (W8A8) or a dequantised weight (weight-only).
    """
    dim, b = inv.dim, work.run_dtype_bytes
    per_token = tokens * dim * b / 2  # the constants are for a bf16 run
    concatenated = 0 if joined else 2 * b * keys * dim
    roped_cond = work.geometry.frame_tokens if joined else cond_tokens
    attention = max(ROPE_BYTES_PER_TOKEN_DIM * per_token,
                    ATTENTION_BYTES_PER_TOKEN_DIM * per_token + concatenated
                    + COND_ROPE_BYTES_PER_TOKEN_DIM * roped_cond * dim * b / 2)
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
    """Every GPU and pinned-host allocation of a run under `placement`, with the phases it is live in: the
    DiT's weights, what denoising needs (KV sets, cond cache, activations) and what the output GPU holds
    (encoders, VAE, decode); one rank of a pipeline holds only the groups its role has."""
    components: list[Component] = []
    if work.holds_dit:
        components += _dit_weight_components(inv, work, placement)
    if work.kv_sets_per_gpu:
        components += _denoise_components(inv, work, placement, hw)
    if work.is_output:
        components += _output_components(inv, work, placement)
    return components


def _dit_weight_components(inv: DiTInventory, work: Workload, placement: Placement) -> list[Component]:
    b, wdtype = work.run_dtype_bytes, placement.weight_dtype
    run_dtype = _run_dtype_name(b)
    components = []
    streamed = set(placement.streamed_layers)
    resident_units = [u for i, u in enumerate(inv.layers) if i not in streamed]
    resident = sum(u.nbytes(wdtype, b) for u in resident_units) + inv.globals.nbytes(wdtype, b)
    components.append(Component(f"DiT weights, {len(resident_units)}/{inv.num_layers} layers resident",
                                "gpu", wdtype, resident, PHASES))
    if streamed:
        streamed_bytes = [inv.layers[i].nbytes(wdtype, b) for i in sorted(streamed)]
        components.append(Component(f"DiT weights, {len(streamed)} layers streamed", "host", wdtype,
                                    packed_bytes(inv.streamed_host_sizes(sorted(streamed), wdtype, b)), PHASES,
                                    pinned=True))
        components.append(Component("layer slots (2 x largest streamed layer)", "gpu", wdtype,
                                    2 * max(streamed_bytes), PHASES))
    # The load places one unit at a time: that unit in the run dtype, plus the float32 temporaries of the
    # LoRA merge of its largest layer (W, B @ A and its scaled copy: 12 B per weight of an FFN linear).
    components.append(Component("load transient (one unit + its LoRA merge in fp32)", "gpu", run_dtype,
                                max(u.nbytes("bf16", b) for u in inv.layers) + 12 * inv.ffn_dim * inv.dim,
                                ("load",)))
    return components


def _denoise_components(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware) -> list[Component]:
    b = work.run_dtype_bytes
    run_dtype = _run_dtype_name(b)
    cond = work.geometry.cond_tokens
    components = []
    fp8_kv = placement.kv_dtype == "fp8"
    joined = placement.joins_cond  # KV sets hold a copy of the cond rows beside their rings, one per pair
    per_set = kv_allocations(inv, work.kv_tokens, b, fp8=fp8_kv)
    sets = work.kv_sets_per_gpu
    cond_copies = (sets + 1) // 2 if joined else 0
    cond_allocations = kv_allocations(inv, cond, b, fp8=False)
    # Host caches: the KV sets and then the cond cache carved from the cache streamer's one arena.
    host_kv = per_set * sets if placement.kv_location == "host" else []
    host_cond = cond_allocations if placement.cond_location == "host" else []
    kv_bytes = packed_bytes(host_kv) if host_kv else sets * sum(per_set) + cond_copies * sum(cond_allocations)
    cond_bytes = packed_bytes(host_kv + host_cond) - packed_bytes(host_kv) if host_cond else sum(cond_allocations)
    # A text encoder on the CPU leaves the caches allocated while a later request's prompt is encoded.
    cache_phases = ("setup", *STEADY) if placement.text_encoder == "cpu" else STEADY
    on_host = dict(pinned=True, phases=cache_phases)
    with_cond = f" + {cond_copies} x {sum(cond_allocations) / GiB:.2f} GiB copies of the cond rows" if joined else ""
    components.append(Component(f"KV sets ({sets} x {sum(per_set) / GiB:.2f} GiB, {work.kv_tokens} tokens{with_cond})",
                                placement.kv_location, placement.kv_dtype, kv_bytes,
                                **(on_host if host_kv else dict(phases=STEADY))))
    if placement.kv_location == "host":
        components.append(Component("KV window slots (2 layers)", "gpu", placement.kv_dtype,
                                    2 * sum(per_set) // inv.num_layers, STEADY))
    if joined:  # the KV sets' copies hold the rest; the forwards re-rope the reference frame's keys from here
        ref = work.geometry.frame_tokens
        components.append(Component(f"cond cache (the reference frame's {ref} un-roped keys, shared by the steps)",
                                    "gpu", run_dtype, ref * inv.dim * inv.num_layers * b, STEADY))
    else:
        components.append(Component(f"cond cache ({cond} tokens, shared by the steps)", placement.cond_location,
                                    run_dtype, cond_bytes, **(on_host if host_cond else dict(phases=STEADY))))
    if placement.cond_location == "host":
        components.append(Component("cond slots (2 layers)", "gpu", run_dtype, 2 * cond * 2 * inv.dim * b, STEADY))

    components.append(Component("text keys/values (every layer, cached by the DiT)", "gpu", run_dtype,
                                2 * inv.text_len * inv.dim * inv.num_layers * b, STEADY))
    keys = work.kv_tokens + cond
    components.append(Component("forward activations (one block)", "gpu", run_dtype,
                                forward_activation_bytes(inv, work, placement, hw, tokens=work.block_tokens,
                                                         keys=keys, cond_tokens=cond, joined=joined), ("denoise",)))
    components.append(Component("sink prefill activations", "gpu", run_dtype,
                                forward_activation_bytes(inv, work, placement, hw, tokens=cond, keys=cond,
                                                         cond_tokens=cond, joined=False), ("prefill",)))
    return components


def _output_components(inv: DiTInventory, work: Workload, placement: Placement) -> list[Component]:
    b = work.run_dtype_bytes
    run_dtype = _run_dtype_name(b)
    geometry = work.geometry
    components = []
    components.append(Component("VAE weights", "gpu", run_dtype, VAE_PARAMS * b, AFTER_LOAD))
    components.append(Component("audio encoder (wav2vec2, kept on the device)", "gpu", run_dtype,
                                AUDIO_ENCODER_PARAMS * b, AFTER_LOAD))
    state_phases = STEADY if work.mode == Mode.STREAMING else ("decode",)
    components.append(Component("VAE streaming decoder state", "gpu", run_dtype,
                                vae_state_elements(geometry.latent_height, geometry.latent_width) * b,
                                state_phases))
    components.append(Component("VAE decode transient (one latent frame)", "gpu", "fp32/" + run_dtype,
                                vae_decode_transient_bytes(work.height, work.width), ("decode",)))
    if placement.text_encoder == "gpu_then_free":  # on the CPU it is host memory (planner.host)
        components.append(Component("text encoder (prompt-cache miss: encode, then free)", "gpu", run_dtype,
                                    TEXT_ENCODER_PARAMS * b, ("setup",), sequential=True))
    components.append(Component("VAE encode transient (reference, motion)", "gpu", "fp32/" + run_dtype,
                                vae_decode_transient_bytes(work.height, work.width), ("setup",), sequential=True))
    return components


def _run_dtype_name(dtype_bytes: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(dtype_bytes, f"{8 * dtype_bytes}-bit")


def kv_allocations(inv: DiTInventory, tokens: int, run_dtype_bytes: int, *, fp8: bool) -> list[int]:
    """Bytes of every tensor of one KV set (or cond cache) of ``tokens`` tokens, in allocation order."""
    import torch

    from liveavatar.runtime.caches.storage import KVStorage

    dtype = {2: torch.bfloat16, 4: torch.float32}[run_dtype_bytes]
    return KVStorage.host_allocations(inv.num_layers, tokens, 1, inv.dim, dtype=dtype, fp8=fp8)


def phase_peaks(components: list[Component], where: str = "gpu") -> dict[str, int]:
    """Bytes live in each phase on the GPU (or the host: budgeted memory, without reclaimable pages); of
    the sequential steps of a phase only the largest counts."""
    peaks = {}
    for phase in PHASES:
        live = [c for c in components if c.where == where and phase in c.phases and not c.reclaimable]
        peaks[phase] = (sum(c.nbytes for c in live if not c.sequential)
                        + max((c.nbytes for c in live if c.sequential), default=0))
    return peaks


def host_pinned_bytes(components: list[Component]) -> int:
    """Pinned host memory (the arenas' chunks of streamed layers and host caches)."""
    return sum(c.nbytes for c in components if c.where == "host" and c.pinned)
