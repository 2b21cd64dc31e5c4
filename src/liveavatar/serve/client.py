"""A live-session client: stream a speech file to ``/v1/live`` in real-time-sized chunks (or have the
server speak typed text) and write the avatar that comes back (frames + the audio they carry) to an mp4.

    python -m liveavatar.serve.client --image portrait.jpg --audio speech.wav --output avatar.mp4
    python -m liveavatar.serve.client --image portrait.jpg --text "Hello there" --output avatar.mp4

It is also the reference for the protocol (protocol.py, README) and what the tests and the latency
benchmark drive: `stream_file` returns every block's header with its arrival time.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from liveavatar.errors import LiveAvatarError
from liveavatar.geometry import AUDIO_SAMPLE_RATE
from liveavatar.io.media import load_audio
from liveavatar.options import DEFAULTS
from liveavatar.serve.protocol import from_pcm16, to_pcm16, unpack_block


@dataclass
class SessionResult:
    ready: dict | None = None
    done: dict | None = None
    error: str | None = None
    blocks: list[dict] = field(default_factory=list)  # headers, each with "received_at" (monotonic)
    events: list[dict] = field(default_factory=list)  # the other messages: lag, notice, queued
    chunk_sent_at: list[tuple[int, float]] = field(default_factory=list)  # (first sample of a chunk, time sent)
    frames: list[bytes] = field(default_factory=list)  # JPEGs, when kept

    def latency_of(self, block: dict) -> float | None:
        """Seconds from sending the chunk holding the block's first input sample to receiving the block."""
        if not block["input_samples"]:
            return None
        first = block["input_samples"][0]
        sent = [t for start, t in self.chunk_sent_at if start <= first]
        return block["received_at"] - sent[-1] if sent else None


