"""``liveavatar serve``: load the engine once, then serve the page, the jobs API and the live session
until Ctrl-C or SIGTERM (which cancel the running job and remove every file the server wrote)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
import tempfile
from pathlib import Path

from liveavatar.cli.flags import add_attention_flag, add_bool_flag, add_flag
from liveavatar.cli.generate import SETTING_DEFAULTS, plan_for
from liveavatar.errors import ArgumentError, InputError
from liveavatar.options import DEFAULT_SIZE, DEFAULTS, RequestOptions
from liveavatar.serve.tts import DEFAULT_TTS_COMMAND

TOKEN_ENV = "LIVEAVATAR_TOKEN"
MIN_TOKEN_CHARS = 16  # a guessable token is no gate


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("checkpoints and device (as generate)")
    add_flag(model, "ckpt_dir", default=str(SETTING_DEFAULTS["ckpt_dir"]), metavar="DIR",
             help="the Wan2.2-S2V-14B folder (default: %(default)s)")
    add_flag(model, "lora_path_dmd", default=SETTING_DEFAULTS["lora"], metavar="PATH_OR_ID",
             help="the Live-Avatar LoRA (default: %(default)s)")
    add_flag(model, "device", help="cuda, cuda:N or cpu (default: CUDA when available)")
    add_flag(model, "dtype", help="bfloat16 or float32 (default: bfloat16 on CUDA, float32 on the CPU)")
    add_flag(model, "vram-budget", metavar="SIZE", help="GPU memory the planner may use, e.g. 40GiB")
    add_bool_flag(model, "fp8", "FP8 linears after the LoRA merge")
    add_bool_flag(model, "t5_cpu", "run the text encoder on the CPU")

    net = parser.add_argument_group("network")
    add_flag(net, "host", default="127.0.0.1", help="address to listen on (default %(default)s, this machine only; "
             "any other needs --token)")
    add_flag(net, "port", type=int, default=7860, help="port (default %(default)s)")
    add_flag(net, "token", help=f"a secret every request must carry (Authorization: Bearer T, or ?token=T in the "
             f"page's address); default: ${TOKEN_ENV}")

    limits = parser.add_argument_group("requests")
    add_flag(limits, "size", default=DEFAULT_SIZE, help="size of a request that gives none (default %(default)s)")
    add_flag(limits, "max-size", default=DEFAULT_SIZE, help="largest area a request may ask for; the planner places "
             "the models for it (default %(default)s)")
    add_flag(limits, "max-steps", type=int, default=DEFAULTS.sample_steps,
             help="most denoising steps a request may ask for (default %(default)s)")
    add_attention_flag(limits)  # of a request that gives none (a request's "attention" field may ask another)
    add_flag(limits, "max-upload-mb", type=float, default=50.0, help="largest uploaded file (default 50 MiB)")
    add_flag(limits, "max-audio-s", type=float, default=600.0, help="longest audio of a job (default 600 s)")
    add_flag(limits, "max-queued-per-client", type=int, default=8,
             help="jobs one client address may have queued or running (default 8)")
    add_flag(limits, "max-queued", type=int, default=32,
             help="jobs waiting, all clients together; past it a submission gets 429 with Retry-After (default 32)")
    add_flag(limits, "max-live-per-client", type=int, default=2,
             help="live sessions one client address may have waiting or running (default 2)")
    add_flag(limits, "retention", type=float, default=3600.0, metavar="SECONDS",
             help="how long a finished video (and a job's record) is kept (default 3600 s)")
    add_flag(limits, "live-idle-limit", type=float, default=60.0, metavar="SECONDS",
             help="a live session ends after this much silence-only output (default 60 s; a session may ask for less)")

    live = parser.add_argument_group("live sessions")
    add_flag(live, "live", default="auto", choices=("auto", "strict"),
             help="auto (default): sessions run at the largest size and steps the speed model predicts at >= 1.15x "
                  "real time on this GPU, and one that asks for a setting that falls behind gets a warning; strict: "
                  "such a session is refused")
    add_flag(live, "live-size", help="pin the live setting's size (default: chosen as --live says)")
    add_flag(live, "live-steps", type=int, help="pin the live setting's steps (default: chosen as --live says)")
    add_flag(live, "live-lag-bound", type=float, default=DEFAULTS.live_lag_bound_s, metavar="SECONDS",
             help="most audio a live session lets wait before it catches up: it skips queued silence, then drops "
                  "the oldest queued speech, and tells the client (default 2 s; a session may ask for another)")
    add_flag(live, "tts-command", default=DEFAULT_TTS_COMMAND, metavar="COMMAND",
             help="speaks a session's 'say' text: reads the text on stdin, writes a WAV on stdout "
                  "(default: %(default)s)")

    cluster = parser.add_argument_group("cluster (the `cluster` extra: Ray Serve; README's 'Serve on a Ray cluster')")
    add_flag(cluster, "cluster", nargs="?", const="auto", metavar="auto|ray://HOST:PORT",
             help="serve as a Ray Serve application: an ingress and engine replicas; 'auto' joins the Ray cluster "
                  "of this machine (or starts a local one), ray://HOST:PORT a remote one through Ray Client")
    add_flag(cluster, "replicas", type=int, help="engine replicas, fixed (default 1 unless --min/--max-replicas)")
    add_flag(cluster, "min-replicas", type=int, help="autoscaling: fewest engine replicas (default 1)")
    add_flag(cluster, "max-replicas", type=int, help="autoscaling: most engine replicas; scales on open live "
             "sessions and queued jobs, one per replica")
    add_flag(cluster, "gpus-per-replica", type=int, help="GPUs of each replica: 1, or k > 1 for a timestep pipeline "
             "over k GPUs of one node (default 1; 0 with --device cpu)")
    add_flag(cluster, "cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    add_flag(cluster, "max-waiting", type=int, default=16, help="jobs and live sessions that may wait for an engine "
             "across the cluster; past it: 503 with Retry-After / a 'busy' answer (default 16)")
    add_flag(cluster, "store", metavar="DIR", help="the ingress's folder of jobs and videos, on the head node; it "
             "outlives the ingress (default: liveavatar-cluster-store in the temp folder)")
    add_flag(cluster, "write-config", metavar="FILE", help="write Ray Serve's YAML config for `serve deploy` "
             "and exit")


def check_host(host: str, token: str | None) -> None:
    """Loopback needs no token; anything reachable from other machines does. A token given is long enough."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        raise InputError(f"--host {host}: listening beyond this machine needs --token T (or ${TOKEN_ENV}) so that "
                         f"only your clients reach the GPU")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        chars = f"{len(token)} character{'s' if len(token) != 1 else ''}"
        raise InputError(f"--token: {chars} is too short to keep anyone out; use at least {MIN_TOKEN_CHARS}, "
                         f"e.g. --token {secrets.token_urlsafe(24)}")


