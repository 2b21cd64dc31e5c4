"""Progress of a generation: the phases before the first frame, then blocks, frames, video frames per
second, ETA and memory.

Phases (checking, loading with the bytes read per second, encoding the prompt, compiling, generating)
are printed as they start and end. During generation a terminal gets one status line rewritten in place
after every block; anything else (a log file, a pipe, CI) a plain line at the first frame, after every
clip and at least every ``LOG_EVERY_S`` seconds. The ETA uses the generating rate measured after the first
frame, so start-up does not inflate it. With ``enabled=False`` (``--quiet``) nothing is printed.
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


LOG_EVERY_S = 10.0


class Progress:
    """`phase(text)` for the steps before generating; then `start()`, `block_done(clip, block)` and
    `frames_done(n)` as the loop goes, `close()` at the end. ``total_blocks`` None: a run that lasts as long
    as its audio (no ETA)."""

    def __init__(self, *, total_blocks: int | None, blocks_per_clip: int, total_frames: int | None, fps: int = 25,
                 device: torch.device | str | None = None, stream: TextIO | None = None, enabled: bool = True):
        self.total_blocks = total_blocks
        self.blocks_per_clip = blocks_per_clip
        self.total_frames = total_frames
        self.fps = fps
        self.cuda_device = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.frames = 0
        self.blocks = 0
        self.clip = self.block = 0
        self.started: float | None = None
        self.first_frame_s: float | None = None
        self.first_frames = 0
        self._logged_at = 0.0
        self._phase: tuple[str, float] | None = None

    def phase(self, text: str) -> None:
        """A step before generating starts (the previous one, if any, is reported done with its time)."""
        self._end_phase()
        self._phase = (text, time.perf_counter())
        if self.enabled:
            self._write(f"{text} ...\n")

    def phase_done(self, detail: str = "") -> None:
        """The current step ended; ``detail`` (e.g. bytes per second) is added to its line."""
        if self._phase is not None and self.enabled:
            text, began = self._phase
            self._write(f"{text}: done in {time.perf_counter() - began:.1f} s{f' ({detail})' if detail else ''}\n")
        self._phase = None

    def _end_phase(self) -> None:
        if self._phase is not None:
            self.phase_done()

    def start(self) -> None:
        self._end_phase()
        self.started = time.perf_counter()
        if self.enabled and not self.interactive:
            self._write("generating ...\n")

    def note(self, text: str) -> None:
        """A line of its own (e.g. that the first block compiles), above the status line."""
        if self.enabled:
            self._write(("\r\x1b[2K" if self.interactive else "") + text + "\n")

    def block_done(self, clip: int, block: int) -> None:
        self.clip, self.block = clip, block
        self.blocks += 1
        if self.interactive:
            self._write("\r\x1b[2K" + self.status())

    def frames_done(self, count: int) -> None:
        if self.first_frame_s is None and count:
            self.first_frame_s = self.elapsed()
            self.first_frames = count
            if self.enabled and not self.interactive:
                self._write(f"first frame after {self.first_frame_s:.1f} s\n")
                self._logged_at = self.elapsed()
        self.frames += count
        if self.enabled and not self.interactive and (
                self.block == self.blocks_per_clip - 1 or self.elapsed() - self._logged_at >= LOG_EVERY_S):
            self._write(self.status() + "\n")
            self._logged_at = self.elapsed()

    def close(self) -> None:
        if self.interactive and self.started is not None:
            self._write("\r\x1b[2K" + self.status() + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started if self.started is not None else 0.0

    def video_fps(self) -> float:
        """The generating rate: frames per second after the first frame (start-up excluded)."""
        if self.first_frame_s is None:
            return 0.0
        span = self.elapsed() - self.first_frame_s
        return (self.frames - self.first_frames) / span if span > 0 else 0.0

    def status(self) -> str:
        fps = self.video_fps()
        parts = [f"clip {self.clip + 1}", f"block {self.blocks}/{self.total_blocks or '?'}"]
        if self.total_frames is not None:
            remaining = self.total_frames - self.frames
            eta = _duration(remaining / fps) if fps > 0 and remaining > 0 else ("0:00" if remaining <= 0 else "?")
            parts += [f"{self.frames}/{self.total_frames} frames", f"{fps:.2f} video fps", f"ETA {eta}"]
        else:
            parts += [f"{self.frames} frames", f"{fps:.2f} video fps"]
        parts.append(f"RSS {_gib(host_rss_bytes())}")
        if self.cuda_device is not None:
            parts.append(f"GPU {_gib(torch.cuda.max_memory_allocated(self.cuda_device))} peak")
        return " | ".join(parts)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
