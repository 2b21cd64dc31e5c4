"""What a live session's client sends after the start message, fed to its `LiveAudio`: PCM16 audio, and
the controls ``end``, ``interrupt`` and ``say``. The single-process server's WebSocket loop and a cluster
replica (which gets the client's messages relayed by the ingress) both feed a session through it.

Text to speak (``say``) is synthesised in a thread and pushed at real-time pace, one ``say`` after the
other; ``end`` takes effect after the pending ``say``s, ``interrupt`` drops them. A failing ``say`` is one
``error`` event and the session goes on; audio after ``end`` is ignored with one ``notice``.
"""
from __future__ import annotations

import asyncio
import json
import time

from liveavatar.errors import InputError
from liveavatar.geometry import AUDIO_SAMPLE_RATE
from liveavatar.serve.jobs import error_line
from liveavatar.serve.protocol import CONTROL_TYPES, from_pcm16
from liveavatar.serve.tts import check_text, synthesize

SAY_CHUNK_S = 0.1  # spoken text is pushed as a real-time source would push it
AFTER_END = "audio after 'end' is ignored; start a new session for new audio"


def client_message(message: dict) -> bytes | dict:
    """An ASGI WebSocket message after the start: its audio bytes or its control; InputError otherwise."""
    if message.get("bytes") is not None:
        return message["bytes"]
    text = message.get("text") or ""
    try:
        control = json.loads(text)
    except ValueError:
        control = None
    if not isinstance(control, dict) or control.get("type") not in CONTROL_TYPES:
        raise InputError(f"unexpected message {text[:60]!r} after start; send binary PCM16 audio or one of "
                         f"{', '.join(CONTROL_TYPES)} as {{\"type\": ...}}")
    return control


class SessionInput:
    """Feeds one session (anything with ``audio``, ``outbox`` and ``options.tts_command``) on its event loop."""

    def __init__(self, session):
        self.session, self.audio = session, session.audio
        self.speaking: asyncio.Task | None = None
        self._leftover = b""
        self._noticed_after_end = False

    def handle(self, message: bytes | dict) -> str | None:
        """One client message; returns the one-line reason when the session must end, else None."""
        if isinstance(message, bytes):
            data = self._leftover + message
            even = len(data) - len(data) % 2
            self._leftover = data[even:]
            try:
                self._push(from_pcm16(data[:even]))
            except InputError as error:
                return error_line(error)
        elif message["type"] == "end":
            self._after_speech(self.audio.end)
        elif message["type"] == "interrupt":
            if self.speaking is not None:
                self.speaking.cancel()
            self.audio.interrupt()
        else:
            self._say(message.get("text"))
        return None

    def close(self) -> None:
        if self.speaking is not None:
            self.speaking.cancel()

    def _post(self, item: dict) -> None:
        self.session.outbox.put_nowait(item)

    def _push(self, samples) -> None:
        if not self.audio.push(samples) and not self._noticed_after_end:
            self._noticed_after_end = True
            self._post({"type": "notice", "message": AFTER_END})

    def _say(self, text) -> None:
        try:
            text = check_text(text)
        except InputError as error:
            self._post({"type": "error", "message": error_line(error)})
            return
        previous, command = self.speaking, self.session.options.tts_command

        async def speak():
            try:
                samples = await asyncio.to_thread(synthesize, text, command)
            except InputError as error:
                samples = None
                self._post({"type": "error", "message": error_line(error)})
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            if samples is None:
                return
            chunk, began = int(SAY_CHUNK_S * AUDIO_SAMPLE_RATE), time.monotonic()
            for offset in range(0, len(samples), chunk):
                self._push(samples[offset:offset + chunk])
                await asyncio.sleep(max(0.0, began + (offset + chunk) / AUDIO_SAMPLE_RATE - time.monotonic()))

        self.speaking = asyncio.create_task(speak())

    def _after_speech(self, action) -> None:
        if self.speaking is None or self.speaking.done():
            action()
            return
        self.speaking.add_done_callback(lambda task: action())
