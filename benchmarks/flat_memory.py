"""Flat memory over video length: peak host RSS of a long run vs a short one (tiny model, CPU).

    python benchmarks/flat_memory.py                      # 5 clips vs 60 clips, target: within 150 MB
    python benchmarks/flat_memory.py --clips 2 8 --size 64*64

Each run is a fresh process that loads `make-tiny` checkpoints and calls `LiveAvatarPipeline.generate` (the
whole path: audio features, prompt, conditioning, sampling loop, streaming decode, incremental mp4 with
audio) on a portrait from examples/ driven by its speech, tiled to exactly the run's length, so that
everything that could grow with the input grows. The child reports its process peak RSS (getrusage) and the
peak seen while generating (sampled every 20 ms); the parent prints one JSON object with every run and the
differences.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "examples"
SECONDS_PER_CLIP = 48 / 25
TARGET_MB = 150


def write_speech(path: Path, seconds: float, source: Path) -> None:
    """``source`` resampled to 16 kHz and tiled to ``seconds``, as 16-bit PCM."""
    from liveavatar.io.media import load_audio

    speech = load_audio(source)
    samples = int(seconds * 16000)
    tiled = np.tile(speech, samples // len(speech) + 1)[:samples]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(tiled, -1, 1) * 32767).astype("<i2").tobytes())


class RssSampler(threading.Thread):
    """Largest current RSS seen while generating (the process peak also covers loading the models)."""

    def __init__(self, interval_s: float = 0.02):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = 0
        self.stopped = threading.Event()

    def run(self):
        from liveavatar.runtime.progress import host_rss_bytes

        while not self.stopped.is_set():
            self.peak = max(self.peak, host_rss_bytes())
            time.sleep(self.interval_s)


def child(args: argparse.Namespace) -> None:
    import torch

    from liveavatar.api import LiveAvatarPipeline
    from liveavatar.runtime.progress import host_rss_bytes

    start = time.perf_counter()
    pipe = LiveAvatarPipeline.from_pretrained(Path(args.ckpt) / "Wan2.2-S2V-14B", lora=Path(args.ckpt) / "LiveAvatar",
                                              device="cpu", dtype=torch.float32, prompt_cache_dir=args.work)
    loaded = host_rss_bytes()
    sampler = RssSampler()
    sampler.start()
    out = pipe.generate(args.image, args.audio, "a person talking", output=Path(args.work) / f"run{args.run}.mp4",
                        size=args.size, num_clip=args.run)
    sampler.stopped.set()
    sampler.join()
    print(json.dumps({"clips": args.run, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "rss_after_load_mb": round(loaded / 2**20, 1),
                      "generate_peak_rss_mb": round(sampler.peak / 2**20, 1),
                      "seconds": round(time.perf_counter() - start, 1), "mp4_bytes": out.stat().st_size}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, nargs=2, default=[5, 60], metavar=("SHORT", "LONG"))
    parser.add_argument("--size", default="64*64", help="generation area (default 64*64)")
    parser.add_argument("--image", default=str(MEDIA / "dwarven_blacksmith.jpg"))
    parser.add_argument("--speech", default=str(MEDIA / "dwarven_blacksmith.wav"))
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # child mode: clips of this run
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--audio", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run is not None:
        child(args)
        return 0

    from liveavatar.models.tiny import make_tiny_checkpoints

    results = []
    with tempfile.TemporaryDirectory() as work:
        make_tiny_checkpoints(Path(work) / "tiny")
        for clips in args.clips:
            audio = Path(work) / f"speech{clips}.wav"
            write_speech(audio, clips * SECONDS_PER_CLIP, Path(args.speech))
            command = [sys.executable, __file__, "--run", str(clips), "--ckpt", str(Path(work) / "tiny"),
                       "--audio", str(audio), "--work", work, "--image", args.image, "--size", args.size]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    growth = results[1]["peak_rss_mb"] - results[0]["peak_rss_mb"]
    generate_growth = results[1]["generate_peak_rss_mb"] - results[0]["generate_peak_rss_mb"]
    print(json.dumps({"runs": results, "size": args.size, "growth_mb": round(growth, 1),
                      "generate_growth_mb": round(generate_growth, 1), "target_mb": TARGET_MB,
                      "within_target": growth <= TARGET_MB}))
    return 0 if growth <= TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
