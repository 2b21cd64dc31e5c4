"""The Ray Serve application: its two deployments and their options, and Ray Serve's YAML config for
``serve deploy`` (whose builder, `liveavatar.cli.serve_cluster.app_builder`, turns the flags into the
settings here).

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
from typing import Callable

from liveavatar.serve.cluster.settings import ClusterSettings, ReplicaLayout

APP_NAME = "liveavatar"
ENGINE = "Engine"
INGRESS = "Ingress"
ROUTER = "liveavatar.serve.cluster.routing:PinnedOrShortestQueue"
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


def engine_options(layout: ReplicaLayout) -> dict:
    actor = {"num_cpus": layout.cpus, "num_gpus": layout.gpus}
    options = {"name": ENGINE, "max_ongoing_requests": ENGINE_MAX_ONGOING, "ray_actor_options": actor,
               "graceful_shutdown_timeout_s": DRAIN_S, "logging_config": QUIET,
               "request_router_config": {"request_router_class": ROUTER}}
    if layout.replicas is not None:
        options["num_replicas"] = layout.replicas
    else:
        options["autoscaling_config"] = {"min_replicas": layout.min_replicas, "max_replicas": layout.max_replicas,
                                         "target_ongoing_requests": 1.0, "upscale_delay_s": 10.0,
                                         "downscale_delay_s": 300.0}
    if layout.gpus > 1:
        options["placement_group_bundles"] = [{"CPU": layout.cpus, "GPU": layout.gpus}]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def ingress_options() -> dict:
    # On the head node: its job store must survive a restart of the ingress, which Ray does there.
    return {"name": INGRESS, "num_replicas": 1, "max_ongoing_requests": INGRESS_MAX_ONGOING, "logging_config": QUIET,
            "ray_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}}


def build_app(layout: ReplicaLayout, settings: ClusterSettings, load_backend: Callable, replica_settings: dict,
              torch_threads: int | None = None):
    """The application: ``load_backend()`` (picklable: it travels to every replica) gives each replica its
    `Backend`; ``replica_settings`` is what ``/v1/info`` shows of them."""
    from ray import serve

    from liveavatar.serve.cluster.ingress import Ingress
    from liveavatar.serve.cluster.replica import EngineReplica

    engine = serve.deployment(EngineReplica).options(**engine_options(layout)).bind(
        load_backend, settings, replica_settings, INGRESS, torch_threads)
    return serve.deployment(serve.ingress()(Ingress)).options(**ingress_options()).bind(engine, settings)


def serve_config(builder: str, args: dict, layout: ReplicaLayout, *, host: str, port: int) -> dict:
    """Ray Serve's config file for ``serve deploy``: ``builder`` (an import path) builds the application
    from ``args``."""
    return {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": builder, "args": args,
                              "deployments": [engine_options(layout), ingress_options()]}]}
