"""The ``liveavatar`` command.

Each subcommand is a ``Command``: a function that adds its arguments and a handler that runs it. Handlers
import heavy modules (torch, the models) themselves, so ``liveavatar --help`` stays fast. A new command
is one more entry in ``COMMANDS``; commands that take the generation flags (``plan``, ``bench``) reuse
``add_generation_arguments`` and ``settings_from_args``.

Errors the user can act on (``LiveAvatarError``, ``ValueError``, ``OSError``) print one ``error: ...``
line and exit 2 (bad input) or 1; anything else prints one line too. ``--debug`` or ``LIVEAVATAR_DEBUG=1``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from liveavatar import __version__
from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.runtime.bench import add_bench_arguments, run_bench
from liveavatar.runtime.planner import add_plan_arguments, run_plan
from liveavatar.serve.command import add_serve_arguments, run_serve
from liveavatar.settings import DEFAULT_SIZE, MODES, GenerationSettings, parse_bool, parse_size, parse_vram_budget

# The defaults live in GenerationSettings; the flags show and pass the same values.
DEFAULTS = {field.name: field.default for field in fields(GenerationSettings)}


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _bool(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_flag(parser, name: str, **kwargs) -> argparse.Action:
    """Register ``--name`` under both spellings (``--sample_steps`` and ``--sample-steps``)."""
    spellings = [f"--{name}"]
    for other in (name.replace("_", "-"), name.replace("-", "_")):
        if f"--{other}" not in spellings:
            spellings.append(f"--{other}")
    return parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


def add_bool_flag(parser, name: str, help: str) -> argparse.Action:
    """A boolean flag: alone it means True; it also takes True/False, 1/0, yes/no."""
    return add_flag(parser, name, type=_bool, nargs="?", const=True, default=None, metavar="BOOL", help=help)


# Reference flags that mean nothing for this engine: (type, what happens instead). Accepted so that
# the reference's command lines run unchanged; each one given prints one notice.
COMPATIBILITY_FLAGS: dict[str, tuple[Callable, str]] = {
    "frame_num": (int, "unused, as in the reference; frames per clip come from --infer_frames"),
    "offload_model": (_bool, "placement of the models is decided by the memory planner (see --vram-budget)"),
    "offload_kv_cache": (_bool, "KV-cache placement is decided by the memory planner (see --vram-budget)"),
    "ulysses_size": (int, "sequence parallelism is not used; ignored"),
    "t5_fsdp": (_bool, "FSDP is not used; the memory planner places the text encoder"),
    "dit_fsdp": (_bool, "FSDP is not used; the memory planner places the transformer"),
    "num_gpus_dit": (int, "GPU placement is decided by the planner; --mode streaming gives the multi-GPU "
                          "(TPP) pipeline's output on any number of GPUs"),
    "enable_vae_parallel": (_bool, "GPU placement is decided by the planner; --mode streaming decodes "
                                   "block by block as the multi-GPU VAE rank does"),
    "single_gpu": (_bool, "the pipeline variant is chosen with --mode (default streaming); "
                          "--mode single_gpu reproduces the single-GPU script"),
    "convert_model_dtype": (_bool, "weights are always loaded in --dtype (default bfloat16)"),
    "sample_shift": (float, "ignored as in the reference: the schedule's shift is fixed at 3"),
    "sample_guide_scale": (float, "the distilled model has no classifier-free guidance; ignored as in the reference"),
    "training_config": (str, "not needed: the LoRA rank is read from the file and alpha is rank/2 "
                             "(64 for the release's rank 128, as in s2v_causal_sft.yaml)"),
    "lora_path": (str, "unused, as in the reference; the LoRA comes from --lora_path_dmd"),
    "use_prompt_extend": (_bool, "prompt extension is not built in; the prompt is used as given"),
    "prompt_extend_method": (str, "prompt extension is not built in; the prompt is used as given"),
    "prompt_extend_model": (str, "prompt extension is not built in; the prompt is used as given"),
    "prompt_extend_target_lang": (str, "prompt extension is not built in; the prompt is used as given"),
    "enable_tts": (_bool, "text-to-speech is not built in; synthesise the speech first and pass it with --audio"),
    "tts_prompt_audio": (str, "text-to-speech is not built in; ignored"),
    "tts_prompt_text": (str, "text-to-speech is not built in; ignored"),
    "tts_text": (str, "text-to-speech is not built in; ignored"),
    "pose_video": (str, "pose conditioning is not supported; the pose latents are zeros, as in the reference "
                        "without --pose_video"),
    "start_from_ref": (_bool, "ignored, as in the reference's causal pipelines"),
    "use_dataset": (_bool, "ignored, as in the reference"),
    "dataset_sample_idx": (int, "ignored, as in the reference"),
    "drop_motion_noisy": (_bool, "ignored, as in the reference"),
    "using_merged_ckpt": (_bool, "ignored, as in the reference"),
}
_BOOL_VALUE_FLAGS = {name for name, (kind, _) in COMPATIBILITY_FLAGS.items() if kind is _bool}


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag that shapes a generation: the reference's names (and dashed spellings) plus ours."""
    inputs = parser.add_argument_group("inputs")
    add_flag(inputs, "image", metavar="PATH", help="reference portrait (any format Pillow reads)")
    add_flag(inputs, "audio", metavar="PATH", help="driving speech (any file with an audio track); "
             "a.wav+b.wav joins files unless the whole string is an existing path")
    add_flag(inputs, "prompt", default=DEFAULTS["prompt"], help="text prompt describing the scene (default: empty)")

    model = parser.add_argument_group("checkpoints")
    add_flag(model, "ckpt_dir", default=str(DEFAULTS["ckpt_dir"]), metavar="DIR",
             help="the Wan2.2-S2V-14B folder (default: %(default)s)")
    add_flag(model, "lora_path_dmd", metavar="PATH_OR_ID",
             help="Live-Avatar LoRA: a .safetensors file, a folder holding liveavatar.safetensors, or a Hub id "
                  f"in the local Hugging Face cache (default: {DEFAULTS['lora']}, found beside --ckpt_dir "
                  "or in the cache)")
    add_bool_flag(model, "load_lora", "apply the LoRA (default True; False runs the undistilled base weights)")
    add_flag(model, "task", default="s2v-14B", help="only s2v-14B exists here (accepted for compatibility)")

    video = parser.add_argument_group("video")
    add_flag(video, "size", default=DEFAULT_SIZE,
             help="target AREA as W*H (also 704x384, 704×384); the aspect ratio follows the image "
                  "(default %(default)s)")
    add_flag(video, "num_clip", type=int, metavar="N", help="at most N clips (default: as many as the audio needs)")
    add_flag(video, "infer_frames", type=int, default=DEFAULTS["infer_frames"], metavar="N",
             help="video frames per clip, a multiple of 12 (default %(default)s)")
    add_flag(video, "sample_steps", type=int, default=DEFAULTS["sample_steps"], metavar="N",
             help="denoising steps (default %(default)s)")
    add_flag(video, "sample_solver", default="euler", help="only euler (the distilled sampler)")
    add_flag(video, "base_seed", type=int, default=DEFAULTS["base_seed"], metavar="SEED",
             help="noise seed; clip r uses SEED+r; -1 draws one and prints it (default %(default)s)")
    add_flag(video, "mode", default=DEFAULTS["mode"], choices=MODES,
             help="streaming: the paper's pipeline (multi-GPU TPP output, on any GPU count); "
                  "single_gpu: the reference's single-GPU script (default %(default)s)")
    add_bool_flag(video, "enable_online_decode", "--mode single_gpu only: decode clip 0 at once and refresh "
                  "the sink from it, as the reference's flag")
    add_flag(video, "ref_rope_offset", default=DEFAULTS["ref_rope_offset"], metavar="seeded|random|N",
             help="rolling-sink RoPE offset: seeded from --base_seed (reproducible), random (unseeded, as the "
                  "reference) or a fixed N in 4..30 (default %(default)s)")

    device = parser.add_argument_group("device")
    add_flag(device, "device", help="cuda, cuda:N or cpu (default: CUDA when available)")
    add_flag(device, "dtype", help="bfloat16 or float32 (default: bfloat16 on CUDA, float32 on the CPU)")
    add_flag(device, "vram-budget", metavar="SIZE", help="GPU memory the planner may use, e.g. 40GiB")
    add_bool_flag(device, "fp8", "FP8 linears after the LoRA merge, as the reference's --fp8")
    add_bool_flag(device, "t5_cpu", "run the text encoder on the CPU")

    output = parser.add_argument_group("output")
    add_flag(output, "save_file", metavar="PATH", help="output .mp4 path")
    add_flag(output, "save_dir", default=str(DEFAULTS["save_dir"]), metavar="DIR",
             help="folder for an automatically named output, created if missing (default ./%(default)s)")
    add_bool_flag(output, "keep-partial", "on failure or Ctrl-C keep the frames written so far as NAME.partial.mp4")

    compatibility = parser.add_argument_group(
        "accepted for compatibility with the reference (each prints a notice saying what happens instead)")
    for name, (kind, meaning) in COMPATIBILITY_FLAGS.items():
        if name in _BOOL_VALUE_FLAGS:
            add_flag(compatibility, name, type=kind, nargs="?", const=True, metavar="BOOL", help=meaning)
        else:
            add_flag(compatibility, name, type=kind, metavar="VALUE", help=meaning)


