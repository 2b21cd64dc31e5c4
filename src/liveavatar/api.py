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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np

import torch
from PIL import Image

from liveavatar.checkpoints.layout import LORA_REPO, CheckpointLayout
from liveavatar.devices import configure_cuda_allocator, resolve_device, resolve_dtype
from liveavatar.errors import InputError
from liveavatar.io.media import load_audio, load_image, reference_tensor
from liveavatar.io.video_writer import Mp4Writer, pixels_to_uint8
from liveavatar.models.audio_features import AudioFeatureExtractor, StreamingAudioFeatures, video_rate_features
from liveavatar.models.text_encoder import TextEncoder
from liveavatar.models.transformer import CausalS2VTransformer
from liveavatar.models.vae import WanVAE
from liveavatar.geometry import AUDIO_SAMPLE_RATE, DEFAULT_SIZE, FPS, WAV2VEC_WINDOW, ClipGeometry, audio_clip_count, size_for_area
from liveavatar.runtime.conditioning import (
    StreamedAudio,
    WholeFileAudio,
    clip_noise,
    encode_reference,
)
from liveavatar.runtime.offload import load_placed_dit
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.progress import Progress
from liveavatar.runtime.sampler import BlockLatents, SequentialExecutor, VideoFrames, ref_rope_shifts, sample
from liveavatar.runtime.schedule import FlowMatchSchedule
from liveavatar.settings import GenerationSettings, parse_size, plan_for_settings

# Audio longer than this gets its wav2vec2 features block by block (bounded memory) instead of in one pass
# over the whole file as the reference does (whose attention cost grows with the square of the length).
WHOLE_FILE_AUDIO_LIMIT_S = 300.0

ImageInput = Union[str, os.PathLike, Image.Image]
AudioInput = Union[str, os.PathLike, np.ndarray]


@dataclass(frozen=True)
class Frame:
    """One output frame: RGB ``image`` uint8 [H, W, 3], its ``index`` in the video, ``timestamp`` in seconds."""

    image: np.ndarray
    index: int
    timestamp: float


@dataclass(frozen=True)
class _Run:
    """A prepared request: its geometry, clip count and the loop's event stream."""

    geometry: ClipGeometry
    num_clips: int
    events: Iterator


