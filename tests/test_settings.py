import math
from datetime import datetime
from pathlib import Path

import pytest

from liveavatar.errors import InputError
from liveavatar.io.media import load_audio
import numpy as np
from PIL import Image

from liveavatar.geometry import audio_clip_count, size_for_area
from liveavatar.options import (DEFAULTS, OPTION_NAMES, Mode, RequestOptions, parse_bool, parse_ref_rope_offset,
                                parse_size)
from liveavatar.request import resolve_request
from liveavatar.settings import GenerationSettings, parse_vram_budget, split_audio_spec


@pytest.mark.parametrize("text", ["704*384", "704x384", "704X384", "704×384", "704 * 384", " 384*704 "])
def test_every_size_spelling_is_the_same_area(text):
    assert parse_size(text) == 704 * 384


@pytest.mark.parametrize("text", ["big", "0*0", "-704*384", "704*", "704*384*2", "704.5*384", "", "63*64"])
def test_bad_size_names_the_accepted_forms(text):
    with pytest.raises(InputError) as error:
        parse_size(text)
    message = error.value.as_flag()  # the CLI's spelling; str() names the API keyword
    assert message.startswith("--size") and "704x384" in message and "\n" not in message
    assert str(error.value).startswith("size ")


# The reference's size search (`--size` is an area; the aspect ratio follows the image, 64-pixel steps):
# (size, image w×h) -> W×H, as the reference chooses them.
@pytest.mark.parametrize("size, image_wh, expected_wh", [
    ("704*384", (720, 400), (704, 384)),
    ("704*384", (400, 720), (384, 704)),
    ("704*384", (1920, 1080), (704, 384)),
    ("704*384", (1024, 1024), (512, 512)),
    ("720*400", (720, 400), (704, 384)),
    ("688*368", (720, 400), (640, 384)),
    ("384*256", (720, 400), (384, 256)),
    ("480*832", (720, 400), (768, 448)),
])
def test_size_search_matches_the_reference_table(size, image_wh, expected_wh):
    (image_w, image_h), (width, height) = image_wh, expected_wh
    assert size_for_area(image_h, image_w, parse_size(size)) == (height, width)


def test_fixture_b_size_comes_from_the_same_search(fixtures_dir):
    import json

    manifest = json.loads((fixtures_dir / "B_loop_offline.json").read_text())
    image_h, image_w = manifest["ref_image_source_hw"]
    assert list(size_for_area(image_h, image_w, manifest["generate_kwargs"]["max_area"])) == manifest["generated_hw"]


@pytest.mark.parametrize("image_hw", [(400, 720), (1080, 1920), (333, 517), (2000, 301), (50, 70), (640, 640)])
@pytest.mark.parametrize("area", [384 * 256, 704 * 384, 720 * 400, 1280 * 720, 5000])
def test_any_area_gives_multiples_of_64_within_the_area(image_hw, area):
    height, width = size_for_area(*image_hw, area)
    assert height % 64 == 0 and width % 64 == 0 and 0 < height * width <= area
    # the aspect ratio follows the image (up to the 64-pixel rounding)
    assert (height >= width) == (image_hw[0] >= image_hw[1]) or abs(height - width) <= 64


