"""What a new user hits, end to end through the command line on tiny checkpoints: the announced length
is the file's, outputs are never clobbered and are checked up front, bad checkpoints and audio are refused
before any model loads, termination signals clean up, and the Python API's first steps work."""
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from safetensors.torch import save_file

from liveavatar.models.tiny import make_tiny_checkpoints
from liveavatar.cli.main import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


def _generate(tiny, media_dir, *extra, image="cyclops_baker.jpg", audio="cyclops_baker.wav"):
    return ["generate", "--image", str(media_dir / image), "--audio", str(audio if isinstance(audio, Path) else
            media_dir / audio), "--ckpt_dir", str(tiny.ckpt_dir), "--lora_path_dmd", str(tiny.lora), "--size",
            "64*64", "--device", "cpu", "--dtype", "float32", *map(str, extra)]


def _frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _write_wav(path, samples, rate=16000):
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def test_the_announced_length_is_the_files_and_no_cut_block_is_made(tiny, media_dir, tmp_path, capsys):
    # 1.3 s of speech: one 48-frame clip would make 45 frames, the audio lasts 33 (3 blocks are enough).
    speech = _write_wav(tmp_path / "short.wav", np.sin(np.arange(20800) / 9.0) * 0.3)
    assert main(_generate(tiny, media_dir, "--dry-run", "--json", audio=speech)) == 0
    import json
    report = json.loads(capsys.readouterr().out)
    assert (report["num_frames"], report["duration_s"], report["total_blocks"], report["generated_frames"]) == \
        (33, 1.32, 3, 33)
    out = tmp_path / "short.mp4"
    assert main(_generate(tiny, media_dir, "--save_file", out, "--quiet", audio=speech)) == 0
    assert _frames(out) == report["num_frames"]


def test_an_existing_output_is_refused_up_front_unless_overwrite(tiny, media_dir, tmp_path, capsys):
    out = tmp_path / "taken.mp4"
    out.write_bytes(b"somebody's video")
    assert main(_generate(tiny, media_dir, "--num_clip", "1", "--save_file", out, "--dry-run")) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"somebody's video"
    assert main(_generate(tiny, media_dir, "--num_clip", "1", "--save_file", out, "--overwrite", "--quiet")) == 0
    assert _frames(out) == 45 and sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4"]


def test_automatic_names_in_the_same_second_do_not_collide(tmp_path):
    from datetime import datetime

    from liveavatar.settings import GenerationSettings

    settings = GenerationSettings(image=tmp_path / "i.jpg", audio=str(tmp_path / "a.wav"), save_dir=tmp_path)
    now = datetime(2026, 1, 2, 3, 4, 5)
    first = settings.output_path(64, 64, now=now)
    first.write_bytes(b"x")
    second = settings.output_path(64, 64, now=now)
    assert second != first and second.name == first.stem + "_2.mp4"


