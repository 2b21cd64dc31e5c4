"""The live session's wire format, shared by the server and `liveavatar.serve.client` (README has the
whole protocol).

Client -> server: a JSON ``start`` message, then binary messages of 16 kHz mono PCM16 little-endian audio
of any size, JSON ``interrupt`` at any time, ``say`` (text the server speaks) and ``end`` when the audio
is over. Server -> client: JSON ``queued`` / ``ready`` / ``lag`` / ``notice`` / ``done`` / ``error``, and
one binary message per block:

    [4 bytes: header length N, big-endian] [N bytes: UTF-8 JSON header] [JPEG 0] ... [JPEG k-1] [PCM16 audio]

The header's ``frame_bytes`` lists the JPEG sizes; the audio (``audio_samples`` samples) fills the rest.

Why JPEG frames + PCM rather than fMP4 segments: every frame can be shown the moment it arrives, with no
codec state across blocks (an H.264 fragment per block must start with a keyframe and is parsed through
an MSE buffer whose own buffering adds latency); the client schedules the PCM on its audio clock and
draws each frame at its timestamp, so the audio stays the master clock; any client decodes it (a
browser's ``createImageBitmap``, Pillow), whether or not it has an H.264 decoder. The cost is bandwidth
(about 5 Mbit/s at 704*384, quality 80), fine on a LAN or loopback.
"""
from __future__ import annotations

import json
import struct

import numpy as np

START_FIELDS = ("type", "image", "image_id", "prompt", "size", "steps", "seed", "attention", "realtime",
                "idle_limit_s", "jpeg_quality", "lag_bound_s")
CONTROL_TYPES = ("end", "interrupt", "say")


def to_pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def pack_block(header: dict, jpegs: list[bytes], pcm: bytes) -> bytes:
    header = {**header, "frame_bytes": [len(j) for j in jpegs]}
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([struct.pack(">I", len(head)), head, *jpegs, pcm])


def unpack_block(data: bytes) -> tuple[dict, list[bytes], bytes]:
    (length,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4:4 + length])
    offset = 4 + length
    jpegs = []
    for size in header["frame_bytes"]:
        jpegs.append(data[offset:offset + size])
        offset += size
    return header, jpegs, data[offset:]
