"""The live session protocol (README "Live session", `liveavatar.serve.protocol`) as an asyncio client: what
every voice-agent adapter stands on, so that each works against any ``liveavatar serve`` (one process or
a cluster) and none imports the engine.

    session = AvatarSession("ws://127.0.0.1:7860/v1/live", "portrait.jpg")
    ready = await session.start()
    await session.push(pcm16_bytes)            # 16 kHz mono PCM16, any size
    async for block in session.blocks():       # AvatarBlock: header, RGB frames, the PCM16 they show
        ...
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import numpy as np
from PIL import Image

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.geometry import AUDIO_SAMPLE_RATE, SAMPLES_PER_FRAME
from liveavatar.serve.protocol import unpack_block

BYTES_PER_FRAME = 2 * SAMPLES_PER_FRAME  # PCM16 bytes of one video frame's audio


class SessionError(LiveAvatarError):
    """The server refused or ended the session with an error (its one-line message)."""


def check_audio_format(sample_rate: int, channels: int, source: str) -> None:
    """The avatar takes 16 kHz mono PCM16: anything else is one clear error naming what came in."""
    if sample_rate != AUDIO_SAMPLE_RATE or channels != 1:
        raise InputError(f"{source}: audio at {sample_rate} Hz with {channels} channel{'s' if channels != 1 else ''}; "
                         f"the avatar takes {AUDIO_SAMPLE_RATE} Hz mono PCM16 (set the TTS's sample rate to "
                         f"{AUDIO_SAMPLE_RATE} and one channel)")


@dataclass(frozen=True)
class AvatarBlock:
    header: dict  # the block's JSON header (frame_start, timestamps, speech, latency_ms, timing, ...)
    frames: list[np.ndarray]  # uint8 [H, W, 3] RGB, 25 fps
    audio: bytes  # PCM16 16 kHz mono: exactly BYTES_PER_FRAME per frame, the audio the frames show

    def frame_audio(self, index: int) -> bytes:
        return self.audio[index * BYTES_PER_FRAME:(index + 1) * BYTES_PER_FRAME]


class AvatarSession:
    """One live session. ``image``: a portrait file or its bytes; ``settings``: start-message fields (size,
    steps, seed, prompt, lag_bound_s, ...). Other server messages (lag, notice) land in ``events``."""

    def __init__(self, url: str, image: str | Path | bytes, *, token: str | None = None, **settings):
        self.url, self.token, self.settings = url, token, settings
        self.image = image if isinstance(image, bytes) else Path(image).read_bytes()
        self.ready: dict | None = None
        self.done: dict | None = None
        self.events: list[dict] = []
        self._ws = None

    async def start(self) -> dict:
        """Open the session and wait until the avatar listens; returns the ``ready`` message."""
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self._ws = await connect(self.url, additional_headers=headers, max_size=2**26)
        except OSError as error:
            raise SessionError(f"cannot open a live session at {self.url} ({error}); is `liveavatar serve` "
                               f"running there?") from None
        await self._ws.send(json.dumps({"type": "start", "image": base64.b64encode(self.image).decode(),
                                        **self.settings}))
        while self.ready is None:
            message = await self._receive()
            if message is None or isinstance(message, bytes):
                raise SessionError("the server closed the session before it was ready")
            if message["type"] == "ready":
                self.ready = message
        return self.ready

    async def push(self, pcm16: bytes) -> None:
        await self._ws.send(pcm16)

    async def interrupt(self) -> None:
        await self._ws.send(json.dumps({"type": "interrupt"}))

    async def end(self) -> None:
        """No more audio: the session ends once the video has covered what was sent."""
        await self._ws.send(json.dumps({"type": "end"}))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def blocks(self) -> AsyncIterator[AvatarBlock]:
        """The avatar's blocks as they come, until the session is done (or closed)."""
        while True:
            message = await self._receive()
            if message is None:
                return
            if isinstance(message, bytes):
                header, jpegs, pcm = unpack_block(message)
                frames = [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs]
                yield AvatarBlock(header, frames, pcm)

    async def _receive(self) -> dict | bytes | None:
        """The next block or ``ready`` / ``lag`` / ``notice``; None once done; SessionError for an error."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                message = await self._ws.recv()
            except ConnectionClosed:
                return None
            if isinstance(message, bytes):
                return message
            item = json.loads(message)
            if item["type"] == "error":
                raise SessionError(item["message"])
            if item["type"] == "done":
                self.done = item
                return None
            if item["type"] == "ready":
                return item
            self.events.append(item)
