"""Pacing a live source to its listener's playback: when each block may start and when it must start.

Playback starts when the first block is sent; block b then plays at
``start + PLAYOUT_DELAY_S + (12b - 3) / 25`` s (the first 3 decoded frames are dropped, as in ``generate``).
A block starts computing no earlier than ``lead_blocks`` blocks before it plays, so that the avatar never
runs far ahead of its audio and a barge-in is heard at once, and no later than its deadline: the time it
must start to be sent ``SAFETY_S`` before it plays, at the measured compute time per block. The first
block has no playback clock yet: it waits ``first_wait_s`` (a real-time source's first block of audio, its
lookahead and a grace) for its audio.
"""
from __future__ import annotations

import time

from liveavatar.geometry import DROPPED_LEADING_FRAMES, FPS

SAFETY_S = 0.05  # margin kept between a block being sent and its playback time
FIRST_BLOCK_GRACE_S = 0.5  # how much longer than a real-time source needs the first block waits for audio
# Clients start playing this long after the first block arrives (announced in 'ready'): the jitter buffer
# that lets a block whose audio came just in time still be made before it plays.
PLAYOUT_DELAY_S = 0.3
COMPUTE_SMOOTHING = 0.2  # weight of the newest block in the running compute time


class PlaybackPacer:
    def __init__(self, frames_per_block: int, lookahead_s: float, *, lead_blocks: float = 2.0,
                 clock=time.monotonic):
        self.frames_per_block = frames_per_block
        self.lead_s = lead_blocks * frames_per_block / FPS
        self.first_wait_s = frames_per_block / FPS + lookahead_s + FIRST_BLOCK_GRACE_S
        self.now = clock
        self.first_call: float | None = None
        self.playback_start: float | None = None
        self.block_compute_s = 0.0  # running estimate, input -> sent

    def deadline(self, index: int) -> float:
        """When block ``index`` must start computing to be sent before it plays."""
        if self.first_call is None:
            self.first_call = self.now()
        if self.playback_start is None:
            return self.first_call + self.first_wait_s
        return self.plays_at(index) - self.block_compute_s - SAFETY_S

    def earliest_start(self, index: int) -> float:
        return self.deadline(index) - self.lead_s

    def plays_at(self, index: int) -> float:
        frames = max(0, index * self.frames_per_block - DROPPED_LEADING_FRAMES)
        return self.playback_start + PLAYOUT_DELAY_S + frames / FPS

    def block_sent(self, compute_s: float) -> None:
        """A block went out ``compute_s`` after its features were handed over; starts the playback clock."""
        if self.playback_start is None:
            self.playback_start = self.now()
        self.block_compute_s = compute_s if self.block_compute_s == 0 else \
            (1 - COMPUTE_SMOOTHING) * self.block_compute_s + COMPUTE_SMOOTHING * compute_s
