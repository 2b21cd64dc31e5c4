"""``liveavatar generate`` and the flags that shape a generation (``plan`` and ``bench`` have their own)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from liveavatar.cli.flags import add_attention_flag, add_bool_flag, add_flag, add_no_compile_flag, bool_arg, byte_amount
from liveavatar.cli.launch import (REFERENCE_MULTI_GPU_FLAGS, check_launch, cpu_rank_notices, generate_on_ranks,
                                   idle_rank_notices, is_quiet_rank, layout_report, rank_count, reference_gpus)
from liveavatar.devices import dtype_bytes, dtype_name, resolve_device, runs_on_cpu
from liveavatar.errors import InputError
from liveavatar.geometry import FRAMES_PER_BLOCK, ClipGeometry
from liveavatar.io.video_writer import check_output_path
from liveavatar.options import DEFAULT_SIZE, DEFAULTS, OPTION_NAMES, Mode, RequestOptions
from liveavatar.request import Request
from liveavatar.runtime.planner.hardware import HARDWARE_PRESETS, detect_hardware
from liveavatar.runtime.planner.memory import Workload, dit_inventory, transformer_config_for
from liveavatar.runtime.planner.policy import Pins, Plan, default_host_budget, make_plan, plan_cpu_run, resolve_budget
from liveavatar.settings import WEIGHT_CHOICES, GenerationSettings, parse_vram_budget

if TYPE_CHECKING:
    from liveavatar.models.checkpoint_check import CheckedTransformer

# The run's defaults live in GenerationSettings, the generation's in RequestOptions; the flags show and pass them.
SETTING_DEFAULTS = {field.name: field.default for field in fields(GenerationSettings)}

# Reference flags that mean nothing for this engine: (type, what happens instead). Accepted so that
# the reference's command lines run unchanged; each one given prints one notice.
COMPATIBILITY_FLAGS: dict[str, tuple[Callable, str]] = {
    "frame_num": (int, "unused, as in the reference; frames per clip come from --infer_frames"),
    "offload_model": (bool_arg, "placement of the models is decided by the memory planner (see --vram-budget)"),
    "offload_kv_cache": (bool_arg, "KV-cache placement is decided by the memory planner (see --vram-budget)"),
    "ulysses_size": (int, "sequence parallelism is not used; the multi-GPU pipeline is timestep-parallel"),
    "t5_fsdp": (bool_arg, "FSDP is not used; the memory planner places the text encoder"),
    "dit_fsdp": (bool_arg, "FSDP is not used; the memory planner places the transformer"),
    "num_gpus_dit": (int, "DiT GPUs of the reference's pipeline: runs as --num_gpus N (N+1 with "
                          "--enable_vae_parallel); under torchrun the launched ranks decide"),
    "enable_vae_parallel": (bool_arg, "the reference's decode GPU: the last rank of the pipeline decodes "
                                      "(see --num_gpus_dit)"),
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
    add_flag(inputs, "audio", metavar="PATH", help="driving speech: one file with an audio track (the "
             "reference's a.wav+b.wav, one file per actor, needs its SAM2 face routing and is refused)")
    add_flag(inputs, "prompt", default=SETTING_DEFAULTS["prompt"], help="text prompt describing the scene (default: empty)")

    model = parser.add_argument_group("checkpoints")
    add_flag(model, "ckpt_dir", default=str(SETTING_DEFAULTS["ckpt_dir"]), metavar="DIR",
             help="the Wan2.2-S2V-14B folder (default: %(default)s)")
    add_flag(model, "lora_path_dmd", metavar="PATH_OR_ID",
             help="Live-Avatar LoRA: a .safetensors file, a folder holding liveavatar.safetensors, or a Hub id "
                  f"in the local Hugging Face cache (default: {SETTING_DEFAULTS['lora']}, found beside --ckpt_dir "
                  "or in the cache)")
    add_flag(model, "lora_alpha", type=float, metavar="ALPHA",
             help="LoRA alpha (default: rank/2, 64 for the release's rank 128, as the reference merges it)")
    add_bool_flag(model, "load_lora", "apply the LoRA (default True; False runs the undistilled base weights)")
    add_flag(model, "task", default="s2v-14B", help="only s2v-14B exists here (accepted for compatibility)")

    video = parser.add_argument_group("video")
    add_flag(video, "size", default=DEFAULT_SIZE,
             help="target AREA as W*H (also 704x384, 704×384); the aspect ratio follows the image "
                  "(default %(default)s)")
    add_flag(video, "num_clip", type=int, metavar="N", help="at most N clips (default: as many as the audio needs)")
    add_flag(video, "infer_frames", type=int, default=DEFAULTS.infer_frames, metavar="N",
             help=f"video frames per clip, a multiple of {FRAMES_PER_BLOCK} (default %(default)s)")
    add_flag(video, "sample_steps", type=int, default=DEFAULTS.sample_steps, metavar="N",
             help="denoising steps (default %(default)s)")
    add_flag(video, "sample_solver", default="euler", help="only euler (the distilled sampler)")
    add_flag(video, "base_seed", type=int, default=DEFAULTS.base_seed, metavar="SEED",
             help="noise seed; clip r uses SEED+r; -1 draws one and prints it (default %(default)s)")
    add_flag(video, "mode", default=DEFAULTS.mode, choices=tuple(Mode),
             help="streaming: the paper's pipeline (multi-GPU TPP output, on any GPU count); "
                  "single_gpu: the reference's single-GPU script (default %(default)s)")
    add_bool_flag(video, "enable_online_decode", "--mode single_gpu only: decode clip 0 at once and refresh "
                  "the sink from it, as the reference's flag")
    add_flag(video, "ref_rope_offset", default=DEFAULTS.ref_rope_offset, metavar="seeded|random|N",
             help="rolling-sink RoPE offset: seeded from --base_seed (reproducible), random (unseeded, as the "
                  "reference) or a fixed N in 4..30 (default %(default)s)")
    add_attention_flag(video)

    device = parser.add_argument_group("device")
    add_flag(device, "device", help="cuda, cuda:N or cpu (default: CUDA when available)")
    add_flag(device, "num_gpus", type=int, metavar="N",
             help="run the timestep pipeline on N GPUs, spawned here: each runs a share of the denoising steps "
                  "and the last one decodes and writes (with --device cpu: N processes); default 1")
    add_flag(device, "gpus", type=_gpu_list, metavar="0,1,2,3",
             help="the GPUs of the pipeline (default: the first --num_gpus); under torchrun give neither")
    add_flag(device, "dtype", help="bfloat16 or float32 (default: bfloat16 on CUDA, float32 on the CPU)")
    add_flag(device, "vram-budget", metavar="SIZE", help="GPU memory the planner may use, e.g. 40GiB")
    add_flag(device, "host-memory", metavar="SIZE", help="host RAM the run may use, e.g. 28GiB (default: what "
             "the machine, or its cgroup, has available)")
    add_flag(device, "weights", choices=WEIGHT_CHOICES, help="DiT weights: auto (default: the planner's choice, "
             "FP8 where bf16 does not fit or FP8 is faster, printed before loading), bf16, or fp8 (e4m3 linears "
             "after the LoRA merge)")
    add_bool_flag(device, "fp8", "the reference's flag: True = --weights fp8, False = --weights bf16")
    add_bool_flag(device, "t5_cpu", "run the text encoder on the CPU")
    add_no_compile_flag(device)

    output = parser.add_argument_group("output")
    add_flag(output, "save_file", metavar="PATH", help="output .mp4 path")
    add_flag(output, "save_dir", default=str(SETTING_DEFAULTS["save_dir"]), metavar="DIR",
             help="folder for an automatically named output, created if missing (default ./%(default)s)")
    add_bool_flag(output, "keep-partial", "on failure or Ctrl-C keep the frames written so far as NAME.partial.mp4")
    add_bool_flag(output, "overwrite", "replace an existing --save_file (default: refuse)")

    compatibility = parser.add_argument_group(
        "accepted for compatibility with the reference (each prints a notice saying what happens instead)")
    for name, (kind, meaning) in COMPATIBILITY_FLAGS.items():
        if kind is bool_arg:
            add_flag(compatibility, name, type=kind, nargs="?", const=True, metavar="BOOL", help=meaning)
        else:
            add_flag(compatibility, name, type=kind, metavar="VALUE", help=meaning)


def _gpu_list(text: str) -> tuple[int, ...]:
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPU indices such as 0,1,2,3") from None
    if not gpus or min(gpus) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPU indices such as 0,1,2,3")
    return gpus


def settings_from_args(args: argparse.Namespace) -> tuple[GenerationSettings, list[str]]:
    """Validated settings plus the notice lines the user should see (ignored flags, drawn seed, ...)."""
    notices = [f"{_given(name, getattr(args, name))}: {meaning}"
               for name, (_, meaning) in COMPATIBILITY_FLAGS.items()
               if getattr(args, name) is not None and name not in REFERENCE_MULTI_GPU_FLAGS]
    reference_ranks, multi_gpu_notice = reference_gpus(args)
    if multi_gpu_notice:
        notices.append(multi_gpu_notice)
    if args.task != "s2v-14B":
        raise InputError(f"--task {args.task}: only s2v-14B (speech-to-video) exists in this engine")
    if args.sample_solver != "euler":
        raise InputError(f"--sample_solver {args.sample_solver}: only euler exists (as in the reference, where "
                         f"the others raise NotImplementedError)")
    if not args.image:
        raise InputError("--image: required (the reference portrait)")
    if not args.audio:
        raise InputError("--audio: required (the driving speech)")
    lora = args.lora_path_dmd or SETTING_DEFAULTS["lora"]
    if args.load_lora is False:
        lora = None
        notices.append("--load_lora False: running the base S2V weights without the distilled LoRA "
                       "(the 4-step sampler then gives poor video)")
    weights = args.weights or "auto"
    if args.fp8 is not None:
        wanted = "fp8" if args.fp8 else "bf16"
        if args.weights not in (None, wanted):
            raise InputError(f"--fp8 {args.fp8} contradicts --weights {args.weights}; give one of them")
        weights = wanted
    if args.sample_steps != DEFAULTS.sample_steps and args.sample_steps >= 1:
        notices.append(f"--sample_steps {args.sample_steps}: the LoRA is distilled for 4 steps")
    settings = GenerationSettings(
        image=args.image, audio=args.audio, prompt=args.prompt, options=options_from_args(args), ckpt_dir=args.ckpt_dir,
        lora=lora, weights=weights, lora_alpha=args.lora_alpha, t5_cpu=bool(args.t5_cpu), device=args.device, dtype=args.dtype,
        num_gpus=args.num_gpus if args.num_gpus is not None else reference_ranks, gpus=args.gpus,
        vram_budget=parse_vram_budget(args.vram_budget) if args.vram_budget is not None else None,
        host_memory=byte_amount("host-memory", args.host_memory),
        compile=not args.no_compile, save_file=args.save_file, save_dir=args.save_dir,
        keep_partial=bool(args.keep_partial), overwrite=bool(args.overwrite),
    )
    return settings, notices


def options_from_args(args: argparse.Namespace) -> RequestOptions:
    """The flags named like an option (``--size``, ``--num_clip``, ...) as the run's `RequestOptions`; a flag
    not given keeps the option's default."""
    given = {name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name, None) is not None}
    return RequestOptions(**given)


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
    quiet = args.quiet or is_quiet_rank()
    settings, notices = settings_from_args(args)
    check_launch(settings)
    _print_notices(notices, quiet)
    request = settings.request()
    _print_notices(list(request.notices), quiet)
    _print_notices(cpu_rank_notices(settings) + idle_rank_notices(settings, request), quiet)
    output = check_output_path(settings.output_path(request.geometry.width, request.geometry.height),
                               overwrite=settings.overwrite)
    checked = check_checkpoints(settings)
    if checked.lora is not None and checked.lora.notice:
        _print_notices([checked.lora.notice], quiet)
    report = {**request.shape_report(), **_configuration(settings, request), **layout_report(settings, request),
              "output": str(output)}
    if args.dry_run:
        if is_quiet_rank():
            return 0
        if args.json:
            print(json.dumps(report))
        else:
            print(request.summary())
            print(_configuration_line(report))
        return 0
    if not args.json and not is_quiet_rank():
        print(request.summary(), flush=True)
    output = generate_from_settings(settings, request, output, progress=not (quiet or args.json))
    if output is None:  # a torchrun rank that served its steps; the output rank reports
        return 0
    if args.json:
        print(json.dumps({**report, "output": str(output)}))
    else:
        print(f"saved {output}")
    return 0


