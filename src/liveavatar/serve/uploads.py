"""Uploads: a streaming multipart reader that writes files straight into a job's folder under the
server's temp folder (never a spool file elsewhere), with size limits enforced while reading, and the
validation that turns the fields into a `JobSpec` with the CLI's own one-line messages.

Client-supplied file names are only ever shown in messages (cleaned up), never used as paths: the
server stores the two files as ``image`` and ``audio``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from liveavatar.errors import InputError
from liveavatar.geometry import AUDIO_SAMPLE_RATE
from liveavatar.io.media import load_audio, load_image
from liveavatar.serve.backend import JobSpec
from liveavatar.settings import GenerationSettings, GenerationShape, parse_size

FILE_FIELDS = ("image", "audio")
TEXT_FIELDS = ("prompt", "size", "steps", "seed", "mode", "num_clip")
MAX_TEXT_FIELD = 4096


class UploadTooLarge(InputError):
    """HTTP 413."""


@dataclass(frozen=True)
class Limits:
    upload_bytes: int
    audio_seconds: float
    max_area: int
    max_steps: int
    default_size: str


def client_name(raw: str | None, field: str) -> str:
    """A client's file name fit for a message: printable, short; the field name when there is none."""
    name = re.sub(r"[^\w .()+-]", "_", raw or "")[:80].strip()
    return name or field


class MultipartReader:
    """Feed it the body's chunks; file fields go to ``folder/<field>`` (or ``target``), text fields into
    ``fields``."""

    def __init__(self, content_type: str, folder: Path, *, file_fields: tuple[str, ...], text_fields: tuple[str, ...],
                 max_file_bytes: int, target: Path | None = None):
        kind, options = parse_options_header(content_type)
        if kind != b"multipart/form-data" or b"boundary" not in options:
            raise InputError("the request must be multipart/form-data (an HTML form with files, or curl -F)")
        self.folder = folder
        self.file_fields, self.text_fields = file_fields, text_fields
        self.max_file_bytes = max_file_bytes
        self.target = target  # where the one file field goes, instead of folder/<field>
        self.fields: dict[str, str] = {}
        self.files: dict[str, str] = {}  # field -> client's name for it
        self._header_name = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._out = None
        self._size = 0
        self._text = bytearray()
        self._parser = MultipartParser(options[b"boundary"], {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._end})

    def feed(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()

    def _begin(self):
        self._headers, self._header_name = {}, b""

    def _header_field(self, data, start, end):
        self._header_name += data[start:end]

    def _header_value(self, data, start, end):
        key = self._header_name.lower()
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def _header_end(self):
        self._header_name = b""

    def _headers_done(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        accepted = self.file_fields + self.text_fields
        if self._name not in accepted:
            raise InputError(f"unknown field {self._name!r}; the accepted fields are {', '.join(accepted)}")
        if self._name in self.files or self._name in self.fields:
            raise InputError(f"field {self._name!r} given twice")
        self._size = 0
        if self._name in self.file_fields:
            self.files[self._name] = client_name(options.get(b"filename", b"").decode("utf-8", "replace"), self._name)
            self._out = open(self.target or self.folder / self._name, "wb")
        else:
            self._text = bytearray()

    def _data(self, data, start, end):
        self._size += end - start
        if self._out is not None:
            if self._size > self.max_file_bytes:
                raise UploadTooLarge(f"--{self._name} {self.files[self._name]}: larger than this server's "
                                     f"{self.max_file_bytes / 2**20:g} MiB upload limit (--max-upload-mb)")
            self._out.write(data[start:end])
        else:
            if self._size > MAX_TEXT_FIELD:
                raise UploadTooLarge(f"field {self._name!r}: longer than {MAX_TEXT_FIELD} bytes")
            self._text += data[start:end]

    def _end(self):
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._name:
            self.fields[self._name] = self._text.decode("utf-8", "replace")


def _as_int(fields: dict[str, str], name: str, flag: str, default: int | None) -> int | None:
    text = str(fields.get(name, "")).strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--{flag} {text!r}: expected an integer") from None


def read_image(path: Path, name: str):
    """`load_image` with the client's name in the message instead of the server's path."""
    try:
        return load_image(path)
    except InputError as error:
        raise InputError(str(error).replace(str(path), name)) from None


def generation_settings(fields: dict[str, str], limits: Limits, *, image: Path, audio: Path,
                        ckpt_dir: Path) -> GenerationSettings:
    """The request's settings, checked by `GenerationSettings` (the CLI's checks and messages) and against
    the server's limits."""
    size = fields.get("size", "").strip() or limits.default_size
    area = parse_size(size)
    if area > limits.max_area:
        raise InputError(f"--size {size!r}: the area {area} is above this server's limit {limits.max_area} (--max-size)")
    steps = _as_int(fields, "steps", "sample_steps", 4)
    if steps > limits.max_steps:
        raise InputError(f"--sample_steps {steps}: above this server's limit of {limits.max_steps}")
    return GenerationSettings(image=image, audio=(audio,), prompt=fields.get("prompt", ""), ckpt_dir=ckpt_dir,
                              size_area=area, sample_steps=steps,
                              num_clip=_as_int(fields, "num_clip", "num_clip", None),
                              base_seed=_as_int(fields, "seed", "base_seed", 420),
                              mode=fields.get("mode", "").strip() or "streaming")


def job_spec(folder: Path, reader: MultipartReader, limits: Limits, *, ckpt_dir: Path) -> JobSpec:
    """Validate a job's fields and files as ``generate`` validates its flags and inputs (same messages)."""
    for name in FILE_FIELDS:
        if name not in reader.files:
            what = "reference portrait" if name == "image" else "driving speech"
            raise InputError(f"--{name}: required (upload the {what} as the {name!r} file field)")
    image_path, audio_path = folder / "image", folder / "audio"
    settings = generation_settings(reader.fields, limits, image=image_path, audio=audio_path, ckpt_dir=ckpt_dir)
    image = read_image(image_path, reader.files["image"])
    try:
        (waveform,) = load_audio([audio_path])
        seconds = len(waveform) / AUDIO_SAMPLE_RATE
        if seconds > limits.audio_seconds:
            raise InputError(f"--audio {audio_path}: {seconds:.1f} s is longer than this server's "
                             f"{limits.audio_seconds:g} s limit (--max-audio-s); cut it or use the live session")
        GenerationShape.compute(settings, image.size, len(waveform))
    except InputError as error:
        text = str(error).replace(str(audio_path), reader.files["audio"]).replace(str(image_path), reader.files["image"])
        raise InputError(text) from None
    return JobSpec(image=image_path, audio=audio_path, prompt=settings.prompt, size_area=settings.size_area,
                   sample_steps=settings.sample_steps, base_seed=settings.base_seed, mode=settings.mode,
                   num_clip=settings.num_clip)
