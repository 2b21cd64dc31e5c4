"""Incremental H.264/AAC mp4 output: frames are encoded as they arrive, the audio track is decoded and
muxed alongside them, so memory stays constant however long the video runs.

The file is written under a hidden temporary name in the target folder, unique to the run
(``.name.<random>.partial.mp4``, created exclusively), and given its final name only by a successful
``close()``. On an error or Ctrl-C nothing with the final name is left; with ``keep_partial`` the frames
written so far are kept as a valid ``name.partial.mp4``. An existing output is refused unless
``overwrite``; without it the final name is taken with a hard link, which fails instead of replacing a file
another run wrote meanwhile (that run's video stays, this one's is kept under ``name.<random>.mp4``).
Write errors (a full disk, a vanished folder) name the output, never the hidden file.
Like the reference's ``ffmpeg -shortest`` mux, the result ends with the shorter of the two streams.
"""
from __future__ import annotations

import errno
import os
import queue
import secrets
import tempfile
import threading
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np

from liveavatar.errors import InputError, LiveAvatarError

_AAC_FRAME = 1024
_AAC_RATES = {7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: not an .mp4 name, a folder, an existing
    file (unless ``overwrite``), or a folder that cannot be created or written to. Creates nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name ending in .mp4")
    if path.suffix.lower() != ".mp4":
        raise InputError(f"{path}: the output is an mp4; give a name ending in .mp4")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists; choose another name, or pass --overwrite "
                         f"(overwrite=True in Python) to replace it")
    folder = path.parent.absolute()
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        raise InputError(f"{folder}: cannot be created, {existing} is a file; choose another output folder")
    try:
        # A real file, because permission bits do not show read-only mounts, ACLs or quotas.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"{folder}: cannot write the output there ({_reason(error)}); "
                         f"choose another output folder") from None
    return path


def uint8_frames(video):
    """Decoded video in [-1, 1], a tensor [3, T, H, W] or [1, 3, T, H, W] -> uint8 [T, H, W, 3] on its own
    device, the way the reference saves it: clamp, (x + 1) / 2 * 255, truncated (not rounded)."""
    if video.dim() == 5:
        video = video[0]
    pixels = ((video.detach().float().clamp(-1, 1) + 1) / 2 * 255).byte()
    return pixels.permute(1, 2, 3, 0).contiguous()


def pixels_to_uint8(video) -> np.ndarray:
    """`uint8_frames` as a host array."""
    return uint8_frames(video).cpu().numpy()


class _AudioTrack:
    """The first audio stream of a file, decoded on demand and resampled into a FIFO of AAC-ready frames."""

    def __init__(self, path: Path):
        import av  # PyAV is needed only where files are written (GPU benchmarks run without it)

        try:
            self._container = av.open(str(path))
        except (av.FFmpegError, EOFError, OSError) as error:
            raise InputError(f"--audio {path}: cannot be opened for muxing ({error})") from None
        if not self._container.streams.audio:
            self._container.close()
            raise InputError(f"--audio {path}: has no audio track")
        stream = self._container.streams.audio[0]
        self.rate = stream.sample_rate if stream.sample_rate in _AAC_RATES else 48_000
        self.layout = "mono" if stream.channels == 1 else "stereo"
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        self._fifo = av.AudioFifo()
        self._frames = self._container.decode(stream)
        self.finished = False
        self.samples_read = 0  # samples pushed into the FIFO since the start of the file

    def fill(self, total_samples: int) -> None:
        """Decode until ``total_samples`` have been read from the start of the file or it ends."""
        while not self.finished and self.samples_read < total_samples:
            try:
                frames = self._resampler.resample(next(self._frames))
            except StopIteration:
                frames = self._resampler.resample(None)
                self.finished = True
                self._container.close()
            for frame in frames:
                frame.pts = None  # the FIFO insists on contiguous pts; we stamp the output frames ourselves
                self._fifo.write(frame)
                self.samples_read += frame.samples

    def read(self, samples: int) -> "av.AudioFrame | None":
        return self._fifo.read(samples, partial=True) if self._fifo.samples else None

    def close(self) -> None:
        if not self.finished:
            self._container.close()


