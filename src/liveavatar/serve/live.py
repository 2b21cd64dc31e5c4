"""The live session behind ``/v1/live``: a WebSocket side (asyncio) and an engine side (the queue's worker
thread), joined by the request's `LiveAudio` (audio in) and an asyncio queue (blocks out). Protocol:
protocol.py and the README.

The start message is resolved once, here, into the session's `Request` (its audio a paced `LiveAudio`);
the engine thread runs it (`Backend.live`) when the session's turn comes. The session ends on ``end``
(once the video has covered all the audio), after ``idle_limit_s`` of silence-only output, when the client
disconnects (the loop stops within one block) or when the server stops. JPEG encoding runs in a helper
thread so that the engine thread goes straight on to the next block.
"""
from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass

from PIL import Image
from starlette.websockets import WebSocket, WebSocketDisconnect

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.geometry import AUDIO_SAMPLE_RATE, DROPPED_LEADING_FRAMES, FPS
from liveavatar.request import Request
from liveavatar.runtime.live_audio import LiveAudio
from liveavatar.runtime.live_ledger import OutputAudio
from liveavatar.serve.backend import Backend, BlockDone, Frames
from liveavatar.serve.jobs import error_line
from liveavatar.serve.live_input import SessionInput, client_message
from liveavatar.serve.live_start import LiveOptions, parse_start
from liveavatar.serve.protocol import pack_block, to_pcm16

BAD_INPUT_CLOSE = 4400  # WebSocket close codes 4000-4999 are the application's; 4400 mirrors HTTP 400
INTERNAL_CLOSE = 1011


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(max(0.0, seconds) * 1000, 1)


@dataclass
class _Block:
    """A block on its way out, with the times it passed each stage (monotonic seconds)."""

    index: int  # blocks sent before it
    frames: Frames
    audio: OutputAudio
    queued_s: float
    lag_s: float
    window_done: float  # its features' window was complete (audio + lookahead there)
    handed: float  # the loop took its features: compute starts
    latents_at: float  # denoised
    frames_at: float  # decoded
    busy_s: float  # the engine's time on this block: from its start, or the previous block's frames if later
    encoded_at: float = 0.0


class LiveSession:
    """One session; `run` is called on the engine thread when the session's turn comes."""

    def __init__(self, client: str, request: Request, options: LiveOptions, ready: dict,
                 loop: asyncio.AbstractEventLoop):
        self.client = client
        self.request, self.options = request, options
        self.audio: LiveAudio = request.audio
        self.outbox: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._stopped = False
        self._latents_at: dict[int, float] = {}
        self._last_frames_at: float | None = None
        self.audio.on_first_block = lambda: self._post(ready)
        self.audio.on_lag = lambda lag_s, dropped_s, policy: self._post({
            "type": "lag", "lag_s": round(lag_s, 3), "dropped_s": round(dropped_s, 3), "policy": policy})

    def cancel(self) -> None:
        self._stopped = True
        self.audio.close()
        self._post({"type": "done", "reason": "stopped", "blocks": 0})

    def run(self, backend: Backend) -> None:
        blocks, reason = 0, "stopped"
        run = None
        try:
            run = backend.live(self.request)
            for event in run.events:
                if self._stopped:
                    break
                if isinstance(event, BlockDone):
                    self._latents_at[event.blocks_done - 1] = time.monotonic()
                    continue
                self._post(self._block(blocks, event))
                blocks += 1
                made = event.start + len(event.frames)
                if self.audio.silent_seconds(made) > self.options.idle_limit_s:
                    reason = "idle"
                    break
            else:
                reason = "stopped" if self._stopped else "end"
        except Exception as error:
            self._post({"type": "error", "message": error_line(error)})
            reason = "error"
        finally:
            if run is not None:
                run.events.close()
        self._post({"type": "done", "reason": reason, "blocks": blocks})

    def _block(self, index: int, frames: Frames) -> _Block:
        now = time.monotonic()
        number = (frames.start + DROPPED_LEADING_FRAMES) // self.request.geometry.frames_per_block
        window_done, handed = self.audio.ledger.blocks.pop(number)
        # A block's compute alone overstates the rate: the decode runs beside the next block's compute, and on a
        # GPU the launches return before the work is done. Frames-ready to frames-ready is what the engine
        # sustains; a block that waited for its audio counts only from its start.
        started = handed if self._last_frames_at is None else max(handed, self._last_frames_at)
        self._last_frames_at = now
        block = _Block(index, frames, self.audio.take_output(frames.start, len(frames.frames)), self.audio.queued_seconds,
                       self.audio.lag_seconds(), window_done, handed, self._latents_at.pop(number, now), now,
                       now - started)
        if self.audio.pacer is not None:
            self.audio.pacer.block_sent(now - handed)
        return block

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is gone (server stopping): nobody is listening any more

    def encode(self, block: _Block) -> list[bytes]:
        """The block's JPEGs (runs in a helper thread)."""
        jpegs = []
        for pixels in block.frames.frames:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=self.options.jpeg_quality)
            jpegs.append(buffer.getvalue())
        block.encoded_at = time.monotonic()
        return jpegs

    def message(self, block: _Block, jpegs: list[bytes]) -> bytes:
        """The wire message, its timing complete up to the moment it is handed to the socket."""
        sent_at, out, start = time.monotonic(), block.audio, block.frames.start
        compute_s = block.latents_at - block.handed
        speech = out.first_arrival is not None
        timing = {
            "accumulate_ms": _ms(out.last_arrival - out.first_arrival) if speech else None,
            "lookahead_ms": _ms(block.window_done - out.last_arrival),
            "queue_ms": _ms(block.handed - block.window_done), "compute_ms": _ms(compute_s),
            "decode_ms": _ms(block.frames_at - block.latents_at), "jpeg_ms": _ms(block.encoded_at - block.frames_at),
            "send_ms": _ms(sent_at - block.encoded_at)}
        block_seconds = self.request.geometry.frames_per_block / FPS
        header = {"type": "block", "block": block.index, "frame_start": start,
                  "timestamps": [round((start + i) / FPS, 4) for i in range(len(jpegs))],
                  "audio_start": out.clock_start / AUDIO_SAMPLE_RATE, "audio_samples": len(out.samples),
                  "input_samples": list(out.input_range) if out.input_range else None, "speech": speech,
                  "latency_ms": _ms(sent_at - out.first_arrival) if speech else None,
                  "compute_ms": timing["compute_ms"], "rtf": round(block_seconds / max(block.busy_s, 1e-6), 3),
                  "timing": timing, "queued_audio_s": round(block.queued_s, 3), "lag_s": round(block.lag_s, 3),
                  "blocks_done": block.index + 1}
        return pack_block(header, jpegs, to_pcm16(out.samples))