class LiveAvatarPipeline:
    """All models of Live Avatar, loaded once; `stream` and `generate` serve any number of requests."""

    def __init__(self, transformer: CausalS2VTransformer, vae: WanVAE, text_encoder: TextEncoder,
                 audio_encoder: AudioFeatureExtractor, *, device: torch.device, dtype: torch.dtype):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.audio_encoder = audio_encoder
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike, *, lora: str | os.PathLike | None = LORA_REPO,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        lora_alpha: float | None = None, fp8: bool = False, t5_cpu: bool = False,
                        prompt_cache_dir: str | os.PathLike | None = None,
                        placement: Placement | None = None) -> "LiveAvatarPipeline":
        """Load the release (or ``liveavatar make-tiny`` checkpoints) from ``ckpt_dir`` (the Wan2.2-S2V-14B
        folder). ``lora``: the Live-Avatar LoRA as a file, a folder or a Hub id in the local cache; None runs
        the base weights. ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA and
        float32 on CPU. ``fp8`` converts the DiT's linears to FP8 after the LoRA merge (as ``--fp8``).
        ``placement`` (from the memory planner) decides weight dtype, streamed layers, cache locations and
        where the text encoder runs; it overrides ``fp8`` and ``t5_cpu``. Default: everything resident."""
        layout = CheckpointLayout.discover(ckpt_dir, None if lora is None else os.fspath(lora))
        layout.validate()
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if device.type == "cuda":
            configure_cuda_allocator()
        if placement is None:
            placement = Placement(weight_dtype="fp8" if fp8 else "bf16",
                                  text_encoder="cpu" if t5_cpu else "gpu_then_free")
        transformer = load_placed_dit(layout.dit_dir, placement, device=device, dtype=dtype, lora=layout.lora,
                                      lora_alpha=lora_alpha)
        vae = WanVAE.from_checkpoint(layout.vae, device=device, dtype=dtype)
        text_device = "cpu" if placement.text_encoder == "cpu" else device
        text_encoder = TextEncoder.from_pretrained(layout.ckpt_dir, device=text_device, dtype=dtype,
                                                   cache_dir=prompt_cache_dir)
        audio_encoder = AudioFeatureExtractor.from_pretrained(layout.wav2vec2, device=device, dtype=dtype)
        return cls(transformer, vae, text_encoder, audio_encoder, device=device, dtype=dtype)

    # ----------------------------------------------------------------------------------------------
    # requests

    def stream(self, image: ImageInput, audio: AudioInput, prompt: str = "", *, size: str | int = DEFAULT_SIZE,
               infer_frames: int = 48, sample_steps: int = 4, num_clip: int | None = None, base_seed: int = 420,
               mode: str = "streaming", enable_online_decode: bool = False,
               ref_rope_offset: str | int = "seeded") -> Iterator[Frame]:
        """Yield the video's frames as they are made (48·clips − 3 frames at 25 fps). The request is checked
        and the inputs are read at once; the models run as the frames are consumed.

        ``image``: a path or a PIL image. ``audio``: a path, or a 16 kHz mono float32 waveform. ``size`` is
        an area (``"704*384"`` or a number); the aspect ratio follows the image. ``mode``: ``streaming``
        (the paper's pipeline) or ``single_gpu`` (the reference's single-GPU script, with
        ``enable_online_decode`` as its flag). ``ref_rope_offset``: ``seeded``, ``random`` or 4..30.
        """
        run = self._prepare(image, audio, prompt, size=size, infer_frames=infer_frames, sample_steps=sample_steps,
                            num_clip=num_clip, base_seed=base_seed, mode=mode,
                            enable_online_decode=enable_online_decode, ref_rope_offset=ref_rope_offset)
        return self._frames(run.events)

    @staticmethod
    def _frames(events: Iterator) -> Iterator[Frame]:
        for event in events:
            if isinstance(event, VideoFrames):
                for offset, pixels in enumerate(pixels_to_uint8(event.frames)):
                    index = event.start + offset
                    yield Frame(pixels, index, index / FPS)

    def generate(self, image: ImageInput, audio: str | os.PathLike, prompt: str = "", *,
                 output: str | os.PathLike, keep_partial: bool = False, progress: bool = False,
                 size: str | int = DEFAULT_SIZE, infer_frames: int = 48, sample_steps: int = 4,
                 num_clip: int | None = None, base_seed: int = 420, mode: str = "streaming",
                 enable_online_decode: bool = False, ref_rope_offset: str | int = "seeded") -> Path:
        """Write the video with the audio muxed in (H.264 + AAC, 25 fps) to ``output`` and return its path.

        Frames are encoded as they are made. On an error or Ctrl-C nothing is left under ``output``
        (with ``keep_partial`` the frames so far are kept as ``<name>.partial.mp4``). ``progress`` prints a
        status line (a terminal) or log lines (otherwise) on stderr. Other arguments as in `stream`.
        """
        if isinstance(audio, np.ndarray):
            raise InputError("generate() muxes the audio file into the mp4: pass its path (stream() takes waveforms)")
        run = self._prepare(image, audio, prompt, size=size, infer_frames=infer_frames, sample_steps=sample_steps,
                            num_clip=num_clip, base_seed=base_seed, mode=mode,
                            enable_online_decode=enable_online_decode, ref_rope_offset=ref_rope_offset)
        geometry = run.geometry
        status = Progress(num_clips=run.num_clips, blocks_per_clip=geometry.blocks_per_clip,
                          total_frames=geometry.video_frames(run.num_clips), fps=FPS, device=self.device,
                          enabled=progress)
        with Mp4Writer(output, width=geometry.width, height=geometry.height, fps=FPS, audio_path=audio,
                       keep_partial=keep_partial) as writer:
            status.start()
            try:
                for event in run.events:
                    if isinstance(event, BlockLatents):
                        status.block_done(event.clip, event.block)
                    else:
                        writer.write(pixels_to_uint8(event.frames))
                        status.frames_done(event.count)
            finally:
                run.events.close()
                status.close()
        return writer.path

    # ----------------------------------------------------------------------------------------------

    def _prepare(self, image: ImageInput, audio: AudioInput, prompt: str, *, size, infer_frames: int,
                 sample_steps: int, num_clip: int | None, base_seed: int, mode: str, enable_online_decode: bool,
                 ref_rope_offset) -> _Run:
        """Validate the request, read the inputs and set up the loop; the heavy work runs as it is consumed."""
        area = size if isinstance(size, int) else parse_size(size)
        if num_clip is not None and num_clip < 1:
            raise InputError(f"--num_clip {num_clip}: must be at least 1 (or None for the whole audio)")
        if base_seed < 0:
            raise InputError(f"--base_seed {base_seed}: must be >= 0")
        schedule = FlowMatchSchedule.create(sample_steps)
        rd = ref_rope_shifts(ref_rope_offset, base_seed=base_seed, mode=mode, num_steps=sample_steps)
        if enable_online_decode and mode != "single_gpu":
            raise InputError("enable_online_decode belongs to mode='single_gpu' (the streaming mode always "
                             "refreshes the sink from the first generated latent)")

        picture = image if isinstance(image, Image.Image) else load_image(image)
        height, width = size_for_area(picture.height, picture.width, area)
        geometry = ClipGeometry(height, width, infer_frames)
        waveform = self._waveform(audio)
        audio_clips = audio_clip_count(len(waveform), infer_frames)
        num_clips = audio_clips if num_clip is None else min(num_clip, audio_clips)
        events = self._events(picture, waveform, prompt, geometry, num_clips, schedule, rd, base_seed=base_seed,
                              mode=mode, online_decode=enable_online_decode)
        return _Run(geometry, num_clips, events)

    @staticmethod
    def _waveform(audio: AudioInput) -> np.ndarray:
        if isinstance(audio, np.ndarray):
            if audio.ndim != 1:
                raise InputError(f"audio waveform must be 16 kHz mono [samples], got shape {audio.shape}")
            waveform = audio.astype(np.float32, copy=False)
        else:
            waveforms = load_audio(audio)
            if len(waveforms) != 1:
                raise InputError(f"--audio {audio}: several files joined with '+' drive several actors, which needs "
                                 f"the reference's SAM2 face routing; this engine takes one audio file")
            waveform = waveforms[0]
        if len(waveform) < WAV2VEC_WINDOW:
            raise InputError(f"--audio: {len(waveform)} samples at 16 kHz is shorter than the "
                             f"{WAV2VEC_WINDOW / AUDIO_SAMPLE_RATE * 1000:.0f} ms one audio feature needs")
        return waveform

    @torch.no_grad()
    def _events(self, picture: Image.Image, waveform: np.ndarray, prompt: str, geometry: ClipGeometry,
                num_clips: int, schedule: FlowMatchSchedule, rd, *, base_seed: int, mode: str,
                online_decode: bool) -> Iterator:
        audio = self._audio_features(waveform, geometry)
        with self.text_encoder:  # loads the encoder only on a prompt-cache miss, frees it on exit
            context = self.text_encoder.encode(prompt)
        text = self.transformer.embed_text(context.to(self.device))
        reference = encode_reference(self.vae, reference_tensor(picture, geometry.height, geometry.width)
                                     .to(self.device, self.dtype), mode)
        executor = SequentialExecutor(self.transformer, schedule, text, geometry, ref_rope_shift=rd)
        yield from sample(executor, self.vae, reference, audio, geometry, num_clips=num_clips,
                          noise=lambda clip: clip_noise(base_seed, clip, geometry, device=self.device, dtype=self.dtype),
                          mode=mode, online_decode=online_decode)

    def _audio_features(self, waveform: np.ndarray, geometry: ClipGeometry):
        if len(waveform) <= WHOLE_FILE_AUDIO_LIMIT_S * AUDIO_SAMPLE_RATE:
            hidden = self.audio_encoder.hidden_states(waveform)
            features, _ = video_rate_features(hidden, infer_frames=geometry.infer_frames, fps=FPS)
            # Kept on the host in the run dtype (the DiT casts to it anyway); blocks move to the device.
            return WholeFileAudio(features.to("cpu", self.dtype), geometry)
        streamer = StreamingAudioFeatures(self.audio_encoder, frames_per_block=geometry.frames_per_block, fps=FPS)
        shape = (self.audio_encoder.num_layers + 1, self.audio_encoder.hidden_size)
        return StreamedAudio(streamer, waveform, geometry, feature_shape=shape)