def check_checkpoints(settings: GenerationSettings) -> CheckedTransformer:
    """Every checkpoint file present and whole, and the DiT's and the LoRA's shapes what the config says,
    from the headers alone (no weight is read)."""
    from liveavatar.models.checkpoint_check import check_transformer_checkpoint

    layout = settings.checkpoint_layout
    layout.validate()
    return check_transformer_checkpoint(layout.dit_dir, layout.lora, lora_alpha=settings.lora_alpha)


def _configuration(settings: GenerationSettings, request) -> dict:
    """What will run: the device, dtype and compilation resolved as the run resolves them (a CPU run is
    float32 and eager), not the flags as given."""
    from liveavatar.models.quantised_attention import choose_self_attention
    from liveavatar.runtime.compile import resolve_fast_path

    layout = settings.checkpoint_layout
    device = str(resolve_device("cpu" if runs_on_cpu(settings.device) else settings.device))
    return {
        "mode": request.options.mode, "enable_online_decode": request.options.online_decode,
        "sample_steps": request.options.sample_steps, "base_seed": request.options.base_seed,
        "ref_rope_offset": request.options.ref_rope_offset, "dtype": dtype_name(settings.dtype, device.split(":")[0]),
        "device": device, "weights": settings.weights, "vram_budget": settings.vram_budget,
        "compile": resolve_fast_path(device, compile=None if settings.compile else False).compile,
        "attention": choose_self_attention(request.options.attention, device).name,
        "image": str(settings.image),
        "audio": [str(p) for p in settings.audio], "ckpt_dir": str(layout.ckpt_dir),
        "lora": str(layout.lora) if layout.lora else None,
    }


