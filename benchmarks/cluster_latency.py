"""What Ray Serve adds to a live session's latency: one engine replica on the GPU behind the cluster's
ingress (`liveavatar serve --cluster`, a local Ray instance) against the single-process server, the same
live session through each, in one process, one after the other on the same GPU.

    python benchmarks/cluster_latency.py                     # 14B random weights, 704*384, bf16, 20 s of audio
    python benchmarks/cluster_latency.py --fp8               # for cards that cannot hold bf16
    python benchmarks/cluster_latency.py --ckpt_dir T/Wan2.2-S2V-14B --lora_path_dmd T/LiveAvatar \\
        --device cpu --dtype float32 --size 64*64 --steps 1 --live-seconds 3   # CPU smoke test

For each server: chunk_to_frames p50/p95 (sending the chunk holding a block's first audio sample ->
receiving the block, as serve_latency.py measures it), the sustained live blocks/s, and the server's own
latency_ms field; then the cluster's added latency (p50 and p95 differences). The cluster path adds the
HTTP proxy hop, the ingress relay and Ray's object transfer of each block and audio batch. Prints one
JSON object.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_end_to_end import write_audio  # noqa: E402
from serve_latency import emit, live_figures, parse_arguments, random_backend, run_header  # noqa: E402

from liveavatar.io.media import load_audio  # noqa: E402
from liveavatar.serve.client import stream_file  # noqa: E402


def random_replica(device: str, fp8: bool):
    """A replica's (backend, live setting): the random weights, and the setting the flags pin (--live-size/-steps)."""
    return random_backend(device, fp8), None


def real_time_session(ws_url: str, image: Path, waveform: np.ndarray, settings: dict) -> dict:
    session = stream_file(ws_url, image, waveform, chunk_s=0.1, pace=1.0, **settings)
    if session.error:
        raise RuntimeError(session.error)
    return live_figures(session)


def single_process(args, image: Path, waveform: np.ndarray, settings: dict) -> dict:
    from liveavatar.options import parse_size
    from liveavatar.serve.backend import Backend
    from liveavatar.serve.local import LocalServer
    from liveavatar.runtime.placement import Placement

    if args.ckpt_dir:
        backend = Backend.load(ckpt_dir=args.ckpt_dir, lora=args.lora_path_dmd, device=args.device, dtype=args.dtype,
                               placement=Placement(weight_dtype="fp8" if args.fp8 else "bf16"))
    else:
        backend = random_backend(args.device, args.fp8)
    with LocalServer(backend, default_size=args.size, max_area=parse_size(args.size), max_steps=args.steps) as server:
        stream_file(server.ws_url, image, waveform[:16000 * 3], pace=0.0, realtime=False, **settings)  # warm-up
        figures = real_time_session(server.ws_url, image, waveform, settings)
    del backend, server
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the replica loads its own copy next
    return figures


def cluster(args, image: Path, waveform: np.ndarray, settings: dict, store: Path) -> dict:
    import ray
    from ray import serve

    from liveavatar.cli.serve import add_serve_arguments
    from liveavatar.cli.serve_cluster import application, cluster_flags
    from liveavatar.serve.cluster.config import APP_NAME
    from liveavatar.serve.local import free_port

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    cpu = args.device == "cpu"
    serve_args = parser.parse_args(
        ["--cluster", "--replicas", "1", "--size", args.size, "--max-size", args.size, "--max-steps", str(args.steps),
         "--live-size", args.size, "--live-steps", str(args.steps),
         "--store", str(store), "--gpus-per-replica", "0" if cpu else "1", "--device", args.device]
        + (["--ckpt_dir", args.ckpt_dir] if args.ckpt_dir else [])
        + (["--lora_path_dmd", args.lora_path_dmd] if args.lora_path_dmd else [])
        + (["--dtype", args.dtype] if args.dtype else []) + (["--fp8"] if args.fp8 else []))
    flags = {**cluster_flags(serve_args), "token": None}
    ray.init(num_cpus=4, num_gpus=0 if cpu else 1, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        # Without a checkpoint each replica builds the full-size random weights (none on a benchmark machine).
        load = None if args.ckpt_dir else functools.partial(random_replica, args.device, args.fp8)
        serve.run(application(flags, load), name=APP_NAME, route_prefix="/")
        deploy_s = time.perf_counter() - started
        ws_url = f"ws://127.0.0.1:{port}/v1/live"
        stream_file(ws_url, image, waveform[:16000 * 3], pace=0.0, realtime=False, **settings)  # warm-up
        return {**real_time_session(ws_url, image, waveform, settings), "deploy_s": round(deploy_s, 1)}
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(__doc__.splitlines()[0], argv)
    if args is None:
        return 2
    if args.device == "cpu" and not args.ckpt_dir:
        print(json.dumps({"error": "--device cpu needs --ckpt_dir (tiny checkpoints): random 14B weights are GPU-only"}))
        return 2
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        image, audio = work / "image.png", work / "speech.wav"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 720, 3), dtype=np.uint8)).save(image)
        write_audio(audio, max(args.live_seconds, 4.0))
        waveform = load_audio(audio)[:int(args.live_seconds * 16000)]
        settings = {"size": args.size, "steps": args.steps}
        single = single_process(args, image, waveform, settings)
        through_ray = cluster(args, image, waveform, settings, work / "store")
    emit({**run_header(args), "single_process": single, "ray_serve": through_ray,
          "added_p50_s": round(through_ray["chunk_to_frames_p50_s"] - single["chunk_to_frames_p50_s"], 3),
          "added_p95_s": round(through_ray["chunk_to_frames_p95_s"] - single["chunk_to_frames_p95_s"], 3)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