async def serve_live(websocket: WebSocket, server) -> None:
    await websocket.accept()
    try:
        first = await websocket.receive()
        if first["type"] == "websocket.disconnect":
            return
        request, options, ready = await asyncio.to_thread(parse_start, start_message(first), server)
    except InputError as error:
        await _refuse(websocket, error_line(error))
        return
    except WebSocketDisconnect:
        return
    session = LiveSession(websocket.client.host if websocket.client else "?", request, options, ready,
                          asyncio.get_running_loop())
    try:
        position = server.queue.submit_live(session)
    except LiveAvatarError as error:  # over the per-client cap, or shutting down
        await _refuse(websocket, error_line(error))
        return
    if position:
        await websocket.send_json({"type": "queued", "position": position})
    receiver = asyncio.create_task(_receive(websocket, SessionInput(session)))
    try:
        while True:
            getter = asyncio.create_task(session.outbox.get())
            done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                problem = receiver.result()
                if problem is None:
                    return  # the client went away
                await _refuse(websocket, problem)
                return
            item = getter.result()
            if isinstance(item, dict):
                await websocket.send_json(item)
                if item["type"] == "done":
                    await websocket.close()
                    return
            else:
                jpegs = await asyncio.to_thread(session.encode, item)
                await websocket.send_bytes(session.message(item, jpegs))
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    finally:
        receiver.cancel()
        server.queue.withdraw(session)
        session.cancel()


def start_message(message: dict) -> dict:
    """The first message as a start message's fields; InputError for anything else."""
    if message.get("text") is None:
        raise InputError('the first message must be the JSON text {"type": "start", ...} (see the README\'s live '
                         'protocol); got a binary message')
    try:
        start = json.loads(message["text"])
    except ValueError:
        raise InputError(f'the first message is not JSON ({message["text"][:40]!r}...); send {{"type": "start", '
                         f'...}} (see the README\'s live protocol)') from None
    if not isinstance(start, dict) or start.get("type") != "start":
        raise InputError('the first message must be {"type": "start", ...} (see the README\'s live protocol)')
    return start


async def _receive(websocket: WebSocket, feed: SessionInput) -> str | None:
    """The client's messages into the session; a message for a protocol error, None on disconnect."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return None
            try:
                problem = feed.handle(client_message(message))
            except InputError as error:
                problem = error_line(error)
            if problem is not None:
                return problem
    except WebSocketDisconnect:
        return None
    finally:
        feed.close()


async def _refuse(websocket: WebSocket, message: str) -> None:
    try:
        await websocket.send_json({"type": "error", "message": message})
        await websocket.close(code=BAD_INPUT_CLOSE, reason=message[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass

