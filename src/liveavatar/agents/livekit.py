"""A LiveKit Agents avatar ``VideoGenerator`` backed by a ``liveavatar serve`` live session (``pip install
"liveavatar[livekit]"``), for the avatar worker that ``livekit.agents.voice.avatar.AvatarRunner`` runs:

    generator = LiveAvatarVideoGenerator(url="ws://gpu-box:7860/v1/live", image="portrait.jpg")
    await generator.start()
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room), video_gen=generator,
                          options=generator.avatar_options())

``push_audio`` takes the agent's TTS frames (16 kHz mono) and ``AudioSegmentEnd``; ``clear_buffer`` is a
barge-in (the avatar stops speaking within one block); iterating gives ``rtc.VideoFrame`` (RGBA) and the
``rtc.AudioFrame`` of the 40 ms each frame shows, 25 fps, and an ``AudioSegmentEnd`` after the block that
speaks the last sample of a segment.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import AsyncIterator

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions, VideoGenerator

from liveavatar.agents.session import AvatarSession, check_audio_format
from liveavatar.geometry import AUDIO_SAMPLE_RATE, FPS, SAMPLES_PER_FRAME


class LiveAvatarVideoGenerator(VideoGenerator):
    """``url``: the server's ``/v1/live``; ``image``: the portrait (a path or bytes); ``token``: the server's
    ``--token``; ``settings``: start-message fields (size, steps, seed, prompt, lag_bound_s, ...)."""

    def __init__(self, *, url: str, image: str | Path | bytes, token: str | None = None, **settings):
        self.session = AvatarSession(url, image, token=token, **settings)
        self.blocks: list[dict] = []  # every block's header (latency, timing), for metrics
        self._pushed = 0  # input samples sent
        self._segment_ends: deque[int] = deque()  # input sample where each pushed segment ends

    async def start(self) -> dict:
        return await self.session.start()

    def avatar_options(self) -> AvatarOptions:
        """What the runner's tracks need (call after `start`)."""
        ready = self.session.ready
        return AvatarOptions(video_width=ready["width"], video_height=ready["height"], video_fps=FPS,
                             audio_sample_rate=AUDIO_SAMPLE_RATE, audio_channels=1)

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            if not self._segment_ends or self._segment_ends[-1] < self._pushed:
                self._segment_ends.append(self._pushed)
            return
        check_audio_format(frame.sample_rate, frame.num_channels, "LiveAvatarVideoGenerator.push_audio")
        await self.session.push(bytes(frame.data))
        self._pushed += frame.samples_per_channel

    async def clear_buffer(self) -> None:
        self._segment_ends.clear()
        await self.session.interrupt()

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def aclose(self) -> None:
        await self.session.close()

    async def _frames(self):
        async for block in self.session.blocks():
            self.blocks.append(block.header)
            height, width = block.frames[0].shape[:2]
            for index, pixels in enumerate(block.frames):
                rgba = np.concatenate([pixels, np.full((height, width, 1), 255, np.uint8)], axis=2)
                yield rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, rgba.tobytes())
                yield rtc.AudioFrame(block.frame_audio(index), AUDIO_SAMPLE_RATE, 1, SAMPLES_PER_FRAME)
            spoken = block.header["input_samples"]
            while spoken and self._segment_ends and self._segment_ends[0] <= spoken[1]:
                self._segment_ends.popleft()
                yield AudioSegmentEnd()
