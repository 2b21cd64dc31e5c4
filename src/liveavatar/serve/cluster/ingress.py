"""The cluster's ingress deployment: the single-process server's app (pages, jobs API, uploads, live
endpoint, token gate, limits, ``/v1/info``) on a `ClusterQueue` and `relay_live`, plus ``/metrics`` and the
replicas in ``/v1/info``. One replica, on the head node (its store must outlive it: see `dispatch`)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi.responses import PlainTextResponse

from liveavatar.errors import InputError
from liveavatar.serve.app import ServerState, create_app
from liveavatar.serve.cluster.dispatch import ClusterQueue
from liveavatar.serve.cluster.metrics import prometheus_text
from liveavatar.serve.cluster.relay import relay_live
from liveavatar.serve.cluster.settings import ClusterSettings

TOKEN_ENV = "LIVEAVATAR_TOKEN"


class Ingress:
    def __init__(self, engine, settings: ClusterSettings):
        token = settings.token or os.environ.get(TOKEN_ENV) or None
        if settings.require_token and not token:
            raise InputError(f"the ingress listens beyond loopback: set ${TOKEN_ENV} in the environment of "
                             f"`ray start` on its node")
        self.queue = ClusterQueue(engine, Path(settings.store), retention_s=settings.retention_s,
                                  max_per_client=settings.max_per_client, max_waiting=settings.max_waiting,
                                  max_queued=settings.max_queued, max_live_per_client=settings.max_live_per_client)
        self.state = ServerState(backend=None, root=Path(tempfile.mkdtemp(prefix="liveavatar-ingress-")),
                                 limits=settings.limits, retention_s=settings.retention_s,
                                 max_per_client=settings.max_per_client, live_idle_limit_s=settings.live_idle_limit_s,
                                 token=token, queue=self.queue, live=relay_live, extra_info=self.info,
                                 **settings.live_state())

    def info(self) -> dict:
        """What ``/v1/info`` adds to the server's limits: the replicas and the waiting line."""
        import ray

        return {"mode": "cluster", "replicas": self.queue.replicas_info(), "waiting": self.queue.waiting,
                "max_waiting": self.queue.max_waiting,
                "ingress": {"node": ray.util.get_node_ip_address(), "pid": os.getpid()}}

    def __serve_build_asgi_app__(self):
        app = create_app(self.state)
        queue = self.queue

        @app.get("/metrics", response_class=PlainTextResponse)
        async def metrics():
            states: dict[str, int] = {}
            for job in queue.jobs.values():
                states[job.state] = states.get(job.state, 0) + 1
            return prometheus_text(queue.replicas_info(), states, queue.waiting)

        return app

    async def heartbeat(self, info: dict) -> None:
        """Called by every engine replica each second (`replica.EngineReplica`)."""
        self.queue.replicas.heard(info)
