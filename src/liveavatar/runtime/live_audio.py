"""Audio pushed while the video is made: the one live audio source (`liveavatar.LiveAudio`), for the Python
API and for the server's live session alike.

Client side (any thread): `push` 16 kHz mono samples, `end`, `interrupt` (barge-in), `close`. Engine side:
it is the request's audio source; `block_features` builds its feature stream (`StreamingAudioFeatures`,
the one ``generate`` uses for long audio) on the engine's wav2vec2, and `block` hands the loop each block's
features once its audio is there, or None once the audio has ended (or the source was closed), which ends
the run.

Samples are fed to the streamer in 10 ms pieces only when the next block needs them, so queued audio stays
droppable (interrupt, catch-up) until the last moment. With a `PlaybackPacer` (someone plays the output
as it comes: the server's session) blocks are paced to playback, and a block whose audio has not arrived
by its deadline is made from silence: the avatar keeps moving, idle, instead of freezing. Without one the
loop waits for audio as long as it takes (batch use, exact comparisons with ``generate``).

Catch-up: the lag is how far behind real time the queued audio will end: every pushed chunk is due at
``max(its arrival, the end of the audio before it)``, so audio pushed ahead of time (a TTS burst) is not
lag, and ``lag = now + queued - due end of the last queued sample``. With ``lag_bound_s``, whenever the
lag passes the bound, queued silence is skipped first, then the oldest queued speech is dropped, down to
the bound; `on_lag` is told.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import torch

from liveavatar.errors import InputError
from liveavatar.geometry import AUDIO_SAMPLE_RATE, DROPPED_LEADING_FRAMES, FPS, SAMPLES_PER_FRAME, ClipGeometry
from liveavatar.io.media import waveform_from_array
from liveavatar.models.audio_features import StreamingAudioFeatures
from liveavatar.runtime.live_ledger import OutputAudio, SpeechLedger
from liveavatar.runtime.live_pacing import PlaybackPacer

PIECE = AUDIO_SAMPLE_RATE // 100  # fed to the feature streamer at a time: a block pops at most 10 ms late
SILENCE_RMS = 10 ** (-50 / 20)  # a queued 10 ms piece quieter than -50 dBFS is silence the catch-up may skip


class LiveAudio:
    """``push`` appends samples, ``end`` says no more will come (later pushes are ignored and counted in
    ``ignored_after_end``), ``interrupt`` drops what is queued and silences what the next blocks would
    speak, ``close`` ends the run at the next block. Thread-safe between one pushing thread and the engine.
    One source drives one run. Every misuse raises `InputError`."""

    def __init__(self, *, pacer: PlaybackPacer | None = None, lookahead_s: float = 1.0, max_queued_s: float = 60.0,
                 lag_bound_s: float | None = None, clock=time.monotonic):
        self.pacer = pacer
        self.lookahead_s = lookahead_s
        self.max_queued = int(max_queued_s * AUDIO_SAMPLE_RATE)
        self.lag_bound = lag_bound_s
        self.now = clock
        self.on_first_block = lambda: None  # the loop asks for audio: the model is ready to listen
        self.on_lag = lambda lag_s, dropped_s, policy: None
        self.ledger = SpeechLedger()
        self.received = 0  # client samples accepted
        self.dropped = 0  # of which dropped by interrupts and catch-up
        self.ignored_after_end = 0
        self._lock = threading.Condition()
        self._queue: deque[tuple[np.ndarray, int, float]] = deque()  # (samples, input offset, arrival)
        self._queued = 0
        self._due_end = 0.0  # when the pushed audio would end if played in real time from its arrival
        self._ended_at = 0.0  # the last blocks' windows are complete once the end is known
        self._ended = self._closed = self._cut_pending = False
        # engine thread only
        self.streamer: StreamingAudioFeatures | None = None
        self.frames_per_block = 0
        self.next_block = 0
        self._ready: deque[tuple[torch.Tensor, float]] = deque()  # (features, when their window was complete)
        self._finished = False
        self._feature_shape = (0, 0)  # (hidden states, channels) of the engine's wav2vec2

    # ------------------------------------------------------------------------------------ client side

    def push(self, samples) -> bool:
        """Queue 16 kHz mono samples (float in [-1, 1] or integer PCM). False: ignored, the audio has ended."""
        chunk = waveform_from_array(samples, name="audio chunk")
        with self._lock:
            if self._ended:
                self.ignored_after_end += len(chunk)
                return False
            if self._queued + len(chunk) > self.max_queued:
                raise InputError(f"audio chunk: more than {self.max_queued / AUDIO_SAMPLE_RATE:g} s of audio is "
                                 f"waiting to be spoken; send the audio in real time (or interrupt to drop it)")
            if len(chunk):
                now = self.now()
                self._due_end = max(now, self._due_end) + len(chunk) / AUDIO_SAMPLE_RATE
                self._queue.append((chunk, self.received, now))
                self._queued += len(chunk)
                self.received += len(chunk)
                self._lock.notify_all()
            return True

    def end(self) -> None:
        with self._lock:
            if not self._ended:
                self._ended, self._ended_at = True, self.now()
            self._lock.notify_all()

    def interrupt(self) -> None:
        """Barge-in: drop the queued audio, and silence what was fed ahead for the lookahead (see `_cut`)."""
        with self._lock:
            self.dropped += self._queued
            self._queue.clear()
            self._queued = 0
            self._due_end = 0.0
            self._cut_pending = True
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    @property
    def queued_seconds(self) -> float:
        return self._queued / AUDIO_SAMPLE_RATE

    def lag_seconds(self) -> float:
        """How far behind real time the queued audio will end (0 when it is on time or ahead)."""
        with self._lock:
            return self._lag()

    def _lag(self) -> float:
        if not self._queued:
            return 0.0
        return max(0.0, self.now() + self._queued / AUDIO_SAMPLE_RATE - self._due_end)

    # ------------------------------------------------------------------------------------ engine side

    def block_features(self, extractor, geometry: ClipGeometry) -> "LiveAudio":
        """The loop's per-block features (`block`), on the engine's wav2vec2 ``extractor``."""
        if self.streamer is not None:
            raise InputError("audio: this LiveAudio already drives a run; make a new one for each run")
        self.streamer = StreamingAudioFeatures(extractor, frames_per_block=geometry.frames_per_block, fps=FPS,
                                               lookahead_seconds=self.lookahead_s)
        self.frames_per_block = geometry.frames_per_block
        self._feature_shape = (extractor.num_layers + 1, extractor.hidden_size)
        return self

    def block(self, clip: int, block: int) -> torch.Tensor | None:
        """Features [1, 25, C, frames_per_block] of the next block once its audio is there (or due); None once
        the audio has ended and every block of it was handed out, or the source was closed."""
        index = self.next_block
        if index == 0:
            self.on_first_block()
        if self.pacer is not None:
            self._wait(until=self.pacer.earliest_start(index), for_audio=False)
        while not self._ready:
            if self._closed:
                return None
            if self._cut_pending:
                self._cut()
                continue
            self._catch_up()
            piece = self._take_piece()
            if piece is not None:
                self._feed(*piece)
            elif self._drained():
                if not self._finished:
                    self._finished = True
                    self._ready.extend((features, self._ended_at) for features in self.streamer.finish())
                break
            elif self.pacer is not None and self.now() >= self.pacer.deadline(index):
                self._make_from_silence(index)
            else:
                self._wait(until=None if self.pacer is None else self.pacer.deadline(index), for_audio=True)
        if self._closed:
            return None
        if self._ready:
            features, window_done = self._ready.popleft()
        elif self._covered(index) < self.ledger.clock:
            # The streamer makes no block whose first frame lies past the audio's 30 Hz frames; the video
            # still covers every sample, on zero features as the whole-file path pads its last clip.
            features, window_done = torch.zeros(1, *self._feature_shape, self.frames_per_block), self.now()
        else:
            return None
        self.ledger.block_handed(index, window_done, self.now())
        self.next_block += 1
        return features

    def take_output(self, start_frame: int, count: int) -> OutputAudio:
        return self.ledger.take_output(start_frame, count)

    def silent_seconds(self, output_frames: int) -> float:
        """How long the output has been silence only, up to frame ``output_frames`` (0 while audio waits)."""
        with self._lock:
            waiting = bool(self._queue)
        return 0.0 if waiting else self.ledger.silent_seconds(output_frames)

    # ------------------------------------------------------------------------------------ internals

    def _covered(self, index: int) -> int:
        """Clock samples the output frames of the blocks before ``index`` show."""
        return max(0, index * self.frames_per_block - DROPPED_LEADING_FRAMES) * SAMPLES_PER_FRAME

    def _wait(self, *, until: float | None, for_audio: bool) -> None:
        with self._lock:
            while not self._closed:
                if for_audio and (self._queue or self._ended or self._cut_pending):
                    return
                remaining = None if until is None else until - self.now()
                if remaining is not None and remaining <= 0:
                    return
                self._lock.wait(remaining)

    def _drained(self) -> bool:
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

    def _feed(self, samples: np.ndarray, input_start: int | None, arrival: float) -> None:
        self.ledger.feed(samples, input_start, arrival)
        self._ready.extend((features, arrival) for features in self.streamer.push(samples))

    def _make_from_silence(self, index: int) -> None:
        """The block is due and its audio has not come. Mid-speech (the clock ends in the client's audio, a
        chunk is late): silence only up to the block's last frame and its lookahead padded with zeros kept
        off the clock, so no silence is put inside the speech. Idle (the clock ends in silence): silence up to
        the end of its window, so that the speech that comes next still gets the whole lookahead; it then
        plays as late as speech always does (its block waits for the lookahead), no later."""
        now = self.now()
        idle = self.ledger.last_speech_end < self.ledger.clock or self.ledger.clock == 0
        end = self.streamer.block_audio_end(index) + (self.streamer.lookahead_samples if idle else 0)
        if end > self.ledger.clock:
            self._feed(np.zeros(end - self.ledger.clock, np.float32), None, now)
        if not self._ready:
            self._ready.append((self.streamer.next_block_padded(), now))

    def _cut(self) -> None:
        """Silence every fed sample the next block and later ones would speak: the streamer holds them in its
        window (fed ahead as the previous block's lookahead); blocks computed from them are made again."""
        self._cut_pending = False
        cut = self.next_block * self.frames_per_block * SAMPLES_PER_FRAME
        self.streamer.silence_from(cut, self.next_block)
        self.ledger.cut(cut)
        self._ready.clear()
        if self._finished:
            self._ready.extend((features, self._ended_at) for features in self.streamer.finish())

    def _catch_up(self) -> None:
        if self.lag_bound is None:
            return
        with self._lock:
            lag = self._lag()
            excess = int((lag - self.lag_bound) * AUDIO_SAMPLE_RATE)
            if excess <= 0:
                return
            silence = self._drop_queued(excess, silent_only=True)
            speech = self._drop_queued(excess - silence, silent_only=False)
            self.dropped += silence + speech
        if not silence + speech:
            return
        policy = "dropped the oldest queued speech" if speech else "skipped queued silence"
        self.on_lag(lag, (silence + speech) / AUDIO_SAMPLE_RATE, policy)

    def _drop_queued(self, amount: int, *, silent_only: bool) -> int:
        """Drop at least ``amount`` queued samples (whole 10 ms pieces), oldest first: only silent pieces, or
        any; fewer when the queue has no more."""
        dropped, kept = 0, deque()
        for samples, offset, arrival in self._queue:
            for start in range(0, len(samples), PIECE):
                piece = samples[start:start + PIECE]
                quiet = float(np.sqrt(np.mean(piece ** 2))) < SILENCE_RMS
                if dropped < amount and (quiet or not silent_only):
                    dropped += len(piece)
                elif kept and kept[-1][2] == arrival and kept[-1][1] + len(kept[-1][0]) == offset + start:
                    kept[-1] = (np.concatenate([kept[-1][0], piece]), kept[-1][1], kept[-1][2])
                else:
                    kept.append((piece, offset + start, arrival))
        self._queue = kept
        self._queued -= dropped
        return dropped