def test_size_search_scans_the_2ac_bound_of_the_reference():
    # With 4ac the lower scan bound is higher and the 100-step scan is finer; the reference's 2ac
    # bound reaches other sizes for some images. This image/area pair tells the two apart.
    def search(h, w, area, discriminant_factor):
        d, a, b, c = 63, h * w, 63 * (h + w), 63**2 - area
        low = (-b + math.sqrt(b * b - discriminant_factor * a * c)) / (2 * a)
        high = math.sqrt(area / (h * w))
        for i in range(100):
            s = high - (high - low) * i / 100
            hh, ww = -(-int(h * s) // 64) * 64, -(-int(w * s) // 64) * 64
            if hh * ww <= area:
                return hh, ww
    cases = [(h, w, a) for h in range(300, 2000, 37) for w in range(300, 2000, 41) for a in (270336, 288000)
             if h * w > a and search(h, w, a, 2) != search(h, w, a, 4)]
    assert cases, "no image where the 2ac quirk matters; the test needs another search range"
    for h, w, area in cases[:20]:
        assert size_for_area(h, w, area) == search(h, w, area, 2)


def test_clip_count_from_sample_count(media_dir):
    # The reference's example: 283,520 samples at 16 kHz -> T50 885 -> N30 531 -> 10 clips.
    assert audio_clip_count(283_520, 48) == 10
    # and the other examples' durations: cyclops_baker 11.6 s -> 7, fashion_blogger 12.8 s -> 7
    for name, clips in [("cyclops_baker.wav", 7), ("fashion_blogger.wav", 7), ("dwarven_blacksmith.wav", 10)]:
        waveform = load_audio(media_dir / name)
        assert audio_clip_count(len(waveform), 48) == clips


def test_clip_count_follows_infer_frames():
    samples = 283_520  # N30 = 531
    for infer_frames in (12, 24, 48, 96):
        assert audio_clip_count(samples, infer_frames) == int(531 / (infer_frames * 1.2)) + 1


@pytest.mark.parametrize("text, value", [("True", True), ("false", False), ("1", True), ("0", False),
                                         ("yes", True), ("NO", False), (True, True)])
def test_parse_bool(text, value):
    assert parse_bool(text) is value


def test_parse_bool_rejects_other_words():
    with pytest.raises(ValueError):
        parse_bool("maybe")


@pytest.mark.parametrize("text, expected", [("40", 40 * 2**30), ("40GiB", 40 * 2**30), ("40g", 40 * 2**30),
                                            ("38000MiB", 38000 * 2**20), ("1.5T", int(1.5 * 2**40))])
def test_vram_budget(text, expected):
    assert parse_vram_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "-4G", "0", "40 GB extra"])
def test_bad_vram_budget(text):
    with pytest.raises(InputError, match="--vram-budget"):
        parse_vram_budget(text)


def test_ref_rope_offset_values():
    assert parse_ref_rope_offset("seeded") == "seeded"
    assert parse_ref_rope_offset("RANDOM") == "random"
    assert parse_ref_rope_offset("4") == 4 and parse_ref_rope_offset(30) == 30
    for bad in ("3", "31", "abc", "-5"):
        with pytest.raises(InputError, match="^ref_rope_offset"):
            parse_ref_rope_offset(bad)


def test_audio_spec_split_on_plus_unless_the_path_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert split_audio_spec("a.wav+b.wav") == [tmp_path / "a.wav", tmp_path / "b.wav"]
    (tmp_path / "me+you.wav").write_bytes(b"x")
    assert split_audio_spec("me+you.wav") == [tmp_path / "me+you.wav"]
    with pytest.raises(InputError):
        split_audio_spec("a.wav+")


def _settings(tmp_path, **overrides):
    values = dict(image=tmp_path / "i.jpg", audio=str(tmp_path / "a.wav"), ckpt_dir=tmp_path / "ckpt")
    values.update(overrides)
    return GenerationSettings(**values)


def test_settings_defaults_are_the_engine_defaults(tmp_path):
    settings = _settings(tmp_path)
    options = settings.options
    assert options == DEFAULTS == RequestOptions()
    assert (options.infer_frames, options.sample_steps, options.size, options.base_seed) == (48, 4, 270336, 420)
    assert options.mode is Mode.STREAMING and options.ref_rope_offset == "seeded" and options.num_clip is None
    assert settings.dtype is None and settings.device is None  # chosen from the hardware by the engine
    assert settings.audio == (tmp_path / "a.wav",)


def test_options_are_normalised_when_built_and_overridden_by_name():
    options = RequestOptions(size="64 x 128", mode="single_gpu", ref_rope_offset="7", enable_online_decode="yes")
    assert (options.size, options.mode, options.ref_rope_offset, options.enable_online_decode) == \
        (64 * 128, Mode.SINGLE_GPU, 7, True)
    assert options == RequestOptions(size=8192, mode=Mode.SINGLE_GPU, ref_rope_offset=7, enable_online_decode=True)
    changed = RequestOptions.build(options, num_clip=2, base_seed=-1)
    assert (changed.num_clip, changed.base_seed, changed.size) == (2, -1, 8192) and options.num_clip is None
    assert RequestOptions.build() == DEFAULTS and RequestOptions.build(options) is options
    with pytest.raises(InputError) as error:
        RequestOptions.build(options, steps=3)
    assert str(error.value) == f"steps: not an option; the options are {', '.join(OPTION_NAMES)}"


def test_settings_paths_expand_home_and_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    settings = GenerationSettings(image="~/face.png", audio="speech.wav", ckpt_dir="ckpt", save_dir="out")
    assert settings.image == tmp_path / "face.png"
    assert settings.audio == (tmp_path / "speech.wav",)
    assert settings.ckpt_dir == tmp_path / "ckpt" and settings.save_dir == tmp_path / "out"