def generate_from_settings(settings: GenerationSettings, *, progress: bool = True) -> Path:
    """What ``liveavatar generate`` runs once the settings are validated: load, generate, return the mp4 path."""
    picture = load_image(settings.image)
    height, width = size_for_area(picture.height, picture.width, settings.size_area)
    # Planned before anything heavy is loaded: a run that cannot fit is refused here, with the numbers.
    plan = plan_for_settings(settings, height, width).check()
    if progress and resolve_device(settings.device).type == "cuda":
        print(f"plan: {plan.placement.describe()}; predicted peak {plan.predicted_peak_bytes / 2**30:.1f} GiB "
              f"({plan.budget_source})", file=sys.stderr)
    pipe = LiveAvatarPipeline.from_pretrained(settings.ckpt_dir, lora=settings.lora, device=settings.device,
                                              dtype=settings.dtype, placement=plan.placement)
    return pipe.generate(picture, settings.audio[0], settings.prompt, output=settings.output_path(width, height),
                         keep_partial=settings.keep_partial, progress=progress, size=settings.size_area,
                         infer_frames=settings.infer_frames, sample_steps=settings.sample_steps,
                         num_clip=settings.num_clip, base_seed=settings.base_seed, mode=settings.mode,
                         enable_online_decode=settings.enable_online_decode,
                         ref_rope_offset=settings.ref_rope_offset)
