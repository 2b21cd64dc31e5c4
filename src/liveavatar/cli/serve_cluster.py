"""``liveavatar serve --cluster``: check the flags, connect to Ray, deploy the application (or write its
config for ``serve deploy``) and serve until Ctrl-C or SIGTERM, which delete the application.

The flags become the serve layer's settings here (`liveavatar.serve.cluster.config`); ``app_builder`` is
the builder Serve imports for ``serve deploy``, and `replica_backend` what each engine replica calls to
plan and load its engine as ``liveavatar serve`` does.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
from pathlib import Path

from liveavatar.cli.serve import TOKEN_ENV, check_host, load_backend, run_serve, serve_limits
from liveavatar.errors import InputError
from liveavatar.serve.cluster import cluster_extra_status
from liveavatar.serve.cluster.config import APP_NAME, build_app, default_store, is_loopback, serve_config
from liveavatar.serve.cluster.settings import ClusterSettings, ReplicaLayout

BUILDER = "liveavatar.cli.serve_cluster:app_builder"
NOT_FLAGS = ("command", "cluster", "write_config", "host", "port")


def serve_command(args: argparse.Namespace) -> int:
    """``liveavatar serve``: the single-process server, or with --cluster / --write-config the Ray application."""
    if args.cluster is not None or args.write_config is not None:
        return run_cluster(args)
    return run_serve(args)


def cluster_flags(args: argparse.Namespace) -> dict:
    """The flags every replica and the ingress get, checked (plain values: they travel through Ray and YAML)."""
    serve_limits(args)  # one line for a bad limit, before anything starts
    if args.cluster not in (None, "auto") and not args.cluster.startswith("ray://"):
        raise InputError(f"--cluster {args.cluster}: expected auto or ray://HOST:PORT (Ray Client's address, port "
                         f"10001 by default)")
    fixed, low, high = args.replicas, args.min_replicas, args.max_replicas
    if fixed is not None and (low is not None or high is not None):
        raise InputError("--replicas: give either a fixed count or --min-replicas/--max-replicas, not both")
    if fixed is None and low is None and high is None:
        fixed = 1
    if fixed is not None and fixed < 1:
        raise InputError(f"--replicas {fixed}: must be >= 1")
    if fixed is None:
        low = 1 if low is None else low
        high = max(low, 1) if high is None else high
        if low < 1 or high < low:
            raise InputError(f"--min-replicas {low} --max-replicas {high}: need 1 <= min <= max")
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 0 if args.device == "cpu" else 1
    if gpus < 0 or (gpus == 0 and args.device != "cpu"):
        raise InputError(f"--gpus-per-replica {gpus}: must be >= 1 for a GPU device (0 only with --device cpu)")
    if gpus > 1 and args.device not in (None, "cuda"):
        raise InputError(f"--gpus-per-replica {gpus}: a pipeline replica places its ranks itself; drop --device")
    if args.max_waiting < 0 or args.cpus_per_replica < 0:
        raise InputError("--max-waiting and --cpus-per-replica must be >= 0")
    flags = {key: value for key, value in vars(args).items() if key not in NOT_FLAGS and not callable(value)}
    flags.update(replicas=fixed, min_replicas=low, max_replicas=high, gpus_per_replica=gpus,
                 store=args.store or default_store(), require_token=not is_loopback(args.host), torch_threads=None)
    return flags


def app_builder(flags: dict):
    """The application ``serve deploy`` builds (the YAML's ``import_path``, the flags its ``args``: Serve's
    builders take exactly one argument)."""
    return application(flags)


def application(flags: dict, load=None):
    """The application the flags describe; ``load`` (default: `replica_backend` on the flags) gives each
    engine replica its `Backend` and live setting."""
    args = argparse.Namespace(**flags)
    settings = ClusterSettings(limits=serve_limits(args), retention_s=args.retention,
                              max_per_client=args.max_queued_per_client, live_idle_limit_s=args.live_idle_limit,
                              max_waiting=args.max_waiting, max_queued=args.max_queued,
                              max_live_per_client=args.max_live_per_client, store=args.store, token=args.token,
                              require_token=args.require_token, live_policy=args.live, live_size=args.live_size,
                              live_steps=args.live_steps, live_lag_bound_s=args.live_lag_bound,
                              tts_command=args.tts_command)
    shown = {"device": args.device or "auto", "dtype": args.dtype or "auto", "gpus": args.gpus_per_replica,
             "max_size": args.max_size, "max_steps": args.max_steps, "default_size": args.size,
             "live_idle_limit_s": args.live_idle_limit}
    return build_app(_layout(flags), settings, load or functools.partial(replica_backend, flags), shown,
                     args.torch_threads)


def replica_backend(flags: dict):
    """One engine replica's `Backend` and live setting, planned, loaded, chosen and warmed on its own GPU as
    ``liveavatar serve`` does; with k > 1 GPUs the timestep pipeline over them (its ranks being the replica's
    child processes on its node) and the live setting the flags pin or the ladder's smallest (None)."""
    from liveavatar.cli.serve import plan_serve, prepare_live

    args = argparse.Namespace(**flags)
    limits = serve_limits(args)
    if args.gpus_per_replica > 1:
        from liveavatar.api import LiveAvatarPipeline
        from liveavatar.serve.backend import Backend

        devices = [f"cuda:{index}" for index in range(args.gpus_per_replica)]
        return Backend(LiveAvatarPipeline.from_pretrained(args.ckpt_dir, lora=args.lora_path_dmd, dtype=args.dtype,
                                                          devices=devices, sample_steps=args.max_steps).engine), None
    plan = plan_serve(args, limits)
    backend = load_backend(args, limits, plan)
    return backend, prepare_live(args, limits, plan, backend)