def _configuration_line(report: dict) -> str:
    return (f"mode {report['mode']}, {report['sample_steps']} steps, seed {report['base_seed']}, "
            f"rope offset {report['ref_rope_offset']}, {report['dtype']} on {report['device']}, "
            f"{'compiled' if report['compile'] else 'eager'}, weights {report['weights']}, "
            f"attention {report['attention']}, "
            f"LoRA {report['lora'] or 'none'} -> {report['output']}")


def plan_for(*, ckpt_dir: Path, device: str | None, dtype: str | None, weights: str, t5_cpu: bool,
             vram_budget: int | None, geometry: ClipGeometry, options: RequestOptions,
             host_memory: int | None = None, audio_seconds: float = 0.0) -> Plan:
    """The plan a run of ``geometry`` and ``options`` gets, made before anything is loaded (of the
    checkpoints only the DiT's config.json is read). ``vram_budget`` caps the GPU budget, ``host_memory``
    the host's (default: what the machine or its cgroup has available); ``weights`` (bf16 / fp8; auto
    leaves it to the planner) and ``t5_cpu`` pin those choices; ``audio_seconds`` of audio stay in host
    memory. A CPU run (``--device cpu``, or no GPU) gets a plan with no GPU budget. Call ``.check()`` on
    the result to refuse a run that does not fit."""
    on_cpu = runs_on_cpu(device)
    work = Workload.of(geometry, options, run_dtype_bytes=dtype_bytes(dtype_name(dtype, "cpu" if on_cpu else "cuda")),
                       audio_seconds=audio_seconds)
    inventory = dit_inventory(transformer_config_for(ckpt_dir))
    pins = Pins(weight_dtype=None if weights == "auto" else weights, text_encoder="cpu" if t5_cpu else None)
    if on_cpu:
        return plan_cpu_run(inventory, work, pins)
    hardware = detect_hardware() or HARDWARE_PRESETS["h100"]
    budget, source = resolve_budget(vram_budget=vram_budget)
    host = host_memory if host_memory is not None else default_host_budget()
    return make_plan(inventory, work, hardware, budget, budget_source=source, pins=pins, host_budget_bytes=host)


