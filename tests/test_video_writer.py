import errno
import os
import signal
import threading
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.io import video_writer
from liveavatar.io.video_writer import BackgroundWriter, Mp4Writer, check_output_path, pixels_to_uint8

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
        (temporary,) = tmp_path.glob(".v.*.partial.mp4")
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
    assert not out.exists() and not list(tmp_path.glob(".video*"))
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
    assert len(list(tmp_path.glob(".v.*.partial.mp4"))) == 1

    def disk_full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_finish", disk_full)
    with pytest.raises(OSError):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def _write_video(out, frames, **options):
    with Mp4Writer(out, width=WIDTH, height=HEIGHT, **options) as writer:
        writer.write(_frames(frames))
    return writer.path


def test_two_runs_writing_the_same_name_share_no_file_and_replace_nothing(tmp_path):
    out = tmp_path / "same.mp4"
    started = threading.Barrier(2)
    results = {}

    def run(frames):
        writer = Mp4Writer(out, width=WIDTH, height=HEIGHT)
        started.wait()  # both have begun before either finishes: the output name was free for both
        writer.write(_frames(frames, seed=frames))
        try:
            results[frames] = writer.close()
        except LiveAvatarError as error:
            results[frames] = error

    threads = [threading.Thread(target=run, args=(frames,)) for frames in (10, 20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (winner,) = [frames for frames, result in results.items() if result == out]
    (loser,) = [frames for frames in results if frames != winner]
    message = str(results[loser])
    assert message.startswith(f"{out}: another run wrote this file meanwhile") and "\n" not in message
    kept = Path(message.split("this run's video is saved as ")[1])
    assert kept.parent == tmp_path and kept.name.startswith("same.") and kept.suffix == ".mp4"
    assert _probe(out)[0] == winner and _probe(kept)[0] == loser  # each run's video, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["same.mp4", kept.name])


def test_temporary_names_are_unique_per_run(tmp_path):
    first = Mp4Writer(tmp_path / "v.mp4", width=WIDTH, height=HEIGHT)
    second = Mp4Writer(tmp_path / "v.mp4", width=WIDTH, height=HEIGHT)
    assert len(list(tmp_path.glob(".v.*.partial.mp4"))) == 2
    first.abort()
    second.abort()
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    out = _write_video(tmp_path / "v.mp4", 5)
    with pytest.raises(InputError) as error:
        Mp4Writer(out, width=WIDTH, height=HEIGHT)
    assert str(error.value).startswith(f"{out}: already exists;") and "--overwrite" in str(error.value)
    assert _probe(out)[0] == 5
    assert _write_video(out, 8, overwrite=True) == out and _probe(out)[0] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_without_hard_links_the_final_name_is_still_never_replaced(tmp_path, monkeypatch):
    def no_hard_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    out = tmp_path / "v.mp4"
    late = Mp4Writer(out, width=WIDTH, height=HEIGHT)
    late.write(_frames(6))
    assert _write_video(out, 4) == out
    with pytest.raises(LiveAvatarError, match="another run wrote this file meanwhile"):
        late.close()
    assert _probe(out)[0] == 4 and len(list(tmp_path.glob("v.*.mp4"))) == 1
    assert not list(tmp_path.glob(".*"))


def test_write_errors_name_the_output_not_the_hidden_file(tmp_path):
    resource = pytest.importorskip("resource")
    out = tmp_path / "v.mp4"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then fails writes with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # like a disk that is full after 20 kB
    try:
        with pytest.raises(LiveAvatarError) as error:
            with Mp4Writer(out, width=WIDTH, height=HEIGHT) as writer:
                writer.write(np.random.default_rng(0).integers(0, 256, (60, HEIGHT, WIDTH, 3), dtype=np.uint8))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    message = str(error.value)
    assert message.startswith(f"{out}: writing the video failed (File too large)") and "partial" not in message
    assert list(tmp_path.iterdir()) == []


def test_output_checks_name_the_folder_and_create_nothing(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder.mp4").mkdir()
    assert check_output_path(tmp_path / "new" / "deeper" / "v.mp4") == tmp_path / "new" / "deeper" / "v.mp4"
    cases = {tmp_path / "a_file" / "v.mp4": f"{tmp_path / 'a_file'}: cannot be created, {tmp_path / 'a_file'} is a file",
             tmp_path / "v.avi": "the output is an mp4", tmp_path / "folder.mp4": "is a folder"}
    for path, words in cases.items():
        with pytest.raises(InputError, match=words):
            check_output_path(path)

    def read_only(dir):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(video_writer.tempfile, "TemporaryFile", read_only)
    with pytest.raises(InputError) as error:
        check_output_path(tmp_path / "out" / "v.mp4")
    assert str(error.value) == (f"{tmp_path / 'out'}: cannot write the output there (Read-only file system); "
                                f"choose another output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder.mp4"]


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
