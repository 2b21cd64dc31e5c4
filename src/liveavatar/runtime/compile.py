"""The fast path's policy: whether the DiT's tensor work runs compiled, whether steady forwards replay CUDA
graphs, where the compiler keeps its artefacts, and the counters ``bench`` reports.

Compiled: every function of `liveavatar.models.regions` goes through ``torch.compile`` (Inductor) with
static shapes. One compiled version of a region serves all 40 blocks (modules are arguments, so nothing
specialises on a block); a region sees one shape per clip size for the blocks and one for the sink
prefill, so after the first block of the first request nothing compiles again: not in the KV window's
fill phase, at the ring wrap, at the sink refresh or for the next request of the same size (the window
length only reaches the attention glue, which stays outside the regions). Elementwise work (norms,
modulation, gates, RoPE, residual casts, the FP8 activation quantiser) is fused by Inductor around the
GEMMs, which stay cuBLAS calls. ``emulate_precision_casts`` keeps every explicit rounding of the
reference's numerics (the bf16 casts inside fused kernels); Inductor's ``deterministic`` mode chooses every
kernel's tiling by rule, not by timing, so no kernel depends on how busy the GPU was when it was first run
(at no measurable cost: H100, FP8, 704*384, the DiT 0.728 s per block with it, 0.730 without).

Default: on for CUDA GPUs where Triton works, off on the CPU. ``LIVEAVATAR_COMPILE=0`` (or the API's
``compile=False``, the CLI's ``--no-compile``) turns it off; ``=1`` forces it (also on the CPU, where
Inductor generates C++). If the compiler fails on a machine, every region falls back to eager with one
notice. Artefacts are cached under ``LIVEAVATAR_COMPILE_CACHE`` (default ``~/.cache/liveavatar/compile``),
so a new process loads instead of compiling. ``LIVEAVATAR_CUDA_GRAPHS=0`` keeps the compiled path but
replays no graphs (for measuring).

The streaming VAE decoder is compiled the same way (`compile_decoder`): a settled stream's step per latent
frame, its causal cache in fixed buffers (`liveavatar.runtime.decoding.SteadyDecoder`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch loads with the functions that need it: the CLI reads the names above without it
    import torch

COMPILE_ENV = "LIVEAVATAR_COMPILE"
GRAPHS_ENV = "LIVEAVATAR_CUDA_GRAPHS"
CACHE_ENV = "LIVEAVATAR_COMPILE_CACHE"
DETERMINISTIC_ENV = "TORCHINDUCTOR_DETERMINISTIC"  # exported by the user (0 or 1): theirs wins
_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get(CACHE_ENV) or os.path.join(base, "liveavatar", "compile"))


def _env_switch(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    if value:
        warnings.warn(f"{name}={os.environ[name]!r} is not 0/1 (or off/on); ignored")
    return None


@dataclass(frozen=True)
class FastPath:
    """How the DiT's forwards run: ``compile`` the regions, replay ``cuda_graphs`` where the placement
    allows it; ``reason`` says why the compiler is off when it is."""

    compile: bool
    cuda_graphs: bool
    reason: str = ""

    @property
    def name(self) -> str:
        return "compiled + CUDA graphs" if self.cuda_graphs else "compiled" if self.compile else "eager"


def compiler_problem(device: "torch.device") -> str | None:
    """Why Inductor cannot run on ``device`` here (None when it can)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not available for this GPU"
        return None
    if device.type != "cpu":
        return f"no compiler path for {device.type}"
    return None


def resolve_fast_path(device: "torch.device | str", *, compile: bool | None = None,
                      cuda_graphs: bool | None = None) -> FastPath:
    """The fast path a run on ``device`` gets. ``compile``/``cuda_graphs`` None: the environment
    (`COMPILE_ENV`, `GRAPHS_ENV`), else on for CUDA GPUs with a working compiler and off on the CPU.
    Where the compiler cannot run, eager with one notice."""
    import torch

    device = torch.device(device)
    wanted = compile if compile is not None else _env_switch(COMPILE_ENV)
    if wanted is False:
        return FastPath(False, False, "turned off")
    if wanted is None and device.type != "cuda":
        return FastPath(False, False, "eager on the CPU by default")
    problem = compiler_problem(device)
    if problem is not None:
        warnings.warn(f"the DiT runs eagerly: {problem} (torch.compile needs it)", stacklevel=2)
        return FastPath(False, False, problem)
    graphs = cuda_graphs if cuda_graphs is not None else _env_switch(GRAPHS_ENV)
    return FastPath(True, device.type == "cuda" and graphs is not False)


