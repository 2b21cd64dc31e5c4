"""The server's only door into the engine: load once, run a job, run a live session.

* `Backend.load(...)`        -> the `Engine`, placed as the planner decided;
* `Backend.job(request)`     -> ``engine.run(request)`` of a job's request (resolved at upload, the file as audio);
* `Backend.live(request)`    -> ``engine.run(request)`` of a session's request (its audio a `LiveAudio`),
                                until the audio ends or the caller closes the events;
* `Backend.warm(size, steps, attention)` -> one short run at the live setting (compile, CUDA graphs) before any session.

Both return a `Run`: the output size, the block count when known, and an iterator of `BlockDone` and
`Frames` events. Closing the iterator stops the run within one block (the loop is a generator that is
suspended at a block boundary).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np
from PIL import Image

from liveavatar.geometry import AUDIO_SAMPLE_RATE, FPS
from liveavatar.options import RequestOptions
from liveavatar.request import Request, resolve_request
from liveavatar.runtime.live_audio import LiveAudio
from liveavatar.runtime.engine import Engine
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.sampler import BlockLatents


@dataclass(frozen=True)
class BlockDone:
    blocks_done: int
    blocks_total: int | None  # None: a live session, which runs until it is stopped


@dataclass(frozen=True)
class Frames:
    start: int  # output index of the first frame
    frames: np.ndarray  # uint8 [N, H, W, 3]


Event = Union[BlockDone, Frames]


@dataclass
class Run:
    width: int
    height: int
    blocks_total: int | None
    events: Iterator[Event]


class Backend:
    """The loaded `Engine`; one run at a time (the job queue's worker thread is its only caller)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def load(cls, *, ckpt_dir: str, lora: str | None, device: str | None, dtype: str | None, placement: Placement,
             prompt_cache_dir: str | None = None) -> "Backend":
        """Load every model once, placed as the planner decided for the largest request the server takes."""
        from liveavatar.api import LiveAvatarPipeline

        return cls(LiveAvatarPipeline.from_pretrained(ckpt_dir, lora=lora, device=device, dtype=dtype,
                                                      placement=placement, prompt_cache_dir=prompt_cache_dir).engine)

    def job(self, request: Request) -> Run:
        """The whole-file video of a job's request (resolved when it was uploaded), as ``generate`` makes it."""
        geometry = request.geometry
        return Run(geometry.width, geometry.height, request.total_blocks,
                   _events(self.engine.run(request), request.total_blocks))

    def live(self, request: Request) -> Run:
        """A live session's run (its request resolved on the WebSocket side): block after block until its
        `LiveAudio` ends or the caller closes the events."""
        geometry = request.geometry
        return Run(geometry.width, geometry.height, None, _events(self.engine.run(request), None))

    def warm(self, size: str, sample_steps: int, attention: str) -> None:
        """Two clips of silence at the live setting with the server's attention, so that the first session
        finds the compiled regions, the CUDA graphs and the caches of its size ready."""
        audio = LiveAudio()
        audio.push(np.zeros(int(2 * 48 / FPS * AUDIO_SAMPLE_RATE), np.float32))
        audio.end()
        request = resolve_request(Image.new("RGB", (16 * 64, 9 * 64), (128, 128, 128)), audio, "",
                                  RequestOptions(size=size, sample_steps=sample_steps, attention=attention))
        for _ in self.live(request).events:
            pass


def _events(loop: Iterator, total: int | None) -> Iterator[Event]:
    done = 0
    try:
        for event in loop:
            if isinstance(event, BlockLatents):
                done += 1
                yield BlockDone(done, total)
            else:
                yield Frames(event.start, event.uint8())
    finally:
        loop.close()
