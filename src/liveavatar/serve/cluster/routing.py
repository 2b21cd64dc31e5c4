"""How the engine deployment's calls pick a replica (Ray Serve's request-router extension point).

Two kinds of call reach the engine replicas:

* new work (a job, a live session): no replica named; every live replica is offered in one rank, and
  Serve's selection takes the one with the fewest ongoing requests (its queue-length cache, probed when
  stale, incremented on every send): the shortest queue. Serve's default router compares only two random
  replicas ("power of two choices"); with long-running work the exact minimum matters more than the probe
  cost.
* calls that belong to work already placed (a live session's audio, its cancel): the ingress names the
  replica it learnt from the work's first event, as the ``replica`` keyword. Only that replica is offered;
  when it is gone no replica is, and the call waits until the caller's timeout cancels it (the caller
  then reports the replica lost). Clients never name replicas: only the ingress sets this keyword.
"""
from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

REPLICA_KEYWORD = "replica"


class PinnedOrShortestQueue(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(REPLICA_KEYWORD) if pending_request is not None else None
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no tight loop while every replica is full
        if target is None:
            return [candidate_replicas] if candidate_replicas else []
        pinned = [replica for replica in candidate_replicas if replica.replica_id.unique_id == target]
        return [pinned] if pinned else []