def test_an_unwritable_output_folder_is_refused_before_loading(tiny, media_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        target = tmp_path / "blocker"
        target.write_text("a file where the folder should be")
        folder = target / "videos"
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
    started = time.perf_counter()
    assert main(_generate(tiny, media_dir, "--save_dir", folder, "--num_clip", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder) in err and err.count("\n") == 1 and "partial" not in err
    assert time.perf_counter() - started < 5  # refused before any model loads


def test_nan_audio_is_refused_by_the_dry_run_naming_the_file(tiny, media_dir, tmp_path, capsys):
    path = tmp_path / "nan.wav"
    samples = np.zeros(16000, np.float32)
    samples[100] = np.nan
    with av.open(str(path), "w") as container:  # 32-bit float WAV keeps the NaN
        stream = container.add_stream("pcm_f32le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    assert main(_generate(tiny, media_dir, "--dry-run", audio=path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --audio {path}:") and "NaN" in err


def test_a_lora_for_another_model_is_refused_by_the_dry_run_and_doctor(tiny, media_dir, tmp_path, capsys):
    wrong = tmp_path / "wrong.safetensors"
    import torch
    save_file({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(4, 5120),
               "blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(5120, 4)}, str(wrong))
    argv = _generate(tiny, media_dir, "--dry-run")
    argv[argv.index("--lora_path_dmd") + 1] = str(wrong)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "wrong.safetensors" in err and err.count("\n") == 1
    assert main(["doctor", "--ckpt_dir", str(tiny.ckpt_dir), "--lora_path_dmd", str(wrong)]) == 1
    assert "wrong.safetensors" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signals_leave_nothing_behind(tiny, media_dir, tmp_path, signum):
    out = tmp_path / "video.mp4"
    process = subprocess.Popen([sys.executable, "-m", "liveavatar", *_generate(tiny, media_dir, "--save_file", out,
                                                                              "--num_clip", "3")],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial.mp4") for p in tmp_path.iterdir()):  # the writer has started
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert f"error: terminated ({signal.Signals(signum).name})" in err
    assert list(tmp_path.iterdir()) == []


def test_quiet_means_only_the_result(tiny, media_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "liveavatar", *_generate(tiny, media_dir, "--num_clip", "1",
                                                                           "--save_file", tmp_path / "q.mp4",
                                                                           "--quiet")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines()[-1] == f"saved {tmp_path / 'q.mp4'}"


def test_plan_into_a_closed_pipe_exits_quietly():
    result = subprocess.run(f"{sys.executable} -m liveavatar plan --gpu-memory 24GiB | head -n 1", shell=True,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "Broken pipe" not in result.stderr and result.stderr == ""
    check = subprocess.run([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, "
                            "'-m', 'liveavatar', 'plan', '--gpu-memory', '24GiB'], stdout=subprocess.PIPE, "
                            "stderr=subprocess.PIPE); p.stdout.close(); sys.exit(p.wait())"], capture_output=True)
    assert check.returncode == 0


@pytest.mark.parametrize("extra, words", [
    (["--size", "-704*384"], "--size '-704*384': expected WIDTH*HEIGHT"),
    (["--save_file", "{tmp}"], "is a folder"),
    (["--ckpt_dir", "{file}"], "is a file"),
    (["--device", "mps"], "not supported"),
])
def test_messages_say_what_is_wrong(tiny, media_dir, tmp_path, capsys, extra, words):
    (tmp_path / "config.json").write_text("{}")
    extra = [e.format(tmp=tmp_path, file=tmp_path / "config.json") for e in extra]
    argv = _generate(tiny, media_dir, "--dry-run")
    if extra[0] == "--ckpt_dir":
        argv[argv.index("--ckpt_dir") + 1] = extra[1]
    else:
        argv += extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_oversized_sizes_and_long_prompts_get_one_notice(tiny, media_dir, tmp_path, capsys):
    assert main(_generate(tiny, media_dir, "--dry-run", "--size", "4096*4096")) == 0
    assert "not upscaled" in capsys.readouterr().err
    out = tmp_path / "long.mp4"
    assert main(_generate(tiny, media_dir, "--num_clip", "1", "--save_file", out, "--prompt", "word " * 2000)) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "fill the text encoder's" in line]
    assert len(notices) == 1 and notices[0].startswith("notice: prompt: 10000 characters")


def test_python_api_first_steps(tiny, media_dir):
    import liveavatar
    from liveavatar import LiveAvatarPipeline
    from liveavatar.errors import InputError

    pipe = LiveAvatarPipeline.from_pretrained(tiny.ckpt_dir, lora=tiny.lora, device="cpu", dtype="float32")
    image, audio = media_dir / "cyclops_baker.jpg", media_dir / "cyclops_baker.wav"
    frames = list(pipe.stream(image, audio, None, size="64*64", num_clip=1, base_seed=-1))
    assert len(frames) == 45 and liveavatar.__version__
    with pytest.raises(InputError) as error:
        list(pipe.stream(image, audio, size=100))
    assert str(error.value).startswith("size 100: ") and "--" not in str(error.value)
    pcm = (np.sin(np.arange(16000) / 7.0) * 20000).astype(np.int16)  # integer PCM is scaled, not taken as float
    request = liveavatar.resolve_request(image, pcm, "", liveavatar.RequestOptions(size="64*64"))
    assert np.abs(request.audio.samples).max() <= 1.0 and request.audio.samples.dtype == np.float32
