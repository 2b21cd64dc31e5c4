"""``liveavatar serve --cluster``: check the flags, connect to Ray, deploy the application (or write its
config for ``serve deploy``) and serve until Ctrl-C or SIGTERM, which delete the application."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from liveavatar.errors import InputError
from liveavatar.serve.cluster import cluster_extra_status
from liveavatar.serve.cluster.config import APP_NAME, build_app, default_store, is_loopback, write_serve_config

NOT_FLAGS = ("command", "cluster", "write_config", "host", "port")


def cluster_flags(args: argparse.Namespace) -> dict:
    """The flags every replica and the ingress get (plain values: they travel through Ray and YAML)."""
    from liveavatar.cli.serve import serve_limits

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
                 store=args.store or default_store(),
                 require_token=not is_loopback(args.host), torch_threads=None)
    return flags


def run_cluster(args: argparse.Namespace) -> int:
    from liveavatar.cli.serve import TOKEN_ENV, check_host

    ready, line = cluster_extra_status()
    if not ready:
        raise InputError(line)
    flags = cluster_flags(args)
    if args.write_config is not None:
        flags["token"] = None
        write_serve_config(Path(args.write_config), flags, host=args.host, port=args.port)
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
        serve.run(build_app(flags), name=APP_NAME, route_prefix="/")
        print(f"serving on http://{args.host}:{args.port}/ through Ray Serve (live: /live, API: /v1, "
              f"metrics: /metrics)", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
            ray.shutdown()
    return 0


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
