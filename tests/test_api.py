"""End to end on tiny checkpoints (`make_tiny_checkpoints`) and the example media: mp4 output, frame counts
and sizes, determinism, Ctrl-C, flat memory, and request validation."""
import ctypes
import io

import av
import numpy as np
import pytest
import torch

from liveavatar.api import LiveAvatarPipeline
from liveavatar.models.tiny import make_tiny_checkpoints
from liveavatar.cli.generate import generate_from_settings
from liveavatar.errors import InputError
from liveavatar.runtime.progress import Progress, host_rss_bytes
from liveavatar.options import RequestOptions
from liveavatar.settings import GenerationSettings

from conftest import live_tensor_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(tiny, tmp_path_factory):
    return LiveAvatarPipeline.from_pretrained(tiny.ckpt_dir, lora=tiny.lora, device="cpu", dtype=torch.float32,
                                              prompt_cache_dir=tmp_path_factory.mktemp("prompts"))


def _probe(path):
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio
        info = {"codec": video.codec_context.name, "pix_fmt": video.codec_context.pix_fmt,
                "width": video.codec_context.width, "height": video.codec_context.height,
                "fps": video.average_rate, "audio": audio[0].codec_context.name if audio else None}
        info["frames"] = sum(1 for _ in container.decode(video=0))
    return info


def test_generate_writes_h264_25fps_mp4_with_audio(pipe, media_dir, tmp_path):
    # A portrait image (400x720) gives a portrait video: the aspect ratio follows the image.
    out = pipe.generate(media_dir / "fashion_blogger.jpg", media_dir / "fashion_blogger.wav", "a blogger",
                        output=tmp_path / "blogger.mp4", size="128*64", num_clip=2)
    assert out == tmp_path / "blogger.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blogger.mp4"]
    assert _probe(out) == {"codec": "h264", "pix_fmt": "yuv420p", "width": 64, "height": 128, "fps": 25,
                           "audio": "aac", "frames": 2 * 48 - 3}


def test_stream_yields_timestamped_frames_and_the_same_seed_gives_the_same_video(pipe, media_dir):
    image, audio = media_dir / "cyclops_baker.jpg", media_dir / "cyclops_baker.wav"

    def run(seed):
        return pipe.stream(image, audio, "a baker", size="64*64", num_clip=1, base_seed=seed)

    first, again = list(run(7)), list(run(7))
    assert len(first) == 48 - 3
    assert [f.index for f in first] == list(range(45))
    assert [f.timestamp for f in first] == [i / 25 for i in range(45)]
    assert all(f.image.dtype == np.uint8 and f.image.shape == (64, 64, 3) for f in first)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    other = run(8)
    first_block = [next(other) for _ in range(9)]
    other.close()
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, first_block))


class _InterruptingDecoder:
    """Wraps the VAE's streaming decoder and raises KeyboardInterrupt (a Ctrl-C) on its n-th call."""

    def __init__(self, decoder, calls):
        self.decoder, self.calls = decoder, calls

    def decode(self, z):
        self.calls[0] -= 1
        if self.calls[0] == 0:
            raise KeyboardInterrupt
        return self.decoder.decode(z)


@pytest.mark.parametrize("keep_partial", [False, True])
def test_ctrl_c_leaves_nothing_under_the_final_name(pipe, media_dir, tmp_path, monkeypatch, keep_partial):
    original = pipe.vae.stream_decoder
    calls = [4]  # warm-up, block 0, block 1, then Ctrl-C: two blocks (21 frames) are already written
    monkeypatch.setattr(pipe.vae, "stream_decoder", lambda: _InterruptingDecoder(original(), calls))
    output = tmp_path / "cut.mp4"
    with pytest.raises(KeyboardInterrupt):
        pipe.generate(media_dir / "cyclops_baker.jpg", media_dir / "cyclops_baker.wav", output=output,
                      size="64*64", num_clip=2, keep_partial=keep_partial)
    assert not output.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    if keep_partial:
        assert left == ["cut.partial.mp4"]
        assert _probe(tmp_path / "cut.partial.mp4")["frames"] == 9 + 12
    else:
        assert left == []


