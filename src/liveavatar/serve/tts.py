"""Typed text spoken on the server (a live session's ``say`` message, the client's ``--text``): any
command that reads the text on stdin and writes a WAV file (any rate, any channels) on stdout; Debian's
``espeak-ng`` by default, which runs offline.
"""
from __future__ import annotations

import shlex
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from liveavatar.errors import InputError
from liveavatar.io.media import load_audio

DEFAULT_TTS_COMMAND = "espeak-ng --stdin --stdout"
MAX_TEXT_BYTES = 4096  # as a text field of the HTTP form (uploads.MAX_TEXT_FIELD)
TTS_TIMEOUT_S = 30.0


class SpeechFailed(InputError):
    """The TTS command failed or gave no audio."""


def check_text(text) -> str:
    """The text a ``say`` may carry: non-empty, at most MAX_TEXT_BYTES of UTF-8."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("say: 'text' must be non-empty text")
    if len(text.encode()) > MAX_TEXT_BYTES:
        raise InputError(f"say: 'text' is longer than {MAX_TEXT_BYTES} bytes; send it in several 'say' messages")
    return text


def synthesize(text: str, command: str = DEFAULT_TTS_COMMAND) -> np.ndarray:
    """Speak ``text`` with ``command``: 16 kHz mono float32 samples. Raises SpeechFailed (one line)."""
    check_text(text)
    argv = shlex.split(command)
    try:
        done = subprocess.run(argv, input=text.encode(), capture_output=True, timeout=TTS_TIMEOUT_S)
    except FileNotFoundError:
        raise SpeechFailed(f"say: the TTS command {argv[0]!r} is not installed (--tts-command names another; "
                           f"Debian: apt install espeak-ng)") from None
    except subprocess.TimeoutExpired:
        raise SpeechFailed(f"say: the TTS command {command!r} took longer than {TTS_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1][:200]
        raise SpeechFailed(f"say: the TTS command {command!r} failed (exit {done.returncode}: {last})")
    with tempfile.TemporaryDirectory(prefix="liveavatar-tts-") as folder:
        path = Path(folder) / "speech.wav"
        path.write_bytes(_sized_wav(done.stdout))
        try:
            samples = load_audio(path)
        except InputError:
            raise SpeechFailed(f"say: the TTS command {command!r} did not write a WAV file on stdout") from None
    if not len(samples):
        raise SpeechFailed(f"say: the TTS command {command!r} gave no audio")
    return samples


def _sized_wav(data: bytes) -> bytes:
    """A WAV written to a pipe cannot seek back to fill in its sizes (espeak-ng and sox leave a 2 GiB
    placeholder): set the RIFF and data chunk sizes to what arrived."""
    start = data.find(b"data", 12)
    if data[:4] != b"RIFF" or start < 0 or len(data) < start + 8:
        return data
    return (data[:4] + struct.pack("<I", len(data) - 8) + data[8:start + 4]
            + struct.pack("<I", len(data) - start - 8) + data[start + 8:])
