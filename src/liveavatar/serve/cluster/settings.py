"""The cluster's settings, resolved from the flags once (`liveavatar.cli.serve_cluster`) and handed to the
deployments."""
from __future__ import annotations

from dataclasses import dataclass

from liveavatar.options import DEFAULTS
from liveavatar.serve.live_setting import choose_live_setting
from liveavatar.serve.tts import DEFAULT_TTS_COMMAND
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
    max_per_client: int  # jobs queued or running per client
    live_idle_limit_s: float
    max_waiting: int  # jobs and sessions waiting for an engine, all clients together
    max_queued: int  # jobs waiting, all clients together (as the single-process server)
    max_live_per_client: int
    store: str  # the job store's folder on the ingress's node
    token: str | None  # None: read $LIVEAVATAR_TOKEN on the ingress's node
    require_token: bool  # the HTTP proxy listens beyond loopback
    # Live sessions (`liveavatar.serve.live_setting`): each replica chooses its setting with its own GPU's speed
    # model; the ingress (no GPU) and a pipeline replica take the one pinned by --live-size/--live-steps, else
    # the ladder's smallest.
    live_policy: str = "auto"
    live_size: str | None = None
    live_steps: int | None = None
    live_lag_bound_s: float = DEFAULTS.live_lag_bound_s
    tts_command: str = DEFAULT_TTS_COMMAND

    def live_state(self, setting=None) -> dict:
        """The `ServerState` fields of live sessions; ``setting``: the one a replica chose on its GPU."""
        setting = setting or choose_live_setting(None, max_area=self.limits.max_area, max_steps=self.limits.max_steps,
                                                 policy=self.live_policy, size=self.live_size, steps=self.live_steps)
        return {"live_setting": setting, "live_lag_bound_s": self.live_lag_bound_s, "tts_command": self.tts_command}