def stream_file(url: str, image: Path | None, audio: Path | np.ndarray | str, *, output: Path | None = None,
                token: str | None = None, chunk_s: float = 0.1, pace: float = 1.0, keep_frames: bool = False,
                send_end: bool = True, **settings) -> SessionResult:
    """Run one session. ``audio``: a file or a waveform, or text (a str) for the server to speak (``say``).
    ``pace`` 1 sends the audio in real time, 0 as fast as possible; without ``send_end`` the session goes
    on idle after the audio until its idle limit; ``settings`` go into the start message (prompt, size,
    steps, seed, realtime, idle_limit_s, jpeg_quality, lag_bound_s). A refused session, a dropped
    connection or a server that cannot be reached end with ``error`` set, never with an exception."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect

    if isinstance(audio, str):
        send = (lambda ws: _send_text(ws, audio, result, send_end))
    else:
        waveform = audio if isinstance(audio, np.ndarray) else load_audio(audio)
        send = (lambda ws: _send_audio(ws, waveform, chunk_s, pace, result, send_end))
    start = {"type": "start", **settings}
    if image is not None:  # None: the settings carry an image_id from POST /v1/images
        start["image"] = base64.b64encode(Path(image).read_bytes()).decode()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    result = SessionResult()
    writer = None
    try:
        ws = connect(url, additional_headers=headers, max_size=2**26)
    except (OSError, InvalidHandshake) as error:
        result.error = f"cannot open a live session at {url} ({error}); is `liveavatar serve` running there?"
        return result
    with ws:
        ws.send(json.dumps(start))
        # The audio starts when the server is ready to listen, as a live source would.
        sender = threading.Thread(target=send, args=(ws,), daemon=True)
        try:
            for message in ws:
                if isinstance(message, str):
                    item = json.loads(message)
                    if item["type"] == "ready":
                        result.ready = item
                        sender.start()
                        if output is not None:
                            from liveavatar.serve.fmp4 import FragmentedMp4Writer

                            writer = FragmentedMp4Writer(Path(output), width=item["width"], height=item["height"])
                    elif item["type"] == "error":
                        result.error = item["message"]
                    elif item["type"] == "done":
                        result.done = item
                        break
                    else:
                        result.events.append(item)
                    continue
                header, jpegs, pcm = unpack_block(message)
                header["received_at"] = time.monotonic()
                result.blocks.append(header)
                if keep_frames:
                    result.frames.extend(jpegs)
                if writer is not None:
                    frames = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
                    writer.write(frames, from_pcm16(pcm))
        except ConnectionClosed as closed:
            if result.error is None:
                result.error = f"the server closed the session (code {closed.rcvd.code if closed.rcvd else 'none'})"
        finally:
            if writer is not None:
                writer.close() if result.blocks else writer.abort()
    return result


def _send_audio(ws, waveform: np.ndarray, chunk_s: float, pace: float, result: SessionResult,
                send_end: bool) -> None:
    """Chunks of ``chunk_s`` seconds, each sent when a real-time source would have it (scaled by ``pace``)."""
    from websockets.exceptions import ConnectionClosed

    chunk = int(chunk_s * AUDIO_SAMPLE_RATE)
    began = time.monotonic()
    try:
        for offset in range(0, len(waveform), chunk):
            due = began + pace * (offset + chunk) / AUDIO_SAMPLE_RATE
            time.sleep(max(0.0, due - time.monotonic()))
            result.chunk_sent_at.append((offset, time.monotonic()))
            ws.send(to_pcm16(waveform[offset:offset + chunk]))
        if send_end:
            ws.send(json.dumps({"type": "end"}))
    except ConnectionClosed:
        pass


def _send_text(ws, text: str, result: SessionResult, send_end: bool) -> None:
    """The server speaks the text (``say``); ``end`` takes effect once it has been spoken."""
    from websockets.exceptions import ConnectionClosed

    try:
        result.chunk_sent_at.append((0, time.monotonic()))
        ws.send(json.dumps({"type": "say", "text": text}))
        if send_end:
            ws.send(json.dumps({"type": "end"}))
    except ConnectionClosed:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liveavatar.serve.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:7860/v1/live")
    parser.add_argument("--image", required=True, type=Path)
    speech = parser.add_mutually_exclusive_group(required=True)
    speech.add_argument("--audio", type=Path, help="a speech file, streamed in real time")
    speech.add_argument("--text", help="text the server speaks (its --tts-command, espeak-ng by default)")
    parser.add_argument("--output", required=True, type=Path, help="mp4 to write what comes back to")
    parser.add_argument("--token", help="the server's --token")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--size", help="default: the server's live setting")
    parser.add_argument("--steps", type=int, help="default: the server's live setting")
    parser.add_argument("--seed", type=int, default=DEFAULTS.base_seed)
    parser.add_argument("--chunk-ms", type=float, default=100.0, help="audio per message (default 100 ms)")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        print(f"error: --image {args.image}: no such file", file=sys.stderr)
        return 2
    settings = {key: value for key, value in (("size", args.size), ("steps", args.steps)) if value is not None}
    try:
        result = stream_file(args.url, args.image, args.text if args.text is not None else args.audio,
                             output=args.output, token=args.token, chunk_s=args.chunk_ms / 1000, prompt=args.prompt,
                             seed=args.seed, **settings)
    except LiveAvatarError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for event in result.events:
        if event["type"] == "lag":
            print(f"notice: the avatar fell {event['lag_s']:.1f} s behind real time; the server {event['policy']} "
                  f"({event['dropped_s']:.2f} s)", file=sys.stderr)
        elif event["type"] in ("notice", "warning"):
            print(f"notice: {event['message']}", file=sys.stderr)
    if result.ready and result.ready.get("warning"):
        print(f"notice: {result.ready['warning']}", file=sys.stderr)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 2
    latencies = sorted(x for x in map(result.latency_of, result.blocks) if x is not None)
    median = f", median chunk-to-frames latency {latencies[len(latencies) // 2] * 1000:.0f} ms" if latencies else ""
    print(f"{len(result.blocks)} blocks -> {args.output}{median}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
