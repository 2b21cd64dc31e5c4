"""Python API: load the models once, then stream frames or write mp4 files for any number of requests.

    pipe = LiveAvatarPipeline.from_pretrained("ckpt/Wan2.2-S2V-14B")
    for frame in pipe.stream("portrait.jpg", "speech.wav", "a woman talking"):
        show(frame.image, at=frame.timestamp)          # uint8 [H, W, 3], seconds
    pipe.generate("portrait.jpg", "speech.wav", "a woman talking", output="out.mp4")

Frames come out as they are decoded (a block of 12 frames at a time in the default streaming mode) and
nothing is kept after it is handed over, so memory does not grow with the length of the audio.
Models: the DiT, the VAE and wav2vec2 stay loaded on the device; the 11 GB text encoder is only loaded when
a prompt is not in the on-disk prompt cache, and freed right after encoding it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from liveavatar.checkpoints.layout import LORA_REPO, CheckpointLayout
from liveavatar.devices import configure_cuda_allocator, resolve_device, resolve_dtype
from liveavatar.errors import InputError
from liveavatar.geometry import FPS
from liveavatar.io.video_writer import BackgroundWriter, Mp4Writer
from liveavatar.options import DEFAULTS, RequestOptions
from liveavatar.request import Request, WaveformAudio, resolve_request
from liveavatar.runtime.live_audio import LiveAudio
from liveavatar.runtime.engine import Engine
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.progress import Progress
from liveavatar.runtime.sampler import BlockLatents, VideoFrames

ImageInput = Union[str, os.PathLike, Image.Image]
AudioInput = Union[str, os.PathLike, np.ndarray, LiveAudio]


@dataclass(frozen=True)
class Frame:
    """One output frame: RGB ``image`` uint8 [H, W, 3], its ``index`` in the video, ``timestamp`` in seconds."""

    image: np.ndarray
    index: int
    timestamp: float


class LiveAvatarPipeline:
    """All models of Live Avatar, loaded once (an `Engine`); `stream` and `generate` serve any number of
    requests."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def vae(self):
        return self.engine.vae

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike, *, lora: str | os.PathLike | None = LORA_REPO,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        lora_alpha: float | None = None, fp8: bool = False, t5_cpu: bool = False,
                        prompt_cache_dir: str | os.PathLike | None = None,
                        placement: Placement | Sequence[Placement] | None = None,
                        devices: Sequence[str | torch.device] | None = None,
                        sample_steps: int = DEFAULTS.sample_steps, compile: bool | None = None) -> "LiveAvatarPipeline":
        """Load the release (or ``liveavatar make-tiny`` checkpoints) from ``ckpt_dir`` (the Wan2.2-S2V-14B
        folder). ``lora``: the Live-Avatar LoRA as a file, a folder or a Hub id in the local cache; None runs
        the base weights. ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA and
        float32 on CPU. ``fp8`` converts the DiT's linears to FP8 after the LoRA merge (as ``--fp8``).
        ``placement`` (from the memory planner) decides weight dtype, streamed layers, cache locations and
        where the text encoder runs; it overrides ``fp8`` and ``t5_cpu``. Default: everything resident.
        ``compile``: the DiT's compiled fast path (None: on for CUDA GPUs unless ``LIVEAVATAR_COMPILE=0``;
        the first request compiles, artefacts are cached on disk, see `liveavatar.runtime.compile`).

        ``devices`` (two or more, e.g. ``["cuda:0", "cuda:1", "cuda:2", "cuda:3"]``) runs the timestep
        pipeline over one process per device, spawned here; this process is the last rank (decode and
        output) and ``device`` is ignored. ``placement`` may then be one per device; ``sample_steps`` is the
        step count the ranks are laid out for (any count runs). `close()` stops the ranks."""
        layout = CheckpointLayout.discover(ckpt_dir, None if lora is None else os.fspath(lora))
        layout.validate()
        return cls.from_layout(layout, device=device, dtype=dtype, lora_alpha=lora_alpha, fp8=fp8, t5_cpu=t5_cpu,
                               prompt_cache_dir=prompt_cache_dir, placement=placement, devices=devices,
                               sample_steps=sample_steps, compile=compile)

    @classmethod
    def from_layout(cls, layout: CheckpointLayout, *, device=None, dtype=None, lora_alpha: float | None = None,
                    fp8: bool = False, t5_cpu: bool = False, prompt_cache_dir=None,
                    placement: Placement | Sequence[Placement] | None = None,
                    devices: Sequence[str | torch.device] | None = None, sample_steps: int = DEFAULTS.sample_steps,
                    step_ranks=None, compile: bool | None = None) -> "LiveAvatarPipeline":
        """As `from_pretrained`, for a checkpoint layout already discovered and validated. ``pipeline``:
        the output rank's `StepRanks` of ranks started elsewhere (torchrun) instead of ``devices``."""
        if devices is not None and len(devices) == 1:
            device, devices = devices[0], None
        ranks = [resolve_device(d) for d in devices] if devices is not None else None
        device = ranks[-1] if ranks else step_ranks.device if step_ranks is not None else resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if device.type == "cuda":
            configure_cuda_allocator()
        count = len(ranks) if ranks else step_ranks.layout.world_size if step_ranks is not None else 1
        if placement is None:
            placement = Placement(weight_dtype="fp8" if fp8 else "bf16",
                                  text_encoder="cpu" if t5_cpu else "gpu_then_free")
        placements = [placement] * count if isinstance(placement, Placement) else list(placement)
        if len(placements) != count:
            raise ValueError(f"placement: {len(placements)} given for {count} ranks")
        if ranks:
            from liveavatar.runtime.multi_gpu import StageSpec, spawn_step_ranks

            threads = torch.get_num_threads() if device.type == "cpu" else None
            step_ranks = spawn_step_ranks(
                [StageSpec(str(layout.dit_dir), rank_placement, str(rank_device), str(dtype).removeprefix("torch."),
                           lora=None if layout.lora is None else str(layout.lora), lora_alpha=lora_alpha,
                           threads=threads, compile=compile)
                 for rank_device, rank_placement in zip(ranks[:-1], placements)],
                device, sample_steps=sample_steps)
        try:
            engine = Engine.from_pretrained(layout, placements[-1], device=device, dtype=dtype, lora_alpha=lora_alpha,
                                            prompt_cache_dir=prompt_cache_dir, step_ranks=step_ranks, compile=compile)
        except BaseException as error:
            if step_ranks is not None:
                step_ranks.close(error)
            raise
        return cls(engine)

    def close(self, failure: BaseException | None = None) -> None:
        """Stop the other ranks of a multi-GPU pipeline (nothing to do on one device); after ``failure`` at
        once, without letting the blocks in flight finish."""
        if self.engine.step_ranks is not None:
            self.engine.step_ranks.close(failure)

    def __enter__(self) -> "LiveAvatarPipeline":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)

    # ----------------------------------------------------------------------------------------------
    # requests

    def stream(self, image: ImageInput | Request, audio: AudioInput | None = None, prompt: str | None = "",
               options: RequestOptions | None = None, **overrides) -> Iterator[Frame]:
        """Yield the video's frames as they are made (48·clips − 3 frames at 25 fps, cut where the audio
        ends). The request is checked, the inputs are read and encoded at once (a prompt cut at the text
        encoder's length is reported as a warning); the DiT runs as the frames are consumed.

        ``image``: a path or a PIL image (or a `Request` already resolved, then nothing else is given).
        ``audio``: a path, a 16 kHz mono waveform (float, or integer PCM, scaled), or a `LiveAudio` fed as
        the audio arrives. ``options``: a `RequestOptions` (default: the defaults), with ``overrides`` by
        option name (``size="704*384"``, ``num_clip=2``, ``mode="single_gpu"``, ...; see `RequestOptions`).
        """
        request = _request(image, audio, prompt, options, overrides)
        conditioning = self.engine.condition(request)
        for notice in conditioning.notices:
            warnings.warn(notice, stacklevel=2)
        return self._frames(self.engine.run(request, conditioning), request.num_frames)

    @staticmethod
    def _frames(events: Iterator, limit: int | None) -> Iterator[Frame]:
        try:
            for event in events:
                if isinstance(event, VideoFrames):
                    for offset, pixels in enumerate(_up_to(event, limit)):
                        index = event.start + offset
                        yield Frame(pixels, index, index / FPS)
        finally:
            events.close()

    def generate(self, image: ImageInput | Request, audio: str | os.PathLike | None = None, prompt: str | None = "",
                 options: RequestOptions | None = None, *, output: str | os.PathLike, keep_partial: bool = False,
                 overwrite: bool = False, progress: bool | Progress = False, **overrides) -> Path:
        """Write the video with the audio muxed in (H.264 + AAC, 25 fps) to ``output`` and return its path.

        Frames are encoded as they are made. On an error or Ctrl-C nothing is left under ``output``
        (with ``keep_partial`` the frames so far are kept as ``<name>.partial.mp4``); an existing ``output``
        is refused unless ``overwrite``. ``progress`` prints the phases and a status line (a terminal) or log
        lines (otherwise) on stderr, or reports to the `Progress` given. Other arguments as in `stream`.
        """
        if isinstance(audio, (np.ndarray, LiveAudio)):
            raise InputError("audio: generate() muxes the audio file into the mp4; pass its path "
                             "(stream() takes waveforms and live audio)")
        request = _request(image, audio, prompt, options, overrides)
        if not isinstance(request.audio, WaveformAudio) or request.audio.path is None:
            raise InputError("audio: generate() muxes the audio file into the mp4; the request needs an audio file")
        geometry = request.geometry
        status = progress if isinstance(progress, Progress) else Progress(
            total_blocks=request.total_blocks, blocks_per_clip=geometry.blocks_per_clip,
            total_frames=request.num_frames, fps=FPS, device=self.device, enabled=progress)
        # Encoding runs on its own thread, overlapped with the denoising of the next blocks.
        with BackgroundWriter(Mp4Writer(output, width=geometry.width, height=geometry.height, fps=FPS,
                                        audio_path=request.audio.path, keep_partial=keep_partial,
                                        overwrite=overwrite)) as writer:
            status.phase("encoding the prompt, the portrait and the audio")
            conditioning = self.engine.condition(request)
            for notice in conditioning.notices:
                status.note(f"notice: {notice}")
            events = self.engine.run(request, conditioning)
            status.start()
            compiling = self.engine.fast_path.compile and self.engine.requests_run == 0
            if compiling:
                status.note(f"compiling the DiT for the first block (cached in {self.engine.compile_cache} for "
                            f"the next runs; --no-compile skips it)")
            try:
                for event in events:
                    if isinstance(event, BlockLatents):
                        if compiling:
                            status.note(f"first block done after {status.elapsed():.1f} s (compiled)")
                            compiling = False
                        status.block_done(event.clip, event.block)
                    else:
                        frames = _up_to(event, request.num_frames)
                        writer.write(frames)
                        status.frames_done(len(frames))
            finally:
                events.close()
                status.close()
        return writer.path


def _request(image, audio, prompt, options: RequestOptions | None, overrides: dict) -> Request:
    """The request a call describes: a `Request` given as ``image``, else resolved from the inputs and the
    options (every option checked before any input is read)."""
    if isinstance(image, Request):
        return image
    return resolve_request(image, audio, prompt, RequestOptions.build(options, **overrides))


def _up_to(event: VideoFrames, limit: int | None) -> np.ndarray:
    """The event's frames as uint8 [T, H, W, 3], those before frame ``limit`` of the video (all when None)."""
    pixels = event.uint8()
    return pixels if limit is None else pixels[:max(0, limit - event.start)]

