"""Peak resident memory of this process, sampled in the background: what `bench` reports per phase."""
from __future__ import annotations

import threading

from liveavatar.runtime.planner.hardware import meminfo_bytes


class RssSampler:
    """Peak resident memory of this process per window (between `take` calls), sampled from
    /proc/self/status every few milliseconds by a background thread (ru_maxrss only has the peak since
    the start). Fields: VmRSS (the total) and its anonymous, file-backed and shared parts, and "Taken": how
    far the machine's MemAvailable fell below its value at the start (what the run took from the machine,
    whoever's books it is in, e.g. the GPU driver's)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Taken")

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.available_at_start = _mem_available()
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def now(cls) -> dict[str, int]:
        """This process's resident memory now, by field (Taken: 0; it needs a start)."""
        values = dict.fromkeys(cls.FIELDS, 0)
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    key = line.split(":", 1)[0]
                    if key in values:
                        values[key] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return values

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        values = self.now()
        values["Taken"] = max(0, self.available_at_start - _mem_available())
        with self._lock:
            self.peak = {key: max(self.peak[key], values[key]) for key in self.FIELDS}

    def take(self) -> dict[str, int]:
        """The peaks since the last call (including now), then start a new window."""
        self.sample()
        with self._lock:
            peak, self.peak = self.peak, dict.fromkeys(self.FIELDS, 0)
        return peak

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def _mem_available() -> int:
    return meminfo_bytes("MemAvailable") or 0
