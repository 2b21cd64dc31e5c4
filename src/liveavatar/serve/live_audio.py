"""Audio pushed by a live client, turned into the sampling loop's per-block features on one audio clock.

It is the request's live audio source (a `liveavatar.request.LiveSource`): the session's pacing, silence
and barge-in rules live here, with the server, while the engine's plain `LiveAudio` serves API users who
push samples without a playback clock. The WebSocket side calls `push`, `end`, `interrupt` and `close` from its thread;
the engine thread's loop calls `block` (the loop's ``BlockAudio``) and the session calls `take_output`
for the audio that goes out with each block's frames.

The audio clock counts the samples fed to the feature streamer (`StreamingAudioFeatures`, the same one
``generate`` uses for long audio, so a session fed a whole file matches ``generate`` in its streamed-audio
mode). They are the client's samples, plus silence wherever the client's audio ran dry in real-time
mode; output frame i plays at clock time i/25 s, as in ``generate``'s mp4. Samples are fed in 10 ms
pieces only when the next block needs them, so queued audio stays droppable until the last moment.

Real-time mode paces the loop to the client's playback, which starts when the first block is sent:
block b plays at ``start + PLAYOUT_DELAY_S + (12b - 3) / 25`` s. Its computation starts no earlier than
``max_lead_blocks`` blocks before that (the avatar never runs far ahead of the audio, so a barge-in is
heard at once), and if its audio has not arrived by the time it must start to be ready in time, the
missing samples become silence: the avatar keeps moving, idle, instead of freezing. Without real-time
mode the loop waits for audio as long as it takes (batch use, exact comparisons).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from liveavatar.geometry import AUDIO_SAMPLE_RATE, DROPPED_LEADING_FRAMES, FPS, ClipGeometry
from liveavatar.models.audio_features import StreamingAudioFeatures

SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // FPS
PIECE = AUDIO_SAMPLE_RATE // 100  # fed to the feature streamer at a time: a block pops at most 10 ms late
SAFETY_S = 0.05  # margin kept between a block being sent and its playback time
FIRST_BLOCK_GRACE_S = 0.5  # how much longer than a real-time source needs the first block waits for audio
# Clients start playing this long after the first block arrives (announced in 'ready'): the jitter
# buffer that lets a block whose audio came just in time still be made before it plays.
PLAYOUT_DELAY_S = 0.3


class SessionClosed(Exception):
    """The session was closed (client gone, server stopping) while the loop waited for audio."""


@dataclass
class _Speech:
    """Client samples ``input_start..+length`` placed on the clock at ``clock_start``, received at ``arrival``."""

    clock_start: int
    input_start: int
    length: int
    arrival: float


@dataclass(frozen=True)
class OutputAudio:
    """The audio of one block's frames, with where it came from (for the latency fields)."""

    samples: np.ndarray  # float32, SAMPLES_PER_FRAME per frame
    clock_start: int
    input_range: tuple[int, int] | None  # client samples this block carries; None: only silence
    first_arrival: float | None  # when the first of them arrived


