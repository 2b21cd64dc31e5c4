"""``liveavatar generate`` and the flags that shape a generation (``plan`` and ``bench`` have their own)."""
from __future__ import annotations

import argparse
import json
import secrets
import sys
from dataclasses import fields
from typing import Callable

from pathlib import Path

from liveavatar.cli.flags import add_bool_flag, add_flag, bool_arg, byte_amount
from liveavatar.devices import dtype_bytes
from liveavatar.errors import InputError
from liveavatar.geometry import DEFAULT_SIZE, FRAMES_PER_BLOCK, MODES
from liveavatar.request import Request
from liveavatar.runtime.planner.hardware import HARDWARE_PRESETS, detect_hardware
from liveavatar.runtime.planner.memory import Workload, dit_inventory, transformer_config_for
from liveavatar.runtime.planner.policy import Pins, Plan, default_host_budget, make_plan, plan_cpu_run, resolve_budget
from liveavatar.settings import GenerationSettings, parse_size, parse_vram_budget

# The defaults live in GenerationSettings; the flags show and pass the same values.
DEFAULTS = {field.name: field.default for field in fields(GenerationSettings)}

# Reference flags that mean nothing for this engine: (type, what happens instead). Accepted so that
# the reference's command lines run unchanged; each one given prints one notice.
COMPATIBILITY_FLAGS: dict[str, tuple[Callable, str]] = {
    "frame_num": (int, "unused, as in the reference; frames per clip come from --infer_frames"),
    "offload_model": (bool_arg, "placement of the models is decided by the memory planner (see --vram-budget)"),
    "offload_kv_cache": (bool_arg, "KV-cache placement is decided by the memory planner (see --vram-budget)"),
    "ulysses_size": (int, "sequence parallelism is not used; ignored"),
    "t5_fsdp": (bool_arg, "FSDP is not used; the memory planner places the text encoder"),
    "dit_fsdp": (bool_arg, "FSDP is not used; the memory planner places the transformer"),
    "num_gpus_dit": (int, "GPU placement is decided by the planner; --mode streaming gives the multi-GPU "
                          "(TPP) pipeline's output on any number of GPUs"),
    "enable_vae_parallel": (bool_arg, "GPU placement is decided by the planner; --mode streaming decodes "
                                      "block by block as the multi-GPU VAE rank does"),
    "single_gpu": (bool_arg, "the pipeline variant is chosen with --mode (default streaming); "
                             "--mode single_gpu reproduces the single-GPU script"),
    "convert_model_dtype": (bool_arg, "weights are always loaded in --dtype (default bfloat16)"),
    "sample_shift": (float, "ignored as in the reference: the schedule's shift is fixed at 3"),
    "sample_guide_scale": (float, "the distilled model has no classifier-free guidance; ignored as in the reference"),
    "training_config": (str, "not needed: the LoRA rank is read from the file and alpha is rank/2 "
                             "(64 for the release's rank 128, as in s2v_causal_sft.yaml)"),
    "lora_path": (str, "unused, as in the reference; the LoRA comes from --lora_path_dmd"),
    "use_prompt_extend": (bool_arg, "prompt extension is not built in; the prompt is used as given"),
    "prompt_extend_method": (str, "prompt extension is not built in; the prompt is used as given"),
    "prompt_extend_model": (str, "prompt extension is not built in; the prompt is used as given"),
    "prompt_extend_target_lang": (str, "prompt extension is not built in; the prompt is used as given"),
    "enable_tts": (bool_arg, "text-to-speech is not built in; synthesise the speech first and pass it with --audio"),
    "tts_prompt_audio": (str, "text-to-speech is not built in; ignored"),
    "tts_prompt_text": (str, "text-to-speech is not built in; ignored"),
    "tts_text": (str, "text-to-speech is not built in; ignored"),
    "pose_video": (str, "pose conditioning is not supported; the pose latents are zeros, as in the reference "
                        "without --pose_video"),
    "start_from_ref": (bool_arg, "ignored, as in the reference's causal pipelines"),
    "use_dataset": (bool_arg, "ignored, as in the reference"),
    "dataset_sample_idx": (int, "ignored, as in the reference"),
    "drop_motion_noisy": (bool_arg, "ignored, as in the reference"),
    "using_merged_ckpt": (bool_arg, "ignored, as in the reference"),
}


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
             help=f"video frames per clip, a multiple of {FRAMES_PER_BLOCK} (default %(default)s)")
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
    add_flag(device, "host-memory", metavar="SIZE", help="host RAM the run may use, e.g. 28GiB (default: what "
             "the machine, or its cgroup, has available)")
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
        if kind is bool_arg:
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
    if args.sample_steps != DEFAULTS["sample_steps"] and args.sample_steps >= 1:
        notices.append(f"--sample_steps {args.sample_steps}: the LoRA is distilled for 4 steps")
    settings = GenerationSettings(
        image=args.image, audio=args.audio, prompt=args.prompt, ckpt_dir=args.ckpt_dir, lora=lora,
        size_area=parse_size(args.size), infer_frames=args.infer_frames, sample_steps=args.sample_steps,
        num_clip=args.num_clip, base_seed=seed, mode=args.mode,
        enable_online_decode=bool(args.enable_online_decode), ref_rope_offset=args.ref_rope_offset,
        fp8=bool(args.fp8), t5_cpu=bool(args.t5_cpu), device=args.device, dtype=args.dtype,
        vram_budget=parse_vram_budget(args.vram_budget) if args.vram_budget is not None else None,
        host_memory=byte_amount("host-memory", args.host_memory),
        save_file=args.save_file, save_dir=args.save_dir, keep_partial=bool(args.keep_partial),
    )
    return settings, notices