class _ClosedOnExit:
    """``with``: leaving the block normally calls ``close()``, leaving it with an exception ``abort()``."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Mp4Writer(_ClosedOnExit):
    """``with Mp4Writer(path, width=W, height=H, audio_path=wav) as out: out.write(frames)``.

    ``write`` takes uint8 frames [N, H, W, 3] (or one [H, W, 3]); leaving the block normally calls
    ``close()`` (finish, mux, rename); leaving it with an exception calls ``abort()``."""

    def __init__(self, path: str | os.PathLike, *, width: int, height: int, fps: int = 25,
                 audio_path: str | os.PathLike | None = None, keep_partial: bool = False,
                 overwrite: bool = False, crf: int = 10, preset: str = "medium"):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"video size {width}x{height}: H.264 yuv420p needs positive even dimensions")
        self.path = check_output_path(path, overwrite=overwrite)
        self.width, self.height, self.fps = width, height, fps
        self.keep_partial = keep_partial
        self.overwrite = overwrite
        self.frames_written = 0
        self.frames_dropped = 0  # frames past the end of the audio (the -shortest rule)
        import av

        self._video_frame = av.VideoFrame
        self._audio = _AudioTrack(Path(audio_path).expanduser()) if audio_path is not None else None
        self._audio_encoded = 0
        self._closed = False
        try:
            with self._naming_the_output():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._run_id, self._temporary = _create_temporary(self.path)
                try:
                    self._container = av.open(str(self._temporary), "w", format="mp4")
                except BaseException:
                    self._temporary.unlink()
                    raise
        except BaseException:
            if self._audio is not None:
                self._audio.close()
            raise
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.options = {"crf": str(crf), "preset": preset}
        if self._audio is not None:
            self._audio_stream = self._container.add_stream("aac", rate=self._audio.rate, layout=self._audio.layout)
            self._audio_stream.bit_rate = 192_000

    @property
    def partial_path(self) -> Path:
        """Where ``keep_partial`` leaves the frames written so far after a failure."""
        return self.path.with_name(f"{self.path.stem}.partial.mp4")

    def write(self, frames) -> None:
        if self._closed:
            raise LiveAvatarError(f"{self.path}: write() after the writer was closed")
        if hasattr(frames, "detach"):
            frames = frames.detach().cpu().numpy()
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be uint8 [N, {self.height}, {self.width}, 3], "
                             f"got {frames.dtype} {list(frames.shape)}")
        for pixels in frames:
            if self._audio is not None and self._past_audio_end(self.frames_written):
                self.frames_dropped += 1
                continue
            frame = self._video_frame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts, frame.time_base = self.frames_written, Fraction(1, self.fps)
            with self._naming_the_output():
                self._container.mux(self._video.encode(frame))
            self.frames_written += 1
            if self._audio is not None:
                self._mux_audio(self._video_end_sample(), whole_frames_only=True)

    def close(self) -> Path:
        """Flush the encoders, mux the rest of the audio (cut at the video's end) and give the file its name."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self._discard()
            raise LiveAvatarError(f"{self.path}: no video frames were written")
        try:
            self._finish()
            saved = self._publish(self.path)
        except BaseException:
            self._discard()
            raise
        if saved != self.path:
            raise LiveAvatarError(f"{self.path}: another run wrote this file meanwhile and it was left as it is; "
                                  f"this run's video is saved as {saved}")
        return self.path

    def abort(self) -> Path | None:
        """Stop after a failure: delete the temporary file, or keep what was written as ``partial_path``
        (returned; a unique name beside it if another run's partial file is there)."""
        if self._closed:
            return None
        if self.keep_partial and self.frames_written:
            try:
                self._finish()
                return self._publish(self.partial_path)
            except Exception:
                pass  # could not finish a valid file: fall through and delete it
        self._discard()
        return None

    def _publish(self, target: Path) -> Path:
        """Give the finished temporary file the name ``target`` and return where it ended up: ``target``,
        or, when another run created ``target`` meanwhile (and ``overwrite`` is off), a unique name beside it."""
        with self._naming_the_output():
            if self.overwrite:
                os.replace(self._temporary, target)
                return target
            try:
                _claim(self._temporary, target)
            except FileExistsError:
                target = target.with_name(f"{target.stem}.{self._run_id}{target.suffix}")
                os.replace(self._temporary, target)
            return target

    @contextmanager
    def _naming_the_output(self):
        """Errors of the hidden temporary file are errors of the output the user asked for."""
        import av

        try:
            yield
        except (OSError, av.FFmpegError) as error:
            raise LiveAvatarError(f"{self.path}: writing the video failed ({_reason(error)}); check the free "
                                  f"space and permissions of {self.path.parent}") from error

    def _discard(self) -> None:
        self._closed = True
        try:
            self._container.close()
        except Exception:
            pass  # a half-written container may refuse to finalise; it is deleted anyway
        if self._audio is not None:
            self._audio.close()
        self._temporary.unlink(missing_ok=True)

    def _finish(self) -> None:
        with self._naming_the_output():
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._mux_audio(self._video_end_sample(), whole_frames_only=False)
                self._container.mux(self._audio_stream.encode(None))
                self._audio.close()
            self._container.close()
        self._closed = True

    def _video_end_sample(self) -> int:
        return self.frames_written * self._audio.rate // self.fps

    def _past_audio_end(self, frame_index: int) -> bool:
        start = frame_index * self._audio.rate // self.fps
        self._audio.fill(start + 1)
        return self._audio.finished and self._audio.samples_read <= start

    def _mux_audio(self, until_sample: int, *, whole_frames_only: bool) -> None:
        while self._audio_encoded < until_sample:
            wanted = min(_AAC_FRAME, until_sample - self._audio_encoded)
            if whole_frames_only and wanted < _AAC_FRAME:
                return
            self._audio.fill(self._audio_encoded + wanted)
            frame = self._audio.read(wanted)
            if frame is None:
                return
            frame.pts, frame.time_base = self._audio_encoded, Fraction(1, self._audio.rate)
            with self._naming_the_output():
                self._container.mux(self._audio_stream.encode(frame))
            self._audio_encoded += frame.samples


def _create_temporary(path: Path) -> tuple[str, Path]:
    """(run id, a new empty hidden file beside ``path`` named with it). Created exclusively, so no other
    run can write to the same temporary file, whatever the timing."""
    while True:
        run_id = secrets.token_hex(4)
        candidate = path.with_name(f".{path.stem}.{run_id}.partial.mp4")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return run_id, candidate
        except FileExistsError:
            continue


# link() is refused by file systems without hard links (FAT/exFAT drives, some network shares).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def _claim(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` unless ``target`` exists (FileExistsError): never replaces a file."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        # Without hard links: take the name with an exclusive create, then move onto our own placeholder.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(source, target)
    else:
        source.unlink()


def _reason(error: OSError | av.FFmpegError) -> str:
    """The error without the file name, which would be the hidden temporary one."""
    return getattr(error, "strerror", None) or str(error)


class BackgroundWriter(_ClosedOnExit):
    """A writer's ``write`` on its own thread, so that encoding overlaps the generation.

    ``write`` queues (waiting while ``depth`` batches are queued); an encoding error comes out of the
    next ``write`` or of ``close``; ``close`` and ``abort`` finish the queue and then close or abort the
    wrapped writer (``with`` works as for `Mp4Writer`). The batches must not be changed after ``write``.
    """

    def __init__(self, writer: Mp4Writer, *, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="liveavatar-mp4-writer", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        return self.writer.path

    def _work(self) -> None:
        while (frames := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(frames)
                except BaseException as error:  # handed to the caller's thread
                    self._error = error

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def write(self, frames) -> None:
        self._check()
        self._queue.put(frames)

    def _drain(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> Path:
        self._drain()
        self._check()
        return self.writer.close()

    def abort(self) -> Path | None:
        self._drain()
        self._error = None
        return self.writer.abort()