def settings_from_args(args: argparse.Namespace) -> tuple[GenerationSettings, list[str]]:
    """Validated settings plus the notice lines the user should see (ignored flags, drawn seed, ...)."""
    notices = [f"{_given(name, getattr(args, name))}: {meaning}"
               for name, (_, meaning) in COMPATIBILITY_FLAGS.items() if getattr(args, name) is not None]
    if args.task != "s2v-14B":
        raise InputError(f"--task {args.task}: only s2v-14B (speech-to-video) exists in this engine")
    if args.sample_solver != "euler":
        raise InputError(f"--sample_solver {args.sample_solver}: only euler exists (as in the reference, where "
                         f"the others raise NotImplementedError)")
    if not args.image:
        raise InputError("--image: required (the reference portrait)")
    if not args.audio:
        raise InputError("--audio: required (the driving speech)")
    seed = args.base_seed
    if seed == -1:
        seed = secrets.randbelow(2**31)
        notices.append(f"--base_seed -1: using seed {seed}")
    lora = args.lora_path_dmd or DEFAULTS["lora"]
    if args.load_lora is False:
        lora = None
        notices.append("--load_lora False: running the base S2V weights without the distilled LoRA "
                       "(the 4-step sampler then gives poor video)")
    online_decode = bool(args.enable_online_decode)
    if online_decode and args.mode != "single_gpu":
        online_decode = False
        notices.append("--enable_online_decode: ignored, it belongs to --mode single_gpu; the streaming pipeline "
                       "always refreshes the sink from the first generated latent")
    if args.sample_steps != DEFAULTS["sample_steps"] and args.sample_steps >= 1:
        notices.append(f"--sample_steps {args.sample_steps}: the LoRA is distilled for 4 steps")
    settings = GenerationSettings(
        image=args.image, audio=args.audio, prompt=args.prompt, ckpt_dir=args.ckpt_dir, lora=lora,
        size_area=parse_size(args.size), infer_frames=args.infer_frames, sample_steps=args.sample_steps,
        num_clip=args.num_clip, base_seed=seed, mode=args.mode,
        enable_online_decode=online_decode, ref_rope_offset=args.ref_rope_offset,
        fp8=bool(args.fp8), t5_cpu=bool(args.t5_cpu), device=args.device, dtype=args.dtype,
        vram_budget=parse_vram_budget(args.vram_budget) if args.vram_budget is not None else None,
        save_file=args.save_file, save_dir=args.save_dir, keep_partial=bool(args.keep_partial),
    )
    return settings, notices


