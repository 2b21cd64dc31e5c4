"""Host memory of the streaming VAE decoder over a long stream (tiny VAE, CPU, float32).

Streams a warm-up of latent frames (the TPP pipeline's 7 motion latents) and then N blocks of 3
latent frames through one ``StreamingDecoder``, the way the TPP decode rank does, and records for
every block:

* ``state_bytes``: bytes held by the carried causal-conv state after the block;
* ``rss_after_mb``: resident set size after the block, once glibc has returned freed memory to the
  system (``malloc_trim``), i.e. what stays alive between blocks (torch's CPU tensors are malloc'ed,
  so they show here and not in tracemalloc);
* ``rss_peak_mb``: the highest resident set size seen while the block was decoded (sampled every
  2 ms by a background thread);
* with ``--trace-python``: ``py_peak_kb`` / ``py_net_kb``, peak and net change of Python-object
  allocations during the block (``tracemalloc``; a Python list that grows with the history shows as a
  positive net change). tracemalloc's own bookkeeping then adds a few KB of RSS per block, so the RSS
  columns are only clean without it.

Memory is flat when none of these grows with the block index. Usage:

    python benchmarks/vae_stream_memory.py --blocks 200 [--latent-size 8x16] [--trace-python] [--json out.json]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import torch

from liveavatar.models.vae import WanVAE, save_tiny_vae

PAGE_MB = resource.getpagesize() / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_MB


class PeakRss:
    """Samples the resident set size in a background thread; ``take()`` returns the max since the last take."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = rss_mb()
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            value = rss_mb()
            with self.lock:
                self.peak = max(self.peak, value)
            time.sleep(self.interval_s)

    def take(self) -> float:
        with self.lock:
            peak, self.peak = self.peak, rss_mb()
        return peak

    def stop(self) -> None:
        self.running = False
        self.thread.join()


def release_freed_memory() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--block-frames", type=int, default=3, help="latent frames per block")
    parser.add_argument("--warmup-frames", type=int, default=7, help="latent frames decoded before the blocks")
    parser.add_argument("--latent-size", default="8x16", help="latent HxW (pixels are 8x)")
    parser.add_argument("--base-dim", type=int, default=8, help="width of the random tiny VAE")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids oversubscription slowdowns on a shared machine)")
    parser.add_argument("--trace-python", action="store_true", help="also trace Python allocations")
    parser.add_argument("--json", type=Path, help="write every block's numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.latent_size.lower().split("x"))

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        vae = WanVAE.from_checkpoint(save_tiny_vae(Path(tmp) / "Wan2.1_VAE.pth", base_dim=args.base_dim))
    z_dim = vae.config.z_dim
    decoder = vae.stream_decoder()
    decoder.decode(torch.randn(1, z_dim, args.warmup_frames, height, width))

    records = []
    sampler = PeakRss()
    if args.trace_python:
        tracemalloc.start()
    start = time.perf_counter()
    for block in range(args.blocks):
        latents = torch.randn(1, z_dim, args.block_frames, height, width)
        release_freed_memory()
        sampler.take()
        py_before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        frames = decoder.decode(latents)
        del frames, latents  # a real consumer hands the frames to the video writer
        py_now, py_peak = tracemalloc.get_traced_memory()
        rss_peak = sampler.take()
        release_freed_memory()
        record = {"block": block, "state_bytes": decoder.state_nbytes(),
                  "rss_after_mb": round(rss_mb(), 2), "rss_peak_mb": round(rss_peak, 2)}
        if args.trace_python:
            record.update(py_peak_kb=round((py_peak - py_before) / 1024, 1),
                          py_net_kb=round((py_now - py_before) / 1024, 1))
        records.append(record)
        if (block + 1) % 20 == 0:
            print(f"  {block + 1}/{args.blocks} blocks, rss {records[-1]['rss_after_mb']:.1f} MB", flush=True)
    elapsed = time.perf_counter() - start
    tracemalloc.stop()
    sampler.stop()

    columns = [c for c in records[0] if c != "block"]
    print(f"tiny VAE base_dim {args.base_dim}, latent {height}x{width} -> pixels {8 * height}x{8 * width}, "
          f"{args.blocks} blocks of {args.block_frames} latent frames after {args.warmup_frames} warm-up; "
          f"{elapsed / args.blocks * 1000:.0f} ms/block on {torch.get_num_threads()} threads")
    print(f"{'block':>6}" + "".join(f" {c:>13}" for c in columns))
    shown = sorted({0, 1, 2, 5, 10, 25, 50, 100, 150, args.blocks - 1} & set(range(args.blocks)))
    for i in shown:
        print(f"{i:>6}" + "".join(f" {records[i][c]:>13}" for c in columns))
    settled = records[min(10, len(records) - 1):]
    halves = (settled[:len(settled) // 2], settled[len(settled) // 2:])
    for column in columns:
        values = [r[column] for r in settled]
        means = [sum(r[column] for r in half) / max(len(half), 1) for half in halves]
        print(f"{column:>13} blocks {settled[0]['block']}..{settled[-1]['block']}: min {min(values):g} "
              f"max {max(values):g}; mean first half {means[0]:.2f}, second half {means[1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "ms_per_block": elapsed / args.blocks * 1000, "blocks": records}, indent=1))


if __name__ == "__main__":
    main()
