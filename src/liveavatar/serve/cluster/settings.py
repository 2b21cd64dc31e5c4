"""The cluster's settings, resolved from the flags once (`liveavatar.cli.serve_cluster`) and handed to the
deployments."""
from __future__ import annotations

from dataclasses import dataclass

from liveavatar.serve.uploads import Limits


@dataclass(frozen=True)
class ReplicaLayout:
    """How many engine replicas, and what each reserves."""

    replicas: int | None  # a fixed count, or None: autoscale between the two below
    min_replicas: int | None
    max_replicas: int | None
    gpus: int
    cpus: float


@dataclass(frozen=True)
class ClusterSettings:
    """What the ingress and every replica serve by (the flags, resolved once)."""

    limits: Limits
    retention_s: float
    max_per_client: int
    live_idle_limit_s: float
    max_waiting: int
    store: str  # the job store's folder on the ingress's node
    token: str | None  # None: read $LIVEAVATAR_TOKEN on the ingress's node
    require_token: bool  # the HTTP proxy listens beyond loopback