def _retained_rss_bytes() -> int:
    """RSS after glibc hands freed heap pages back: what stays alive, not malloc's high-water mark (which
    moved by up to ~135 MiB between runs of this test with the live tensor bytes exactly flat)."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return host_rss_bytes()


def test_memory_stays_flat_over_clips(pipe, media_dir):
    """After clip 2 vs after clip 8 of one run: no tensor may accumulate per clip or block (exact count of
    live tensor bytes), and the process RSS may only move by allocator noise."""
    live, rss = {}, {}
    for frame in pipe.stream(media_dir / "dwarven_blacksmith.jpg", media_dir / "dwarven_blacksmith.wav",
                             size="128*64", num_clip=8):
        if (frame.index + 4) % 48 == 0:  # the last frame of a clip (the first clip has 45)
            clip = (frame.index + 4) // 48
            live[clip], rss[clip] = live_tensor_bytes(), _retained_rss_bytes()
    assert sorted(live) == list(range(1, 9))
    # One clip's frames alone would be 48 x 3 x 64 x 128 x 4 B = 4.7 MB: any accumulation shows at once.
    assert max(live[clip] for clip in range(3, 9)) - live[2] < 2**20, live
    growth = max(rss[clip] for clip in range(3, 9)) - rss[2]
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB from clip 2 to clip 8"


def test_generate_from_settings_names_the_file_and_logs_progress(tiny, media_dir, tmp_path, capsys):
    settings = GenerationSettings(image=media_dir / "dwarven_blacksmith.jpg", audio=media_dir / "dwarven_blacksmith.wav",
                                  prompt="a dwarf", ckpt_dir=tiny.ckpt_dir, lora=str(tiny.lora),
                                  options=RequestOptions(size=64 * 64, num_clip=1), device="cpu", dtype="float32", save_dir=tmp_path / "out")
    request = settings.request()
    out = generate_from_settings(settings, request, settings.output_path(64, 64), progress=True)
    assert out.parent == tmp_path / "out" and out.name.endswith("_64x64_4step_a_dwarf.mp4")
    assert _probe(out)["frames"] == 45
    log = capsys.readouterr().err  # not a terminal: plain log lines, no in-place rewriting
    assert "clip 1 | block 4/4 | 45/45 frames" in log and "\x1b[2K" not in log
    phases = [line.split(" ...")[0] for line in log.splitlines() if line.endswith(" ...")]
    assert phases[0] == "planning the memory" and phases[1].startswith("loading ") and phases[1].endswith(" of weights")
    assert phases[2:] == ["encoding the prompt, the portrait and the audio", "generating"]
    # A CPU run's plan says what runs, and the tiny weights' size reads (not "0.0 GB ... 0.00 GB/s").
    assert "CPU run: float32 weights and caches in host memory, eager" in log and "on gpu" not in log
    assert "0.0 GB" not in log and "B/s)" in log and "first frame after" in log


@pytest.mark.parametrize("change, message", [
    ({"num_clip": 0}, "num_clip"),
    ({"mode": "tpp"}, "mode"),
    ({"ref_rope_offset": 50}, "ref_rope_offset"),
    ({"infer_frames": 50}, "infer_frames"),
    ({"sample_steps": 0}, "sample_steps"),
    ({"size": "big"}, "size"),
])
def test_bad_requests_fail_before_any_work(pipe, media_dir, change, message):
    kwargs = {"size": "64*64", **change}
    with pytest.raises(ValueError, match=message):
        pipe.stream(media_dir / "cyclops_baker.jpg", media_dir / "cyclops_baker.wav", **kwargs)


def test_waveforms_joined_names_and_short_audio_are_handled_up_front(pipe, media_dir, tmp_path):
    joined = f"{media_dir / 'cyclops_baker.wav'}+{media_dir / 'fashion_blogger.wav'}"
    with pytest.raises(InputError, match="not found"):  # the API takes one path, literally
        pipe.stream(media_dir / "cyclops_baker.jpg", joined, size="64*64")
    with pytest.raises(InputError, match="path"):
        pipe.generate(media_dir / "cyclops_baker.jpg", np.zeros(16000, np.float32), output=tmp_path / "x.mp4")
    with pytest.raises(InputError, match="shorter"):
        pipe.stream(media_dir / "cyclops_baker.jpg", np.zeros(399, np.float32), size="64*64")


def test_long_audio_takes_the_streamed_feature_path(pipe, media_dir, monkeypatch):
    import liveavatar.request

    monkeypatch.setattr(liveavatar.request, "WHOLE_FILE_AUDIO_LIMIT_S", 1.0)
    frames = list(pipe.stream(media_dir / "cyclops_baker.jpg", media_dir / "cyclops_baker.wav", size="64*64",
                              num_clip=1))
    assert len(frames) == 45 and frames[-1].image.shape == (64, 64, 3)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_logs_lines_otherwise(monkeypatch):
    import liveavatar.runtime.progress as progress_module

    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        clock[0] = 0.0
        progress = Progress(total_blocks=4, blocks_per_clip=2, total_frames=45, stream=stream)
        progress.phase("loading 1.0 GB of weights")
        clock[0] = 2.0
        progress.phase_done("0.5 GB/s")
        progress.start()
        clock[0] = 12.0  # ten seconds of start-up before the first frame
        for clip in range(2):
            for block in range(2):
                progress.block_done(clip, block)
                progress.frames_done(9 if clip == block == 0 else 12)
                if (clip, block) == (0, 1):
                    status = progress.status()
                clock[0] += 1.0  # then one block (12 frames) per second
        progress.close()
    assert terminal.getvalue().count("\r\x1b[2K") == 5 and "clip 2 | block 4/4 | 45/45 frames" in terminal.getvalue()
    assert "loading 1.0 GB of weights: done in 2.0 s (0.5 GB/s)" in terminal.getvalue()
    lines = log.getvalue().splitlines()
    assert lines[:4] == ["loading 1.0 GB of weights ...", "loading 1.0 GB of weights: done in 2.0 s (0.5 GB/s)",
                         "generating ...", "first frame after 10.0 s"] and "\r" not in log.getvalue()
    assert lines[4].startswith("clip 1 | block 2/4 | 21/45 frames") and "RSS" in lines[4] and len(lines) == 6
    # 12 frames in the second since the first frame: 24 frames left take 2 s, whatever the start-up took.
    assert "12.00 video fps | ETA 0:02" in status
    quiet = _Terminal()
    silent = Progress(total_blocks=1, blocks_per_clip=1, total_frames=3, stream=quiet, enabled=False)
    silent.phase("loading"), silent.start(), silent.block_done(0, 0), silent.frames_done(3), silent.close()
    assert quiet.getvalue() == ""


def test_one_generate_decodes_the_image_and_the_audio_exactly_once(tiny, media_dir, tmp_path, monkeypatch):
    """The CLI's whole path (settings, dry checks, plan, load, generate): each input is read once, by the
    request; the mp4 writer opens the audio file again only to mux its original track."""
    import liveavatar.io.media as media
    from liveavatar.cli.main import main

    calls = {"image": 0, "audio": 0}
    real_image, real_audio = media.load_image, media.decode_audio

    def count(kind, function):
        def counted(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(media, "load_image", count("image", real_image))
    monkeypatch.setattr(media, "decode_audio", count("audio", real_audio))
    import liveavatar.request as request_module
    monkeypatch.setattr(request_module, "load_image", media.load_image)
    assert main(["generate", "--image", str(media_dir / "cyclops_baker.jpg"),
                 "--audio", str(media_dir / "cyclops_baker.wav"), "--ckpt_dir", str(tiny.ckpt_dir),
                 "--lora_path_dmd", str(tiny.lora), "--size", "64*64", "--num_clip", "1", "--device", "cpu",
                 "--dtype", "float32", "--save_file", str(tmp_path / "once.mp4"), "--quiet"]) == 0
    assert calls == {"image": 1, "audio": 1}
    assert _probe(tmp_path / "once.mp4")["frames"] == 45


def test_two_requests_reuse_the_same_cache_storage(pipe, media_dir):
    """Caches are allocated once per placement and clip size and reset per request: the second request
    allocates no KV set or cond cache of its own, and gives the same video for the same seed."""
    image, audio = media_dir / "cyclops_baker.jpg", media_dir / "cyclops_baker.wav"
    first = [f.image for f in pipe.stream(image, audio, size="64*64", num_clip=1, base_seed=3)]
    caches = pipe.engine.cache_set
    storage = {step: kv.storage.tensors[0].data_ptr() for step, kv in caches.kv_sets.items()}
    cond = caches.cond.address
    second = [f.image for f in pipe.stream(image, audio, size="64*64", num_clip=1, base_seed=3)]
    assert pipe.engine.cache_set is caches and caches.cond.address == cond
    assert {step: kv.storage.tensors[0].data_ptr() for step, kv in caches.kv_sets.items()} == storage
    assert all(np.array_equal(a, b) for a, b in zip(first, second)) and len(first) == len(second) == 45
    other_size = list(pipe.stream(image, audio, size="128*64", num_clip=1))  # another clip size: new caches
    assert len(other_size) == 45 and pipe.engine.cache_set is not caches
