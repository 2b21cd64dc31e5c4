"""704*384 under a memory cap (a 24 GB card's usable 22 GiB, and 16 GiB) with the plan the planner chose.

    PYTHONPATH=src python3 benchmarks/capped.py [--caps 22,16] [--blocks 4 --warmup-blocks 2]

1. Measures this machine's host<->GPU bandwidth (pinned buffers, 1 GiB copies).
2. For every cap, runs `liveavatar bench --memory-cap CAP` in its own process: the process's GPU memory
   is capped with torch.cuda.set_per_process_memory_fraction, the planner plans for the cap with the
   measured bandwidth and the bench runs that placement. Prints placement, measured vs predicted peak,
   FPS and time to first frame.
3. Prints the planner's prediction for an RTX 4090-class card (24 GB, ~25 GB/s host link, ~330 TFLOP/s
   FP8) at the same size, next to the measured machine.
A markdown block for benchmarks/RESULTS.md closes the output; with $OUT set, reports go there as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from planner_vs_measured import REPO, run_bench_json


def bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> tuple[float, float]:
    """(host->device, device->host) GB/s between pinned host memory and the current GPU."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = []
    for destination, source in ((device, host), (host, device)):
        destination.copy_(source, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            destination.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(nbytes * repeats / (time.perf_counter() - start) / 1e9)
    del host, device
    torch.cuda.empty_cache()
    return rates[0], rates[1]


def plan_json(args: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "liveavatar", "plan", *args, "--json"], env=env,
                            capture_output=True, text=True, cwd=REPO)
    if not result.stdout.strip():
        raise RuntimeError(f"plan {' '.join(args)} failed:\n{result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", default="22,16", help="GiB caps, comma-separated (default 22,16)")
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--warmup-blocks", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU here: this script measures GPU memory caps (on a CPU, `liveavatar bench "
                     "--config tiny` runs the same loop)")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    h2d, d2h = bandwidth_gbps()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: host->device {h2d:.1f} GB/s, device->host {d2h:.1f} GB/s (pinned, 1 GiB copies)", flush=True)
    link = f"{min(h2d, d2h):.1f}"

    rows = []
    for cap in args.caps.split(","):
        report = run_bench_json(["--size", args.size, "--memory-cap", f"{cap}GiB", "--h2d-gbps", link,
                                 "--blocks", str(args.blocks), "--warmup-blocks", str(args.warmup_blocks)])
        if out:
            (out / f"capped_{cap}GiB.json").write_text(json.dumps(report, indent=1))
        card = plan_json(["--size", args.size, "--hardware", "rtx4090", "--vram-budget", f"{cap}GiB"])
        rows.append((cap, report, card))
        print(f"cap {cap} GiB: placement {report['placement']}\n"
              f"    peak {report['peak_gib']:.2f} GiB allocated / {report['peak_reserved_gib']:.2f} GiB reserved "
              f"(predicted {report['predicted_peak_gib']:.2f} GiB); fps {report['fps']:.2f} "
              f"(predicted {report['predicted_fps']:.2f}); ttff {report['ttff_s']:.2f} s; "
              f"forward {report['forward_s']:.3f} s; KV fetched {report['kv_host_fetched_gb']:.1f} GB; "
              f"host RSS {report['host_rss_peak_gib']:.1f} GiB\n"
              f"    RTX 4090-class at {cap} GiB: {card['placement']} -> predicted {card['fps']:.2f} FPS "
              f"(peak {card['predicted_peak_gib']:.2f} GiB)", flush=True)

    print(f"\nGPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"host link {h2d:.1f} GB/s up, {d2h:.1f} GB/s down; date {time.strftime('%Y-%m-%d')}")
    print("\n| cap | placement chosen | peak allocated (predicted) | peak reserved | video FPS (predicted) | "
          "time to first frame | RTX 4090-class, predicted FPS |")
    print("|---|---|---|---|---|---|---|")
    for cap, report, card in rows:
        p = report["placement"]
        placement = (f"{p['weight_dtype']} weights, {len(p['streamed_layers'])} layers streamed, "
                     f"KV {p['kv_dtype']} on {p['kv_location']}, cond on {p['cond_location']}")
        print(f"| {cap} GiB | {placement} | {report['peak_gib']:.2f} GiB ({report['predicted_peak_gib']:.2f}) | "
              f"{report['peak_reserved_gib']:.2f} GiB | {report['fps']:.2f} ({report['predicted_fps']:.2f}) | "
              f"{report['ttff_s']:.2f} s | {card['fps']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
