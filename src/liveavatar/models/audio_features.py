"""wav2vec2 speech features at video rate, as the reference's `AudioEncoder` + `WanS2V.encode_audio`.

Whole-file path (the reference, used for parity):
1. the processor normalises the whole 16 kHz waveform to zero mean / unit variance;
2. wav2vec2 (`Wav2Vec2ForCTC` from the release's `wav2vec2-large-xlsr-53-english/`) runs once over the whole
   file; all 25 hidden states are kept: the transformer input, the outputs of layers 1..23 and the output of
   layer 24 after the encoder's final LayerNorm -> `[25, T50, C]` at 50 Hz;
3. linear interpolation (align_corners) to `int(T50/50*30)` frames at 30 Hz, in the model dtype, then float32;
4. video frame k of 25 fps takes the 30 Hz frame round(k*30/25) (zeros past the end of the audio), in whole
   clips of `infer_frames`, clips = int(T30/(infer_frames*1.2)) + 1 -> `audio_emb [1, 25, C, frames]`.

`StreamingAudioFeatures` is the chunked counterpart for audio that arrives in pieces (see its docstring for
where and by how much it differs).
"""
from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from liveavatar.errors import CheckpointError, InputError

SAMPLE_RATE = 16000
# The reference hard-codes these rates rather than deriving them from the model config.
FEATURE_RATE = 50
VIDEO_RATE = 30


class AudioFeatureExtractor:
    """The wav2vec2 feature extractor (processor normalisation + model) on a given device and dtype."""

    def __init__(self, processor, model: torch.nn.Module, *, device: torch.device | str, dtype: torch.dtype):
        self.processor = processor
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        # Samples per 50 Hz frame and samples seen by the first frame (320 and 400 for wav2vec2).
        self.hop = math.prod(config.conv_stride)
        self.receptive_field = 1
        for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel

    @classmethod
    def from_pretrained(cls, wav2vec_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "AudioFeatureExtractor":
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the engine reports loading itself (and --quiet means quiet)

        folder = Path(wav2vec_dir)
        for name in ("config.json", "preprocessor_config.json"):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: no {name}; point it at the release's "
                                      f"wav2vec2-large-xlsr-53-english folder")
        try:
            processor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder))
            # Loaded in float32 and then cast, as the reference does (the positional conv's weight norm is
            # recombined from the legacy weight_g/weight_v before the cast).
            model, loading = Wav2Vec2ForCTC.from_pretrained(str(folder), output_loading_info=True)
        except Exception as error:  # transformers/safetensors raise many unrelated types for bad files
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{folder}: cannot load the wav2vec2 checkpoint ({detail}); "
                                  f"the folder is incomplete or corrupt") from None
        # transformers would silently initialise missing weights at random.
        missing = sorted(k for k in loading["missing_keys"] if not k.startswith("lm_head."))
        if missing:
            raise CheckpointError(f"{folder}: the wav2vec2 checkpoint lacks {len(missing)} weights "
                                  f"(e.g. {missing[0]}); it is incomplete or not a Wav2Vec2ForCTC checkpoint")
        if model.config.num_hidden_layers != 24:
            raise CheckpointError(f"{folder}: wav2vec2 has {model.config.num_hidden_layers} layers; the DiT's "
                                  f"audio encoder mixes exactly 25 hidden states, i.e. 24 layers")
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(processor, model, device=device, dtype=dtype)

    def input_values(self, waveform_16k: np.ndarray) -> torch.Tensor:
        """The processor's output for the whole waveform (zero mean / unit variance when configured)."""
        waveform = np.asarray(waveform_16k, dtype=np.float32)
        if waveform.ndim != 1:
            raise InputError(f"waveform must be mono [samples], got shape {waveform.shape}")
        if waveform.shape[0] < self.receptive_field:
            raise InputError(f"audio is too short: {waveform.shape[0]} samples, wav2vec2 needs at least "
                             f"{self.receptive_field} ({self.receptive_field / SAMPLE_RATE * 1000:.0f} ms at 16 kHz)")
        return self.processor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values[0]

    def hidden_states(self, waveform_16k: np.ndarray) -> torch.Tensor:
        """All 25 hidden states `[25, T50, C]` in the model dtype, on the model device."""
        values = self.input_values(waveform_16k).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model.wav2vec2(values[None], output_hidden_states=True)
        # The first num_layers entries are the input of every layer in all transformers versions; the last
        # entry is the post-LayerNorm output in 4.x but the raw layer-24 output in 5.x, so it is taken from
        # last_hidden_state, which is post-LayerNorm in both.
        states = out.hidden_states[: self.num_layers] + (out.last_hidden_state,)
        return torch.cat(states)

    def unload(self) -> None:
        on_cuda = self.device.type == "cuda"
        self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def resample_to_video_rate(hidden: torch.Tensor, *, video_rate: int = VIDEO_RATE) -> torch.Tensor:
    """`[L, T50, C]` -> `[L, int(T50/50*video_rate), C]` by linear interpolation with align_corners, computed in
    the input's dtype (bf16 in real runs, as the reference) and returned as float32."""
    length = int(hidden.shape[1] / float(FEATURE_RATE) * video_rate)
    if length < 1:
        raise InputError(f"audio is too short: {hidden.shape[1]} wav2vec2 frames give no {video_rate} Hz frame")
    resampled = F.interpolate(hidden.transpose(1, 2), size=length, mode="linear", align_corners=True)
    return resampled.transpose(1, 2).float()


