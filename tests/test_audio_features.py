import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from liveavatar.errors import CheckpointError, InputError
from liveavatar.io.media import load_audio
from liveavatar.models.audio_features import (AudioFeatureExtractor, StreamingAudioFeatures, bucket_video_frames,
                                              resample_to_video_rate, save_tiny_wav2vec2, video_frame_indices,
                                              video_rate_features)
from liveavatar.testing.parity import Fixture, run_fixture

# Streamed-vs-whole-file error as a fraction of the features' variation over time, for the fixture's
# wav2vec2 on 8 s of cyclops_baker with 5 s context and 1 s lookahead: measured 0.217.
BOUND_VS_VARIATION = 0.3


@pytest.fixture(scope="module")
def extractor(fixtures_dir) -> AudioFeatureExtractor:
    return AudioFeatureExtractor.from_pretrained(fixtures_dir / "weights" / "wav2vec2", device="cpu",
                                                 dtype=torch.float32)


@pytest.fixture(scope="module")
def speech(media_dir) -> np.ndarray:
    """12 s of real speech at 16 kHz (24 kHz float WAV resampled by the media loader)."""
    return load_audio(media_dir / "cyclops_baker.wav")[: 12 * 16000]


def test_fixture_d_audio_through_runner(fixtures_dir):
    results = [r for r in run_fixture(Fixture(fixtures_dir / "D_encoders.json")) if r.name.startswith("audio")]
    names = {r.name for r in results}
    assert {"audio.debug.hidden_states", "audio.out.audio_emb", "audio.dit.merged_audio_emb_block0"} <= names
    failed = [f"{r.name}: max_abs {r.max_abs:.2e} {r.note}" for r in results if not r.passed]
    assert not failed, failed


def _bucket_as_specified(features: torch.Tensor, infer_frames: int, fps: int, rate: int):
    """The reference's bucketing (`get_audio_embed_bucket_fps` in wan_2_2/modules/s2v/audio_encoder.py, m=0)
    written out frame by frame: whole clips, frame k takes index round(k*30/25), zeros past the end."""
    length = features.shape[1]
    clips = int(length / (infer_frames * rate / fps)) + 1
    frames = []
    for k in range(infer_frames * clips):
        index = int(np.round(k / fps * rate))
        frames.append(features[:, index] if index < length else torch.zeros_like(features[:, 0]))
    return torch.stack(frames, dim=-1)[None], clips


@pytest.mark.parametrize("infer_frames", [12, 48, 60])
def test_bucketing_matches_the_spec_for_every_length(infer_frames):
    generator = torch.Generator().manual_seed(infer_frames)
    for length in list(range(1, 130)) + [575, 576, 577]:
        features = torch.randn(3, length, 5, generator=generator)
        got, clips = bucket_video_frames(features, infer_frames=infer_frames, fps=25, video_rate=30)
        want, want_clips = _bucket_as_specified(features, infer_frames, 25, 30)
        assert clips == want_clips, length
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert list(video_frame_indices(0, 20, fps=25)) == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18,
                                                         19, 20, 22, 23]


def test_resampling_is_align_corners_linear():
    hidden = torch.linspace(0, 1, 101)[None, :, None] * torch.tensor([[[1.0, -2.0, 3.0]], [[0.5, 4.0, -1.0]]])
    resampled = resample_to_video_rate(hidden)
    assert resampled.shape == (2, int(101 / 50 * 30), 3)
    # align_corners keeps both ends; in between, a linear ramp stays linear.
    torch.testing.assert_close(resampled[:, 0], hidden[:, 0])
    torch.testing.assert_close(resampled[:, -1], hidden[:, -1])
    step = resampled.diff(dim=1)
    torch.testing.assert_close(step, step[:, :1].expand_as(step))


def test_real_speech_shapes_and_zeros_past_the_end(extractor, speech):
    hidden = extractor.hidden_states(speech)
    t50 = (len(speech) - extractor.receptive_field) // extractor.hop + 1
    assert hidden.shape == (25, t50, extractor.hidden_size) and torch.isfinite(hidden).all()
    audio_emb, clips = video_rate_features(hidden, infer_frames=48, fps=25)
    t30 = int(t50 / 50 * 30)
    assert clips == int(t30 / (48 * 1.2)) + 1
    assert audio_emb.shape == (1, 25, extractor.hidden_size, 48 * clips) and audio_emb.dtype == torch.float32
    real = video_frame_indices(0, 48 * clips, fps=25) < t30
    frame_norms = audio_emb.abs().sum(dim=(0, 1, 2))
    assert (frame_norms[torch.from_numpy(real)] > 0).all() and (frame_norms[torch.from_numpy(~real)] == 0).all()


def test_too_short_or_stereo_audio_is_refused(extractor):
    with pytest.raises(InputError, match="too short"):
        extractor.hidden_states(np.zeros(300, dtype=np.float32))
    with pytest.raises(InputError, match="mono"):
        extractor.hidden_states(np.zeros((2, 16000), dtype=np.float32))


def _stream(extractor, waveform, chunk, **kwargs):
    streamer = StreamingAudioFeatures(extractor, **kwargs)
    blocks, longest_buffer = [], 0
    for start in range(0, len(waveform), chunk):
        blocks += streamer.push(waveform[start:start + chunk])
        longest_buffer = max(longest_buffer, streamer.buffered_samples)
    blocks += streamer.finish()
    return torch.cat(blocks, dim=-1), longest_buffer


