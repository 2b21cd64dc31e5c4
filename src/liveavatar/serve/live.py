"""The live session behind ``/v1/live``: a WebSocket side (asyncio) and an engine side (the queue's worker
thread), joined by a `PushedAudio` (audio in) and an asyncio queue (blocks out). Protocol: protocol.py.

The session ends on ``end`` (once the video has covered all the audio), after ``idle_limit_s`` of
silence-only output, when the client disconnects (the loop stops within one block) or when the server
stops. JPEG encoding runs in a helper thread so that the engine thread goes straight on to the next block.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from dataclasses import dataclass

from PIL import Image
from starlette.websockets import WebSocket, WebSocketDisconnect

from liveavatar.errors import InputError
from liveavatar.geometry import AUDIO_SAMPLE_RATE, FPS
from liveavatar.options import RequestOptions
from liveavatar.serve.backend import Backend, Frames, LiveSpec
from liveavatar.serve.jobs import error_line
from liveavatar.serve.live_audio import PLAYOUT_DELAY_S, PushedAudio, SessionClosed
from liveavatar.serve.protocol import CONTROL_TYPES, START_FIELDS, from_pcm16, pack_block, to_pcm16
from liveavatar.serve.uploads import OPTION_FIELDS, form_options, read_image

BAD_INPUT_CLOSE = 4400  # WebSocket close codes 4000-4999 are the application's; 4400 mirrors HTTP 400
INTERNAL_CLOSE = 1011


@dataclass(frozen=True)
class LiveOptions:
    realtime: bool
    idle_limit_s: float
    jpeg_quality: int


class LiveSession:
    """One session; `run` is called on the engine thread when the session's turn comes."""

    def __init__(self, client: str, spec: LiveSpec, options: LiveOptions, audio: PushedAudio,
                 loop: asyncio.AbstractEventLoop):
        self.client = client
        self.spec, self.options, self.audio = spec, options, audio
        self.outbox: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._stopped = False

    def cancel(self) -> None:
        self._stopped = True
        self.audio.close()
        self._post({"type": "done", "reason": "stopped", "blocks": 0})

    def run(self, backend: Backend) -> None:
        blocks, reason = 0, "stopped"
        run = None
        try:
            geometry = backend.live_geometry(self.spec)
            # Sent once the prompt, the reference and the sink are done, when the loop first asks for audio.
            self.audio.on_ready = lambda: self._post({
                "type": "ready", "width": geometry.width, "height": geometry.height, "fps": FPS,
                "sample_rate": AUDIO_SAMPLE_RATE, "frames_per_block": geometry.frames_per_block,
                "playout_delay_s": PLAYOUT_DELAY_S})
            run = backend.live(self.spec, self.audio)
            for event in run.events:
                if self._stopped:
                    break
                if not isinstance(event, Frames):
                    continue
                self._post((blocks, event, self.audio.take_output(event.start, len(event.frames)),
                            self.audio.queued_seconds))
                self.audio.block_sent()
                blocks += 1
                made = event.start + len(event.frames)
                if self.audio.all_sent(made):
                    reason = "end"
                    break
                if self.audio.silent_seconds(made) > self.options.idle_limit_s:
                    reason = "idle"
                    break
        except SessionClosed:
            pass
        except Exception as error:
            self._post({"type": "error", "message": error_line(error)})
            reason = "error"
        finally:
            if run is not None:
                run.events.close()
        self._post({"type": "done", "reason": reason, "blocks": blocks})

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is gone (server stopping): nobody is listening any more

    def encode(self, item) -> bytes:
        """A block as the wire message (runs in a helper thread)."""
        index, event, out, queued = item
        jpegs = []
        for pixels in event.frames:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=self.options.jpeg_quality)
            jpegs.append(buffer.getvalue())
        now = self.audio.now()
        header = {"type": "block", "block": index, "frame_start": event.start,
                  "timestamps": [round((event.start + i) / FPS, 4) for i in range(len(jpegs))],
                  "audio_start": out.clock_start / AUDIO_SAMPLE_RATE, "audio_samples": len(out.samples),
                  "input_samples": list(out.input_range) if out.input_range else None,
                  "speech": out.input_range is not None,
                  "latency_ms": None if out.first_arrival is None else round((now - out.first_arrival) * 1000, 1),
                  "compute_ms": round(self.audio.block_compute_s * 1000, 1), "queued_audio_s": round(queued, 3),
                  "blocks_done": index + 1}
        return pack_block(header, jpegs, to_pcm16(out.samples))


