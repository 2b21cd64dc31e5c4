"""Progress of a generation: clips and blocks done, frames, video frames per second, ETA, memory.

On a terminal one status line is rewritten in place after every block; otherwise (a log file, a pipe, CI)
a plain line is printed when the first frame is out and after every clip. With ``enabled=False`` (``--quiet``)
nothing is printed.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO

import torch


def host_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Call `start()` when denoising begins, `block_done(clip, block)` and `frames_done(n)` as the loop goes,
    `close()` at the end."""

    def __init__(self, *, num_clips: int, blocks_per_clip: int, total_frames: int, fps: int = 25,
                 device: torch.device | str | None = None, stream: TextIO | None = None, enabled: bool = True):
        self.num_clips = num_clips
        self.blocks_per_clip = blocks_per_clip
        self.total_frames = total_frames
        self.fps = fps
        self.cuda_device = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.frames = 0
        self.clip = self.block = 0
        self.started: float | None = None
        self.first_frame_s: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def note(self, text: str) -> None:
        """A line of its own (e.g. that the first block compiles), above the status line."""
        if self.enabled:
            self._write(("\r\x1b[2K" if self.interactive else "") + text + "\n")

    def block_done(self, clip: int, block: int) -> None:
        self.clip, self.block = clip, block
        if self.interactive:
            self._write("\r\x1b[2K" + self.status())

    def frames_done(self, count: int) -> None:
        if self.first_frame_s is None and count:
            self.first_frame_s = self.elapsed()
            if self.enabled and not self.interactive:
                self._write(f"first frame after {self.first_frame_s:.1f} s\n")
        self.frames += count
        if self.enabled and not self.interactive and self.block == self.blocks_per_clip - 1:
            self._write(self.status() + "\n")

    def close(self) -> None:
        if self.interactive:
            self._write("\r\x1b[2K" + self.status() + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started if self.started is not None else 0.0

    def video_fps(self) -> float:
        elapsed = self.elapsed()
        return self.frames / elapsed if elapsed > 0 else 0.0

    def status(self) -> str:
        fps = self.video_fps()
        remaining = self.total_frames - self.frames
        eta = _duration(remaining / fps) if fps > 0 and remaining > 0 else ("0:00" if remaining <= 0 else "?")
        parts = [f"clip {self.clip + 1}/{self.num_clips}", f"block {self.block + 1}/{self.blocks_per_clip}",
                 f"{self.frames}/{self.total_frames} frames", f"{fps:.2f} video fps", f"ETA {eta}",
                 f"RSS {_gib(host_rss_bytes())}"]
        if self.cuda_device is not None:
            parts.append(f"GPU {_gib(torch.cuda.max_memory_allocated(self.cuda_device))} peak")
        return " | ".join(parts)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