def test_streaming_is_independent_of_chunking_and_bounded(extractor, speech):
    waveform = speech[: 5 * 16000]
    kwargs = dict(frames_per_block=12, fps=25, context_seconds=1.5, lookahead_seconds=0.25)
    small, longest = _stream(extractor, waveform, 1000, **kwargs)
    large, _ = _stream(extractor, waveform, 7777, **kwargs)
    torch.testing.assert_close(small, large, rtol=0, atol=0)
    # Between calls the buffer holds one window's context, however long the audio.
    assert longest <= 1.5 * 16000 + extractor.hop
    # finish() stops at the block that holds the last frame of the audio.
    t30 = int(((len(waveform) - extractor.receptive_field) // extractor.hop + 1) / 50 * 30)
    frames = small.shape[-1]
    assert frames % 12 == 0
    assert video_frame_indices(frames - 12, 1, fps=25)[0] < t30 <= video_frame_indices(frames, 1, fps=25)[0]
    beyond = torch.from_numpy(video_frame_indices(0, frames, fps=25) >= t30)
    assert (small[..., beyond] == 0).all() and (small[..., ~beyond].abs().sum(dim=(0, 1, 2)) > 0).all()


class FramewiseFeatures:
    """A stand-in for wav2vec2 whose 50 Hz frame t depends only on its own 400 samples, so that streaming
    windows cannot change it: what remains is the streaming bookkeeping (positions, interpolation, zeros)."""

    hop, receptive_field, num_layers, hidden_size = 320, 400, 24, 6

    def __init__(self):
        self.projection = torch.randn(25, 400, 6, generator=torch.Generator().manual_seed(0)) / 20

    def hidden_states(self, waveform):
        frames = (len(waveform) - 400) // 320 + 1
        windows = np.lib.stride_tricks.sliding_window_view(waveform, 400)[::320][:frames]
        return torch.einsum("tk,lkc->ltc", torch.from_numpy(np.ascontiguousarray(windows)), self.projection)


@pytest.mark.parametrize("seconds", [2.3, 6.71])
def test_streaming_with_known_length_reproduces_the_whole_file_bookkeeping(speech, seconds):
    extractor = FramewiseFeatures()
    waveform = speech[: int(seconds * 16000)]
    whole, _ = video_rate_features(extractor.hidden_states(waveform), infer_frames=48, fps=25)
    kwargs = dict(context_seconds=1.0, lookahead_seconds=0.0)
    known, _ = _stream(extractor, waveform, 2500, total_samples=len(waveform), **kwargs)
    torch.testing.assert_close(known, whole[..., : known.shape[-1]], rtol=1e-4, atol=1e-4)
    # Without the length (live input) the positions are the nominal 50/30: equal at the first frame only.
    live, _ = _stream(extractor, waveform, 2500, **kwargs)
    torch.testing.assert_close(live[..., 0], whole[..., 0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(live, known, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="announced"):
        _stream(extractor, waveform[:-1], 2500, total_samples=len(waveform), **kwargs)


def test_streaming_deviation_from_the_whole_file_is_bounded(extractor, speech):
    """With the real model only the window (attention context, per-window normalisation) separates the
    streamed features from the whole-file ones; the size of that effect is in StreamingAudioFeatures'
    docstring. Here: error relative to the features' variation over time, for the fixture's wav2vec2."""
    waveform = speech[: 8 * 16000]
    whole, _ = video_rate_features(extractor.hidden_states(waveform), infer_frames=48, fps=25)
    streamed, _ = _stream(extractor, waveform, 3200, context_seconds=5.0, lookahead_seconds=1.0,
                          total_samples=len(waveform))
    whole = whole[..., : streamed.shape[-1]]
    variation = (whole - whole.mean(dim=-1, keepdim=True)).norm()
    error = ((streamed - whole).norm() / variation).item()
    shifted = torch.cat([whole[..., :1], whole[..., :-1]], dim=-1)  # one video frame late
    assert error < BOUND_VS_VARIATION, error
    assert error < 0.5 * ((shifted - whole).norm() / variation).item()


def test_tiny_wav2vec2_loads_its_legacy_weight_norm(tmp_path):
    folder = save_tiny_wav2vec2(tmp_path / "w2v", seed=5, hidden_size=24)
    stored = load_file(str(folder / "model.safetensors"))
    prefix = "wav2vec2.encoder.pos_conv_embed.conv."
    assert {prefix + "weight_g", prefix + "weight_v"} <= set(stored)
    loaded = AudioFeatureExtractor.from_pretrained(folder, device="cpu", dtype=torch.float32)
    g, v = stored[prefix + "weight_g"], stored[prefix + "weight_v"]
    expected = g * v / v.norm(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(loaded.model.wav2vec2.encoder.pos_conv_embed.conv.weight, expected)
    from transformers import Wav2Vec2Processor

    Wav2Vec2Processor.from_pretrained(str(folder))  # the folder is a complete processor
    hidden = loaded.hidden_states(np.random.default_rng(0).standard_normal(8000).astype(np.float32))
    assert hidden.shape == (25, (8000 - 400) // 320 + 1, 24)


def test_bad_wav2vec2_folders_give_one_clear_error(tmp_path):
    folder = save_tiny_wav2vec2(tmp_path / "w2v")
    weights = folder / "model.safetensors"
    payload = weights.read_bytes()
    weights.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        AudioFeatureExtractor.from_pretrained(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(CheckpointError, match="no config.json"):
        AudioFeatureExtractor.from_pretrained(tmp_path / "absent")


def test_missing_weights_are_refused_not_randomly_initialised(tmp_path):
    from safetensors.torch import save_file

    folder = save_tiny_wav2vec2(tmp_path / "w2v")
    weights = folder / "model.safetensors"
    stored = load_file(str(weights))
    save_file({k: v for k, v in stored.items() if "layers.3.attention" not in k}, str(weights),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks"):
        AudioFeatureExtractor.from_pretrained(folder)
