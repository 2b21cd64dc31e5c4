"""Where every piece of the engine lives on a run: the one decision that models and caches read.

A `Placement` is chosen by the planner (`liveavatar.runtime.planner`) before anything is loaded and is
then consumed by the loaders (FP8 conversion, layer streaming) and by the cache construction (KV dtype
and location). It is deliberately a plain, frozen, JSON-friendly value.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

WEIGHT_DTYPES = ("bf16", "fp8")
KV_DTYPES = ("bf16", "fp8")
LOCATIONS = ("gpu", "host")
TEXT_ENCODER_PLACEMENTS = ("gpu_then_free", "cpu")


@dataclass(frozen=True)
class Placement:
    """What goes where for one run.

    weight_dtype: "bf16", or "fp8" (e4m3 linears with per-tensor scales after the LoRA merge, as
        ``liveavatar.runtime.fp8`` converts them).
    streamed_layers: indices of the DiT blocks whose weights live in pinned host memory and are
        copied into one of two GPU slots just before they run (prefetched on a side stream). A block
        that carries an audio injector streams together with its injector. Empty: all resident.
    kv_dtype: dtype of the per-step KV sets ("fp8" stores e4m3 codes with one scale per written chunk).
    kv_location: "gpu", or "host" (pinned host memory, each layer's window fetched ahead of use and
        the new block's K/V written back asynchronously).
    cond_location: where the shared sink (cond) cache lives; "host" streams it per layer like the KV.
    text_encoder: "gpu_then_free" loads the 11.4 GB text encoder onto the GPU to encode the prompt and
        frees it before denoising (skipped on a prompt-cache hit); "cpu" encodes on the CPU, for cards that
        cannot hold it next to the DiT.
    compile_workers: Inductor's compile worker processes while the first block of a clip size compiles
        (None: Inductor's default, `default_compile_workers`; 0: compile inside this process). Each takes
        host memory (`liveavatar.runtime.planner.host`), so the planner lowers the count where the host
        budget cannot hold the default pool next to the run; fewer workers only make the compile slower.
    """

    weight_dtype: str = "bf16"
    streamed_layers: tuple[int, ...] = field(default_factory=tuple)
    kv_dtype: str = "bf16"
    kv_location: str = "gpu"
    cond_location: str = "gpu"
    text_encoder: str = "gpu_then_free"
    compile_workers: int | None = None

    def __post_init__(self):
        _check_choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPES)
        _check_choice("kv_dtype", self.kv_dtype, KV_DTYPES)
        _check_choice("kv_location", self.kv_location, LOCATIONS)
        _check_choice("cond_location", self.cond_location, LOCATIONS)
        _check_choice("text_encoder", self.text_encoder, TEXT_ENCODER_PLACEMENTS)
        layers = tuple(int(i) for i in self.streamed_layers)
        if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
            raise ValueError(f"streamed_layers must be distinct non-negative block indices, got {layers}")
        object.__setattr__(self, "streamed_layers", tuple(sorted(layers)))
        if self.compile_workers is not None and self.compile_workers < 0:
            raise ValueError(f"compile_workers must be >= 0 (0: compile in-process), got {self.compile_workers}")

    @property
    def streams_layers(self) -> bool:
        return bool(self.streamed_layers)

    @property
    def resident(self) -> bool:
        """Every layer, KV set and the cond cache on the GPU: nothing moves between layers, so a forward can
        be one CUDA graph."""
        return not self.streamed_layers and self.kv_location == "gpu" and self.cond_location == "gpu"

    @property
    def joins_cond(self) -> bool:
        """The KV sets keep a copy of the cond rows beside their ring, so the attention reads views instead
        of concatenating (`liveavatar.runtime.caches.joined`): KV sets and cond cache on the GPU, the KV sets
        in the run dtype (FP8 ones are dequantised on load and host ones reach the GPU through slots: both
        concatenate)."""
        return (self.kv_location, self.cond_location, self.kv_dtype) == ("gpu", "gpu", "bf16")

    def is_streamed(self, layer: int) -> bool:
        return layer in self.streamed_layers

    def describe(self) -> str:
        """One line for logs: `fp8 weights, 12 layers streamed, KV bf16 on host, cond on gpu, ...`."""
        return (f"{self.weight_dtype} weights, {len(self.streamed_layers)} layers streamed, "
                f"KV {self.kv_dtype} on {self.kv_location}, cond on {self.cond_location}, "
                f"text encoder {self.text_encoder}" + ("" if self.compile_workers is None else
                                                       ", compiles in-process" if self.compile_workers == 0 else
                                                       f", {self.compile_workers} compile workers"))

    def to_json(self) -> dict:
        data = asdict(self)
        data["streamed_layers"] = list(self.streamed_layers)
        return data


def default_compile_workers() -> int:
    """The worker processes Inductor starts by default: its ``compile_threads`` (torch/_inductor/config.py,
    ``decide_compile_threads``: TORCHINDUCTOR_COMPILE_THREADS, else one per usable CPU up to 32), mirrored
    so the planner counts them without importing torch. A count of 1 starts no pool (0 workers)."""
    if os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"):
        threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])
    else:
        threads = min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return threads if threads > 1 else 0


def spread_layers(count: int, num_layers: int) -> tuple[int, ...]:
    """`count` block indices spread evenly over `num_layers` blocks, never the first block.

    Spreading lets each streamed block's copy overlap the compute of the resident blocks before it
    (with two GPU slots the copy of streamed block j+1 starts as soon as block j-1 is done); keeping
    block 0 resident hides the first copy of every forward.
    """
    if not 0 <= count <= num_layers:
        raise ValueError(f"cannot stream {count} of {num_layers} layers")
    if count == 0:
        return ()
    if count == num_layers:
        return tuple(range(num_layers))
    # Place streamed blocks at the end of equal-sized groups, so block 0 stays resident.
    return tuple(num_layers - 1 - (i * num_layers) // count for i in range(count))[::-1]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"placement {name} must be one of {', '.join(choices)}; got {value!r}")
