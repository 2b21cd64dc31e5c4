"""The host-memory model: what a run holds in RAM besides the pinned buffers `memory` already counts.

Host memory is budgeted like GPU memory, phase by phase (``memory.PHASES``):

* the process itself (Python, PyTorch, the CUDA runtime and its libraries), in every phase;
* load: the pinned buffers of the streamed layers fill as the units are placed, while the host holds one
  checkpoint tensor being read (`liveavatar.runtime.loading`) and then the encoders being read (wav2vec2
  in float32 before its cast, the VAE);
* set-up, only on a prompt-cache miss: the text encoder. On the CPU its bf16 weights stay memory-mapped
  from the ``.pth`` and are paged in as it runs: file pages the kernel can reclaim, so they are shown but not
  budgeted (a run in float32 copies them: budgeted). On the GPU it is moved there one tensor at a time;
* set-up onwards: the waveform and its whole-file audio features (for ``Workload.audio_seconds``);
* the caches on the host (pinned, in ``memory``), from the sink prefill on, and during the set-up too when
  the text encoder runs on the CPU (the engine then keeps an earlier request's caches);
* decode: the decoded frames of a block and the mp4 encoder's buffers;
* on a GPU, from the first forward on: Inductor's compile worker processes (the fast path compiles the
  first block of a clip size; the pool stays up for the next size). ``Placement.compile_workers`` sets
  their count; the planner lowers it where the default pool does not fit next to the run.

Constants marked CALIBRATED are fitted to ``benchmarks/desktop_fit.py``; ESTIMATE ones are not measured.
"""
from __future__ import annotations

from liveavatar.geometry import AUDIO_SAMPLE_RATE, FPS
from liveavatar.runtime.placement import Placement, default_compile_workers
from liveavatar.runtime.planner.hardware import CPU_HARDWARE, GiB, MiB, Hardware
from liveavatar.runtime.planner.memory import (AFTER_LOAD, AUDIO_ENCODER_PARAMS, PHASES, STEADY, TEXT_ENCODER_PARAMS,
                                               VAE_PARAMS, Component, DiTInventory, Workload)

# CALIBRATED: resident memory of the process besides what the plan lists (Python, PyTorch, the CUDA runtime,
# cuBLAS handles, the compiled FP8 quantiser). RESULTS.md's capped H100 runs: 44.8 GiB RSS over 43.0 GiB of
# pinned chunks (22 GiB cap), 51.7 over 50.0 (16 GiB cap).
PROCESS_BYTES_CUDA = int(1.8 * GiB)
PROCESS_BYTES_CPU = 640 * MiB  # ESTIMATE: Python + PyTorch without CUDA
# The release's umT5-XXL token embedding (256,384 x 4,096): the largest tensor the text encoder moves.
TEXT_ENCODER_LARGEST_ELEMENTS = 256_384 * 4_096
# ESTIMATE: PyAV/x264 frame queue and lookahead of the mp4 writer at 704x384.
MP4_ENCODER_BYTES = 64 * MiB
CHECKPOINT_DTYPE_BYTES = 2  # the release's DiT and text encoder are stored in bf16
# CALIBRATED: RSS of one Inductor compile worker process (Python with torch and Triton) while the DiT's
# regions compile. benchmarks/desktop_fit.py --compile, 22 GiB row on a 16-CPU H200 host (RESULTS.md): with
# the default pool (16 workers and their parent) the process tree passed its 32 GiB limit and was killed;
# with the 11 workers the planner then gave it, the tree peaked 5.55 GiB above the process's own 24.87 GiB,
# 0.46 GiB for each of the 12 processes.
COMPILE_WORKER_BYTES = int(0.46 * GiB)
COMPILE_WORKERS_NAME = "Inductor compile workers"


def compile_worker_bytes(workers: int) -> int:
    """Host bytes of a pool of ``workers`` compile processes (Inductor runs them under one parent process)."""
    return (workers + 1) * COMPILE_WORKER_BYTES if workers else 0


def host_components(inv: DiTInventory, work: Workload, placement: Placement, hw: Hardware) -> list[Component]:
    """The host-memory pieces of a run that are not pinned buffers (those come from `memory_components`)."""
    b = work.run_dtype_bytes
    run_dtype = {2: "bf16", 4: "fp32"}.get(b, f"{8 * b}-bit")
    components = [Component("process (Python, PyTorch, CUDA runtime)", "host", "-",
                            PROCESS_BYTES_CPU if hw == CPU_HARDWARE else PROCESS_BYTES_CUDA, PHASES)]
    if work.holds_dit and hw != CPU_HARDWARE:
        workers = default_compile_workers() if placement.compile_workers is None else placement.compile_workers
        components.append(Component(f"{COMPILE_WORKERS_NAME} ({workers}; the fast path's first block)", "host", "-",
                                    compile_worker_bytes(workers), STEADY))
    if work.holds_dit:
        components.append(Component("checkpoint read buffer (largest DiT tensor)", "host", "bf16",
                                    inv.largest_tensor_elements * CHECKPOINT_DTYPE_BYTES, ("load",), sequential=True))
    if not work.is_output:  # a pipeline rank that only denoises: no encoders, audio, decode or mp4
        return components
    components.append(Component("wav2vec2 + VAE read (float32 file and model, then cast)", "host", "fp32",
                                2 * 4 * max(AUDIO_ENCODER_PARAMS, VAE_PARAMS), ("load",), sequential=True))
    if placement.text_encoder == "cpu":
        mapped = b == CHECKPOINT_DTYPE_BYTES  # the run dtype is the file's: the weights stay memory-mapped
        name = ("text encoder on the CPU (cache miss; mapped file pages)" if mapped else
                f"text encoder on the CPU (cache miss; {run_dtype} copy)")
        components.append(Component(name, "host", run_dtype, TEXT_ENCODER_PARAMS * b, ("setup",),
                                    reclaimable=mapped, sequential=True))
    else:
        components.append(Component("text encoder move to the GPU (one tensor at a time)", "host", "bf16",
                                    TEXT_ENCODER_LARGEST_ELEMENTS * CHECKPOINT_DTYPE_BYTES, ("setup",),
                                    sequential=True))
    per_second = 4 * AUDIO_SAMPLE_RATE + FPS * inv.audio_feature_width * b
    components.append(Component(f"audio: waveform + whole-file features ({work.audio_seconds:g} s)", "host",
                                run_dtype, int(work.audio_seconds * per_second), AFTER_LOAD))
    frames = work.video_frames_per_block * 3 * work.height * work.width * (b + 1)
    components.append(Component("decoded frames of a block + mp4 encoder", "host", "uint8",
                                frames + MP4_ENCODER_BYTES, STEADY[-1:]))
    return components
