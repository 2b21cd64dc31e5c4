"""The figures the cluster reports: a sliding-window meter that each replica keeps for itself and for each
live session, and the Prometheus text the ingress serves at ``/metrics`` from the replicas' heartbeats.

Ray Serve's own metrics (requests, latencies, replica counts: ``ray_serve_*``) are exported by every node's
Ray metrics agent, not here; this endpoint adds what only the engine knows.
"""
from __future__ import annotations

import time
from collections import deque

from liveavatar.geometry import FPS

WINDOW_S = 30.0


class Meter:
    """Blocks and output frames made in the last ``WINDOW_S`` seconds: blocks/s and the real-time factor
    (seconds of video made per second of wall time; >= 1 keeps up with a live listener)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.blocks = 0
        self.frames = 0
        self._recent: deque[tuple[float, int]] = deque()  # (when, frames) per block

    def record(self, frames: int) -> None:
        now = self.clock()
        self.blocks += 1
        self.frames += frames
        self._recent.append((now, frames))
        self._trim(now)

    def figures(self) -> dict:
        now = self.clock()
        self._trim(now)
        span = min(WINDOW_S, max(now - self.started, 1e-6))
        frames = sum(count for _, count in self._recent)
        return {"blocks": self.blocks, "blocks_per_s": round(len(self._recent) / span, 3),
                "realtime_factor": round(frames / FPS / span, 3)}

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()


def _labels(**values) -> str:
    inner = ",".join(f'{key}="{str(value).replace(chr(92), "").replace(chr(34), "")}"' for key, value in values.items())
    return "{" + inner + "}"


GAUGES = {
    "liveavatar_replicas": "engine replicas that sent a heartbeat in the last few seconds",
    "liveavatar_jobs": "jobs in the ingress's table, by state",
    "liveavatar_waiting": "jobs and live sessions dispatched to a replica but not started",
    "liveavatar_replica_queue_depth": "items waiting in a replica's own queue",
    "liveavatar_replica_busy": "1 while a replica runs a job or a live session",
    "liveavatar_replica_blocks_per_second": "blocks a replica made per second (last 30 s)",
    "liveavatar_replica_realtime_factor": "seconds of video a replica made per second (last 30 s)",
    "liveavatar_replica_gpu_memory_bytes": "CUDA memory of a replica's device, by kind",
    "liveavatar_session_blocks_per_second": "blocks per second of an open live session (last 30 s)",
    "liveavatar_session_realtime_factor": "seconds of video per second of an open live session (last 30 s)",
}


def prometheus_text(replicas: list[dict], jobs_by_state: dict[str, int], waiting: int) -> str:
    samples: dict[str, list[str]] = {name: [] for name in GAUGES}
    samples["liveavatar_replicas"].append(f"liveavatar_replicas {len(replicas)}")
    for state, count in sorted(jobs_by_state.items()):
        samples["liveavatar_jobs"].append(f"liveavatar_jobs{_labels(state=state)} {count}")
    samples["liveavatar_waiting"].append(f"liveavatar_waiting {waiting}")
    for info in replicas:
        replica = _labels(replica=info["id"], node=info["node"])
        samples["liveavatar_replica_queue_depth"].append(f"liveavatar_replica_queue_depth{replica} {info['waiting']}")
        samples["liveavatar_replica_busy"].append(f"liveavatar_replica_busy{replica} {int(info['running'] is not None)}")
        samples["liveavatar_replica_blocks_per_second"].append(
            f"liveavatar_replica_blocks_per_second{replica} {info['figures']['blocks_per_s']}")
        samples["liveavatar_replica_realtime_factor"].append(
            f"liveavatar_replica_realtime_factor{replica} {info['figures']['realtime_factor']}")
        for kind, value in (info.get("gpu_memory") or {}).items():
            samples["liveavatar_replica_gpu_memory_bytes"].append(
                f"liveavatar_replica_gpu_memory_bytes{_labels(replica=info['id'], node=info['node'], kind=kind)} {value}")
        for session in info["sessions"]:
            labels = _labels(replica=info["id"], session=session["id"])
            samples["liveavatar_session_blocks_per_second"].append(
                f"liveavatar_session_blocks_per_second{labels} {session['blocks_per_s']}")
            samples["liveavatar_session_realtime_factor"].append(
                f"liveavatar_session_realtime_factor{labels} {session['realtime_factor']}")
    lines = []
    for name, help_text in GAUGES.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", *samples[name]]
    return "\n".join(lines) + "\n"