def video_frame_indices(first: int, count: int, *, fps: int, video_rate: int = VIDEO_RATE) -> np.ndarray:
    """Index of the `video_rate` frame used by video frames first..first+count-1 (numpy round-half-even)."""
    times = np.arange(first, first + count, dtype=np.float64) / fps
    return np.round(times * video_rate).astype(np.int64)


def bucket_video_frames(features: torch.Tensor, *, infer_frames: int, fps: int = 25,
                        video_rate: int = VIDEO_RATE) -> tuple[torch.Tensor, int]:
    """`[L, T30, C]` at `video_rate` -> (`[1, L, C, infer_frames*num_clips]`, num_clips) at `fps`.

    The reference's `get_audio_embed_bucket_fps` with m=0: whole clips, frame k takes index round(k*30/25),
    zeros where that index is past the end of the audio.
    """
    num_layers, length, channels = features.shape
    num_clips = int(length / (infer_frames * (video_rate / fps))) + 1
    num_frames = num_clips * infer_frames
    padded_length = math.ceil(num_frames / fps * video_rate)
    # The reference's own expression (linspace over the clip duration), kept for its exact float rounding.
    times = np.linspace(0, num_frames / int(fps), num_frames, endpoint=False)
    indices = np.clip(np.round(times * int(video_rate)).astype(np.int64), 0, padded_length - 1)
    valid = indices < length
    out = features.new_zeros(num_layers, num_frames, channels)
    source = torch.from_numpy(indices[valid]).to(features.device)
    out[:, torch.from_numpy(valid).to(features.device)] = features[:, source]
    return out.permute(0, 2, 1).unsqueeze(0).contiguous(), num_clips


def video_rate_features(hidden: torch.Tensor, *, infer_frames: int, fps: int = 25,
                        video_rate: int = VIDEO_RATE) -> tuple[torch.Tensor, int]:
    """wav2vec2 hidden states `[25, T50, C]` -> (`audio_emb [1, 25, C, infer_frames*num_clips]` float32, num_clips)."""
    return bucket_video_frames(resample_to_video_rate(hidden, video_rate=video_rate),
                               infer_frames=infer_frames, fps=fps, video_rate=video_rate)


