"""The placement policy: the fastest placement whose memory fits the GPU budget and the host budget, or a
refusal that gives the numbers and the nearest setting that fits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.geometry import FRAMES_PER_BLOCK, size_for_area
from liveavatar.runtime.placement import Placement, default_compile_workers, spread_layers
from liveavatar.runtime.planner.hardware import CPU_HARDWARE, GiB, MiB, Hardware, available_host_memory
from liveavatar.runtime.planner.host import COMPILE_WORKER_BYTES, compile_worker_bytes, host_components
from liveavatar.runtime.planner.memory import (ALLOCATOR_FRAGMENTATION, Component, DiTInventory, Workload,
                                               host_pinned_bytes, memory_components, phase_peaks)
from liveavatar.runtime.planner.speed import SpeedEstimate, attention_runs, estimate_speed

# Memory the CUDA context, cuBLAS/cuDNN handles and kernels take outside PyTorch's allocator.
CUDA_CONTEXT_BYTES = 640 * MiB
DEFAULT_HEADROOM_BYTES = 1 * GiB
DEFAULT_HEADROOM_FRACTION = 0.05
# Standard --size areas as (width, height), largest first: the "nearest setting that fits" walks down them.
STANDARD_SIZES = ((720, 400), (704, 384), (688, 368), (384, 256))


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
    host_headroom_bytes: int = 0
    notes: list[str] = field(default_factory=list)  # why the placement is what it is, where not obvious

    @property
    def host_phases(self) -> dict[str, int]:
        """Budgeted host bytes (pinned and pageable, without reclaimable file pages) per phase."""
        return phase_peaks(self.components, "host")

    @property
    def predicted_host_peak_bytes(self) -> int:
        return max(self.host_phases.values())

    @property
    def host_reclaimable_bytes(self) -> int:
        """File pages the run maps on top of the peak when memory allows (the text encoder on the CPU)."""
        return max((c.nbytes for c in self.components if c.where == "host" and c.reclaimable), default=0)

    @property
    def host_fits(self) -> bool | None:
        """Whether the host peak plus its headroom fits the host budget (None: no budget known)."""
        if self.host_budget_bytes is None:
            return None
        return self.predicted_host_peak_bytes + self.host_headroom_bytes <= self.host_budget_bytes

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
        return host_pinned_bytes(self.components)

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
        budgets = self.budget_source
        if self.host_budget_bytes is not None:
            budgets += f" and {format_gib(self.host_budget_bytes)} of host memory"
        return (f"{self.workload.describe()} does not fit {budgets}: {self.reason}. "
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
            "predicted_host_peak_gib": gib(self.predicted_host_peak_bytes),
            "host_fits": self.host_fits,
            "host_phases_gib": {phase: gib(n) for phase, n in self.host_phases.items()},
            "host_pinned_gib": gib(self.host_pinned_bytes),
            "host_reclaimable_gib": gib(self.host_reclaimable_bytes),
            "host_budget_gib": gib(self.host_budget_bytes),
            "host_headroom_gib": gib(self.host_headroom_bytes),
            "notes": self.notes,
            "forward_s": round(self.speed.forward_s, 4),
            "fps": round(self.speed.fps, 3),
            "attention_runs": attention_runs(self.workload, self.hardware),
            "slowdown": round(self.slowdown, 3),
            "h2d_gb_per_forward": round(self.speed.h2d_bytes_per_forward / 1e9, 3),
            "workload": {"height": self.workload.height, "width": self.workload.width,
                         "infer_frames": self.workload.infer_frames, "sample_steps": self.workload.sample_steps,
                         "num_gpus": self.workload.num_gpus, "mode": self.workload.mode,
                         "attention": self.workload.attention,
                         "frame_tokens": self.workload.geometry.frame_tokens,
                         "kv_tokens_per_set": self.workload.kv_tokens,
                         "cond_tokens": self.workload.geometry.cond_tokens},
            "hardware": asdict(self.hardware),
            "reason": self.reason,
            "nearest": self.nearest,
        }


class MemoryPlanError(LiveAvatarError):
    """No placement fits the GPU and the host; the message has the numbers and the nearest setting that fits."""


def format_gib(n: int | None) -> str:
    """Bytes as the plan reports them; None is a budget without a limit."""
    return "unlimited" if n is None else f"{n / GiB:.2f} GiB"


def default_headroom(budget_bytes: int) -> int:
    return max(DEFAULT_HEADROOM_BYTES, int(DEFAULT_HEADROOM_FRACTION * budget_bytes))


def default_host_budget() -> int | None:
    """Host memory a run in this process may use: what this machine (or the process's cgroup) has available
    now plus what the process already holds, since the planner predicts the process's whole footprint; None
    (unlimited) when that is unknown."""
    from liveavatar.runtime.progress import host_rss_bytes

    available = available_host_memory()
    return None if available is None else available + host_rss_bytes()


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
        limits.append((hardware.memory_bytes - CUDA_CONTEXT_BYTES,
                       f"{hardware.name}: {hardware.memory_bytes / GiB:.2f} GiB minus "
                       f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA context"))
    if not limits:
        raise InputError("no CUDA GPU detected: give the card's memory with --gpu-memory 24GiB (or --vram-budget, "
                         "or --hardware rtx4090)")
    return min(limits)


def make_plan(inv: DiTInventory, work: Workload, hw: Hardware, budget_bytes: int | None, *,
              budget_source: str = "", headroom_bytes: int | None = None, host_budget_bytes: int | None = None,
              pins: Pins = Pins(), suggest: bool = True) -> Plan:
    """The fastest placement that fits `budget_bytes` of GPU memory and `host_budget_bytes` of host memory
    (None: unlimited), or a refusal with the numbers and the nearest setting that fits."""
    headroom = default_headroom(budget_bytes or 0) if headroom_bytes is None else headroom_bytes
    budgets = _Budgets(budget_bytes, headroom, host_budget_bytes,
                       0 if host_budget_bytes is None else default_headroom(host_budget_bytes))
    fastest_weights = "fp8" if hw.has_fp8_matmul else "bf16"
    baseline_placement = Placement(weight_dtype=pins.weight_dtype or fastest_weights)
    baseline = estimate_speed(inv, work, baseline_placement, hw)

    candidates, host_bound = [], []
    for weight_dtype in _choices(pins.weight_dtype, ("bf16", "fp8")):
        for kv_dtype in _choices(pins.kv_dtype, ("bf16", "fp8")):
            for kv_location in _choices(pins.kv_location, ("gpu", "host")):
                for cond_location in _choices(pins.cond_location, ("gpu", "host")):
                    counts = range(inv.num_layers + 1) if pins.streamed_layers is None else [pins.streamed_layers]
                    for count in counts:
                        # The compile pool is elastic: placements are compared without it (see
                        # `_with_compile_workers`).
                        placement = Placement(weight_dtype=weight_dtype, kv_dtype=kv_dtype, kv_location=kv_location,
                                              cond_location=cond_location,
                                              streamed_layers=streamed_layer_choice(inv, weight_dtype, count),
                                              compile_workers=0)
                        check = _evaluate(inv, work, hw, placement, budgets)
                        if check.fits_gpu and check.fits_host:
                            candidates.append((estimate_speed(inv, work, placement, hw), placement))
                        elif check.fits_gpu:
                            host_bound.append((check.host_peak, placement))
                        if check.fits_gpu:
                            break  # more streaming is never faster, and only takes more host memory
    if candidates:
        # An FP8 KV cache changes the numerics beyond the reference's own FP8 scheme, so unless pinned it
        # is a memory measure only: used when no bf16 KV placement fits, never just for speed.
        lossless = [(speed, p) for speed, p in candidates if p.kv_dtype == "bf16"]
        notes = [] if lossless or pins.kv_dtype else [
            "KV sets in FP8 (e4m3, one scale per token): no placement with bf16 KV sets fits "
            + _budget_words(budget_source, host_budget_bytes)]
        candidates = lossless or candidates
        best_s = min(speed.block_s for speed, _ in candidates)
        near_best = [(speed, p) for speed, p in candidates if speed.block_s <= best_s * 1.01]
        speed, placement = min(near_best, key=lambda sp: (
            sp[1].kv_location == "host", sp[1].cond_location == "host",
            len(sp[1].streamed_layers), sp[0].block_s))
        placement = _with_text_encoder(inv, work, hw, placement, budgets, pins)
        placement = _with_compile_workers(inv, work, hw, placement, budgets)
        check = _evaluate(inv, work, hw, placement, budgets)
        reason = "" if check.fits_setup else "the set-up (text encoder) does not fit even on the CPU"
        return Plan(work, hw, placement, check.fits and check.fits_setup, budget_bytes, budget_source, headroom,
                    check.components, check.phases, host_budget_bytes, speed, baseline, reason,
                    host_headroom_bytes=budgets.host_headroom, notes=notes)

    # Nothing fits: report the leanest placement's numbers (or, when placements fit the GPU but not the
    # host, the one of them that needs the least host memory).
    leanest = Placement(weight_dtype=pins.weight_dtype or "fp8", kv_dtype=pins.kv_dtype or "fp8",
                        kv_location=pins.kv_location or "host", cond_location=pins.cond_location or "host",
                        streamed_layers=streamed_layer_choice(
                            inv, pins.weight_dtype or "fp8",
                            inv.num_layers if pins.streamed_layers is None else pins.streamed_layers),
                        text_encoder=pins.text_encoder or "cpu", compile_workers=0)
    if host_bound:
        leanest = replace(min(host_bound, key=lambda hp: hp[0])[1], text_encoder=pins.text_encoder or "cpu")
    check = _evaluate(inv, work, hw, leanest, budgets)
    plan = Plan(work, hw, leanest, False, budget_bytes, budget_source, headroom, check.components, check.phases,
                host_budget_bytes, estimate_speed(inv, work, leanest, hw), baseline,
                host_headroom_bytes=budgets.host_headroom)
    if host_bound:
        plan.reason = (f"the placements that fit the GPU need at least {format_gib(check.host_peak)} of host "
                       f"memory at their peak ({format_gib(plan.host_pinned_bytes)} pinned; "
                       f"{leanest.describe()}) plus {format_gib(budgets.host_headroom)} headroom")
    else:
        needed = _run_reserved_bytes(check.phases) + headroom
        plan.reason = f"even the leanest placement ({leanest.describe()}) needs {format_gib(int(needed))} " \
                      f"incl. {format_gib(headroom)} headroom"
        if not check.fits_host:
            plan.reason += (f" and {format_gib(check.host_peak)} of host memory ({format_gib(plan.host_pinned_bytes)} "
                            f"pinned) plus {format_gib(budgets.host_headroom)} headroom")
    if suggest:
        plan.nearest = nearest_fitting(inv, work, hw, budget_bytes, headroom=headroom,
                                       host_budget_bytes=host_budget_bytes, pins=pins)
    return plan


def _budget_words(budget_source: str, host_budget_bytes: int | None) -> str:
    host = "" if host_budget_bytes is None else f" and {format_gib(host_budget_bytes)} of host memory"
    return (budget_source or "the GPU budget") + host


def plan_cpu_run(inv: DiTInventory, work: Workload, pins: Pins) -> Plan:
    """A CPU run: no GPU budget, so the placement is what `pins` fix and the planner's defaults elsewhere."""
    return make_plan(inv, work, CPU_HARDWARE, None, budget_source="CPU run (no GPU budget)", pins=pins)


def nearest_fitting(inv: DiTInventory, work: Workload, hw: Hardware, budget_bytes: int, *, headroom: int,
                    host_budget_bytes: int | None, pins: Pins) -> list[str]:
    """Closest settings that fit, as the refusal names them (see `nearest_fitting_plans`)."""
    return [text for text, _ in nearest_fitting_plans(inv, work, hw, budget_bytes, headroom=headroom,
                                                      host_budget_bytes=host_budget_bytes, pins=pins)]


def nearest_fitting_plans(inv: DiTInventory, work: Workload, hw: Hardware, budget_bytes: int, *, headroom: int,
                          host_budget_bytes: int | None, pins: Pins) -> list[tuple[str, Plan]]:
    """Closest settings that fit, each with its plan: the planner's own choice instead of the pinned
    placements, fewer frames per clip, or the next smaller standard --size (same aspect ratio)."""

    def fits(candidate_work: Workload, candidate_pins: Pins) -> Plan | None:
        plan = make_plan(inv, candidate_work, hw, budget_bytes, headroom_bytes=headroom,
                         host_budget_bytes=host_budget_bytes, pins=candidate_pins, suggest=False)
        return plan if plan.fits else None

    def peaks(plan: Plan) -> str:
        host = "" if host_budget_bytes is None else f", {format_gib(plan.predicted_host_peak_bytes)} host"
        return f"{format_gib(plan.predicted_peak_bytes)}{host}, {plan.placement.describe()}"

    suggestions = []
    if pins.pinned():
        plan = fits(work, Pins())
        if plan:
            flags = ", ".join(f"{k}={v}" for k, v in pins.pinned().items())
            suggestions.append((f"drop the pinned {flags} (the planner's choice fits: {peaks(plan)})", plan))
    for frames in range(work.infer_frames - FRAMES_PER_BLOCK, 0, -FRAMES_PER_BLOCK):
        plan = fits(replace(work, infer_frames=frames), pins)
        if plan:
            suggestions.append((f"--infer_frames {frames} ({peaks(plan)})", plan))
            break
    area = work.height * work.width
    for size_w, size_h in STANDARD_SIZES:
        if size_w * size_h >= area:
            continue
        height, width = size_for_area(work.height, work.width, size_w * size_h)
        plan = fits(replace(work, height=height, width=width), pins)
        if plan:
            suggestions.append((f"--size {size_w}*{size_h} -> {width}x{height} ({peaks(plan)})", plan))
            break
    return suggestions


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


def _choices(pinned, options):
    return (pinned,) if pinned is not None else options


@dataclass(frozen=True)
class _Budgets:
    gpu: int | None
    gpu_headroom: int
    host: int | None
    host_headroom: int


@dataclass(frozen=True)
class _Check:
    components: list[Component]
    phases: dict[str, int]
    host_peak: int
    fits_gpu: bool  # every phase but the set-up (whose text encoder can move to the CPU)
    fits_host: bool
    fits_setup: bool

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host


def _evaluate(inv, work, hw, placement, budgets: _Budgets) -> _Check:
    components = memory_components(inv, work, placement, hw) + host_components(inv, work, placement, hw)
    phases = phase_peaks(components)
    host_peak = max(phase_peaks(components, "host").values())
    reserved = max(phases.values()) * (1 + ALLOCATOR_FRAGMENTATION)
    fits_gpu = budgets.gpu is None or _run_reserved_bytes(phases) + budgets.gpu_headroom <= budgets.gpu
    fits_setup = budgets.gpu is None or reserved + budgets.gpu_headroom <= budgets.gpu
    fits_host = budgets.host is None or host_peak + budgets.host_headroom <= budgets.host
    return _Check(components, phases, host_peak, fits_gpu, fits_host, fits_setup)


def _run_reserved_bytes(phases: dict[str, int]) -> float:
    """Reserved GPU bytes at the peak of every phase but the set-up (whose text encoder can move to the CPU)."""
    return max(n for phase, n in phases.items() if phase != "setup") * (1 + ALLOCATOR_FRAGMENTATION)


def _with_compile_workers(inv, work, hw, placement: Placement, budgets: _Budgets) -> Placement:
    """``placement`` with as many of Inductor's compile workers as the host budget holds next to it: the
    default pool (None) when it fits or no budget is known, else fewer, else none (compiled in-process)."""
    if budgets.host is None or hw == CPU_HARDWARE:
        return replace(placement, compile_workers=None)
    free = budgets.host - budgets.host_headroom - _evaluate(inv, work, hw, placement, budgets).host_peak
    default = default_compile_workers()
    if compile_worker_bytes(default) <= free:
        return replace(placement, compile_workers=None)
    fitting = max(0, free // COMPILE_WORKER_BYTES - 1)  # the pool's parent process counts too
    return replace(placement, compile_workers=int(fitting) if fitting >= 2 else 0)


def _with_text_encoder(inv, work, hw, placement, budgets: _Budgets, pins) -> Placement:
    if pins.text_encoder is not None:
        return replace(placement, text_encoder=pins.text_encoder)
    on_gpu = replace(placement, text_encoder="gpu_then_free")
    check = _evaluate(inv, work, hw, on_gpu, budgets)
    if check.fits_setup and check.fits_host:
        return on_gpu
    return replace(placement, text_encoder="cpu")