def _given(name: str, value) -> str:
    return f"--{name}" if value is True else f"--{name} {value}"


def _print_notices(notices: list[str], quiet: bool) -> None:
    if not quiet:
        for line in notices:
            print(f"notice: {line}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- generate

def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_arguments(parser)
    run = parser.add_argument_group("run")
    add_flag(run, "dry-run", action="store_true",
             help="check every input and the checkpoints without loading a model, print the configuration")
    add_flag(run, "json", action="store_true", help="print one JSON object on stdout (notices go to stderr)")
    add_flag(run, "quiet", action="store_true", help="no notices or progress, only errors and the result")


def _run_generate(args: argparse.Namespace) -> int:
    from liveavatar.settings import inspect_inputs

    settings, notices = settings_from_args(args)
    _print_notices(notices, args.quiet)
    shape = inspect_inputs(settings)
    report = {**shape.as_dict(), **_configuration(settings)}
    if args.dry_run:
        report["output"] = str(settings.output_path(shape.width, shape.height))
        if args.json:
            print(json.dumps(report))
        else:
            print(shape.summary())
            print(_configuration_line(report))
        return 0
    if not args.json:
        print(shape.summary(), flush=True)
    from liveavatar.api import generate_from_settings

    output = generate_from_settings(settings, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps({**report, "output": str(output)}))
    else:
        print(f"saved {output}")
    return 0


def _configuration(settings: GenerationSettings) -> dict:
    layout = settings.checkpoint_layout()
    return {
        "mode": settings.mode, "enable_online_decode": settings.enable_online_decode,
        "sample_steps": settings.sample_steps, "base_seed": settings.base_seed,
        "ref_rope_offset": settings.ref_rope_offset, "dtype": settings.dtype, "device": settings.device,
        "fp8": settings.fp8, "vram_budget": settings.vram_budget, "image": str(settings.image),
        "audio": [str(p) for p in settings.audio], "ckpt_dir": str(layout.ckpt_dir),
        "lora": str(layout.lora) if layout.lora else None,
    }


def _configuration_line(report: dict) -> str:
    return (f"mode {report['mode']}, {report['sample_steps']} steps, seed {report['base_seed']}, "
            f"rope offset {report['ref_rope_offset']}, {report['dtype'] or 'auto dtype'}, "
            f"fp8 {'on' if report['fp8'] else 'off'}, "
            f"LoRA {report['lora'] or 'none'} -> {report['output']}")


# ------------------------------------------------------------------------------------------------ doctor

def _add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "ckpt_dir", default=str(DEFAULTS["ckpt_dir"]), metavar="DIR", help="the Wan2.2-S2V-14B folder")
    add_flag(parser, "lora_path_dmd", default=DEFAULTS["lora"], metavar="PATH_OR_ID", help="the LoRA")