def generate_from_settings(settings: GenerationSettings, request: Request, output: Path, *,
                           progress: bool = True) -> Path | None:
    """What ``liveavatar generate`` runs once the request is resolved and the inputs checked: plan, load,
    generate into ``output``, return its path. A run that cannot fit is refused by the plan, with the
    numbers, before anything heavy loads. ``progress`` shows the phases and the generation's progress. On
    several ranks (``--num_gpus``, ``--gpus`` or torchrun) see `liveavatar.cli.launch`; a rank other than
    the output rank returns None."""
    from liveavatar.api import LiveAvatarPipeline
    from liveavatar.runtime.progress import Progress

    if rank_count(settings) > 1:
        return generate_on_ranks(settings, request, output, progress=progress)
    status = Progress(total_blocks=request.total_blocks, blocks_per_clip=request.geometry.blocks_per_clip,
                      total_frames=request.num_frames, enabled=progress)
    status.phase("planning the memory")
    plan = plan_for(ckpt_dir=settings.ckpt_dir, device=settings.device, dtype=settings.dtype,
                    weights=settings.weights, t5_cpu=settings.t5_cpu, vram_budget=settings.vram_budget,
                    geometry=request.geometry, options=request.options, host_memory=settings.host_memory,
                    audio_seconds=request.audio_seconds or 0.0).check()
    notes = "".join(f"; {n}" for n in plan.notes)
    if runs_on_cpu(settings.device):  # no GPU placement: the whole model and its caches in host memory
        status.phase_done(f"CPU run: {dtype_name(settings.dtype, 'cpu')} weights and caches in host memory, eager"
                          + notes)
    else:
        chosen = "the planner's choice" if settings.weights == "auto" else f"--weights {settings.weights}"
        status.phase_done(f"{plan.placement.describe()} ({chosen}); predicted peak "
                          f"{plan.predicted_peak_bytes / 2**30:.1f} GiB ({plan.budget_source}), host "
                          f"{plan.predicted_host_peak_bytes / 2**30:.1f} GiB" + notes)
    layout = settings.checkpoint_layout
    size = layout.weight_bytes()
    status.phase(f"loading {_amount(size)} of weights")
    began = time.perf_counter()
    pipe = LiveAvatarPipeline.from_layout(layout, device=settings.device, dtype=settings.dtype,
                                          placement=plan.placement, lora_alpha=settings.lora_alpha,
                                          compile=None if settings.compile else False)
    status.phase_done(f"{_amount(size / max(time.perf_counter() - began, 1e-9))}/s")
    return pipe.generate(request, output=output, keep_partial=settings.keep_partial, overwrite=settings.overwrite,
                         progress=status)


def _amount(n_bytes: float) -> str:
    """Bytes in the unit that reads: 1.2 GB, 85 MB, 40 kB (a tiny checkpoint is not "0.0 GB")."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}" if n_bytes < 10 * size else f"{n_bytes / size:.0f} {unit}"
    return f"{n_bytes:.0f} B"