def server_url(host: str, port: int) -> str:
    """The address to open; an IPv6 literal goes in brackets."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve_limits(args: argparse.Namespace):
    """The request limits the flags set, checked (one line for a bad flag)."""
    from liveavatar.options import parse_size
    from liveavatar.serve.uploads import Limits

    limits = Limits(upload_bytes=int(args.max_upload_mb * 2**20), audio_seconds=args.max_audio_s,
                    max_area=parse_size(args.max_size), max_steps=args.max_steps, default_size=args.size,
                    default_attention=args.attention)
    if parse_size(args.size) > limits.max_area:
        raise InputError(f"--size {args.size}: larger than --max-size {args.max_size}")
    if min(args.max_steps, args.max_queued_per_client, args.max_queued, args.max_live_per_client) < 1 or \
            args.retention < 0 or args.live_idle_limit <= 0:
        raise InputError("--max-steps, --max-queued-per-client, --max-queued and --max-live-per-client must be >= 1, "
                         "--retention >= 0, --live-idle-limit > 0")
    try:
        RequestOptions(live_lag_bound_s=args.live_lag_bound)  # its one rule
    except ArgumentError as error:
        raise InputError(f"--live-lag-bound {error.detail}") from None
    if args.live_size is not None:
        parse_size(args.live_size)
    return limits


def plan_serve(args: argparse.Namespace, limits):
    """The placement for the largest request the server accepts (its landscape size at --max-steps)."""
    from liveavatar.geometry import ClipGeometry
    from liveavatar.serve.live_setting import landscape
    from liveavatar.settings import parse_vram_budget

    largest = RequestOptions(size=limits.max_area, sample_steps=limits.max_steps)
    plan = plan_for(ckpt_dir=Path(args.ckpt_dir), device=args.device, dtype=args.dtype,
                    weights={None: "auto", True: "fp8", False: "bf16"}[args.fp8],
                    t5_cpu=bool(args.t5_cpu), vram_budget=parse_vram_budget(args.vram_budget) if args.vram_budget else None,
                    geometry=ClipGeometry(*landscape(largest.size), largest.infer_frames), options=largest).check()
    if plan.budget_bytes is not None:
        print(f"plan: {plan.placement.describe()}; predicted peak {plan.predicted_peak_bytes / 2**30:.1f} GiB "
              f"({plan.budget_source})", file=sys.stderr)
    return plan


def load_backend(args: argparse.Namespace, limits, plan=None):
    """Load every model once, placed as ``plan`` (default: `plan_serve`) says: the single-process server's
    engine, and each cluster replica's."""
    from liveavatar.serve.backend import Backend

    plan = plan or plan_serve(args, limits)
    return Backend.load(ckpt_dir=args.ckpt_dir, lora=args.lora_path_dmd, device=args.device, dtype=args.dtype,
                        placement=plan.placement)