def _run_doctor(args: argparse.Namespace) -> int:
    from liveavatar.doctor import report_lines

    lines, healthy = report_lines(Path(args.ckpt_dir), args.lora_path_dmd)
    print("\n".join(lines))
    return 0 if healthy else 1


# ---------------------------------------------------------------------------------------------- download

def _add_download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default="ckpt", help="target folder (default ./ckpt)")
    add_flag(parser, "quiet", action="store_true", help="no progress bars")


def _run_download(args: argparse.Namespace) -> int:
    from liveavatar.checkpoints.download import download_checkpoints

    layout = download_checkpoints(args.dir, progress=not args.quiet)
    print(f"base model: {layout.ckpt_dir}\nLoRA: {layout.lora}")
    print(f"next: liveavatar generate --ckpt_dir {layout.ckpt_dir} --image IMAGE --audio AUDIO")
    return 0


# --------------------------------------------------------------------------------------------- make-tiny

def _add_make_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="target folder; gets Wan2.2-S2V-14B/ and LiveAvatar/liveavatar.safetensors")
    add_flag(parser, "seed", type=int, default=0, help="seed of the random weights (default 0)")


def _run_make_tiny(args: argparse.Namespace) -> int:
    from liveavatar.checkpoints.make_tiny import make_tiny_checkpoints

    layout = make_tiny_checkpoints(args.dir, seed=args.seed)
    print(f"base model: {layout.ckpt_dir}\nLoRA: {layout.lora}")
    print(f"try: liveavatar generate --ckpt_dir {layout.ckpt_dir} --lora_path_dmd {layout.lora} "
          f"--image IMAGE --audio AUDIO --dtype float32 --dry-run")
    return 0


COMMANDS: list[Command] = [
    Command("generate", "make a talking-avatar video from an image and speech", _add_generate_arguments,
            _run_generate),
    Command("doctor", "report the Python/torch/GPU setup and checkpoint completeness", _add_doctor_arguments,
            _run_doctor),
    Command("download", "download the checkpoints from the Hugging Face Hub", _add_download_arguments,
            _run_download),
    Command("make-tiny", "write tiny random checkpoints in the release's layout (tests, demos)",
            _add_make_tiny_arguments, _run_make_tiny),
    Command("plan", "predict the GPU memory of a run and choose the fastest placement that fits", add_plan_arguments, run_plan),
    Command("bench", "time the engine at full size with random weights (no checkpoint needed)", add_bench_arguments, run_bench),
    Command("serve", "serve a web page, a jobs API and a live WebSocket session on one loaded engine", add_serve_arguments, run_serve),
]


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks (also LIVEAVATAR_DEBUG=1)")
    parser = _Parser(prog="liveavatar", parents=[debug], allow_abbrev=False,
                     description="Streaming inference engine for Live Avatar (Wan2.2-S2V-14B + Live-Avatar LoRA).")
    parser.add_argument("--version", action="version", version=f"liveavatar {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help, parents=[debug],
                                  allow_abbrev=False)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("LIVEAVATAR_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "run"):
            parser.error(f"choose a command: {', '.join(command.name for command in COMMANDS)}")
        return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        if isinstance(error, LiveAvatarError):
            return error.exit_code
        return 2 if isinstance(error, ValueError) else 1


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, (LiveAvatarError, ValueError, OSError)):
        return text or type(error).__name__
    return f"unexpected {type(error).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