class StreamingAudioFeatures:
    """Per-block `audio_emb` for audio that arrives in chunks, with bounded memory and latency.

    `push(chunk)` appends 16 kHz float32 samples and returns the blocks that became computable, each
    `[1, 25, C, frames_per_block]` float32 for video frames `frames_per_block*b ...`; `finish()` returns the
    rest, up to the block holding the last frame of the audio, with zeros past the end (it does not pad to
    whole clips). A block is computed once the samples for its last 50 Hz frame plus `lookahead_seconds` have
    arrived, by running wav2vec2 on the last `context_seconds` of audio ending there. Between calls at most
    `context_seconds` of samples are kept.

    Where the features must differ from the whole-file path (`hidden_states` + `video_rate_features`):
    * wav2vec2's self-attention is global over its input, and its positional convolution spans +-64 frames
      (+-1.28 s): here the input is a window, so a frame sees no audio after the lookahead and none before
      the context;
    * the processor normalises per input: here per window, not over the whole file;
    * the whole file's 50 -> 30 Hz interpolation puts 30 Hz frame i at 50 Hz position i*(T50-1)/(T30-1),
      which depends on the file's length. With `total_samples` (audio whose length is known, e.g. a long
      file fed in pieces) the stream uses exactly those positions; without it (live input) it uses the
      nominal i*50/30, which agrees at the start and drifts linearly to between 2/3 and 2 frames of 50 Hz
      (13-40 ms) behind at the end of the file the whole-file path would have seen;
    * interpolation is done in float32 (the whole-file path interpolates in the model dtype).
    Frames with 30 Hz index past the end of the audio are zeros in both.

    Measured on the real speech in shared/media (dwarven_blacksmith 17.7 s, cyclops_baker 11.6 s,
    fashion_blogger 12.8 s; 24 kHz resampled to 16 kHz), float32, pushed in 0.2 s chunks: error of the
    streamed `audio_emb` against the whole-file one over every frame of the audio, as a fraction of the
    whole-file features' variation over time, ||stream - whole|| / ||whole - time mean|| (plain relative L2
    in brackets). The release's wav2vec2 weights are not available offline, so two random-weight models with
    the XLSR-53 layout were measured: "tiny" (the fixture's: width 32, positional conv 16) and "mid"
    (width 256, the real positional conv of 128 taps / 16 groups). Random weights give features that change
    from one 50 Hz frame to the next far more than a trained model's, so the position terms below are an
    upper bound; the window terms show how context and lookahead trade against each other.

    * scale, the whole-file features one 25 fps frame late: tiny 0.87-1.26 [0.21-0.22], mid 1.19-1.20 [0.77-0.79];
    * nominal positions alone (whole-file states read at i*50/30): tiny 0.45-0.68 [0.08-0.13], mid 0.77-0.79
      [0.51];
    * known length, context 10 s, lookahead 0 / 0.5 / 1 / 2 s: tiny 0.22-0.47 / 0.20-0.46 / 0.18-0.38
      [0.04-0.07] / 0.16-0.30; mid (2 files) 0.29-0.34 / - / 0.09-0.10 [0.06] / 0.05;
    * known length, context 5 s, lookahead 1 s: tiny 0.22-0.49, mid 0.10-0.11;
    * live (nominal positions), context 10 s, lookahead 1 s: tiny 0.56-0.75 [0.11-0.15], mid 0.77-0.79 [0.51].

    So with the length known, a 1 s lookahead and >= 5 s of context leave 0.09-0.11 (mid) and 0.18-0.49
    (tiny) of the features' variation; per layer the error is smallest at the input (layer 0: 0.02-0.08) and
    grows with depth. Live input adds the nominal-position term, which a trained model's smoother features
    shrink; the nominal positions are the physically aligned ones (video frame k at k/25 s), the whole-file
    path stretches the audio by up to 40 ms at the end.
    """

    def __init__(self, extractor: AudioFeatureExtractor, *, frames_per_block: int = 12, fps: int = 25,
                 video_rate: int = VIDEO_RATE, context_seconds: float = 10.0, lookahead_seconds: float = 1.0,
                 total_samples: int | None = None):
        if frames_per_block < 1 or context_seconds <= lookahead_seconds or lookahead_seconds < 0:
            raise ValueError("need frames_per_block >= 1 and 0 <= lookahead_seconds < context_seconds")
        self.extractor = extractor
        self.frames_per_block = frames_per_block
        self.fps = fps
        self.video_rate = video_rate
        self.total_samples = total_samples
        hop = extractor.hop
        self.context_samples = int(round(context_seconds * SAMPLE_RATE / hop)) * hop
        self.lookahead_samples = int(round(lookahead_seconds * SAMPLE_RATE))
        self._position_scale = FEATURE_RATE / video_rate
        if total_samples is not None:
            frames_50, frames_30 = self._frame_counts(total_samples)
            if frames_30 > 1:
                self._position_scale = (frames_50 - 1) / (frames_30 - 1)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # absolute index of self._buffer[0]
        self._received = 0
        self._next_block = 0
        self._finished = False

    @property
    def buffered_samples(self) -> int:
        return self._buffer.shape[0]

    def push(self, chunk: np.ndarray) -> list[torch.Tensor]:
        if self._finished:
            raise ValueError("push() after finish(): start a new StreamingAudioFeatures for new audio")
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, chunk])
        self._received += chunk.shape[0]
        blocks = []
        while (end := self._window_end(self._next_block)) <= self._received:
            blocks.append(self._compute_block(self._next_block, end))
        self._drop_old_samples()
        return blocks

    def finish(self) -> list[torch.Tensor]:
        """The remaining blocks; frames whose 30 Hz index is past the end of the audio are zeros."""
        if self.total_samples is not None and self._received != self.total_samples:
            raise ValueError(f"the stream was announced as {self.total_samples} samples but {self._received} "
                             f"were pushed")
        self._finished = True
        if self._received < self.extractor.receptive_field:
            return []
        frames_30 = self._frame_counts(self._received)[1]
        blocks = []
        while self._positions(self._next_block)[0][0] < frames_30:
            blocks.append(self._compute_block(self._next_block, self._received, frames_30=frames_30))
        return blocks

    def block_audio_end(self, block: int) -> int:
        """Samples up to the last frame of ``block`` (its window without the lookahead)."""
        return self._window_end(block) - self.lookahead_samples

    def next_block_padded(self) -> torch.Tensor:
        """The next block now, with zeros for whatever of its window has not arrived (a live source whose
        audio is late must make it by its deadline). The zeros are not kept: later pushes continue where the
        audio really is, so no silence is put inside the speech."""
        end = self._window_end(self._next_block)
        kept = self._buffer
        self._buffer = np.concatenate([kept, np.zeros(max(0, end - self._received), np.float32)])
        try:
            return self._compute_block(self._next_block, end)
        finally:
            self._buffer = kept

    def silence_from(self, sample: int, block: int) -> None:
        """Zero every buffered sample from absolute index ``sample`` on and make ``block`` the next block to
        compute (barge-in: blocks already computed from the dropped speech are made again from silence)."""
        self._buffer[max(0, sample - self._buffer_start):] = 0
        self._next_block = min(self._next_block, block)

    def _frame_counts(self, samples: int) -> tuple[int, int]:
        """(50 Hz wav2vec2 frames, 30 Hz frames) of `samples` samples, as the whole-file path counts them."""
        frames_50 = (samples - self.extractor.receptive_field) // self.extractor.hop + 1
        return frames_50, int(frames_50 / float(FEATURE_RATE) * self.video_rate)

    def _positions(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """30 Hz indices of the block's video frames and their 50 Hz positions."""
        indices = video_frame_indices(block * self.frames_per_block, self.frames_per_block,
                                      fps=self.fps, video_rate=self.video_rate)
        return indices, indices * self._position_scale

    def _window_end(self, block: int) -> int:
        last_frame = int(math.ceil(self._positions(block)[1][-1]))
        return last_frame * self.extractor.hop + self.extractor.receptive_field + self.lookahead_samples

    def _compute_block(self, block: int, end: int, *, frames_30: int | None = None) -> torch.Tensor:
        hop = self.extractor.hop
        # A block made again after `silence_from` may reach back past what is kept: its window starts there.
        start = max(max(0, end - self.context_samples) // hop * hop, self._buffer_start)
        window = self._buffer[start - self._buffer_start: end - self._buffer_start]
        hidden = self.extractor.hidden_states(window).float()
        first_frame = start // hop
        indices, positions = self._positions(block)
        lower = np.floor(positions).astype(np.int64)
        weight = torch.tensor(positions - lower, dtype=torch.float32, device=hidden.device)[None, :, None]
        last = first_frame + hidden.shape[1] - 1
        lower_rows = torch.from_numpy(np.clip(lower, first_frame, last) - first_frame).to(hidden.device)
        upper_rows = torch.from_numpy(np.clip(lower + 1, first_frame, last) - first_frame).to(hidden.device)
        features = hidden[:, lower_rows] * (1 - weight) + hidden[:, upper_rows] * weight
        if frames_30 is not None:
            features[:, torch.from_numpy(indices >= frames_30).to(hidden.device)] = 0
        self._next_block = block + 1
        return features.permute(0, 2, 1).unsqueeze(0).cpu()

    def _drop_old_samples(self) -> None:
        """Keep only what the next window can reach back to. That window ends after what has been received
        (or exactly there, in finish()), so it starts no earlier than `received - context`."""
        hop = self.extractor.hop
        keep_from = max(0, self._received - self.context_samples) // hop * hop
        if keep_from > self._buffer_start:
            self._buffer = self._buffer[keep_from - self._buffer_start:]
            self._buffer_start = keep_from


def save_tiny_wav2vec2(out_dir: str | os.PathLike, *, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a tiny `Wav2Vec2ForCTC` + processor folder with the XLSR-53 structure (24 stable-layer-norm layers,
    conv kernels 10,3,3,3,3,2,2 / strides 5,2,2,2,2,2,2) and seeded random weights; the positional-conv weight
    norm is stored as legacy `weight_g`/`weight_v`, like the release checkpoint."""
    import json

    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["'"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: 5 + i for i, c in enumerate(letters)}}
    config = Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=24, num_attention_heads=2,
        intermediate_size=2 * hidden_size, conv_dim=[16] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        conv_stride=[5, 2, 2, 2, 2, 2, 2], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, layerdrop=0.0,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config).eval()
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, tensor in model.state_dict().items():
        if ("layer_norm" in key and key.endswith("weight")) or "original0" in key:
            value = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif key.endswith("bias") or tensor.ndim == 1:
            value = 0.05 * torch.randn(tensor.shape, generator=generator)
        else:
            value = torch.randn(tensor.shape, generator=generator) * (tensor[0].numel() ** -0.5)
        key = key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        state_dict[key] = value.contiguous()
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["Wav2Vec2ForCTC"]
    config.save_pretrained(str(out_dir))
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    Wav2Vec2CTCTokenizer(str(out_dir / "vocab.json")).save_pretrained(str(out_dir))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(out_dir))
    return out_dir
