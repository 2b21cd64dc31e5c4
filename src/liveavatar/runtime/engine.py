"""The Engine: the loaded models, their placement and the caches, and the one place that assembles a run.

``Engine.run(request)`` conditions the request (prompt embedding, reference and motion latents, audio
features), takes the caches (allocated once per placement and clip size, reset per request), builds the
executor and the decoder, and yields the sampling loop's events. The Python API, ``bench`` and the server
all go through it; nothing of a request stays on the models.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from liveavatar.checkpoints.layout import CheckpointLayout
from liveavatar.geometry import FPS, ClipGeometry
from liveavatar.io.media import reference_tensor
from liveavatar.models.audio_features import (
    AudioFeatureExtractor,
    StreamingAudioFeatures,
    video_rate_features,
)
from liveavatar.models.quantised_attention import SelfAttention, resolve_self_attention
from liveavatar.models.regions import EAGER
from liveavatar.models.text_encoder import TEXT_LEN, TextEncoder
from liveavatar.models.vae import WanVAE
from liveavatar.options import Mode, RequestOptions
from liveavatar.request import LiveSource, Request
from liveavatar.runtime.caches import CacheSet, build_caches
from liveavatar.runtime.conditioning import (
    ReferenceLatents,
    StreamedAudio,
    WholeFileAudio,
    clip_noise,
    encode_reference,
    waveform_chunks,
)
from liveavatar.runtime.compile import (FastPath, compile_decoder, compile_regions, configure_compiler,
                                       resolve_fast_path)
from liveavatar.runtime.decoding import OverlappedDecoder
from liveavatar.runtime.executors import (ExecutorFactory, ForwardGraphs, ForwardHook, SequentialFactory,
                                          graphs_allowed)
from liveavatar.runtime.layer_streaming import LayerStreamer
from liveavatar.runtime.loading import load_placed_dit
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.sampler import BlockAudio, LoopEvent, NoDecoder, make_decoder, ref_rope_offsets, sample
from liveavatar.runtime.schedule import FlowMatchSchedule

REFERENCE_CACHE_SIZE = 4


@dataclass
class Conditioning:
    """What a request's loop is conditioned on, on the engine's device: the text's per-layer K/V (None
    without a DiT here), the reference and motion latents, the per-block audio features, and the prompt
    embedding (the ranks of a pipeline derive their own text K/V from it)."""

    text_kv: list | None
    reference: ReferenceLatents
    audio: BlockAudio
    notices: tuple[str, ...] = ()
    text: torch.Tensor | None = None  # the prompt embedding, from which other pipeline ranks make their text K/V


class Engine:
    """All models of Live Avatar, loaded once and placed as the `Placement` says, serving any number of
    requests one after the other. On several GPUs this is the output rank's engine: ``step_ranks`` (see
    `liveavatar.runtime.executors.step_ranks`) runs the denoising steps on the other ranks, and
    ``transformer`` is None when this rank runs none of them.

    The fast path (`liveavatar.runtime.compile`): ``fast_path`` (default: `resolve_fast_path`) compiles the
    DiT's regions and the VAE's steady decode step once here; with everything resident the forwards replay CUDA graphs kept across requests;
    on CUDA with a resident placement, streaming mode decodes each block on a second stream while the
    next one denoises (``overlap_decode``)."""

    def __init__(self, transformer, vae: WanVAE, text_encoder: TextEncoder | None,
                 audio_encoder: AudioFeatureExtractor | None, *, placement: Placement, device: torch.device,
                 dtype: torch.dtype, layer_streamer: LayerStreamer | None = None, fast_path: FastPath | None = None,
                 overlap_decode: bool | None = None, step_ranks=None,
                 reference_attention: bool = False):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.audio_encoder = audio_encoder
        self.placement = placement
        self.device = device
        self.dtype = dtype
        self.layer_streamer = layer_streamer
        self.step_ranks = step_ranks
        self._caches: CacheSet | None = None
        self._references: OrderedDict[tuple, ReferenceLatents] = OrderedDict()
        self.fast_path = fast_path if fast_path is not None else resolve_fast_path(device)
        self.compile_fallback = self.compile_cache = self.decoder_fallback = None
        if self.fast_path.compile:
            self.compile_cache = configure_compiler(workers=placement.compile_workers)
        if vae is None:  # a rank that only runs denoising steps
            pass
        elif self.fast_path.compile:
            # The decoder's graph keeps its activations in a pool of its own: resident placements only.
            # channels_last_3d: cuDNN's 3-D convolutions ran 21 % faster so on an H100 (compiled decode
            # 0.096 vs 0.122 s per 704*384 block, benchmarks/RESULTS.md).
            self.decoder_fallback = compile_decoder(vae, cuda_graphs=self.fast_path.cuda_graphs and placement.resident,
                                                    channels_last=device.type == "cuda")
        else:
            vae.steady_decoder = None
        if transformer is None:  # an output rank that only decodes: no DiT to compile
            pass
        elif self.fast_path.compile:
            self.compile_fallback = compile_regions(transformer)
        else:
            transformer.regions = EAGER
        self.graphs: ForwardGraphs | None = None
        self._self_attention: dict[str, SelfAttention] = {}
        self.reference_attention = reference_attention  # quantised modes through their PyTorch form (CPU checks)
        self.requests_run = 0
        # The overlapped decode holds its activations next to the DiT's: default for resident placements
        # only (the large-memory case; the planner budgets the decode after the forward).
        self.overlap_decode = (device.type == "cuda" and placement.resident) if overlap_decode is None \
            else overlap_decode

    @classmethod
    def from_pretrained(cls, layout: CheckpointLayout, placement: Placement, *, device: torch.device,
                        dtype: torch.dtype, lora_alpha: float | None = None,
                        prompt_cache_dir: str | os.PathLike | None = None, compile: bool | None = None,
                        step_ranks=None) -> "Engine":
        """Load every model of a validated checkpoint layout onto ``device`` as ``placement`` says (the DiT
        only if this rank of ``step_ranks`` runs steps); ``compile`` as in `resolve_fast_path` (None: on for
        CUDA GPUs unless ``LIVEAVATAR_COMPILE=0``)."""
        fast_path = resolve_fast_path(device, compile=compile)
        transformer, layer_streamer = None, None
        if step_ranks is None or step_ranks.layout.output_denoises:
            transformer, layer_streamer = load_placed_dit(layout.dit_dir, placement, device=device, dtype=dtype,
                                                          lora=layout.lora, lora_alpha=lora_alpha)
        vae = WanVAE.from_checkpoint(layout.vae, device=device, dtype=dtype)
        text_device = "cpu" if placement.text_encoder == "cpu" else device
        text_encoder = TextEncoder.from_pretrained(layout.ckpt_dir, device=text_device, dtype=dtype,
                                                   cache_dir=prompt_cache_dir)
        audio_encoder = AudioFeatureExtractor.from_pretrained(layout.wav2vec2, device=device, dtype=dtype)
        return cls(transformer, vae, text_encoder, audio_encoder, placement=placement, device=device, dtype=dtype,
                   layer_streamer=layer_streamer, fast_path=fast_path, step_ranks=step_ranks)

    def decodes_one_block_late(self, options: RequestOptions) -> bool:
        """True if a request's frames come out one block after its latents (the decode overlapped with the
        next block's denoising)."""
        return self.overlap_decode and options.mode == Mode.STREAMING

    def self_attention(self, mode: str) -> SelfAttention:
        """The blocks' self-attention for an attention mode (`liveavatar.models.quantised_attention`) on this
        engine's device, resolved once per mode: a fallback's notice is given once."""
        if mode not in self._self_attention:
            head_dim = self.transformer.config.head_dim if self.transformer is not None else None
            self._self_attention[mode] = resolve_self_attention(mode, self.device, head_dim=head_dim,
                                                                reference=self.reference_attention)
        return self._self_attention[mode]

    @property
    def cache_set(self) -> CacheSet | None:
        """The caches allocated for the latest request (None before the first)."""
        return self._caches

    # ----------------------------------------------------------------------------------------------

    def caches(self, geometry: ClipGeometry, steps: Sequence[int]) -> CacheSet:
        """The caches for a clip size and denoising steps: the ones already allocated when they fit
        (reset for the new video), else new ones in place of them."""
        if self._caches is not None and self._caches.serves(geometry, steps):
            self._caches.reset()
            return self._caches
        self._release_caches()  # freed before the new ones are allocated
        self._caches = build_caches(self.transformer, self.placement, geometry, steps, device=self.device,
                                    dtype=self.dtype)
        return self._caches

    def _release_caches(self) -> None:
        if self._caches is not None:
            self._caches.close()
            self._caches = self.graphs = None  # graphs bake the caches in: they go with them

    @torch.no_grad()
    def condition(self, request: Request) -> Conditioning:
        """Encode a request's prompt, reference image and audio (the encoders' work before the loop)."""
        geometry = request.geometry
        audio = self._block_audio(request)
        if self.text_encoder.device.type != "cpu" and not self.text_encoder.is_cached(request.prompt):
            self._release_caches()  # the encoder takes their GPU memory while it runs (the plan's set-up)
        with self.text_encoder:  # loads the encoder only on a prompt-cache miss, frees it on exit
            context = self.text_encoder.encode(request.prompt)
        # The tokenizer cuts at TEXT_LEN tokens (EOS included): a full context means the prompt was cut.
        notices = (f"prompt: {len(request.prompt)} characters fill the text encoder's {TEXT_LEN} tokens; the rest "
                   f"is cut, as in the reference",) if context.shape[0] >= TEXT_LEN else ()
        text = context.to(self.device)
        text_kv = None if self.transformer is None else self.transformer.text_kv(text)
        return Conditioning(text_kv, self._reference(request), audio, notices=notices, text=text)

    def _reference(self, request: Request) -> ReferenceLatents:
        """The reference and motion latents of a request's portrait, from the last few encoded: a server sees
        the same avatar again and again, and encoding its 73-frame motion history is the largest fixed cost
        of a request after loading."""
        geometry = request.geometry
        pixels = reference_tensor(request.image, geometry.height, geometry.width)
        mode = request.options.mode
        key = (hashlib.sha256(pixels.numpy().tobytes()).hexdigest(), geometry.height, geometry.width, mode)
        if key in self._references:
            self._references.move_to_end(key)
        else:
            self._references[key] = encode_reference(self.vae, pixels.to(self.device, self.dtype), mode)
            while len(self._references) > REFERENCE_CACHE_SIZE:
                self._references.popitem(last=False)
        return self._references[key]

    @torch.no_grad()
    def run(self, request: Request, conditioning: Conditioning | None = None, *,
            executor: ExecutorFactory | None = None, on_forward: ForwardHook | None = None,
            decode: bool = True) -> Iterator[LoopEvent]:
        """The request's loop events (`BlockLatents` per clean block, `VideoFrames` as they are decoded),
        made as they are consumed; closing the iterator stops the run after the block in progress.
        ``conditioning`` replaces `condition(request)` (benchmarks feed synthetic conditioning);
        ``decode=False`` yields the clean blocks only (benchmarks time the DiT alone). ``executor``: default
        the step ranks' (on several GPUs) or a `SequentialFactory`; the caches are allocated for its
        ``local_steps`` only (None for none)."""
        conditioning = conditioning or self.condition(request)
        self.requests_run += 1
        geometry, options = request.geometry, request.options
        if self.transformer is not None:  # requests run one at a time: the model runs the one this asks for
            self.transformer.self_attention = self.self_attention(options.attention)
        steps = options.sample_steps
        if executor is None:
            executor = SequentialFactory() if self.step_ranks is None else \
                self.step_ranks.executor(geometry, conditioning.text, options.attention)
        schedule = FlowMatchSchedule.create(steps)
        offsets = ref_rope_offsets(options.ref_rope_offset, base_seed=options.base_seed, mode=options.mode,
                                   num_steps=steps)
        local_steps = executor.local_steps(steps)
        caches = self.caches(geometry, local_steps) if local_steps else None
        runner = executor(self.transformer, caches, schedule, conditioning.text_kv, on_forward=on_forward,
                          graphs=self.forward_graphs(caches) if caches else None)
        decoder = make_decoder(options.mode, self.vae, conditioning.reference, geometry) if decode else NoDecoder()
        if decode and self.decodes_one_block_late(options):
            decoder = OverlappedDecoder(decoder, self.device)
        yield from sample(runner, decoder, conditioning.reference, conditioning.audio, geometry,
                          noise=lambda clip: clip_noise(options.base_seed, clip, geometry, device=self.device,
                                                        dtype=self.dtype),
                          ref_rope_offset=offsets, num_steps=steps, total_blocks=request.total_blocks,
                          mode=options.mode, online_decode=options.online_decode)

    def forward_graphs(self, caches: CacheSet) -> ForwardGraphs | None:
        """The engine's CUDA graphs, when the fast path has them and the placement allows them."""
        if not (self.fast_path.cuda_graphs and graphs_allowed(self.placement, self.layer_streamer, caches)):
            return None
        if self.graphs is None:
            self.graphs = ForwardGraphs(self.transformer)
        return self.graphs

    def _block_audio(self, request: Request) -> BlockAudio:
        geometry, audio = request.geometry, request.audio
        if isinstance(audio, LiveSource):
            return audio.block_features(self.audio_encoder, geometry)
        if not request.options.streamed_audio_features:
            hidden = self.audio_encoder.hidden_states(audio.samples)
            features, _ = video_rate_features(hidden, infer_frames=geometry.infer_frames, fps=FPS)
            # Kept on the host in the run dtype (the DiT casts to it anyway); blocks move to the device.
            return WholeFileAudio(features.to("cpu", self.dtype), geometry)
        streamer = StreamingAudioFeatures(self.audio_encoder, frames_per_block=geometry.frames_per_block, fps=FPS)
        shape = (self.audio_encoder.num_layers + 1, self.audio_encoder.hidden_size)
        return StreamedAudio(streamer, waveform_chunks(audio.samples), geometry, feature_shape=shape)
