import wave

import av
import numpy as np
import pytest
import torch

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.io.video_writer import BackgroundWriter, Mp4Writer, pixels_to_uint8

WIDTH, HEIGHT = 128, 64


def _frames(count, seed=0):
    # smooth moving gradients: cheap to encode, unlike noise
    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH]
    shift = np.arange(count)[:, None, None] + seed * 7
    base = (rows[None] + columns[None] + shift) % 256
    return np.stack([base, (base * 2) % 256, 255 - base], axis=-1).astype(np.uint8)


def _wav(path, seconds, rate=24_000):
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((np.sin(2 * np.pi * 300 * t) * 12000).astype("<i2").tobytes())
    return path


def _probe(path):
    """(video frame count, video seconds, audio seconds or None, video codec, pixel format, fps)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        audio = container.streams.audio[0] if container.streams.audio else None
        info = (frames, float(video.duration * video.time_base),
                float(audio.duration * audio.time_base) if audio is not None else None,
                video.codec_context.name, video.codec_context.pix_fmt, video.average_rate)
    if audio is not None:
        with av.open(str(path)) as container:
            assert container.streams.audio[0].codec_context.name == "aac"
    return info


def test_video_with_longer_audio_is_cut_to_the_video(tmp_path):
    audio = _wav(tmp_path / "speech.wav", 3.0)
    out = tmp_path / "out" / "video.mp4"
    with Mp4Writer(out, width=WIDTH, height=HEIGHT, audio_path=audio) as writer:
        for block in range(4):
            writer.write(_frames(12, seed=block))
    frames, video_s, audio_s, codec, pix_fmt, fps = _probe(out)
    assert (frames, codec, pix_fmt, fps) == (48, "h264", "yuv420p", 25)
    assert video_s == pytest.approx(48 / 25) and audio_s == pytest.approx(48 / 25, abs=0.01)
    assert sorted(p.name for p in out.parent.iterdir()) == ["video.mp4"]


def test_video_longer_than_audio_ends_with_the_audio(tmp_path):
    # The reference muxes with -shortest: frames past the end of the audio are not kept.
    audio = _wav(tmp_path / "speech.wav", 1.0)
    out = tmp_path / "video.mp4"
    with Mp4Writer(out, width=WIDTH, height=HEIGHT, audio_path=audio) as writer:
        writer.write(_frames(45))
    frames, video_s, audio_s, *_ = _probe(out)
    assert writer.frames_written == frames == 25 and writer.frames_dropped == 20
    assert audio_s == pytest.approx(1.0, abs=0.01)


def test_example_audio_duration_is_muxed(tmp_path, media_dir):
    out = tmp_path / "v.mp4"
    with Mp4Writer(out, width=WIDTH, height=HEIGHT, audio_path=media_dir / "cyclops_baker.wav") as writer:
        writer.write(_frames(30))
    assert _probe(out)[2] == pytest.approx(30 / 25, abs=0.01)


def test_silent_video(tmp_path):
    out = tmp_path / "silent.mp4"
    with Mp4Writer(out, width=WIDTH, height=HEIGHT) as writer:
        writer.write(_frames(7)[0])  # a single [H, W, 3] frame is accepted too
        writer.write(torch.from_numpy(_frames(6)))
    frames, _, audio_s, *_ = _probe(out)
    assert frames == 7 and audio_s is None


def test_frames_are_encoded_as_they_arrive(tmp_path):
    out = tmp_path / "v.mp4"
    with Mp4Writer(out, width=WIDTH, height=HEIGHT, audio_path=_wav(tmp_path / "a.wav", 20.0)) as writer:
        temporary = tmp_path / ".v.partial.mp4"
        sizes = []
        noise = np.random.default_rng(0)
        for _ in range(16):
            writer.write(noise.integers(0, 256, (12, HEIGHT, WIDTH, 3), dtype=np.uint8))
            sizes.append(temporary.stat().st_size if temporary.exists() else 0)
        assert not out.exists()
    # the file grows while frames are written (in the muxer's buffer-sized steps); nothing waits for close()
    assert sizes[-1] > sizes[8] > 0
    assert _probe(out)[0] == 192


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing(tmp_path, interruption):
    out = tmp_path / "video.mp4"
    with pytest.raises(interruption):
        with Mp4Writer(out, width=WIDTH, height=HEIGHT, audio_path=_wav(tmp_path / "a.wav", 2.0)) as writer:
            writer.write(_frames(12))
            raise interruption()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


def test_keep_partial_leaves_a_valid_shorter_video(tmp_path):
    out = tmp_path / "video.mp4"
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(out, width=WIDTH, height=HEIGHT, audio_path=_wav(tmp_path / "a.wav", 5.0),
                       keep_partial=True) as writer:
            writer.write(_frames(24))
            raise KeyboardInterrupt()
    assert not out.exists() and not (tmp_path / ".video.partial.mp4").exists()
    frames, _, audio_s, *_ = _probe(tmp_path / "video.partial.mp4")
    assert frames == 24 and audio_s == pytest.approx(24 / 25, abs=0.01)


def test_closing_without_frames_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(LiveAvatarError, match="no video frames"):
        with Mp4Writer(tmp_path / "v.mp4", width=WIDTH, height=HEIGHT):
            pass
    assert list(tmp_path.iterdir()) == []


def test_bad_frames_and_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "v.mp4", width=127, height=64)
    with pytest.raises(InputError, match=".mp4"):
        Mp4Writer(tmp_path / "v.mkv", width=128, height=64)
    with pytest.raises(ValueError, match="uint8"):
        with Mp4Writer(tmp_path / "v.mp4", width=WIDTH, height=HEIGHT) as writer:
            writer.write(np.zeros((2, HEIGHT, WIDTH + 2, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_bad_audio_is_reported_before_any_file_is_made(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(InputError, match="notes.wav"):
        Mp4Writer(tmp_path / "out" / "v.mp4", width=WIDTH, height=HEIGHT, audio_path=tmp_path / "notes.wav")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.wav"]


def test_pixels_to_uint8_truncates_like_the_reference():
    # (x + 1) / 2 * 255 then a truncating cast; values outside [-1, 1] are clamped first.
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, 2 * 100.9 / 255 - 1])
    video = values.view(1, 1, 1, 7).expand(3, 1, 1, 7)
    frames = pixels_to_uint8(video[None])
    assert frames.shape == (1, 1, 7, 3) and frames.dtype == np.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255, 100]


def test_a_failing_finish_leaves_nothing(tmp_path, monkeypatch):
    writer = Mp4Writer(tmp_path / "v.mp4", width=WIDTH, height=HEIGHT)
    writer.write(np.random.default_rng(0).integers(0, 256, (60, HEIGHT, WIDTH, 3), dtype=np.uint8))
    assert (tmp_path / ".v.partial.mp4").exists()

    def disk_full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_finish", disk_full)
    with pytest.raises(OSError):
        writer.close()
    assert list(tmp_path.iterdir()) == []


class RecordingWriter:
    """Stands in for `Mp4Writer`: records batches, fails on the batch numbered ``fail_at``."""

    def __init__(self, fail_at=None):
        self.batches, self.fail_at, self.closed, self.aborted = [], fail_at, False, False
        self.path = "out.mp4"

    def write(self, frames):
        if len(self.batches) == self.fail_at:
            raise ValueError("cannot encode this batch")
        self.batches.append(frames)

    def close(self):
        self.closed = True
        return self.path

    def abort(self):
        self.aborted = True


def test_background_writer_writes_in_order_and_hands_errors_back():
    batches = [_frames(2, seed) for seed in range(5)]
    inner = RecordingWriter()
    with BackgroundWriter(inner, depth=1) as writer:
        for batch in batches:
            writer.write(batch)
    assert inner.closed and not inner.aborted
    assert all(a is b for a, b in zip(inner.batches, batches)) and len(inner.batches) == 5

    failing = RecordingWriter(fail_at=1)
    with pytest.raises(ValueError, match="cannot encode"):
        with BackgroundWriter(failing) as writer:
            for batch in batches:
                writer.write(batch)
    assert failing.aborted and not failing.closed and len(failing.batches) == 1


def test_background_mp4_equals_the_in_line_one(tmp_path):
    frames = _frames(30)
    paths = []
    for name, wrap in (("in_line", lambda w: w), ("background", BackgroundWriter)):
        with wrap(Mp4Writer(tmp_path / f"{name}.mp4", width=WIDTH, height=HEIGHT)) as writer:
            for start in range(0, 30, 12):
                writer.write(frames[start:start + 12])
        paths.append(tmp_path / f"{name}.mp4")
    decoded = [[f.to_ndarray(format="rgb24") for f in av.open(str(p)).decode(video=0)] for p in paths]
    assert len(decoded[0]) == len(decoded[1]) == 30
    assert all(np.array_equal(a, b) for a, b in zip(*decoded))
