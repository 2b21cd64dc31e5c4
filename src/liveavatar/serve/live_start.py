"""A live session's start message, checked (the CLI's messages for the settings it shares with
``generate``, the HTTP form's limits) and resolved once into the session's `Request`, whose audio is the
paced `LiveAudio` the client will push into, plus the session's own options and its ``ready`` message."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from liveavatar.errors import InputError
from liveavatar.geometry import AUDIO_SAMPLE_RATE, FPS, FRAMES_PER_BLOCK
from liveavatar.options import RequestOptions
from liveavatar.request import Request, resolve_request
from liveavatar.runtime.live_audio import LiveAudio
from liveavatar.runtime.live_pacing import PLAYOUT_DELAY_S, PlaybackPacer
from liveavatar.serve.protocol import START_FIELDS
from liveavatar.serve.uploads import MAX_TEXT_FIELD, OPTION_FIELDS, UploadTooLarge, form_options, read_image

LOOKAHEAD_S = 1.0  # the feature window's lookahead (StreamingAudioFeatures)


@dataclass(frozen=True)
class LiveOptions:
    idle_limit_s: float
    jpeg_quality: int
    tts_command: str  # speaks the session's ``say`` text


def parse_start(message: dict, server) -> tuple[Request, LiveOptions, dict]:
    """(the session's request, its options, its ``ready`` message); InputError with one line otherwise."""
    unknown = [key for key in message if key not in START_FIELDS]
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} in the start message; accepted: {', '.join(START_FIELDS)}")
    for name, value in message.items():
        if name != "image" and isinstance(value, str) and len(value.encode()) > MAX_TEXT_FIELD:
            raise UploadTooLarge(f"field {name!r}: longer than {MAX_TEXT_FIELD} bytes")
    setting = server.live_setting
    options = start_options(message, server)
    size = str(message.get("size", setting.size))
    predicted_rtf, warning = setting.check(size, options.sample_steps)
    idle = _number(message, "idle_limit_s", server.live_idle_limit_s)
    if not 0 < idle <= server.live_idle_limit_s:
        raise InputError(f"idle_limit_s {idle:g}: must be in (0, {server.live_idle_limit_s:g}] on this server "
                         f"(--live-idle-limit)")
    quality = message.get("jpeg_quality", 80)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 30 <= quality <= 95:
        raise InputError(f"jpeg_quality {quality!r}: must be an integer in 30..95")
    realtime = message.get("realtime", True)
    if not isinstance(realtime, bool):
        raise InputError(f"realtime {realtime!r}: must be true or false")
    image = _image(message, server)
    lag_bound = options.live_lag_bound_s if realtime else None
    audio = LiveAudio(pacer=PlaybackPacer(FRAMES_PER_BLOCK, LOOKAHEAD_S) if realtime else None,
                      lookahead_s=LOOKAHEAD_S, lag_bound_s=lag_bound)
    request = resolve_request(image, audio, str(message.get("prompt", "")), options)
    geometry = request.geometry
    ready = {"type": "ready", "width": geometry.width, "height": geometry.height, "fps": FPS,
             "sample_rate": AUDIO_SAMPLE_RATE, "frames_per_block": geometry.frames_per_block,
             "playout_delay_s": PLAYOUT_DELAY_S, "lag_bound_s": lag_bound,
             "setting": {"size": size, "sample_steps": options.sample_steps,
                         "predicted_rtf": None if predicted_rtf is None else round(predicted_rtf, 2)}}
    if warning:
        ready["warning"] = warning
    return request, LiveOptions(idle_limit_s=idle, jpeg_quality=quality, tts_command=server.tts_command), ready


def start_options(message: dict, server) -> RequestOptions:
    """The session's `RequestOptions`: the start message's option fields (checked as the jobs' form fields,
    within the same limits) over the server's live setting, and its lag bound."""
    fields = {"size": server.live_setting.size, "steps": str(server.live_setting.sample_steps)}
    fields.update({key: str(value) for key, value in message.items() if key in OPTION_FIELDS})
    # The lag bound is a live session's own option: its start field, or this server's --live-lag-bound.
    return RequestOptions.build(form_options(fields, server.limits),
                                live_lag_bound_s=message.get("lag_bound_s", server.live_lag_bound_s))


def _number(message: dict, name: str, default: float) -> float:
    value = message.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} {value!r}: must be a number of seconds")
    return float(value)


def _image(message: dict, server):
    """The portrait: an upload's ``image_id`` or the message's base64 ``image`` (decoded in memory)."""
    if message.get("image_id"):
        path = server.images.get(str(message["image_id"]))
        if path is None:
            raise InputError(f"image_id {message['image_id']!r}: no such upload (or it expired); POST the image to "
                             f"/v1/images again")
        return read_image(path, "image_id")
    try:
        data = base64.b64decode(str(message.get("image", "")), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("--image: the start message's 'image' is not valid base64") from None
    if not data:
        raise InputError("--image: required (the start message's 'image' as base64, or an 'image_id')")
    if len(data) > server.limits.upload_bytes:
        raise InputError(f"--image: larger than this server's {server.limits.upload_bytes / 2**20:g} MiB upload "
                         f"limit (--max-upload-mb)")
    folder = server.queue.new_job_folder()
    try:
        path = folder / "image"
        path.write_bytes(data)
        return read_image(path, "image")
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
