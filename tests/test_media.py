import json
import math
import wave
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from liveavatar.errors import InputError
from liveavatar.io.media import (decode_audio, fit_image, load_audio, load_image, reference_tensor, resample_to_16k,
                                 waveform_from_array)
from liveavatar.settings import split_audio_spec


# ----------------------------------------------------------------------------------------------- image

@pytest.mark.parametrize("mode", ["offline", "online", "tpp"])
def test_reference_tensor_matches_fixture_b(fixtures_dir, mode):
    manifest = json.loads((fixtures_dir / f"B_loop_{mode}.json").read_text())
    expected = load_file(str(fixtures_dir / f"B_loop_{mode}.safetensors"))["in.ref_pixel_values"]
    height, width = manifest["generated_hw"]
    got = reference_tensor(load_image(fixtures_dir / manifest["generate_kwargs"]["ref_image_path"]), height, width)
    assert got.shape == (1, 3, 1, height, width) and got.dtype == torch.float32
    assert torch.equal(got[0], expected)


def test_landscape_example_gets_6_and_7_black_columns(media_dir):
    # As the reference preprocesses it: 720x400 -> resized 691x384 -> 6 black columns left, 7 right at 704x384.
    pixels = fit_image(load_image(media_dir / "dwarven_blacksmith.jpg"), 384, 704)
    assert pixels.shape == (384, 704, 3) and pixels.dtype == np.uint8
    column_max = pixels.max(axis=(0, 2))
    assert (column_max[:6] == 0).all() and (column_max[-7:] == 0).all()
    assert column_max[6] > 0 and column_max[-8] > 0


def test_portrait_example_gets_black_rows(media_dir):
    pixels = fit_image(load_image(media_dir / "fashion_blogger.jpg"), 704, 384)
    row_max = pixels.max(axis=(1, 2))
    assert pixels.shape == (704, 384, 3)
    assert (row_max[:6] == 0).all() and (row_max[-7:] == 0).all() and row_max[6] > 0 and row_max[-8] > 0


def test_resize_is_pil_bilinear_of_the_shorter_side():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    # shorter side 300 -> 192, long side floor(192*500/300) = 320, then centre crop 192x256 (offset 32)
    expected = np.asarray(image.resize((320, 192), Image.BILINEAR))[:, 32:288]
    assert np.array_equal(fit_image(image, 192, 256), expected)