def write_config(path: Path, flags: dict, *, host: str, port: int) -> None:
    """Ray Serve's YAML for ``serve deploy``; the token never goes in it (the ingress reads $LIVEAVATAR_TOKEN
    on its node)."""
    import yaml

    args = {**flags, "token": None}
    config = serve_config(BUILDER, args, _layout(flags), host=host, port=port)
    path.write_text("# Ray Serve config for `serve deploy` (written by `liveavatar serve --cluster --write-config`)\n"
                    + yaml.safe_dump(config, sort_keys=False))


def run_cluster(args: argparse.Namespace) -> int:
    ready, line = cluster_extra_status()
    if not ready:
        raise InputError(line)
    flags = cluster_flags(args)
    if args.write_config is not None:
        write_config(Path(args.write_config), flags, host=args.host, port=args.port)
        print(f"wrote {args.write_config}: `serve deploy {args.write_config}` on the head node "
              f"(README: 'Serve on a Ray cluster')", file=sys.stderr)
        return 0
    flags["token"] = args.token or os.environ.get(TOKEN_ENV) or None
    check_host(args.host, flags["token"])
    import ray
    from ray import serve

    started_here = _connect(args.cluster)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, proxy_location="HeadOnly")
        serve.run(application(flags), name=APP_NAME, route_prefix="/")
        print(f"serving on http://{args.host}:{args.port}/ through Ray Serve (live: /live, API: /v1, "
              f"metrics: /metrics)", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
            ray.shutdown()
    return 0


def _layout(flags: dict) -> ReplicaLayout:
    return ReplicaLayout(replicas=flags["replicas"], min_replicas=flags["min_replicas"],
                         max_replicas=flags["max_replicas"], gpus=flags["gpus_per_replica"],
                         cpus=flags["cpus_per_replica"])


def _connect(address: str) -> bool:
    """Join the cluster at ``address``; True when this call started a local Ray instance."""
    import ray

    if address == "auto":
        try:
            ray.init(address="auto", log_to_driver=False)
            return False
        except ConnectionError:
            print("no Ray cluster on this machine: starting a local one (README: 'Serve on a Ray cluster')",
                  file=sys.stderr)
            ray.init(log_to_driver=False)
            return True
    ray.init(address=address)
    return False