def prepare_live(args: argparse.Namespace, limits, plan, backend):
    """The live setting (`liveavatar.serve.live_setting`), printed, and warmed on a GPU before any session."""
    from liveavatar.serve.live_setting import choose_live_setting, describe, live_predictor

    live = choose_live_setting(live_predictor(plan, Path(args.ckpt_dir), backend, limits.default_attention),
                               max_area=limits.max_area, max_steps=limits.max_steps, policy=args.live,
                               size=args.live_size, steps=args.live_steps)
    print(describe(live), file=sys.stderr, flush=True)
    if plan.budget_bytes is not None:
        print("warming the live setting (compile, CUDA graphs) before the first session", file=sys.stderr, flush=True)
        backend.warm(live.size, live.sample_steps, limits.default_attention)
    return live


def run_serve(args: argparse.Namespace) -> int:
    import shutil

    import uvicorn

    from liveavatar.devices import resolve_device
    from liveavatar.serve.app import ServerState, StoppingServer, create_app, swagger_folder

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_host(args.host, token)
    if args.device is not None:
        resolve_device(args.device)  # a GPU this machine lacks: refused before the planner asks for its memory
    limits = serve_limits(args)
    root = Path(tempfile.mkdtemp(prefix="liveavatar-serve-"))
    try:
        plan = plan_serve(args, limits)
        backend = load_backend(args, limits, plan)
        live = prepare_live(args, limits, plan, backend)
        state = ServerState(backend=backend, root=root, limits=limits,
                            retention_s=args.retention, max_per_client=args.max_queued_per_client,
                            live_idle_limit_s=args.live_idle_limit, token=token, max_queued=args.max_queued,
                            max_live_per_client=args.max_live_per_client, live_setting=live,
                            live_lag_bound_s=args.live_lag_bound, tts_command=args.tts_command)
        server = StoppingServer(uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                               timeout_graceful_shutdown=10,
                                               ws_max_size=limits.upload_bytes * 4 // 3 + 2**20),
                                on_exit=state.queue.stop)
        docs = ", docs: /v1/docs" if swagger_folder() is not None else ""
        print(f"serving on {server_url(args.host, args.port)} (live: /live, API: /v1{docs})", file=sys.stderr,
              flush=True)
        server.run()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0
