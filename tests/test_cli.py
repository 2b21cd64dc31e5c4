import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from liveavatar.models.tiny import make_tiny_checkpoints
from liveavatar.cli.generate import COMPATIBILITY_FLAGS
from liveavatar.cli.main import COMMANDS, build_parser, main
from liveavatar.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A complete tiny checkpoint set: the dry run checks every shape against the headers."""
    return make_tiny_checkpoints(tmp_path_factory.mktemp("ckpt")).ckpt_dir


@pytest.fixture
def inputs(media_dir, ckpt, tmp_path):
    return ["--image", str(media_dir / "dwarven_blacksmith.jpg"), "--audio", str(media_dir / "dwarven_blacksmith.wav"),
            "--ckpt_dir", str(ckpt), "--save_dir", str(tmp_path / "out")]


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_run_json(argv, capsys):
    code, out, err = run(["generate", *argv, "--dry-run", "--json"], capsys)
    assert code == 0, err
    return json.loads(out), err


def test_help_lists_commands_and_imports_no_torch():
    script = "import sys, liveavatar.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.strip() == "False"
    result = subprocess.run([sys.executable, "-m", "liveavatar", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "doctor", "download", "make-tiny"):
        assert command in result.stdout


def test_every_command_has_working_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command.name, "--help"])
        assert exit_.value.code == 0, command.name
        assert command.help.split()[0] in capsys.readouterr().out, command.name


def test_crashes_are_one_line_without_debug(monkeypatch, capsys):
    def broken(parser):
        raise TypeError("a bug")

    # The module itself: the name liveavatar.cli.main is the function that liveavatar.cli re-exports.
    monkeypatch.setattr(sys.modules["liveavatar.cli.main"], "COMMANDS",
                        [COMMANDS[0].__class__("broken", "x", broken, lambda a: 0)])
    code, out, err = run(["broken"], capsys)
    assert code == 1 and err.startswith("error: unexpected TypeError: a bug") and len(err.splitlines()) == 1
    with pytest.raises(TypeError):
        main(["broken", "--debug"])


# The launch lines of the reference's scripts (infinite_inference_*.sh), with the example paths pointing to our media.
SINGLE_GPU = ("--ulysses_size 1 --task s2v-14B --size 704*384 --base_seed 420 --training_config "
              "liveavatar/configs/s2v_causal_sft.yaml --offload_model True --convert_model_dtype --prompt {prompt} "
              "--image {image} --audio {audio} --infer_frames 48 --load_lora --lora_path_dmd Quark-Vision/Live-Avatar "
              "--sample_steps 4 --sample_guide_scale 0 --num_clip 10000 --num_gpus_dit 1 --sample_solver euler "
              "--single_gpu --ckpt_dir {ckpt}/ --fp8")
MULTI_GPU = ("--ulysses_size 1 --task s2v-14B --size 720*400 --base_seed 420 --training_config "
             "liveavatar/configs/s2v_causal_sft.yaml --offload_model False --convert_model_dtype --prompt {prompt} "
             "--image {image} --audio {audio} --infer_frames 48 --load_lora --lora_path_dmd Quark-Vision/Live-Avatar "
             "--sample_steps 4 --sample_guide_scale 0 --num_clip 10000 --num_gpus_dit 4 --sample_solver euler "
             "--enable_vae_parallel --ckpt_dir {ckpt}/ --fp8")


# The reference's multi-GPU flags (--num_gpus_dit, --enable_vae_parallel, --ulysses_size) give one notice together.
@pytest.mark.parametrize("recipe, ignored, ranks", [(SINGLE_GPU, 6, 1), (MULTI_GPU, 5, 5)],
                         ids=["single_gpu", "multi_gpu"])
def test_reference_recipes_parse(recipe, ignored, ranks, media_dir, ckpt, capsys):
    argv = shlex.split(recipe.format(prompt=shlex.quote("A stout, cheerful dwarf"), ckpt=ckpt,
                                     image=media_dir / "dwarven_blacksmith.jpg", audio=media_dir / "dwarven_blacksmith.wav"))
    report, err = dry_run_json(argv, capsys)
    # The reference's example: 704x384 and 10 clips (48*10 - 3 = 477 frames) with either size key; its mp4 is
    # cut to the 17.72 s of audio: 443 frames, what we announce. Both recipes run the streaming mode (the
    # reference's --single_gpu is only noticed), which makes only the 38 blocks those frames need.
    assert (report["width"], report["height"], report["num_clips"], report["num_frames"]) == (704, 384, 10, 443)
    assert report["generated_frames"] == 38 * 12 - 3
    assert report["tokens_per_frame"] == 1056 and report["fps"] == 25 and report["duration_s"] == pytest.approx(17.72)
    assert report["weights"] == "fp8" and report["lora"].endswith("LiveAvatar/liveavatar.safetensors")
    notices = [line for line in err.splitlines() if line.startswith("notice: ")]
    import torch

    on_cpu = ranks > 1 and not torch.cuda.is_available()  # then one more notice: the ranks run on the CPU
    assert len(notices) == ignored + on_cpu == len(err.splitlines())
    assert report["num_gpus"] == ranks
    if ranks > 1:  # the reference's layout: steps 0-3 on ranks 0-3, decode and output on rank 4
        assert report["ranks"] == ["step 0", "step 1", "step 2", "step 3", "decode + output"]
        assert "notice: --num_gpus_dit 4 --enable_vae_parallel --ulysses_size 1: runs as --num_gpus 5" in err


@pytest.mark.parametrize("size", ["704*384", "704x384", "704X384", "704×384", "704 * 384"])
def test_every_size_spelling_resolves_like_the_reference(size, inputs, media_dir, capsys):
    report, _ = dry_run_json([*inputs, "--size", size], capsys)
    assert (report["width"], report["height"]) == (704, 384)
    portrait = [*inputs, "--image", str(media_dir / "fashion_blogger.jpg"), "--size", size]
    report, _ = dry_run_json(portrait, capsys)
    assert (report["width"], report["height"], report["latent_width"], report["latent_height"]) == (384, 704, 48, 88)


def test_human_dry_run_prints_the_resolved_configuration(inputs, capsys):
    code, out, err = run(["generate", *inputs, "--dry-run"], capsys)
    assert code == 0 and err == ""
    first, second = out.splitlines()
    assert first.startswith("704x384 (latent 88x48, 1056 tokens/frame), 10 clips") and "-> 443 frames" in first
    assert "17.72 s" in first and "38 blocks make 453 frames" in first and "mode streaming" in second


def test_dashed_and_underscored_spellings_are_the_same(inputs, capsys):
    underscored, _ = dry_run_json([*inputs, "--sample_steps", "3", "--infer_frames", "24", "--num_clip", "2",
                                   "--base_seed", "7", "--ref_rope_offset", "12"], capsys)
    dashed, _ = dry_run_json([*inputs, "--sample-steps", "3", "--infer-frames", "24", "--num-clip", "2",
                              "--base-seed", "7", "--ref-rope-offset", "12"], capsys)
    underscored.pop("output"), dashed.pop("output")  # automatic names carry the second they were made in
    assert underscored == dashed
    assert (dashed["sample_steps"], dashed["infer_frames"], dashed["num_clips"], dashed["base_seed"]) == (3, 24, 2, 7)
    assert dashed["num_frames"] == 2 * 24 - 3 and dashed["ref_rope_offset"] == 12


@pytest.mark.parametrize("flag, value", [([], False), (["--fp8"], True), (["--fp8", "True"], True),
                                         (["--fp8", "False"], False), (["--fp8", "1"], True), (["--fp8", "no"], False),
                                         (["--fp8=yes"], True)])
def test_boolean_flags(flag, value, inputs, capsys):
    report, _ = dry_run_json([*inputs, *flag], capsys)
    assert report["weights"] == ("fp8" if value else "bf16" if flag else "auto")


@pytest.mark.parametrize("flags, weights", [([], "auto"), (["--weights", "bf16"], "bf16"), (["--weights", "fp8"], "fp8"),
                                            (["--fp8", "--weights", "fp8"], "fp8")])
def test_the_weight_choice_is_explicit(flags, weights, inputs, capsys):
    report, _ = dry_run_json([*inputs, *flags], capsys)
    assert report["weights"] == weights
    code, _, err = run(["generate", *inputs, "--fp8", "--weights", "bf16", "--dry-run"], capsys)
    assert code == 2 and "contradicts" in err


def test_every_compatibility_flag_is_accepted_with_one_notice(inputs, capsys):
    argv = []
    for name, (kind, _) in COMPATIBILITY_FLAGS.items():
        argv += [f"--{name}"] + ({int: ["1"], float: ["0.5"], str: ["x"]}.get(kind, []))
    report, err = dry_run_json([*inputs, *argv], capsys)
    # Without a GPU the two ranks run on the CPU, with one notice of its own.
    lines = [line for line in err.splitlines() if not line.startswith("notice: no CUDA GPU here: the 2 ranks")]
    # the reference's three multi-GPU flags share one notice (what they come to in the pipeline)
    multi_gpu = [line for line in lines if line.startswith("notice: --num_gpus_dit 1 --enable_vae_parallel "
                                                             "--ulysses_size 1:")]
    assert len(multi_gpu) == 1 and len(lines) == len(COMPATIBILITY_FLAGS) - 2
    assert all(line.startswith("notice: --") for line in lines)
    assert report["width"] == 704 and report["num_gpus"] == 2  # --num_gpus_dit 1 + the decode GPU


def test_online_decode_notice_only_in_streaming_mode(inputs, capsys):
    report, err = dry_run_json([*inputs, "--enable_online_decode"], capsys)
    assert "notice: enable_online_decode: ignored" in err and report["enable_online_decode"] is False
    report, err = dry_run_json([*inputs, "--enable_online_decode", "--mode", "single_gpu"], capsys)
    assert err == "" and report["mode"] == "single_gpu" and report["enable_online_decode"] is True


def test_random_seed_is_printed(inputs, capsys):
    report, err = dry_run_json([*inputs, "--base_seed", "-1"], capsys)
    (seed,) = re.findall(r"using seed (\d+)", err)
    assert report["base_seed"] == int(seed)


def test_quiet_hides_notices_and_no_lora(inputs, capsys):
    report, err = dry_run_json([*inputs, "--quiet", "--load_lora", "False", "--sample_guide_scale", "5"], capsys)
    assert err == "" and report["lora"] is None


def _bad_argument_cases(media_dir, tmp_path):
    text_jpg = tmp_path / "text.jpg"
    text_jpg.write_text("hello")
    empty_wav = tmp_path / "empty.wav"
    empty_wav.write_bytes(b"")
    cut_wav = tmp_path / "cut.wav"
    cut_wav.write_bytes((media_dir / "cyclops_baker.wav").read_bytes()[:50_000])
    return {
        "infer_frames not a multiple of 12": (["--infer_frames", "50"], "--infer_frames 50"),
        "zero steps": (["--sample_steps", "0"], "--sample_steps 0"),
        "negative clips": (["--num_clip", "-1"], "--num_clip -1"),
        "size word": (["--size", "big"], "--size 'big'"),
        "size zero": (["--size", "0*0"], "--size '0*0'"),
        "size negative": (["--size=-704*384"], "--size '-704*384'"),
        "missing image": (["--image", str(tmp_path / "none.jpg")], "none.jpg"),
        "text as jpg": (["--image", str(text_jpg)], "text.jpg"),
        "empty audio": (["--audio", str(empty_wav)], "empty.wav"),
        "truncated audio": (["--audio", str(cut_wav)], "cut.wav"),
        "missing ckpt": (["--ckpt_dir", str(tmp_path / "no-ckpt")], "no-ckpt"),
        "solver": (["--sample_solver", "unipc"], "--sample_solver"),
        "task": (["--task", "t2v-A14B"], "--task"),
        "rope offset": (["--ref_rope_offset", "3"], "--ref_rope_offset"),
        "seed": (["--base_seed", "-5"], "--base_seed"),
        "vram": (["--vram-budget", "abc"], "--vram-budget"),
        "dtype": (["--dtype", "int8"], "--dtype"),
        "mode": (["--mode", "tpp"], "--mode"),
        "not an int": (["--infer_frames", "abc"], "--infer_frames"),
        "not a bool": (["--fp8", "maybe"], "--fp8"),
        "unknown flag": (["--bogus", "1"], "--bogus"),
        "save file kind": (["--save_file", str(tmp_path / "out" / "x.avi")], "x.avi"),
        "several actors": (["--audio", f"{media_dir / 'cyclops_baker.wav'}+{media_dir / 'fashion_blogger.wav'}"],
                           "--audio"),
    }


def test_each_bad_input_is_one_line_and_leaves_no_output(inputs, media_dir, tmp_path, capsys):
    for case, (extra, named) in _bad_argument_cases(media_dir, tmp_path).items():
        code, out, err = run(["generate", *inputs, *extra], capsys)
        assert code == 2, case
        assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), (case, err)
        assert named in err and "Traceback" not in err, (case, err)
        assert not (tmp_path / "out").exists(), case


def test_errors_from_a_subprocess_have_no_traceback(inputs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "liveavatar", "generate", *inputs, "--infer_frames", "50"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --infer_frames 50") and len(result.stderr.splitlines()) == 1


@pytest.fixture
def fake_api(monkeypatch):
    """Stands in for the engine run of `generate`: records the call and writes a file where the real one would."""
    calls = []

    def generate_from_settings(settings, request, output, *, progress=True):
        calls.append((settings, progress))
        if calls_behaviour:
            raise calls_behaviour[0]
        path = settings.output_path(704, 384)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"video")
        return path

    calls_behaviour = []
    monkeypatch.setattr(sys.modules["liveavatar.cli.generate"], "generate_from_settings", generate_from_settings)
    return calls, calls_behaviour


def test_generate_validates_then_calls_the_engine(inputs, tmp_path, fake_api, capsys):
    calls, _ = fake_api
    code, out, err = run(["generate", *inputs, "--prompt", "a dwarf", "--sample-steps", "4", "--quiet"], capsys)
    assert code == 0 and err == ""
    summary, saved = out.splitlines()
    assert summary.startswith("704x384") and saved.startswith("saved ")
    (settings, progress), = calls
    assert progress is False and settings.prompt == "a dwarf" and settings.options.sample_steps == 4
    output = Path(saved.removeprefix("saved "))
    assert output.parent == tmp_path / "out" and output.name.endswith("_704x384_4step_a_dwarf.mp4")


def test_generate_json_reports_the_output(inputs, fake_api, capsys):
    code, out, _ = run(["generate", *inputs, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["output"].endswith(".mp4") and report["width"] == 704


def test_engine_is_not_called_on_bad_input(inputs, fake_api, capsys):
    calls, _ = fake_api
    code, _, _ = run(["generate", *inputs, "--num_clip", "0"], capsys)
    assert code == 2 and calls == []


@pytest.mark.parametrize("raised, code, text", [(KeyboardInterrupt(), 130, "error: interrupted"),
                                                (RuntimeError("CUDA exploded"), 1, "unexpected RuntimeError")])
def test_engine_failures_are_one_line(inputs, fake_api, capsys, raised, code, text):
    fake_api[1].append(raised)
    got, _, err = run(["generate", *inputs], capsys)
    assert got == code and text in err and len(err.splitlines()) == 1


def test_debug_shows_the_traceback(inputs, fake_api, capsys, monkeypatch):
    fake_api[1].append(RuntimeError("CUDA exploded"))
    with pytest.raises(RuntimeError):
        main(["generate", *inputs, "--debug"])
    monkeypatch.setenv("LIVEAVATAR_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["generate", *inputs])


def test_doctor_reports_setup_and_checkpoints(ckpt, tmp_path, capsys):
    code, out, _ = run(["doctor", "--ckpt_dir", ckpt], capsys)
    assert code == 0
    assert "python " in out and "torch " in out and "complete" in out and "generate would use" in out
    code, out, _ = run(["doctor", "--ckpt_dir", tmp_path / "missing"], capsys)
    assert code == 1 and "liveavatar download" in out


def test_download_command_failure(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    code, out, err = run(["download", tmp_path / "ckpt", "--quiet"], capsys)
    assert code == 1 and out == "" and "again to resume" in err and len(err.splitlines()) == 1


def test_readme_documents_every_generate_flag():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table_flags = set(re.findall(r"^\|\s*`(--[\w-]+)", readme, flags=re.MULTILINE))
    generate = next(action for action in build_parser()._subparsers._group_actions[0].choices.items()
                    if action[0] == "generate")[1]
    primary = {action.option_strings[0] for action in generate._actions if action.option_strings} - {"-h"}
    assert primary <= table_flags, f"flags missing from the README table: {sorted(primary - table_flags)}"
    assert table_flags <= primary, f"README documents flags that do not exist: {sorted(table_flags - primary)}"


def _generate_flags(capsys) -> set[str]:
    code, out, _ = run(["generate", "--help"], capsys)
    assert code == 0
    return set(re.findall(r"--[\w-]+", out))


def test_a_gpu_the_machine_lacks_is_refused_by_the_dry_run_naming_only_flags_generate_takes(inputs, capsys,
                                                                                             monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run(["generate", *inputs, "--device", "cuda", "--dry-run"], capsys)
    assert code == 2 and out == ""
    assert err == ("error: --device cuda: PyTorch sees no CUDA GPU on this machine; leave --device out or give "
                   "--device cpu to run on the CPU\n")
    assert set(re.findall(r"--[\w-]+", err)) <= _generate_flags(capsys)


def test_torchrun_ranks_without_a_gpu_run_on_the_cpu_with_one_notice(monkeypatch):
    import torch

    from liveavatar.cli import launch
    from liveavatar.devices import runs_on_cpu
    from liveavatar.runtime.distributed import torchrun_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch, "torchrun_world", lambda: (2, 3, 2))
    assert launch.cpu_rank_notices(SimpleNamespace(device=None)) == [
        "no CUDA GPU here: the 3 ranks run on the CPU (give --device cpu to say so, or run on a machine with GPUs)"]
    assert torchrun_device(2, cpu=runs_on_cpu(None)) == torch.device("cpu")  # as one process does
    # A node with GPUs, fewer than its ranks: advice that works.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"this node has 2; launch with --nproc_per_node 2 or fewer, or give "
                                         r"--device cpu$"):
        torchrun_device(2, cpu=runs_on_cpu(None))


def test_a_cpu_run_reports_what_runs(inputs, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report, _ = dry_run_json([*inputs, "--dtype", "float32"], capsys)
    assert (report["device"], report["dtype"], report["compile"]) == ("cpu", "float32", False)
    report, _ = dry_run_json(inputs, capsys)  # the defaults on a machine without a GPU: the same
    assert (report["device"], report["dtype"], report["compile"]) == ("cpu", "float32", False)
    code, out, _ = run(["generate", *inputs, "--dry-run"], capsys)
    assert code == 0 and "float32 on cpu, eager" in out.splitlines()[1]


def test_audio_help_agrees_with_the_refusal_of_joined_files(inputs, media_dir, capsys):
    code, out, _ = run(["generate", "--help"], capsys)
    help_text = " ".join(out.split())
    assert "joins files" not in help_text and "a.wav+b.wav, one file per actor" in help_text and "is refused" in help_text
    joined = f"{media_dir / 'cyclops_baker.wav'}+{media_dir / 'fashion_blogger.wav'}"
    code, _, err = run(["generate", *inputs, "--audio", joined, "--dry-run"], capsys)
    assert code == 2 and "this engine takes one audio file" in err


@pytest.mark.parametrize("frames, advice", [
    (32, "use 24 for less memory, or 36 for the nearest length"),
    (26, "use 24 (the nearest, and less memory)"),
    (5, "use 12 (the nearest, and less memory)"),
])
def test_infer_frames_advice_names_the_nearest_valid_values_and_why(frames, advice, inputs, capsys):
    code, _, err = run(["generate", *inputs, "--infer_frames", frames, "--dry-run"], capsys)
    assert code == 2
    assert err == (f"error: --infer_frames {frames}: must be a positive multiple of 12, as each block denoises 3 "
                   f"latent frames = 12 video frames (the reference leaves a clip's leftover latent frames "
                   f"undenoised); {advice}\n")


def test_the_low_memory_recipes_ulysses_notice_says_what_runs_instead_and_its_cost(inputs, capsys):
    recipe = ("--size 384*256 --num_clip 50 --infer_frames 36 --sample_steps 3 --sample_guide_scale 0 --num_gpus_dit 4 "
              "--ulysses_size 4 --enable_vae_parallel False --offload_model False --enable_online_decode").split()
    _, err = dry_run_json([*inputs, *recipe], capsys)
    assert ("--ulysses_size 4 is not used: rather than splitting each step's tokens 4 ways, each GPU runs whole "
            "denoising steps on the whole sequence, so the first frame comes no sooner than on one GPU and each GPU "
            "holds a whole step's activations and KV cache") in err
