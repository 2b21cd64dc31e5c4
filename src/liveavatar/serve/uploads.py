"""Uploads: a streaming multipart reader that writes files straight into a job's folder under the
server's temp folder (never a spool file elsewhere), with size limits enforced while reading, and the
validation that resolves the fields and files into the job's `Request` (decoded once, here) with the CLI's
own one-line messages.

Client-supplied file names are only ever shown in messages (cleaned up), never used as paths: the
server stores the two files as ``image`` and ``audio``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from liveavatar.errors import ArgumentError, InputError
from liveavatar.io.media import load_image
from liveavatar.options import DEFAULTS, RequestOptions, option_from_text, parse_size
from liveavatar.request import Request, resolve_request

FILE_FIELDS = ("image", "audio")
# The form's text fields that are request options, and the option each one sets.
OPTION_FIELDS = {"size": "size", "steps": "sample_steps", "seed": "base_seed", "mode": "mode", "num_clip": "num_clip",
                 "attention": "attention"}
TEXT_FIELDS = ("prompt", *OPTION_FIELDS)
MAX_TEXT_FIELD = 4096
# The sizes the pages offer (only the area matters: the portrait's aspect sets the shape), cut at --max-size.
OFFERED_SIZES = ("704*384", "640*352", "576*320", "512*288", "448*256", "384*256", "320*192")


class UploadTooLarge(InputError):
    """HTTP 413."""


@dataclass(frozen=True)
class Limits:
    upload_bytes: int
    audio_seconds: float
    max_area: int
    max_steps: int
    default_size: str
    default_attention: str = DEFAULTS.attention

    @property
    def default_steps(self) -> int:
        return min(DEFAULTS.sample_steps, self.max_steps)

    def sizes(self) -> list[str]:
        """The offered sizes this server accepts, and its default size, largest first."""
        accepted = {parse_size(size): size for size in OFFERED_SIZES if parse_size(size) <= self.max_area}
        accepted[parse_size(self.default_size)] = self.default_size
        return [accepted[area] for area in sorted(accepted, reverse=True)]


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


def _as_flags(error: InputError) -> str:
    """The message as the command line prints it (the server answers with the CLI's lines)."""
    return error.as_flag() if isinstance(error, ArgumentError) else str(error)


def read_image(path: Path, name: str):
    """`load_image` with the client's name in the message instead of the server's path."""
    try:
        return load_image(path)
    except InputError as error:
        raise InputError(_as_flags(error).replace(str(path), name)) from None


def form_options(fields: dict[str, str], limits: Limits) -> RequestOptions:
    """The `RequestOptions` a request's text fields (`OPTION_FIELDS`) give, within the server's limits; a
    field left empty keeps the server's default."""
    given = {OPTION_FIELDS[name]: option_from_text(OPTION_FIELDS[name], text.strip())
             for name, text in fields.items() if name in OPTION_FIELDS and text.strip()}
    options = RequestOptions(**{"size": limits.default_size, "sample_steps": limits.default_steps,
                                "attention": limits.default_attention, **given})
    if options.size > limits.max_area:
        raise ArgumentError("size", f"{fields.get('size', '').strip() or limits.default_size!r}: the area "
                                    f"{options.size} is above this server's limit {limits.max_area} (--max-size)")
    if options.sample_steps > limits.max_steps:
        raise ArgumentError("sample_steps", f"{options.sample_steps}: above this server's limit of {limits.max_steps}")
    return options


def job_request(folder: Path, reader: MultipartReader, limits: Limits) -> Request:
    """A job's `Request`, checked as ``generate`` checks its flags and inputs (same messages), the client's
    file names in place of the server's paths."""
    for name in FILE_FIELDS:
        if name not in reader.files:
            what = "reference portrait" if name == "image" else "driving speech"
            raise InputError(f"--{name}: required (upload the {what} as the {name!r} file field)")
    image_path, audio_path = folder / "image", folder / "audio"
    options = form_options(reader.fields, limits)
    image = read_image(image_path, reader.files["image"])
    try:
        request = resolve_request(image, audio_path, reader.fields.get("prompt", ""), options)
    except InputError as error:
        raise InputError(_as_flags(error).replace(str(audio_path), reader.files["audio"])) from None
    if request.audio_seconds > limits.audio_seconds:
        raise InputError(f"--audio {reader.files['audio']}: {request.audio_seconds:.1f} s is longer than this "
                         f"server's {limits.audio_seconds:g} s limit (--max-audio-s); cut it or use the live session")
    return request