def _given(name: str, value) -> str:
    return f"--{name}" if value is True else f"--{name} {value}"


def _print_notices(notices: list[str], quiet: bool) -> None:
    if not quiet:
        for line in notices:
            print(f"notice: {line}", file=sys.stderr)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_arguments(parser)
    run = parser.add_argument_group("run")
    add_flag(run, "dry-run", action="store_true",
             help="check every input and the checkpoints without loading a model, print the configuration")
    add_flag(run, "json", action="store_true", help="print one JSON object on stdout (notices go to stderr)")
    add_flag(run, "quiet", action="store_true", help="no notices or progress, only errors and the result")


def run_generate(args: argparse.Namespace) -> int:
    settings, notices = settings_from_args(args)
    _print_notices(notices, args.quiet)
    request = settings.request()
    _print_notices(request.notices, args.quiet)
    settings.checkpoint_layout.validate()
    report = {**request.shape_report(), **_configuration(settings, request)}
    if args.dry_run:
        report["output"] = str(settings.output_path(request.geometry.width, request.geometry.height))
        if args.json:
            print(json.dumps(report))
        else:
            print(request.summary())
            print(_configuration_line(report))
        return 0
    if not args.json:
        print(request.summary(), flush=True)
    output = generate_from_settings(settings, request, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps({**report, "output": str(output)}))
    else:
        print(f"saved {output}")
    return 0


def _configuration(settings: GenerationSettings, request) -> dict:
    layout = settings.checkpoint_layout
    return {
        "mode": request.mode, "enable_online_decode": request.online_decode,
        "sample_steps": request.sample_steps, "base_seed": request.base_seed,
        "ref_rope_offset": request.ref_rope_offset, "dtype": settings.dtype, "device": settings.device,
        "fp8": settings.fp8, "vram_budget": settings.vram_budget, "image": str(settings.image),
        "audio": [str(p) for p in settings.audio], "ckpt_dir": str(layout.ckpt_dir),
        "lora": str(layout.lora) if layout.lora else None,
    }


def _configuration_line(report: dict) -> str:
    return (f"mode {report['mode']}, {report['sample_steps']} steps, seed {report['base_seed']}, "
            f"rope offset {report['ref_rope_offset']}, {report['dtype'] or 'auto dtype'}, "
            f"fp8 {'on' if report['fp8'] else 'off'}, "
            f"LoRA {report['lora'] or 'none'} -> {report['output']}")


def plan_for_settings(settings: GenerationSettings, request: Request) -> Plan:
    """The plan ``generate`` runs under, made before anything is loaded (of the checkpoints only the DiT's
    config.json is read), for the request's video size and audio length. ``vram_budget`` caps the GPU budget,
    ``host_memory`` the host's (default: what is available); ``fp8`` and ``t5_cpu`` pin those choices. A CPU
    run (``--device cpu``, or no GPU) gets a plan with no GPU budget.
    Call ``.check()`` on the result to refuse a run that does not fit."""
    import torch

    on_cpu = settings.device == "cpu" or (settings.device is None and not torch.cuda.is_available())
    dtype = settings.dtype or ("float32" if on_cpu else "bfloat16")
    geometry = request.geometry
    work = Workload(geometry.height, geometry.width, geometry.infer_frames, request.sample_steps, 1, request.mode,
                    dtype_bytes(dtype), audio_seconds=request.audio_seconds or 0.0)
    inventory = dit_inventory(transformer_config_for(settings.ckpt_dir))
    pins = Pins(weight_dtype="fp8" if settings.fp8 else None, text_encoder="cpu" if settings.t5_cpu else None)
    if on_cpu:
        return plan_cpu_run(inventory, work, pins)
    hardware = detect_hardware() or HARDWARE_PRESETS["h100"]
    budget, source = resolve_budget(vram_budget=settings.vram_budget)
    host = settings.host_memory if settings.host_memory is not None else default_host_budget()
    return make_plan(inventory, work, hardware, budget, budget_source=source, pins=pins, host_budget_bytes=host)


def generate_from_settings(settings: GenerationSettings, request: Request, *, progress: bool = True) -> Path:
    """What ``liveavatar generate`` runs once the request is resolved: plan, load, generate, return the mp4
    path. A run that cannot fit is refused by the plan, with the numbers, before anything heavy loads."""
    from liveavatar.api import LiveAvatarPipeline
    from liveavatar.devices import resolve_device

    plan = plan_for_settings(settings, request).check()
    if progress and resolve_device(settings.device).type == "cuda":
        print(f"plan: {plan.placement.describe()}; predicted peak {plan.predicted_peak_bytes / 2**30:.1f} GiB "
              f"({plan.budget_source}), host {plan.predicted_host_peak_bytes / 2**30:.1f} GiB", file=sys.stderr)
        for note in plan.notes:
            print(f"plan: {note}", file=sys.stderr)
    pipe = LiveAvatarPipeline.from_layout(settings.checkpoint_layout, device=settings.device, dtype=settings.dtype,
                                          placement=plan.placement)
    geometry = request.geometry
    return pipe.generate(request, output=settings.output_path(geometry.width, geometry.height),
                         keep_partial=settings.keep_partial, progress=progress)
