"""The Ray Serve application: its two deployments, their options from the flags, the builder that
``serve deploy`` imports, and the YAML config written for it.

Engine replicas ask Ray for ``num_gpus`` = ``--gpus-per-replica`` (none: a CPU replica). A k-GPU replica
runs the timestep pipeline over k GPUs of one node, its ranks being the replica's child processes, so it
gets one placement-group bundle of k GPUs (STRICT_PACK): the ranks talk over NVLink/PCIe, never the
network. Autoscaling (``--min-replicas/--max-replicas``) follows Serve's ongoing requests per replica,
which here are its open live sessions and its queued and running jobs: the target is one per replica.
"""
from __future__ import annotations

import ipaddress
import tempfile
from pathlib import Path

APP_NAME = "liveavatar"
ENGINE = "Engine"
INGRESS = "Ingress"
ROUTER = "liveavatar.serve.cluster.routing:PinnedOrShortestQueue"
BUILDER = "liveavatar.serve.cluster.config:app_builder"
# Work items and their short calls (audio pushes, heartbeats) in flight on one replica; the real caps
# are --max-waiting at the ingress and one engine run at a time in each replica.
ENGINE_MAX_ONGOING = 64
INGRESS_MAX_ONGOING = 4096
# A replica being scaled down (or redeployed) finishes its work first, up to this long.
DRAIN_S = 600.0
# No access-log line per call: a live session pushes audio ten times a second.
QUIET = {"enable_access_log": False}


def default_store() -> str:
    return str(Path(tempfile.gettempdir()) / "liveavatar-cluster-store")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def engine_options(flags: dict) -> dict:
    gpus = flags["gpus_per_replica"]
    actor = {"num_cpus": flags["cpus_per_replica"], "num_gpus": gpus}
    options = {"name": ENGINE, "max_ongoing_requests": ENGINE_MAX_ONGOING, "ray_actor_options": actor,
               "graceful_shutdown_timeout_s": DRAIN_S, "logging_config": QUIET,
               "request_router_config": {"request_router_class": ROUTER}}
    if flags["replicas"] is not None:
        options["num_replicas"] = flags["replicas"]
    else:
        options["autoscaling_config"] = {"min_replicas": flags["min_replicas"], "max_replicas": flags["max_replicas"],
                                         "target_ongoing_requests": 1.0, "upscale_delay_s": 10.0,
                                         "downscale_delay_s": 300.0}
    if gpus > 1:
        options["placement_group_bundles"] = [{"CPU": flags["cpus_per_replica"], "GPU": gpus}]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def ingress_options() -> dict:
    # On the head node: its job store must survive a restart of the ingress, which Ray does there.
    return {"name": INGRESS, "num_replicas": 1, "max_ongoing_requests": INGRESS_MAX_ONGOING, "logging_config": QUIET,
            "ray_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}}


def app_builder(flags: dict):
    """The application ``serve deploy`` builds (``import_path`` in the YAML config, the flags as its ``args``:
    Serve's builders take exactly one argument)."""
    return build_app(flags)


def build_app(flags: dict, replica_class=None):
    """The application for ``serve.run``; ``replica_class``: an `EngineReplica` subclass (default: itself)."""
    from ray import serve

    from liveavatar.serve.cluster.ingress import Ingress
    from liveavatar.serve.cluster.replica import EngineReplica

    engine = serve.deployment(replica_class or EngineReplica).options(**engine_options(flags)).bind(flags, INGRESS)
    return serve.deployment(serve.ingress()(Ingress)).options(**ingress_options()).bind(engine, flags)


def serve_config(flags: dict, *, host: str, port: int) -> dict:
    """Ray Serve's config file for ``serve deploy``; the token never goes in it (the ingress reads
    $LIVEAVATAR_TOKEN on its node)."""
    args = {key: value for key, value in flags.items() if key != "token"}
    engine = engine_options(flags)
    engine["request_router_config"] = dict(engine["request_router_config"])
    return {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": BUILDER, "args": args,
                              "deployments": [engine, ingress_options()]}]}


def write_serve_config(path: Path, flags: dict, *, host: str, port: int) -> None:
    import yaml

    path.write_text("# Ray Serve config for `serve deploy` (written by `liveavatar serve --cluster --write-config`)\n"
                    + yaml.safe_dump(serve_config(flags, host=host, port=port), sort_keys=False))