def configure_compiler(cache_dir: str | os.PathLike | None = None, *, workers: int | None = None) -> Path:
    """Inductor's settings for the fast path; returns the artefact cache folder. Call before compiling.
    ``workers``: Inductor's compile worker processes (`Placement.compile_workers`; None: its default, 0: none,
    the kernels compile in this process)."""
    import torch._inductor.config as inductor
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # A folder the user exported for Inductor wins (importing Inductor fills in its /tmp default, which
    # does not survive a reboot); Triton's cache sits inside Inductor's.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(inductor_default())) or cache_dir:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        except OSError as error:
            warnings.warn(f"compile cache {folder}: {error}; using {inductor_default()} (set {CACHE_ENV})")
    import torch._dynamo.config as dynamo

    inductor.fx_graph_cache = True
    if workers is not None:
        inductor.compile_threads = max(1, workers)  # 1 thread: Inductor starts no worker pool
    if hasattr(inductor, "emulate_precision_casts"):
        inductor.emulate_precision_casts = True  # keep the reference's explicit bf16 roundings
    if hasattr(inductor, "deterministic") and DETERMINISTIC_ENV not in os.environ:
        # Without it Inductor picks some reduction kernels' block sizes by timing them on the GPU the first
        # time they run, and the block size sets the summation order: two processes (two runs with a cold
        # cache, ranks timing on a GPU another rank is using) could round differently from the same inputs.
        # (It did not close the 11-level difference of a 2-rank H100 pipeline from one GPU, issue 20.)
        inductor.deterministic = True
    # A region has two shapes per clip size and weight type (block, sink): several sizes in one process
    # must not reach dynamo's default limit of 8, past which it silently runs the region eagerly.
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor_default())


class _Fallback:
    """Shared by a model's compiled regions: once one fails to compile, all run eagerly (one notice)."""

    def __init__(self, model: str = "the DiT"):
        self.model = model
        self.error: str | None = None

    def wrap(self, name: str, eager: Callable, compiled: Callable) -> Callable:
        import torch

        def region(*args):
            if self.error is None:
                try:
                    return compiled(*args)
                except torch.OutOfMemoryError:
                    raise
                except Exception as error:  # a compiler that does not work here: regions are pure, rerun eagerly
                    self.error = f"{name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    warnings.warn(f"torch.compile failed ({self.error}); {self.model} runs eagerly", stacklevel=2)
            return eager(*args)

        region.__name__ = name
        return region


_compiled: dict[str, tuple] = {}  # per backend: (regions, fallback), shared by every model of the process


def compile_regions(model: "torch.nn.Module", *, backend: str = "inductor") -> _Fallback:
    """Run ``model``'s regions through ``torch.compile`` (static shapes, whole regions as one graph); the
    returned object's ``error`` says whether they fell back to eager. Every model (every engine) of a
    process shares one set of compiled regions, so nothing compiles twice."""
    if backend not in _compiled:
        import torch

        from liveavatar.models.regions import EAGER

        fallback = _Fallback()
        regions = EAGER.map(lambda name, function: fallback.wrap(
            name, function, torch.compile(function, backend=backend, dynamic=False, fullgraph=True)))
        _compiled[backend] = (regions, fallback)
    model.regions, fallback = _compiled[backend]
    return fallback


def compile_decoder(vae, *, cuda_graphs: bool, channels_last: bool = False, backend: str = "inductor") -> _Fallback:
    """Give ``vae`` the fast path's steady decoder: the step compiled (static shapes, one graph), replayed as a
    CUDA graph when ``cuda_graphs``; falls back to the eager step with one notice. ``channels_last``: the
    decoder's Conv3d weights and the causal buffers in ``channels_last_3d``."""
    import torch

    from liveavatar.models.vae import decode_latent_frame
    from liveavatar.runtime.decoding import SteadyDecoder

    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    for module in vae.decoder.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)
    fallback = _Fallback("the VAE decoder")
    step = fallback.wrap("vae_decode_step", decode_latent_frame,
                         torch.compile(decode_latent_frame, backend=backend, dynamic=False, fullgraph=True))
    vae.steady_decoder = SteadyDecoder(vae, step, cuda_graphs=cuda_graphs, memory_format=memory_format)
    return fallback


def compile_counters() -> dict:
    """Dynamo's running totals: graphs compiled (every compile and recompile), graph breaks, seconds spent
    compiling, and what made the last compiles happen (function: reason)."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    metrics = get_compilation_metrics()
    return {"compiles": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "compile_s": round(sum(m.entire_frame_compile_time_s or 0.0 for m in metrics), 2),
            "last_reasons": [f"{m.co_name}: {m.recompile_reason or 'first compile'}" for m in metrics[-8:]]}