@pytest.mark.parametrize("overrides, flag", [
    ({"dtype": "int8"}, "--dtype"), ({"dtype": "float16"}, "--dtype"), ({"device": "gpu0"}, "--device"),
    ({"save_file": "out.avi"}, "--save_file"), ({"audio": "a.wav+b.wav"}, "--audio"),
])
def test_settings_reject_nonsense(tmp_path, overrides, flag):
    with pytest.raises(InputError) as error:
        _settings(tmp_path, **overrides)
    assert str(error.value).startswith(flag) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, name", [
    ({"infer_frames": 50}, "infer_frames"), ({"infer_frames": 0}, "infer_frames"),
    ({"sample_steps": 0}, "sample_steps"), ({"num_clip": -1}, "num_clip"), ({"num_clip": 0}, "num_clip"),
    ({"base_seed": -2}, "base_seed"), ({"mode": "tpp"}, "mode"), ({"ref_rope_offset": "2"}, "ref_rope_offset"),
    ({"size": 4095}, "size"), ({"size": "63*64"}, "size"), ({"enable_online_decode": "maybe"}, "enable_online_decode"),
])
def test_the_options_reject_nonsense_when_built(overrides, name):
    """The generation options are checked once, when built, before any input is read."""
    with pytest.raises(InputError) as error:
        RequestOptions(**overrides)
    assert str(error.value).startswith(name) and "\n" not in str(error.value)


def test_online_decode_in_streaming_mode_is_ignored_with_one_notice(media_dir, tmp_path):
    inputs = dict(image=media_dir / "dwarven_blacksmith.jpg", audio=str(media_dir / "dwarven_blacksmith.wav"))
    request = _settings(tmp_path, **inputs, options=RequestOptions(enable_online_decode=True)).request()
    assert not request.options.online_decode and len(request.notices) == 1 and "single_gpu" in request.notices[0]
    single = _settings(tmp_path, **inputs, options=RequestOptions(enable_online_decode=True, mode="single_gpu"))
    assert single.request().options.online_decode and not single.request().notices


def test_save_dir_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InputError, match="--save_dir"):
        _settings(tmp_path, save_dir=tmp_path / "taken")


def test_dtype_aliases(tmp_path):
    assert _settings(tmp_path, dtype="bf16").dtype == "bfloat16"
    assert _settings(tmp_path, dtype="fp32").dtype == "float32"


def test_output_path_is_a_file_inside_save_dir(tmp_path):
    settings = _settings(tmp_path, save_dir=tmp_path / "videos", prompt="a dwarf / smith: laughing?",
                         options=RequestOptions(sample_steps=3))
    path = settings.output_path(704, 384, now=datetime(2025, 1, 2, 3, 4, 5))
    assert path.parent == tmp_path / "videos"
    assert path.name == "20250102_030405_704x384_3step_a_dwarf___smith__laughing.mp4"
    assert _settings(tmp_path).output_path(64, 128).name.endswith("_64x128_4step.mp4")
    assert _settings(tmp_path, save_file="x/y.mp4").output_path(1, 1) == Path.cwd() / "x" / "y.mp4"


def _request(image_size, samples, **options):
    return resolve_request(Image.new("RGB", image_size), np.zeros(samples, np.float32), "", RequestOptions(**options))


def test_shape_counts_frames_and_tokens():
    shape = _request((720, 400), 283_520).shape_report()
    assert (shape["width"], shape["height"], shape["latent_width"], shape["latent_height"]) == (704, 384, 88, 48)
    # 10 clips make 477 frames; the video holds the 443 the audio lasts, from the 38 blocks they need.
    assert shape["tokens_per_frame"] == 1056 and shape["num_clips"] == 10 and shape["num_frames"] == 443
    assert shape["total_blocks"] == 38 and shape["generated_frames"] == 38 * 12 - 3
    assert shape["duration_s"] == pytest.approx(443 / 25) and shape["audio_s"] == pytest.approx(17.72)
    limited = _request((400, 720), 283_520, num_clip=2, infer_frames=24)
    report = limited.shape_report()
    assert (report["width"], report["height"], report["num_clips"], report["num_frames"]) == (384, 704, 2, 45)
    assert "2 clips of" in limited.summary()


def test_shape_rejects_too_short_audio_and_extreme_images():
    with pytest.raises(InputError, match="^audio"):
        _request((720, 400), 399)
    with pytest.raises(InputError, match="^image"):
        _request((4000, 10), 16000, size=64 * 128)
