"""Latency of `liveavatar serve` on a GPU: the real server (uvicorn on a loopback port, in this process)
around full-size random weights (no checkpoint), or around a checkpoint set with --ckpt_dir.

    python benchmarks/serve_latency.py                               # 14B random weights, 704*384, bf16
    python benchmarks/serve_latency.py --fp8                         # for cards that cannot hold bf16
    python benchmarks/serve_latency.py --ckpt_dir ckpt/Wan2.2-S2V-14B  # the release
    python benchmarks/serve_latency.py --ckpt_dir T/Wan2.2-S2V-14B --lora_path_dmd T/LiveAvatar \\
        --device cpu --dtype float32 --size 64*64 --steps 1 --live-seconds 3   # smoke test (the test suite's)

Measured, as a client sees it:
* submit_to_first_frame_s: POST /v1/videos -> the job's status shows its first frame made;
  submit_to_first_fragment_s: -> the first video fragment arrives on /stream (playable in the page);
* chunk_to_frames_p50_s / _p95_s: a live session fed in real time (100 ms chunks) -> for every block,
  from sending the chunk holding its first audio sample to receiving the block (includes the 1 s audio
  lookahead of the feature window and the 3-frame offset of the output);
* live_blocks_per_s: sustained blocks per second of that real-time session (paced: 2.08 is real time);
  live_capacity_blocks_per_s: the same session unpaced (realtime false, audio sent at once), i.e. how
  far above real time the engine runs.
Synthetic 720x400 image (-> 704x384) and synthetic speech-like audio. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_end_to_end import RandomTextContext, random_wav2vec2, write_audio  # noqa: E402

from liveavatar.io.media import load_audio  # noqa: E402
from liveavatar.serve.backend import Backend  # noqa: E402
from liveavatar.serve.client import stream_file  # noqa: E402
from liveavatar.serve.local import LocalServer  # noqa: E402
from liveavatar.options import parse_size  # noqa: E402
from liveavatar.runtime.placement import Placement  # noqa: E402


def random_backend(device: str, fp8: bool) -> Backend:
    """The 14B DiT and the full VAE materialised on the device with random weights (as gpu_end_to_end.py)."""
    from liveavatar.devices import resolve_device
    from liveavatar.models.transformer import CausalS2VTransformer, TransformerConfig
    from liveavatar.models.vae import VAEConfig, WanVAE
    from liveavatar.runtime.bench import random_init_
    from liveavatar.runtime.engine import Engine
    from liveavatar.runtime.placement import Placement

    device, dtype = resolve_device(device), torch.bfloat16
    torch.set_grad_enabled(False)
    generator = torch.Generator(device).manual_seed(0)
    config = TransformerConfig.full_14b()
    with torch.device("meta"):
        transformer, vae = CausalS2VTransformer(config), WanVAE(VAEConfig())
    for module in (transformer, vae):
        random_init_(module, device, dtype, generator)
        module.eval().requires_grad_(False)
    if fp8:
        from liveavatar.runtime.fp8 import convert_to_fp8, fp8_kernel_for

        convert_to_fp8(transformer, kernel=fp8_kernel_for(device))
    engine = Engine(transformer, vae, RandomTextContext(config.text_dim, device, dtype),
                    random_wav2vec2(config.audio_dim, device, dtype),
                    placement=Placement(weight_dtype="fp8" if fp8 else "bf16"), device=device, dtype=dtype)
    return Backend(engine)


def first_frame_latency(server: LocalServer, image: Path, audio: Path, fields: dict) -> tuple[float, float]:
    import httpx  # here: live_sustained.py imports this module on machines without httpx

    with httpx.Client(base_url=server.url, timeout=600) as client:
        files = {"image": ("image.png", image.read_bytes()), "audio": ("speech.wav", audio.read_bytes())}
        submitted = time.perf_counter()
        job = client.post("/v1/videos", files=files, data=fields).json()
        while client.get(job["status_url"]).json()["progress"]["frames_done"] == 0:
            time.sleep(0.01)
        first_frame = time.perf_counter() - submitted
        with client.stream("GET", job["stream_url"]) as stream:
            for chunk in stream.iter_bytes():
                if b"moof" in chunk:
                    break
        first_fragment = time.perf_counter() - submitted
        client.delete(job["status_url"])
        while client.get("/v1/health").json()["busy"]:
            time.sleep(0.01)
    return first_frame, first_fragment


def blocks_per_second(blocks: list[dict]) -> float:
    span = blocks[-1]["received_at"] - blocks[1]["received_at"]  # from block 1: block 0 carries the start-up
    return (len(blocks) - 2) / span


def parse_arguments(description: str, argv: list[str] | None) -> argparse.Namespace | None:
    """The serving benchmarks' flags (this script's and cluster_latency.py's); None (after one JSON line)
    when a CUDA device is asked for on a machine without one."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ckpt_dir", help="a checkpoint set (default: full-size random weights)")
    parser.add_argument("--lora_path_dmd")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--live-seconds", type=float, default=20.0, help="audio streamed to each live session")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU here; pass --device cpu with tiny checkpoints for a smoke test"}))
        return None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(__doc__.splitlines()[0], argv)
    if args is None:
        return 2

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        build = time.perf_counter()
        if args.ckpt_dir:
            backend = Backend.load(ckpt_dir=args.ckpt_dir, lora=args.lora_path_dmd, device=args.device,
                                   dtype=args.dtype, placement=Placement(weight_dtype="fp8" if args.fp8 else "bf16"))
        else:
            backend = random_backend(args.device, args.fp8)
        build_s = time.perf_counter() - build
        image, audio = work / "image.png", work / "speech.wav"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 720, 3), dtype=np.uint8)).save(image)
        write_audio(audio, max(args.live_seconds, 4.0))
        waveform = load_audio(audio)
        waveform = waveform[:int(args.live_seconds * 16000)]
        settings = {"size": args.size, "steps": args.steps}
        with LocalServer(backend, default_size=args.size,
                         max_area=parse_size(args.size), max_steps=args.steps) as server:
            first_frame, first_fragment = first_frame_latency(server, image, audio,
                                                              {**settings, "num_clip": "1"})
            live = stream_file(server.ws_url, image, waveform, chunk_s=0.1, pace=1.0, **settings)
            capacity = stream_file(server.ws_url, image, waveform, pace=0.0, realtime=False, **settings)
    for result in (live, capacity):
        if result.error:
            print(json.dumps({"error": result.error}))
            return 1
    report = {**run_header(args), "build_s": round(build_s, 1),
              "submit_to_first_frame_s": round(first_frame, 3), "submit_to_first_fragment_s": round(first_fragment, 3),
              **live_figures(live), "live_capacity_blocks_per_s": round(blocks_per_second(capacity.blocks), 3)}
    emit(report, args.json)
    return 0


def live_figures(session) -> dict:
    """A real-time live session's latency and pace, as a client saw them."""
    latencies = sorted(x for x in map(session.latency_of, session.blocks) if x is not None)
    return {"chunk_to_frames_p50_s": round(statistics.median(latencies), 3),
            "chunk_to_frames_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
            "live_blocks": len(session.blocks), "live_blocks_per_s": round(blocks_per_second(session.blocks), 3),
            "server_latency_ms_p50": statistics.median(b["latency_ms"] for b in session.blocks
                                                       if b["latency_ms"] is not None)}


def run_header(args: argparse.Namespace) -> dict:
    return {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "weights": args.ckpt_dir or ("random 14B fp8" if args.fp8 else "random 14B bf16"),
            "size": args.size, "steps": args.steps}


def emit(report: dict, path: Path | None) -> None:
    print(json.dumps(report))
    if path:
        path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
