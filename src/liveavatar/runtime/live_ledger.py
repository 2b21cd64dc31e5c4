"""Where a live source's samples went on its audio clock: the audio each block's frames carry out, which
client samples those are, and when they arrived (the latency fields).

The audio clock counts the samples fed to the feature streamer: the client's, plus silence wherever its
audio ran dry; output frame i plays at clock time i/25 s, as in ``generate``'s mp4.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liveavatar.geometry import AUDIO_SAMPLE_RATE, SAMPLES_PER_FRAME


@dataclass
class _Piece:
    """Clock samples ``clock_start..+length``: client samples from ``input_start`` (None: filled silence),
    fed at ``arrival`` (a client sample's arrival; for silence, when it was filled)."""

    clock_start: int
    length: int
    input_start: int | None
    arrival: float


@dataclass(frozen=True)
class OutputAudio:
    """The audio of one block's frames, with where it came from."""

    samples: np.ndarray  # float32, SAMPLES_PER_FRAME per frame
    clock_start: int
    input_range: tuple[int, int] | None  # client samples this block carries; None: only silence
    first_arrival: float | None  # when the first of them arrived
    last_arrival: float  # when its last clock sample was there (client or filled)


class SpeechLedger:
    """Engine-thread bookkeeping of the audio clock (no locking: one thread feeds and takes)."""

    def __init__(self):
        self.clock = 0  # samples fed
        self.last_speech_end = 0  # clock position after the last client sample
        self._audio = np.zeros(0, np.float32)  # clock samples from _audio_start on, not yet sent out
        self._audio_start = 0
        self._pieces: list[_Piece] = []
        self.blocks: dict[int, tuple[float, float]] = {}  # block -> (its window complete, handed to the loop)

    def feed(self, samples: np.ndarray, input_start: int | None, arrival: float) -> None:
        self._pieces.append(_Piece(self.clock, len(samples), input_start, arrival))
        if input_start is not None:
            self.last_speech_end = self.clock + len(samples)
        self._audio = np.concatenate([self._audio, samples])
        self.clock += len(samples)

    def block_handed(self, index: int, window_done: float, handed: float) -> None:
        self.blocks[index] = (window_done, handed)

    def cut(self, sample: int) -> None:
        """Barge-in: clock samples from ``sample`` on become silence (they stay on the clock)."""
        self._audio[max(0, sample - self._audio_start):] = 0
        kept = []
        for piece in self._pieces:
            if piece.input_start is not None and piece.clock_start + piece.length > sample:
                if piece.clock_start < sample:
                    kept.append(_Piece(piece.clock_start, sample - piece.clock_start, piece.input_start,
                                       piece.arrival))
                    piece = _Piece(sample, piece.clock_start + piece.length - sample, None, piece.arrival)
                else:
                    piece = _Piece(piece.clock_start, piece.length, None, piece.arrival)
            kept.append(piece)
        self._pieces = kept
        self.last_speech_end = min(self.last_speech_end, sample)

    def take_output(self, start_frame: int, count: int) -> OutputAudio:
        """The clock's samples for output frames ``start_frame..+count`` (zeros past the clock's end)."""
        start, end = start_frame * SAMPLES_PER_FRAME, (start_frame + count) * SAMPLES_PER_FRAME
        samples = np.zeros(end - start, np.float32)
        have = self._audio[max(0, start - self._audio_start):max(0, end - self._audio_start)]
        samples[:len(have)] = have
        self._audio = self._audio[max(0, end - self._audio_start):]
        self._audio_start = max(self._audio_start, end)
        inside = [p for p in self._pieces if p.clock_start < end and p.clock_start + p.length > start]
        last_arrival = max((p.arrival for p in inside), default=0.0)
        self._pieces = [p for p in self._pieces if p.clock_start + p.length > end]
        speech = [p for p in inside if p.input_start is not None]
        if not speech:
            return OutputAudio(samples, start, None, None, last_arrival)
        first = speech[0].input_start + max(0, start - speech[0].clock_start)
        last = speech[-1].input_start + min(speech[-1].length, end - speech[-1].clock_start)
        return OutputAudio(samples, start, (first, last), speech[0].arrival, last_arrival)

    def silent_seconds(self, output_frames: int) -> float:
        """How long the output up to frame ``output_frames`` has been silence only."""
        return max(0, output_frames * SAMPLES_PER_FRAME - self.last_speech_end) / AUDIO_SAMPLE_RATE
