"""The user's inputs: the reference image and the driving audio, read exactly as the reference reads them.

Image: Pillow, EXIF orientation applied (a deliberate difference: the reference ignores it, so a phone
portrait stored sideways came out sideways), ``convert("RGB")`` as the reference, then torchvision's
``Resize(min(H, W))`` + ``CenterCrop((H, W))`` on the PIL image, re-implemented here on Pillow/numpy.
Audio: any file PyAV decodes, averaged to mono and resampled to 16 kHz with soxr at HQ quality, the
defaults of the reference's ``librosa.load(path, sr=16000)``, output length ceil(n * 16000 / rate).
Every unreadable input raises InputError with one line naming the file; so does audio with NaN or
infinite samples, which decodes without complaint and only fails in the encoder (or yields black frames).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from liveavatar.errors import ArgumentError, InputError
from liveavatar.geometry import AUDIO_SAMPLE_RATE

if TYPE_CHECKING:
    import torch

# A decoded stream may be this much shorter than its header says before we call the file truncated
# (codec priming/padding and per-packet rounding make the two differ slightly in valid files).
_DURATION_SLACK_S, _DURATION_SLACK_FRACTION = 0.1, 0.02


def _check_file(path: Path, argument: str, kind: str) -> None:
    if not path.exists():
        raise ArgumentError(argument, f"{path}: file not found")
    if path.is_dir():
        raise ArgumentError(argument, f"{path}: is a folder, expected {kind} file")
    if path.stat().st_size == 0:
        raise ArgumentError(argument, f"{path}: the file is empty (0 bytes)")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image: EXIF orientation applied, converted to RGB as the reference does."""
    path = Path(path).expanduser()
    _check_file(path, "image", "an image")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise ArgumentError("image", f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise ArgumentError("image", f"{path}: too large to decode safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ArgumentError("image", f"{path}: cannot be decoded, the file may be truncated or corrupt ({error})") from None


def fit_image(image: Image.Image, height: int, width: int) -> np.ndarray:
    """torchvision ``CenterCrop((height, width))(Resize(min(height, width))(image))`` on a PIL image ->
    uint8 [height, width, 3]. The shorter side becomes min(height, width) (long side floored), bilinear
    with antialiasing (what torchvision calls on PIL); a crop larger than the image pads with black,
    floor(d/2) before and ceil(d/2) after, and the crop offset is round(d/2) (Python rounding)."""
    short = min(height, width)
    image_w, image_h = image.size
    if image_w <= image_h:
        new_w, new_h = short, int(short * image_h / image_w)
    else:
        new_w, new_h = int(short * image_w / image_h), short
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.BILINEAR)
    pixels = np.asarray(image)
    pad_h, pad_w = max(height - new_h, 0), max(width - new_w, 0)
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    top = int(round((pixels.shape[0] - height) / 2.0))
    left = int(round((pixels.shape[1] - width) / 2.0))
    return np.array(pixels[top:top + height, left:left + width])


def reference_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """The reference frame as the model sees it: fitted to (height, width), float32 [1, 3, 1, H, W] in [-1, 1]."""
    import torch  # kept local so that validating inputs (``--dry-run``) never imports torch

    pixels = torch.from_numpy(fit_image(image, height, width)).permute(2, 0, 1).float().div(255)
    return (pixels * 2 - 1)[None, :, None]


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """The 16 kHz mono float32 waveform of an audio (or video) file."""
    return resample_to_16k(*decode_audio(path))


def waveform_from_array(audio, name: str = "audio") -> np.ndarray:
    """An audio waveform passed as an array, 16 kHz mono [samples], as float32 in [-1, 1]: integer PCM
    (int16 and the like) is scaled as a decoder scales it; NaN/Inf samples and other shapes are refused
    with an InputError naming the argument ``name``."""
    array = np.asarray(audio)
    if array.ndim != 1:
        raise InputError(f"{name}: a waveform must be 16 kHz mono samples [n], got shape {list(array.shape)}")
    if array.dtype.kind not in "iuf":
        raise InputError(f"{name}: {array.dtype} is not audio samples; pass float in [-1, 1] or integer PCM")
    waveform = _samples_to_float32(array)
    _require_finite(waveform, AUDIO_SAMPLE_RATE, name, "")
    return waveform


def resample_to_16k(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """soxr HQ, then zero-padded or cut to ceil(n * 16000 / rate) samples, as ``librosa.resample`` does."""
    if sample_rate == AUDIO_SAMPLE_RATE:
        return waveform
    import soxr  # the media libraries load where files are read (GPU benchmarks run without them)

    length = int(np.ceil(waveform.shape[-1] * (float(AUDIO_SAMPLE_RATE) / sample_rate)))
    resampled = soxr.resample(waveform, sample_rate, AUDIO_SAMPLE_RATE, quality="HQ")[:length]
    return np.pad(resampled, (0, length - resampled.shape[-1])).astype(np.float32, copy=False)


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode the first audio track of any file PyAV opens -> (mono float32 waveform, sample rate).
    Channels are averaged (librosa's to_mono); integer PCM is scaled to [-1, 1) like libsndfile."""
    import av

    path = Path(path).expanduser()
    _check_file(path, "audio", "an audio")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, EOFError) as error:
        raise ArgumentError("audio", f"{path}: not an audio or video file that can be decoded ({_reason(error)})") from None
    with container:
        if not container.streams.audio:
            raise ArgumentError("audio", f"{path}: has no audio track")
        _check_wav_data_chunk(path)
        stream = container.streams.audio[0]
        chunks, sample_rate = [], stream.sample_rate
        try:
            for frame in container.decode(stream):
                if frame.sample_rate != sample_rate:
                    raise ArgumentError("audio", f"{path}: the sample rate changes inside the file "
                                     f"({sample_rate} -> {frame.sample_rate} Hz); convert it to one rate first")
                chunks.append(_frame_to_mono(frame))
        except (av.FFmpegError, EOFError) as error:
            raise ArgumentError("audio", f"{path}: cannot be decoded, the file may be truncated or corrupt "
                             f"({_reason(error)})") from None
        waveform = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        if waveform.size == 0:
            raise ArgumentError("audio", f"{path}: contains no audio samples")
        _require_finite(waveform, sample_rate, "audio", str(path))
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
            decoded = waveform.size / sample_rate
            if decoded < declared - max(_DURATION_SLACK_S, _DURATION_SLACK_FRACTION * declared):
                raise ArgumentError("audio", f"{path}: truncated, the header says {declared:.2f} s but only "
                                 f"{decoded:.2f} s can be decoded")
    return waveform, sample_rate


def _frame_to_mono(frame: "av.AudioFrame") -> np.ndarray:
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    data = _samples_to_float32(data)
    return data[0].copy() if channels == 1 else data.mean(axis=0)


def _samples_to_float32(data: np.ndarray) -> np.ndarray:
    """Integer PCM scaled to [-1, 1) like libsndfile (unsigned, i.e. 8-bit WAV, is centred on half its
    range); float samples as they are."""
    if data.dtype.kind == "f":
        return data.astype(np.float32, copy=False)
    info = np.iinfo(data.dtype)
    half = 2.0 ** (info.bits - 1)
    offset = half if info.min == 0 else 0.0
    return ((data.astype(np.float64) - offset) / half).astype(np.float32)


def _require_finite(waveform: np.ndarray, sample_rate: int, argument: str, subject: str) -> None:
    bad = ~np.isfinite(waveform)
    if bad.any():
        first = int(np.argmax(bad)) / sample_rate
        raise ArgumentError(argument, f"{subject}: {int(bad.sum())} of {waveform.size} samples are NaN or infinite "
                                      f"(the first at {first:.2f} s); the audio is corrupt, export it again")


def _check_wav_data_chunk(path: Path) -> None:
    """FFmpeg silently plays a cut WAV (it trusts the file size); compare the data chunk's declared size
    with the bytes present instead."""
    with open(path, "rb") as file:
        riff = file.read(12)
        if riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
            return
        file_size = path.stat().st_size
        while True:
            header = file.read(8)
            if len(header) < 8:
                return
            chunk_id, chunk_size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk_id == b"data":
                available = file_size - file.tell()
                # 0 and 0xFFFFFFFF are the "size unknown" markers of streamed WAVs.
                if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > available:
                    raise ArgumentError("audio", f"{path}: truncated, the WAV header announces {chunk_size} bytes of "
                                     f"audio but the file holds {available}")
                return
            file.seek(chunk_size + (chunk_size & 1), os.SEEK_CUR)


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)