def parse_start(message: dict, server) -> tuple[LiveSpec, LiveOptions]:
    """Check a start message (same messages as the CLI for the shared settings)."""
    unknown = [key for key in message if key not in START_FIELDS]
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} in the start message; accepted: {', '.join(START_FIELDS)}")
    folder = server.queue.new_job_folder()
    try:
        if message.get("image_id"):
            image_path = server.images.get(str(message["image_id"]))
            if image_path is None:
                raise InputError(f"image_id {message['image_id']!r}: no such upload (or it expired); POST the image to "
                                 f"/v1/images again")
            name = "image_id"
        else:
            try:
                data = base64.b64decode(str(message.get("image", "")), validate=True)
            except (binascii.Error, ValueError):
                raise InputError("--image: the start message's 'image' is not valid base64") from None
            if not data:
                raise InputError("--image: required (the start message's 'image' as base64, or an 'image_id')")
            if len(data) > server.limits.upload_bytes:
                raise InputError(f"--image: larger than this server's {server.limits.upload_bytes / 2**20:g} MiB "
                                 f"upload limit (--max-upload-mb)")
            image_path = folder / "image"
            image_path.write_bytes(data)
            name = "image"
        request_options = start_options(message, server.limits)
        image = read_image(image_path, name)
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    idle = float(message.get("idle_limit_s", server.live_idle_limit_s))
    if not 0 < idle <= server.live_idle_limit_s:
        raise InputError(f"idle_limit_s {idle:g}: must be in (0, {server.live_idle_limit_s:g}] on this server "
                         f"(--live-idle-limit)")
    quality = int(message.get("jpeg_quality", 80))
    if not 30 <= quality <= 95:
        raise InputError(f"jpeg_quality {quality}: must be in 30..95")
    spec = LiveSpec(image=image, prompt=str(message.get("prompt", "")), options=request_options)
    realtime = message.get("realtime", True)
    if not isinstance(realtime, bool):
        raise InputError(f"realtime {realtime!r}: must be true or false")
    return spec, LiveOptions(realtime=realtime, idle_limit_s=idle, jpeg_quality=quality)


def start_options(message: dict, limits) -> RequestOptions:
    """The `RequestOptions` a start message's option fields give (as the jobs' form fields, same limits)."""
    return form_options({key: str(value) for key, value in message.items() if key in OPTION_FIELDS}, limits)


async def serve_live(websocket: WebSocket, server) -> None:
    await websocket.accept()
    try:
        start = json.loads(await websocket.receive_text())
        if not isinstance(start, dict) or start.get("type") != "start":
            raise InputError('the first message must be {"type": "start", ...} (see the README\'s live protocol)')
        spec, options = await asyncio.to_thread(parse_start, start, server)
    except (InputError, ValueError) as error:
        await _refuse(websocket, error_line(error))
        return
    except WebSocketDisconnect:
        return
    geometry = server.backend.live_geometry(spec)
    audio = PushedAudio(server.backend.audio_encoder(), geometry, realtime=options.realtime)
    session = LiveSession(websocket.client.host if websocket.client else "?", spec, options, audio,
                          asyncio.get_running_loop())
    position = server.queue.submit_live(session)
    if position:
        await websocket.send_json({"type": "queued", "position": position})
    receiver = asyncio.create_task(_receive(websocket, audio))
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
                await websocket.send_bytes(await asyncio.to_thread(session.encode, item))
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    finally:
        receiver.cancel()
        server.queue.withdraw(session)
        session.cancel()


async def _receive(websocket: WebSocket, audio: PushedAudio) -> str | None:
    """Feed the client's messages to the session; returns a message for a protocol error, None on disconnect."""
    leftover = b""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("bytes") is not None:
                data = leftover + message["bytes"]
                even = len(data) - len(data) % 2
                leftover = data[even:]
                try:
                    audio.push(from_pcm16(data[:even]))
                except ValueError as error:
                    return error_line(error)
                continue
            try:
                control = json.loads(message.get("text") or "")
                kind = control.get("type")
            except (ValueError, AttributeError):
                kind = None
            if kind == "end":
                audio.end()
            elif kind == "interrupt":
                audio.interrupt()
            else:
                return (f"unexpected message {(message.get('text') or '')[:60]!r} after start; send binary "
                        f"PCM16 audio or one of {', '.join(CONTROL_TYPES)} as {{\"type\": ...}}")
    except WebSocketDisconnect:
        return None


async def _refuse(websocket: WebSocket, message: str) -> None:
    try:
        await websocket.send_json({"type": "error", "message": message})
        await websocket.close(code=BAD_INPUT_CLOSE, reason=message[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass
