"""The pipeline's launch forms and faults on CPU processes (gloo, tiny checkpoints): ``generate --num_gpus``
and ``torchrun -m liveavatar generate`` write the single-device file; a rank that raises or is killed
brings every rank down within seconds with one line naming the rank and the cause; Ctrl-C stops every
rank and leaves no file; bad launches give one clear error before anything loads."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from liveavatar.api import LiveAvatarPipeline
from liveavatar.cli import main
from liveavatar.errors import InputError
from liveavatar.runtime.distributed import LocalRanks, RankFailure, check_same_kind, gpu_devices, torchrun_device
from liveavatar.runtime.executors.step_ranks import StepRanks
from liveavatar.runtime.multi_gpu import StageSpec
from liveavatar.runtime.step_layout import StepLayout
from liveavatar.runtime.placement import Placement

from pipeline_helpers import stage_failing_at

SRC = Path(__file__).resolve().parents[1] / "src"
STOP_WITHIN_S = 30


def _stream(pipe, media_dir, clips=3):
    return pipe.stream(media_dir / "cyclops_baker.jpg", media_dir / "cyclops_baker.wav", "a baker", size="64*64",
                       num_clip=clips)


def _all_stopped(ranks: LocalRanks, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(process.is_alive() for process in ranks.processes.values()):
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------------------- API


def test_a_rank_that_raises_stops_every_rank_with_its_cause(tiny, prompt_cache, media_dir):
    spec = StageSpec(str(tiny.dit_dir), Placement(), "cpu", "float32", lora=str(tiny.lora), threads=1)
    ranks = LocalRanks(3, 2, stage_failing_at, {0: (spec, None), 1: (spec, 3)})
    pipe = LiveAvatarPipeline.from_layout(tiny, dtype=torch.float32, prompt_cache_dir=prompt_cache,
                                          step_ranks=StepRanks(ranks.group, StepLayout.for_steps(3, 4),
                                                            torch.device("cpu"), ranks=ranks))
    with pytest.raises(RankFailure, match=r"^rank 1 \(step 2\) failed: RuntimeError: injected failure$"):
        list(_stream(pipe, media_dir))
    failed = time.monotonic()
    pipe.close()
    assert _all_stopped(ranks, STOP_WITHIN_S - (time.monotonic() - failed))


# ---------------------------------------------------------------------------------------------- CLI


def _inputs(tiny, media_dir) -> list[str]:
    return ["generate", "--ckpt_dir", str(tiny.ckpt_dir), "--lora_path_dmd", str(tiny.lora), "--image",
            str(media_dir / "cyclops_baker.jpg"), "--audio", str(media_dir / "cyclops_baker.wav"), "--size", "64*64"]


def _generate_args(tiny, media_dir, out: Path, clips: int, *extra) -> list[str]:
    return [*_inputs(tiny, media_dir), "--num_clip", str(clips), "--device", "cpu", "--save_file", str(out), *extra]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", **extra}


def test_both_launch_forms_write_the_single_device_file(tiny, prompt_cache, media_dir, tmp_path):
    one = LiveAvatarPipeline.from_pretrained(tiny.ckpt_dir, lora=tiny.lora, device="cpu", dtype=torch.float32,
                                             prompt_cache_dir=prompt_cache)
    one_file = one.generate(media_dir / "cyclops_baker.jpg", media_dir / "cyclops_baker.wav", "", size="64*64",
                            num_clip=1, output=tmp_path / "one.mp4")
    runs = {
        "spawned": [sys.executable, "-m", "liveavatar"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "liveavatar"],
    }
    files = {}
    for name, command in runs.items():
        out = tmp_path / f"{name}.mp4"
        extra = ["--num_gpus", "2"] if name == "spawned" else []
        result = subprocess.run([*command, *_generate_args(tiny, media_dir, out, 1, *extra), "--quiet"],
                                env=_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.count(f"saved {out}") == 1, result.stdout  # only the output rank reports
        files[name] = out.read_bytes()
    assert files["spawned"] == one_file.read_bytes() and files["torchrun"] == one_file.read_bytes()


class _Run:
    """``liveavatar generate`` in its own session (as a terminal's foreground job), its stderr read as it
    comes."""

    def __init__(self, argv: list[str]):
        self.process = subprocess.Popen([sys.executable, "-m", "liveavatar", *argv], env=_env(), text=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.process.poll() is None, "".join(self.lines)
            time.sleep(0.05)

    def ranks(self) -> list[int]:
        """The rank processes it spawned (its session's other members)."""
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if entry.name.isdigit() and int(stat[3]) == self.process.pid and int(entry.name) != self.process.pid \
                        and b"spawn_main" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                continue
        return pids

    def finish(self, timeout: float) -> tuple[int, list[str]]:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code, [line.rstrip("\n") for line in self.lines]

    def session_is_empty(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return False
        except ProcessLookupError:
            return True


def _wait_empty(run: _Run, within: float) -> bool:
    deadline = time.monotonic() + within
    while not run.session_is_empty():
        if time.monotonic() > deadline:
            os.killpg(run.process.pid, signal.SIGKILL)
            return False
        time.sleep(0.1)
    return True


def _started(tiny, media_dir, out_dir: Path) -> _Run:
    """A 2-rank ``generate`` that has made its first frame."""
    out_dir.mkdir()
    run = _Run(_generate_args(tiny, media_dir, out_dir / "video.mp4", 3, "--num_gpus", "2"))
    run.wait_for("first frame")
    return run


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_ctrl_c_stops_every_rank_and_leaves_no_file(tiny, media_dir, tmp_path):
    out_dir = tmp_path / "out"
    run = _started(tiny, media_dir, out_dir)
    os.killpg(run.process.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
    code, lines = run.finish(STOP_WITHIN_S)
    assert code == 130 and lines[-1] == "error: interrupted" and not any("Traceback" in line for line in lines)
    assert _wait_empty(run, 10) and list(out_dir.iterdir()) == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_run_with_one_line_naming_it(tiny, media_dir, tmp_path):
    out_dir = tmp_path / "out"
    run = _started(tiny, media_dir, out_dir)
    victim = max(run.ranks())
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    code, lines = run.finish(STOP_WITHIN_S)
    assert code == 1 and time.monotonic() - killed < STOP_WITHIN_S
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == ["error: rank 0 (steps 0-1) died: killed by SIGKILL"]
    assert _wait_empty(run, 10) and list(out_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------------- bad launches


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine with two H100s and two A100s, as torch.cuda reports it."""
    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA A100 80GB", "NVIDIA A100 80GB"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: names[index])


def test_bad_gpu_choices_are_one_clear_error(four_gpus):
    assert [str(d) for d in gpu_devices([0, 1], None)] == ["cuda:0", "cuda:1"]
    with pytest.raises(InputError, match=r"^--num_gpus 5: this machine has 4 CUDA GPUs; use --num_gpus 4$"):
        gpu_devices(None, 5)
    with pytest.raises(InputError, match=r"^--gpus 0,7: GPU 7 does not exist \(this machine has GPUs 0-3\)$"):
        gpu_devices([0, 7], None)
    with pytest.raises(InputError, match="a GPU appears twice"):
        gpu_devices([1, 1], None)
    with pytest.raises(InputError, match=r"^--gpus 1,2: mixed GPU kinds \(1: NVIDIA H100 80GB HBM3, 2: NVIDIA A100"):
        gpu_devices([1, 2], None)
    with pytest.raises(InputError, match="torchrun local rank 4 has no GPU: this node has 4; launch with "
                                         "--nproc_per_node 4"):
        torchrun_device(4, cpu=False)
    check_same_kind(["cpu", "cpu"], [0, 1], flag="x")


def test_no_gpu_at_all_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"^--num_gpus 2: this machine has 0 CUDA GPUs; use --num_gpus 1 or "
                                         r"--device cpu$"):
        gpu_devices(None, 2)


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "0,1", "--device", "cpu"], "--gpus names CUDA GPUs"),
    (["--num_gpus", "2", "--gpus", "0,1,2"], "they disagree"),
    (["--num_gpus", "2", "--device", "cuda:1"], "choose the GPUs with --gpus"),
    (["--num_gpus", "0"], "must be at least 1"),
    (["--gpus", "0,x"], "expected GPU indices"),
])
def test_contradicting_launch_flags_are_refused_before_loading(flags, message, tiny, media_dir, capsys):
    try:
        code = main([*_inputs(tiny, media_dir), *flags, "--dry-run"])
    except SystemExit as usage_error:  # argparse's own one-line error
        code = usage_error.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("rank, printed", [(1, True), (0, False)])
def test_spawn_flags_under_torchrun_are_refused_by_the_output_rank(rank, printed, tiny, media_dir, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main([*_inputs(tiny, media_dir), "--num_gpus", "2", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == (["error: --num_gpus/--gpus spawn ranks; under torchrun the ranks are torchrun's "
                                 "(--nproc_per_node): leave them out"] if printed else [])


def test_more_ranks_than_steps_and_a_decode_rank_is_told(tiny, media_dir, tmp_path, capsys):
    code = main(_generate_args(tiny, media_dir, tmp_path / "x.mp4", 1, "--num_gpus", "5", "--sample_steps", "3",
                               "--dry-run", "--json"))
    captured = capsys.readouterr()
    assert code == 0
    assert "notice: 5 ranks for 3 steps: rank 3 only passes blocks on" in captured.err
    assert '"ranks": ["step 0", "step 1", "step 2", "idle (passes blocks on)", "decode + output"]' in captured.out
