"""A Pipecat frame processor that puts a Live Avatar face on a voice agent (``pip install
"liveavatar[pipecat]"``): place it after the TTS service.

    pipeline = Pipeline([transport.input(), stt, llm, tts,
                         LiveAvatarVideo(url="ws://gpu-box:7860/v1/live", image="portrait.jpg"),
                         transport.output()])

It takes the TTS audio frames (16 kHz mono: set the TTS's ``sample_rate=16000``) and sends them to a
``liveavatar serve`` live session; what comes back is pushed downstream frame by frame at 25 fps: an
``OutputImageRawFrame`` (RGB) and the ``OutputAudioRawFrame`` of the 40 ms that frame shows, so that the
transport plays the avatar's audio, in step with its picture, instead of the TTS's. An
``InterruptionFrame`` (the user barges in) clears the session's queued speech: the avatar stops speaking
within one block. On ``EndFrame`` it ends the session once the avatar has said everything.
"""
from __future__ import annotations

from pathlib import Path


from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, OutputAudioRawFrame,
                                   OutputImageRawFrame, StartFrame, TextFrame, TTSAudioRawFrame)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from liveavatar.agents.session import AvatarSession, SessionError, check_audio_format
from liveavatar.errors import InputError
from liveavatar.geometry import AUDIO_SAMPLE_RATE
from liveavatar.serve.protocol import to_pcm16
from liveavatar.serve.tts import DEFAULT_TTS_COMMAND, synthesize

TTS_FRAME_S = 0.02  # a TTS service's usual frame: 20 ms


class LiveAvatarVideo(FrameProcessor):
    """``url``: the server's ``/v1/live``; ``image``: the portrait (a path or bytes); ``token``: the server's
    ``--token``; ``settings``: start-message fields (size, steps, seed, prompt, lag_bound_s, ...).
    ``blocks`` keeps every block's header (latency, timing) for the application's metrics."""

    def __init__(self, *, url: str, image: str | Path | bytes, token: str | None = None, **settings):
        super().__init__()
        self.session = AvatarSession(url, image, token=token, **settings)
        self.blocks: list[dict] = []
        self._reader = None
        self._format_error_sent = False

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self.session.start()
            self._reader = self.create_task(self._read())
        elif isinstance(frame, TTSAudioRawFrame):
            await self._send(frame)
        elif isinstance(frame, InterruptionFrame):
            await self.session.interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self.session.end()
            if self._reader is not None:
                await self._reader  # the avatar says everything it was given, then the pipeline ends
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def cleanup(self):
        await super().cleanup()
        await self._stop()

    async def _send(self, frame: TTSAudioRawFrame) -> None:
        try:
            check_audio_format(frame.sample_rate, frame.num_channels, "LiveAvatarVideo")
        except InputError as error:
            if not self._format_error_sent:  # one error, not one per frame
                self._format_error_sent = True
                await self.push_error(str(error), exception=error)
            return
        await self.session.push(frame.audio)

    async def _read(self) -> None:
        try:
            async for block in self.session.blocks():
                self.blocks.append(block.header)
                height, width = block.frames[0].shape[:2]
                for index, pixels in enumerate(block.frames):
                    await self.push_frame(OutputImageRawFrame(image=pixels.tobytes(), size=(width, height),
                                                              format="RGB"))
                    await self.push_frame(OutputAudioRawFrame(audio=block.frame_audio(index),
                                                              sample_rate=AUDIO_SAMPLE_RATE, num_channels=1))
        except SessionError as error:
            await self.push_error(str(error), exception=error)

    async def _stop(self) -> None:
        if self._reader is not None and not self._reader.done():
            await self.cancel_task(self._reader)
        await self.session.close()


class CommandTTS(FrameProcessor):
    """Speaks each ``TextFrame`` with a local command (espeak-ng by default, offline; any command that reads
    text on stdin and writes a WAV on stdout) as 16 kHz mono ``TTSAudioRawFrame``s of 20 ms: a way to try
    the avatar without a cloud TTS, and the TTS of the tests."""

    def __init__(self, command: str = DEFAULT_TTS_COMMAND):
        super().__init__()
        self.command = command

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if not isinstance(frame, TextFrame) or direction != FrameDirection.DOWNSTREAM:
            await self.push_frame(frame, direction)
            return
        import asyncio

        try:
            samples = await asyncio.to_thread(synthesize, frame.text, self.command)
        except InputError as error:
            await self.push_error(str(error), exception=error)
            return
        pcm = to_pcm16(samples)
        step = 2 * int(TTS_FRAME_S * AUDIO_SAMPLE_RATE)
        for offset in range(0, len(pcm), step):
            await self.push_frame(TTSAudioRawFrame(audio=pcm[offset:offset + step], sample_rate=AUDIO_SAMPLE_RATE,
                                                   num_channels=1))