class PushedAudio:
    def __init__(self, extractor, geometry: ClipGeometry, *, realtime: bool, lookahead_s: float = 1.0,
                 max_lead_blocks: float = 2.0, max_queued_s: float = 60.0, clock=time.monotonic,
                 on_ready=lambda: None):
        self.streamer = StreamingAudioFeatures(extractor, frames_per_block=geometry.frames_per_block, fps=FPS,
                                               lookahead_seconds=lookahead_s)
        self.feature_shape = (extractor.num_layers + 1, extractor.hidden_size)
        self.frames_per_block = geometry.frames_per_block
        self.realtime = realtime
        self.lead_s = max_lead_blocks * geometry.frames_per_block / FPS
        self.max_queued = int(max_queued_s * AUDIO_SAMPLE_RATE)
        # A real-time source needs this long to deliver the first block's audio (its window + lookahead).
        self.first_wait_s = (geometry.frames_per_block / FPS + lookahead_s) + FIRST_BLOCK_GRACE_S
        self.now = clock
        self.on_ready = on_ready  # called when the loop first asks for audio: the model is ready to listen
        self._lock = threading.Condition()
        self._queue: deque[tuple[np.ndarray, int, float]] = deque()  # (samples, input offset, arrival)
        self._queued = 0
        self._received = 0  # client samples so far
        self._ended = self._closed = False
        self._cut_pending = False
        # engine thread only
        self._clock = 0  # samples fed to the streamer
        self._audio = np.zeros(0, np.float32)  # clock samples from _audio_start on, not yet sent out
        self._audio_start = 0
        self._speech: list[_Speech] = []
        self._last_speech_end = 0  # clock position after the last client sample
        self._ready: list[torch.Tensor] = []
        self._finished = False
        self.next_block = 0
        self.first_call: float | None = None
        self.playback_start: float | None = None
        self.block_compute_s = 0.0
        self._returned_at = 0.0

    # -------------------------------------------------------------------------------- client side

    def push(self, samples: np.ndarray) -> None:
        """Queue 16 kHz mono float32 samples. Raises ValueError when more than ``max_queued_s`` is waiting."""
        with self._lock:
            if self._ended:
                raise ValueError("audio after 'end': start a new session for new audio")
            if self._queued + len(samples) > self.max_queued:
                raise ValueError(f"more than {self.max_queued / AUDIO_SAMPLE_RATE:.0f} s of audio is waiting to be "
                                 f"spoken; send the audio in real time (or interrupt to drop it)")
            self._queue.append((samples, self._received, self.now()))
            self._queued += len(samples)
            self._received += len(samples)
            self._lock.notify_all()

    def end(self) -> None:
        with self._lock:
            self._ended = True
            self._lock.notify_all()

    def interrupt(self) -> None:
        """Barge-in: drop the queued audio, and silence what was fed ahead for the lookahead (see `_cut`)."""
        with self._lock:
            self._queue.clear()
            self._queued = 0
            self._cut_pending = True
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    @property
    def queued_seconds(self) -> float:
        return self._queued / AUDIO_SAMPLE_RATE

    # -------------------------------------------------------------------------------- engine side

    def block_features(self, extractor, geometry: ClipGeometry) -> "PushedAudio":
        """The loop's per-block features: this object (it made its feature streamer with the engine's
        wav2vec2 when the session started)."""
        if extractor is not self.streamer.extractor or geometry.frames_per_block != self.frames_per_block:
            raise ValueError("the session audio was made for another engine or clip size")
        return self

    def block(self, clip: int, block: int) -> torch.Tensor:
        """Features [1, 25, C, frames_per_block] of the next block, once its audio is there (or due)."""
        if self.first_call is None:
            self.first_call = self.now()
            self.on_ready()
        deadline = self._deadline(self.next_block)
        if self.realtime:
            self._wait(until=deadline - self.lead_s, for_audio=False)
        while not self._ready:
            if self._cut_pending:
                self._cut()
            piece = self._take_piece()
            if piece is not None:
                self._feed(*piece)
            elif self._ended_and_drained():
                if not self._finished:
                    self._finished = True
                    self._ready.extend(self.streamer.finish())
                break
            elif self.realtime and self.now() >= deadline:
                self._feed(np.zeros(PIECE, np.float32), None, None)
            else:
                self._wait(until=deadline if self.realtime else None, for_audio=True)
        self.next_block += 1
        self._returned_at = self.now()
        if self._ready:
            return self._ready.pop(0)
        layers, channels = self.feature_shape
        return torch.zeros(1, layers, channels, self.frames_per_block)  # past the end, as StreamedAudio

    def block_sent(self) -> None:
        """The session sent the block whose features were taken last; starts the playback clock."""
        now = self.now()
        if self.playback_start is None:
            self.playback_start = now
        compute = now - self._returned_at
        self.block_compute_s = compute if self.block_compute_s == 0 else 0.8 * self.block_compute_s + 0.2 * compute

    def take_output(self, start_frame: int, count: int) -> OutputAudio:
        """The clock's samples for output frames ``start_frame..+count`` (zeros past the clock's end)."""
        start, end = start_frame * SAMPLES_PER_FRAME, (start_frame + count) * SAMPLES_PER_FRAME
        samples = np.zeros(end - start, np.float32)
        have = self._audio[max(0, start - self._audio_start):max(0, end - self._audio_start)]
        samples[:len(have)] = have
        self._audio = self._audio[max(0, end - self._audio_start):]
        self._audio_start = max(self._audio_start, end)
        carried = [s for s in self._speech if s.clock_start < end and s.clock_start + s.length > start]
        self._speech = [s for s in self._speech if s.clock_start + s.length > end]
        if not carried:
            return OutputAudio(samples, start, None, None)
        first = carried[0].input_start + max(0, start - carried[0].clock_start)
        last = carried[-1].input_start + min(carried[-1].length, end - carried[-1].clock_start)
        return OutputAudio(samples, start, (first, last), carried[0].arrival)

    def all_sent(self, output_frames: int) -> bool:
        """After `end`: the output has covered every sample of the clock."""
        with self._lock:
            drained = self._ended and not self._queue
        return drained and output_frames * SAMPLES_PER_FRAME >= self._clock

    def silent_seconds(self, output_frames: int) -> float:
        """How long the output has been silence only, up to its end (the session's idle measure)."""
        with self._lock:
            waiting = bool(self._queue)
        silent = output_frames * SAMPLES_PER_FRAME - self._last_speech_end
        return 0.0 if waiting else max(0, silent) / AUDIO_SAMPLE_RATE

    # -------------------------------------------------------------------------------- internals

    def _deadline(self, index: int) -> float:
        """When block ``index`` must start computing to be sent before it plays."""
        if self.playback_start is None:
            return self.first_call + self.first_wait_s
        plays_at = self.playback_start + PLAYOUT_DELAY_S + max(0, index * self.frames_per_block - DROPPED_LEADING_FRAMES) / FPS
        return plays_at - self.block_compute_s - SAFETY_S

    def _wait(self, *, until: float | None, for_audio: bool) -> None:
        with self._lock:
            while not self._closed:
                if for_audio and (self._queue or self._ended or self._cut_pending):
                    return
                remaining = None if until is None else until - self.now()
                if remaining is not None and remaining <= 0:
                    return
                self._lock.wait(remaining)
        raise SessionClosed()

    def _ended_and_drained(self) -> bool:
        with self._lock:
            return self._ended and not self._queue

    def _take_piece(self) -> tuple[np.ndarray, int, float] | None:
        with self._lock:
            if not self._queue:
                return None
            samples, offset, arrival = self._queue[0]
            if len(samples) <= PIECE:
                self._queue.popleft()
            else:
                self._queue[0] = (samples[PIECE:], offset + PIECE, arrival)
                samples = samples[:PIECE]
            self._queued -= len(samples)
            return samples, offset, arrival

    def _feed(self, samples: np.ndarray, input_start: int | None, arrival: float | None) -> None:
        if input_start is not None:
            self._speech.append(_Speech(self._clock, input_start, len(samples), arrival))
            self._last_speech_end = self._clock + len(samples)
        self._audio = np.concatenate([self._audio, samples])
        self._clock += len(samples)
        self._ready.extend(self.streamer.push(samples))

    def _cut(self) -> None:
        """Silence every fed sample the next block and later ones would speak. The streamer has them in its
        window buffer (fed ahead as the previous block's lookahead); they are zeroed in place there and in
        the outgoing audio, so the avatar stops within one block. ``LiveAudio`` should offer this itself."""
        self._cut_pending = False
        cut = self.next_block * self.frames_per_block * SAMPLES_PER_FRAME
        streamer = self.streamer
        streamer._buffer[max(0, cut - streamer._buffer_start):] = 0
        self._audio[max(0, cut - self._audio_start):] = 0
        self._speech = [s for s in self._speech if s.clock_start < cut]
        if self._speech and self._speech[-1].clock_start + self._speech[-1].length > cut:
            self._speech[-1].length = cut - self._speech[-1].clock_start
        self._last_speech_end = min(self._last_speech_end, cut)
        self._ready.clear()
