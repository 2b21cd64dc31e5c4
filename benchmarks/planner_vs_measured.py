"""Predicted vs measured GPU memory (and speed) for several sizes and placements, on a real GPU.

    PYTHONPATH=src python3 benchmarks/planner_vs_measured.py [--only 1,2] [--blocks 4 --warmup-blocks 2]

Each configuration runs `liveavatar bench` (full-size 14B DiT and VAE with random weights, the real
sampling loop) in its own process with every placement choice pinned, and prints the planner's peak
next to the measured one: allocated memory per window of the loop (load, prefill, denoise, decode) and
overall, plus FPS. The planner is judged on the overall allocated peak (the memory the run needs);
reserved memory is printed too. A markdown table for benchmarks/RESULTS.md closes the output; with
$OUT set, every bench report is also written there as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def placement_flags(weights: str, kv_dtype: str = "bf16", kv: str = "gpu", cond: str = "gpu",
                    streamed: int = 0) -> list[str]:
    return ["--weights", weights, "--kv-dtype", kv_dtype, "--kv-location", kv, "--cond-location", cond,
            "--stream-layers", str(streamed)]


# (label, --size, image aspect (w, h) or None for W*H itself, placement flags)
CONFIGS = [
    ("fp8 resident", "704*384", None, placement_flags("fp8")),
    ("bf16 resident", "704*384", None, placement_flags("bf16")),
    ("bf16, KV on host", "384*256", None, placement_flags("bf16", kv="host")),
    ("fp8, 20 layers streamed", "384*256", None, placement_flags("fp8", streamed=20)),
    ("fp8, FP8 KV", "720*400", (1024, 1024), placement_flags("fp8", kv_dtype="fp8")),
    ("fp8, KV+cond on host, 24 layers streamed", "704*384", None,
     placement_flags("fp8", kv="host", cond="host", streamed=24)),
    ("fp8, KV on host, 8 layers streamed", "720*400", (400, 720), placement_flags("fp8", kv="host", streamed=8)),
]


def run_bench_json(args: list[str]) -> dict:
    """`liveavatar bench ... --json` in a fresh process (clean CUDA state and peak counters)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "liveavatar", "bench", *args, "--json"], env=env,
                            capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"bench {' '.join(args)} failed:\n{result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def aspect_image(size: tuple[int, int], folder: Path) -> str:
    from PIL import Image

    path = folder / f"aspect_{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (128, 128, 128)).save(path)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated 1-based configuration numbers (default: all)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--warmup-blocks", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU here: this script measures GPU peaks against the planner (on a CPU, `liveavatar bench "
                     "--config tiny` runs the same loop)")
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(1, len(CONFIGS) + 1)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for number in chosen:
            label, size, aspect, flags = CONFIGS[number - 1]
            image = ["--image", aspect_image(aspect, Path(scratch))] if aspect else []
            # No headroom: the point is the prediction itself, also for placements that fill the card.
            report = run_bench_json(["--size", size, *image, *flags, "--headroom", "1MiB",
                                     "--blocks", str(args.blocks), "--warmup-blocks", str(args.warmup_blocks)])
            if out:
                (out / f"planner_vs_measured_{number}.json").write_text(json.dumps(report, indent=1))
            error = report["predicted_peak_gib"] / report["peak_gib"] - 1
            rows.append((number, label, report, error))
            measured, predicted = report["phase_peaks_gib"], report["predicted_phase_peaks_gib"]
            print(f"[{number}] {label}: {report['width']}x{report['height']}, placement {report['placement']}", flush=True)
            for phase in ("load", "prefill", "denoise", "decode"):
                print(f"    {phase:8s} measured {measured[phase]:7.2f} GiB  predicted {predicted[phase]:7.2f} GiB")
            print(f"    peak     measured {report['peak_gib']:7.2f} GiB  predicted {report['predicted_peak_gib']:7.2f} GiB"
                  f"  ({error:+.1%}); reserved {report['peak_reserved_gib']:.2f} GiB; "
                  f"fps {report['fps']:.2f} (predicted {report['predicted_fps']:.2f}); "
                  f"forward {report['forward_s']:.3f} s", flush=True)

    print("\n| # | size | placement | measured peak (allocated) | predicted | error | reserved | FPS (predicted) |")
    print("|---|---|---|---|---|---|---|---|")
    for number, label, report, error in rows:
        print(f"| {number} | {report['width']}x{report['height']} | {label} | {report['peak_gib']:.2f} GiB | "
              f"{report['predicted_peak_gib']:.2f} GiB | {error:+.1%} | {report['peak_reserved_gib']:.2f} GiB | "
              f"{report['fps']:.2f} ({report['predicted_fps']:.2f}) |")
    worst = max((abs(error) for *_, error in rows), default=0.0)
    print(f"\nworst error {worst:.1%} ({'within' if worst <= 0.10 else 'OUTSIDE'} 10%)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
