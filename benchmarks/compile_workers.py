"""Host memory of Inductor's compile worker pool, which `liveavatar.runtime.planner.host` budgets as
``COMPILE_WORKER_BYTES`` per process.

    PYTHONPATH=src python3 benchmarks/compile_workers.py [--workers 16,1] [--device cuda]

For each count, a fresh process sets Inductor's ``compile_threads``, compiles a function of a few dozen
fused element-wise ops and reductions on ``--device`` (several Triton kernels on a GPU), and samples every
20 ms its own RSS and that of every descendant process. Reports the peak of the descendants' sum, their
count and the bytes per process, and the growth of the process's own RSS while compiling (what an
in-process compile, ``--workers 1``, costs instead). JSON lines on stdout; under $OUT as compile_workers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from desktop_fit import descendants, process_rss, tree_rss
from full_size_checkpoint import GiB


def measure(workers: int, device: str) -> dict:
    import torch
    import torch._inductor.config as inductor

    inductor.compile_threads = workers
    x = torch.randn(4096, 5120, device=device, dtype=torch.bfloat16)
    peak = {"children": 0, "count": 0, "own": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            own = process_rss(os.getpid())
            children = tree_rss(os.getpid()) - own
            if children > peak["children"]:
                peak.update(children=children, count=len(descendants(os.getpid())))
            peak["own"] = max(peak["own"], own)
            time.sleep(0.02)

    def many_kernels(x):
        outs = []
        for i in range(24):  # distinct constants and shapes of reduction: one kernel each
            y = (x * (1 + i / 10)).float()
            outs.append((torch.nn.functional.gelu(y) * y.rsqrt().abs()).amax(dim=-1 if i % 2 else 0))
        return outs

    own_before = process_rss(os.getpid())
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    torch.compile(many_kernels, dynamic=False)(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    time.sleep(1.0)  # the pool after the compile, as a run keeps it
    done.set()
    thread.join()
    count = peak["count"]
    return {"workers_set": workers, "device": device, "torch": torch.__version__, "compile_s": round(compile_s, 1),
            "descendant_processes": count, "descendants_rss_peak_gib": round(peak["children"] / GiB, 3),
            "per_process_gib": round(peak["children"] / count / GiB, 3) if count else None,
            "own_rss_growth_gib": round((peak["own"] - own_before) / GiB, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="16,1", help="compile_threads values, one fresh process each")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.device)))
        return 0
    results = []
    for workers in (int(w) for w in args.workers.split(",")):
        run = subprocess.run([sys.executable, __file__, "--child", str(workers), "--device", args.device],
                             capture_output=True, text=True, timeout=300)
        result = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else {
            "workers_set": workers, "error": run.stderr[-800:]}
        print(json.dumps(result), flush=True)
        results.append(result)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "compile_workers.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