@pytest.mark.parametrize("extra, left", [(1, 0), (3, 2), (5, 2), (7, 4)])
def test_crop_offset_uses_python_rounding(extra, left):
    # torchvision's CenterCrop: left = int(round(d / 2)), i.e. round-half-to-even.
    columns = np.tile(np.arange(64 + extra, dtype=np.uint8), (64, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    pixels = fit_image(image, 64, 64)
    assert pixels[0, 0, 0] == left


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (80, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(path, exif=exif)
    assert load_image(path).size == (40, 80)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_any_pillow_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("image.tiff" if mode in ("CMYK", "I;16") else "image.png")
    Image.new(mode, (30, 20)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)


def _bad_image_cases():
    def missing(tmp, media):
        return tmp / "missing.jpg"

    def folder(tmp, media):
        return tmp

    def empty(tmp, media):
        (tmp / "empty.jpg").write_bytes(b"")
        return tmp / "empty.jpg"

    def text(tmp, media):
        (tmp / "text.jpg").write_text("not an image\n")
        return tmp / "text.jpg"

    def truncated(tmp, media):
        data = (media / "dwarven_blacksmith.jpg").read_bytes()
        (tmp / "cut.jpg").write_bytes(data[: len(data) // 2])
        return tmp / "cut.jpg"

    return {"missing": (missing, "not found"), "folder": (folder, "folder"), "empty": (empty, "empty"),
            "text": (text, "not an image"), "truncated": (truncated, "truncated")}


@pytest.mark.parametrize("case", list(_bad_image_cases()))
def test_bad_images_give_one_line(tmp_path, media_dir, case):
    make, words = _bad_image_cases()[case]
    path = make(tmp_path, media_dir)
    with pytest.raises(InputError) as error:
        load_image(path)
    message = error.value.as_flag()  # the command line's spelling; str() names the API argument
    assert message.startswith(f"--image {path}") and words in message and "\n" not in message
    assert str(error.value).startswith(f"image {path}")


# ----------------------------------------------------------------------------------------------- audio

def test_pcm16_wav_matches_fixture_d(fixtures_dir):
    expected = load_file(str(fixtures_dir / "D_encoders.safetensors"))["audio.in.waveform"].numpy()
    waveform = load_audio(str(fixtures_dir / "D_inputs" / "audio.wav"))
    assert waveform.dtype == np.float32 and np.array_equal(waveform, expected)


def test_example_audio_is_resampled_to_librosa_length(media_dir):
    # librosa.load(sr=16000) of the example: 425,280 samples at 24 kHz -> 283,520 at 16 kHz.
    native, rate = decode_audio(media_dir / "dwarven_blacksmith.wav")
    assert (native.size, rate) == (425_280, 24_000)
    waveform = load_audio(str(media_dir / "dwarven_blacksmith.wav"))
    assert waveform.size == 283_520 and waveform.dtype == np.float32


def test_resampling_keeps_a_tone():
    rate = 44_100
    t = np.arange(rate * 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = resample_to_16k(tone, rate)
    assert out.size == math.ceil(tone.size * 16000 / rate)
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(out.size) / 16000)
    assert np.abs(out[1000:-1000] - expected[1000:-1000]).max() < 2e-3


def _tone(rate, seconds, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    left = 0.4 * np.sin(2 * np.pi * 330 * t)
    right = 0.2 * np.sin(2 * np.pi * 550 * t)
    return np.stack([left, right][:channels]).astype(np.float32)


def _write_with_pyav(path, codec, signal, rate, container_format=None, with_video=False):
    layout = "mono" if signal.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=container_format) as container:
        if with_video:
            video = container.add_stream("libx264", rate=25)
            video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if with_video:
            for index in range(int(signal.shape[1] / rate * 25)):
                frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, 25)
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
        frame_size = 960 if codec == "libopus" else 1024
        for start in range(0, signal.shape[1], frame_size):
            chunk = signal[:, start:start + frame_size]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_wav(path, signal, rate, sample_width):
    scale = 2 ** (8 * sample_width - 1) - 1
    pcm = np.round(signal.T * scale).astype("<i4")
    data = b"".join(int(v).to_bytes(4, "little", signed=True)[:sample_width] for v in pcm.ravel()) \
        if sample_width == 3 else pcm.astype(f"<i{sample_width}").tobytes()
    with wave.open(str(path), "wb") as file:
        file.setnchannels(signal.shape[0])
        file.setsampwidth(sample_width)
        file.setframerate(rate)
        file.writeframes(data)


def _write_float_wav(path, signal, rate):
    # WAVE_FORMAT_IEEE_FLOAT (3), the format of the reference's example audio
    data = signal.T.astype("<f4").tobytes()
    channels = signal.shape[0]
    fmt = (b"fmt " + (16).to_bytes(4, "little") + (3).to_bytes(2, "little") + channels.to_bytes(2, "little")
           + rate.to_bytes(4, "little") + (rate * 4 * channels).to_bytes(4, "little")
           + (4 * channels).to_bytes(2, "little") + (32).to_bytes(2, "little"))
    body = b"WAVE" + fmt + b"data" + len(data).to_bytes(4, "little") + data
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)


AUDIO_FORMATS = {
    "int16.wav": lambda p, s, r: _write_wav(p, s, r, 2),
    "int24.wav": lambda p, s, r: _write_wav(p, s, r, 3),
    "float32.wav": _write_float_wav,
    "speech.flac": lambda p, s, r: _write_with_pyav(p, "flac", s, r),
    "speech.mp3": lambda p, s, r: _write_with_pyav(p, "libmp3lame", s, r),
    "speech.m4a": lambda p, s, r: _write_with_pyav(p, "aac", s, r),
    "speech.ogg": lambda p, s, r: _write_with_pyav(p, "libopus", s, 48_000, container_format="ogg"),
    "talking.mp4": lambda p, s, r: _write_with_pyav(p, "aac", s, r, with_video=True),
}


@pytest.mark.parametrize("name", list(AUDIO_FORMATS))
def test_every_format_decodes_to_16k_mono(tmp_path, name):
    rate = 48_000 if name.endswith(".ogg") else 24_000
    signal = _tone(rate, 1.5, channels=2)
    path = tmp_path / name
    AUDIO_FORMATS[name](path, signal, rate)
    waveform = load_audio(str(path))
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(waveform.size - 24_000) <= 1_200  # 1.5 s at 16 kHz, up to codec padding
    # the mono mix is the average of the channels: compare with the resampled average of the source,
    # allowing lossy codecs a small delay
    expected = resample_to_16k(signal.mean(axis=0), rate)
    got, max_lag = waveform[3000:20000], 0 if name.endswith(".wav") or name.endswith(".flac") else 1200
    window = expected[3000 - max_lag:20000 + max_lag]
    scores = np.correlate(window, got, "valid")
    lag = int(np.argmax(scores))
    matched = window[lag:lag + got.size]
    assert np.corrcoef(got, matched)[0, 1] > 0.99


def test_pcm_wav_mono_mix_is_exact(tmp_path):
    signal = _tone(16_000, 0.5, channels=2)
    _write_wav(tmp_path / "stereo.wav", signal, 16_000, 2)
    waveform = load_audio(tmp_path / "stereo.wav")
    pcm = np.round(signal * 32767).astype(np.int16).astype(np.float32) / 32768
    assert np.array_equal(waveform, pcm.mean(axis=0))


def test_plus_joins_files_unless_the_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_wav(tmp_path / "a.wav", _tone(16_000, 0.5), 16_000, 2)
    _write_wav(tmp_path / "b.wav", _tone(16_000, 0.25), 16_000, 2)
    first, second = (load_audio(path) for path in split_audio_spec("a.wav+b.wav"))
    assert (first.size, second.size) == (8000, 4000)
    _write_wav(tmp_path / "a+b.wav", _tone(16_000, 0.75), 16_000, 2)
    (only,) = (load_audio(path) for path in split_audio_spec("a+b.wav"))
    assert only.size == 12_000


def test_home_relative_audio_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_wav(tmp_path / "voice.wav", _tone(16_000, 0.5), 16_000, 2)
    assert load_audio("~/voice.wav").size == 8000


def _cut(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _bad_audio_cases():
    def missing(tmp):
        return tmp / "nothing.wav"

    def folder(tmp):
        (tmp / "dir.wav").mkdir()
        return tmp / "dir.wav"

    def empty(tmp):
        (tmp / "empty.wav").write_bytes(b"")
        return tmp / "empty.wav"

    def text(tmp):
        (tmp / "notes.wav").write_text("this is not audio\n" * 20)
        return tmp / "notes.wav"

    def image(tmp):
        Image.new("RGB", (64, 64)).save(tmp / "picture.png")
        return tmp / "picture.png"

    def truncated_pcm(tmp):
        _write_wav(tmp / "cut.wav", _tone(24_000, 2.0), 24_000, 2)
        return _cut(tmp / "cut.wav", 0.6)

    def truncated_float(tmp):
        _write_float_wav(tmp / "cut.wav", _tone(24_000, 2.0), 24_000)
        return _cut(tmp / "cut.wav", 0.6)

    def truncated_flac(tmp):
        _write_with_pyav(tmp / "cut.flac", "flac", _tone(24_000, 2.0), 24_000)
        return _cut(tmp / "cut.flac", 0.6)

    def zero_samples(tmp):
        _write_wav(tmp / "silent.wav", np.zeros((1, 0), np.float32), 16_000, 2)
        return tmp / "silent.wav"

    def with_samples(value):
        def make(tmp):
            signal = _tone(24_000, 1.0)
            signal[0, 12_000:12_010] = value
            _write_float_wav(tmp / "broken.wav", signal, 24_000)
            return tmp / "broken.wav"
        return make

    def video_without_audio(tmp):
        path = tmp / "mute.mp4"
        with av.open(str(path), "w") as container:
            video = container.add_stream("libx264", rate=25)
            video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
            for index in range(5):
                frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, 25)
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
        return path

    return {"missing": (missing, "not found"), "folder": (folder, "folder"), "empty": (empty, "empty"),
            "text": (text, "not an audio"), "image": (image, "no audio track"),
            "truncated_pcm": (truncated_pcm, "truncated"), "truncated_float": (truncated_float, "truncated"),
            "truncated_flac": (truncated_flac, "truncated"), "zero_samples": (zero_samples, "no audio samples"),
            "video_without_audio": (video_without_audio, "no audio track"),
            "nan_samples": (with_samples(np.nan), "10 of 24000 samples are NaN or infinite (the first at 0.50 s)"),
            "infinite_samples": (with_samples(-np.inf), "NaN or infinite")}


@pytest.mark.parametrize("case", list(_bad_audio_cases()))
def test_bad_audio_gives_one_line(tmp_path, case):
    make, words = _bad_audio_cases()[case]
    path = make(tmp_path)
    with pytest.raises(InputError) as error:
        load_audio(str(path))
    message = error.value.as_flag()  # the command line's spelling; str() names the API argument
    assert message.startswith(f"--audio {path}") and words in message and "\n" not in message
    assert str(error.value).startswith(f"audio {path}")


def test_an_api_waveform_is_scaled_and_checked_like_a_file(tmp_path):
    pcm = np.array([0, 16384, -32768, 32767, -8], np.int16)
    waveform = waveform_from_array(pcm)
    assert waveform.dtype == np.float32 and waveform.tolist() == [0.0, 0.5, -1.0, 32767 / 32768, -8 / 32768]
    assert waveform_from_array(np.array([0, 128, 255], np.uint8)).tolist() == [-1.0, 0.0, 127 / 128]
    assert waveform_from_array([0.25, -0.5]).dtype == np.float32
    # the same samples read from a WAV file decode to the same floats
    _write_wav(tmp_path / "pcm.wav", (pcm / 32767.0)[None], 16_000, 2)
    with wave.open(str(tmp_path / "pcm.wav")) as file:
        file_pcm = np.frombuffer(file.readframes(5), "<i2")
    assert np.array_equal(decode_audio(tmp_path / "pcm.wav")[0], waveform_from_array(file_pcm))


@pytest.mark.parametrize("audio, words", [
    (np.array([0.1, np.nan, 0.2], np.float32), "audio: 1 of 3 samples are NaN or infinite"),
    (np.full(4, np.inf), "audio: 4 of 4 samples are NaN or infinite"),
    (np.zeros((2, 16000), np.float32), "audio: a waveform must be 16 kHz mono samples [n], got shape [2, 16000]"),
    (np.array(["a", "b"]), "audio: <U1 is not audio samples"),
])
def test_bad_api_waveforms_name_the_argument(audio, words):
    with pytest.raises(InputError) as error:
        waveform_from_array(audio)
    assert str(error.value).startswith(words) and "--" not in str(error.value)
