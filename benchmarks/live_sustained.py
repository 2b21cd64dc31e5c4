"""A long live session at the server's auto live setting, fed in real time like a voice agent: does it keep
up, with bounded latency and flat memory? The real server (uvicorn on a loopback port, in this process)
around full-size random weights (as serve_latency.py) or a checkpoint set.

    python benchmarks/live_sustained.py --fp8 --seconds 600 --deadline-s 450 --out $OUT
    python benchmarks/live_sustained.py --ckpt_dir T/Wan2.2-S2V-14B --lora_path_dmd T/LiveAvatar \\
        --device cpu --dtype float32 --live-size 64*64 --live-steps 1 --seconds 8   # smoke test

The live setting is chosen as ``liveavatar serve --live auto`` chooses it (the speed model for this GPU,
the placement and the fast path; ``--live-size``/``--live-steps`` pin it) and warmed before the session.
The client speaks utterances of ``--utterance-s`` of speech-like audio in 100 ms chunks, in real time,
with ``--gap-s`` of nothing between them (as a TTS agent between answers: the avatar idles on silence), and
barges in (``interrupt``) ``--barge-after-s`` into every ``--barge-every``-th utterance. The session runs
``--seconds`` or until ``--deadline-s`` after the process started, whichever comes first.

Reported per minute of session (by the time each block is received): chunk -> frames latency p50 / p95 / p99
(from sending the chunk holding a block's first speech sample to receiving the block), the server's timing
breakdown (p50 per stage), the measured real-time factor, blocks made, late blocks (received after the
client's playout clock wanted them: a player would have stalled), host RSS and GPU memory; over the
session: the lag events (audio dropped by the catch-up), the added latency of the first block of each
utterance over the steady speech blocks' median (silence -> speech), and each barge-in: seconds from the
interrupt to the first silent block received, and speech blocks received after it. One JSON line per
minute and a final report go to stdout and ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_end_to_end import write_audio  # noqa: E402
from serve_latency import random_backend  # noqa: E402

from liveavatar.options import DEFAULTS, parse_size  # noqa: E402
from liveavatar.runtime.placement import Placement  # noqa: E402
from liveavatar.runtime.progress import host_rss_bytes  # noqa: E402
from liveavatar.serve.backend import Backend  # noqa: E402
from liveavatar.serve.live_setting import choose_live_setting, describe, speed_model_predictor  # noqa: E402
from liveavatar.serve.local import LocalServer  # noqa: E402
from liveavatar.serve.protocol import from_pcm16, to_pcm16, unpack_block  # noqa: E402

CHUNK_S = 0.1
STAGES = ("accumulate_ms", "lookahead_ms", "queue_ms", "compute_ms", "decode_ms", "jpeg_ms", "send_ms")


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def live_setting(args, backend: Backend):
    """As ``serve --live auto``: the speed model on this GPU, this placement and the engine's fast path."""
    predictor = None
    if args.device.startswith("cuda"):
        from liveavatar.models.transformer import TransformerConfig
        from liveavatar.runtime.planner.hardware import HARDWARE_PRESETS, detect_hardware
        from liveavatar.runtime.planner.memory import dit_inventory

        engine = backend.engine
        fast = engine.fast_path
        path = "graphs" if fast.cuda_graphs and engine.placement.resident else "compiled" if fast.compile else "eager"
        predictor = speed_model_predictor(dit_inventory(TransformerConfig.full_14b()), engine.placement,
                                          detect_hardware() or HARDWARE_PRESETS["h100"], run_dtype_bytes=2, path=path)
    return choose_live_setting(predictor, max_area=parse_size("704*384"), max_steps=4, size=args.live_size,
                               steps=args.live_steps)


class Memory(threading.Thread):
    """Host RSS and GPU memory, sampled every ``period`` seconds."""

    def __init__(self, period: float):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()

    def sample(self) -> dict:
        row = {"t": time.monotonic(), "host_rss_gib": round(host_rss_bytes() / 2**30, 3)}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            row.update(gpu_allocated_gib=round(torch.cuda.memory_allocated() / 2**30, 3),
                       gpu_reserved_gib=round(torch.cuda.memory_reserved() / 2**30, 3),
                       gpu_used_gib=round((total - free) / 2**30, 3))
        return row

    def run(self):
        while not self.stop.wait(self.period):
            self.samples.append(self.sample())


def speak(ws, speech: np.ndarray, seconds: float, args, log: dict, began: float) -> None:
    """The agent: utterances in real-time chunks, gaps of nothing, a barge-in now and then."""
    chunk = int(CHUNK_S * 16000)
    offset, utterance, clock = 0, 0, time.monotonic()
    while clock - began < seconds:
        length = int(args.utterance_s * 16000)
        barge = args.barge_every and utterance % args.barge_every == args.barge_every - 1
        stop_at = int(args.barge_after_s * 16000) if barge else length
        log["utterances"].append(offset)
        for start in range(0, stop_at, chunk):
            piece = speech[(start + utterance * 7919) % (len(speech) - chunk):][:chunk]
            clock += CHUNK_S
            time.sleep(max(0.0, clock - time.monotonic()))
            log["sent"].append((offset, time.monotonic()))
            ws.send(to_pcm16(piece))
            offset += len(piece)
        if barge:
            ws.send(json.dumps({"type": "interrupt"}))
            log["interrupts"].append((offset, time.monotonic()))
        clock += args.gap_s
        time.sleep(max(0.0, clock - time.monotonic()))
        utterance += 1
    ws.send(json.dumps({"type": "end"}))


def report_minute(minute: int, blocks: list[dict], memory: dict | None) -> dict:
    latencies = [b["chunk_to_frames_s"] for b in blocks if b.get("chunk_to_frames_s") is not None]
    timing = {stage: quantile([b["timing"][stage] for b in blocks if b["timing"][stage] is not None], 0.5)
              for stage in STAGES}
    return {"minute": minute, "blocks": len(blocks), "speech_blocks": len(latencies),
            "chunk_to_frames_p50_s": quantile(latencies, 0.5), "chunk_to_frames_p95_s": quantile(latencies, 0.95),
            "chunk_to_frames_p99_s": quantile(latencies, 0.99), "timing_p50_ms": timing,
            "rtf_p50": quantile([b["rtf"] for b in blocks], 0.5), "lag_s_max": max((b["lag_s"] for b in blocks), default=0),
            "late_blocks": sum(1 for b in blocks if b["received_at"] > b["due_at"]), "memory": memory}


def run_session(server: LocalServer, image: Path, speech: np.ndarray, args, deadline: float, out) -> dict:
    import base64

    from websockets.sync.client import connect

    log = {"utterances": [], "sent": [], "interrupts": []}
    blocks, events = [], []
    memory = Memory(60.0)
    with connect(server.ws_url, max_size=2**26) as ws:
        ws.send(json.dumps({"type": "start", "image": base64.b64encode(image.read_bytes()).decode(),
                            "idle_limit_s": 30}))
        ready = json.loads(ws.recv())
        while ready["type"] != "ready":
            ready = json.loads(ws.recv())
        began = time.monotonic()
        seconds = min(args.seconds, deadline - began - 20)
        memory.samples.append(memory.sample())
        memory.start()
        sender = threading.Thread(target=speak, args=(ws, speech, seconds, args, log, began), daemon=True)
        sender.start()
        first_received, minute_rows = None, []
        for message in ws:
            if isinstance(message, str):
                item = json.loads(message)
                if item["type"] == "done":
                    break
                events.append({**item, "t": round(time.monotonic() - began, 2)})
                continue
            header = unpack_block(message)[0]
            header["received_at"] = now = time.monotonic()
            first_received = first_received or now
            header["due_at"] = first_received + ready["playout_delay_s"] + header["frame_start"] / 25
            if header["input_samples"]:
                first = header["input_samples"][0]
                sent = [t for start, t in log["sent"] if start <= first]
                header["chunk_to_frames_s"] = now - sent[-1] if sent else None
            blocks.append(header)
            minute = int((now - began) // 60)
            if minute > len(minute_rows):  # a minute is complete
                done = [b for b in blocks if int((b["received_at"] - began) // 60) == len(minute_rows)]
                row = report_minute(len(minute_rows), done, memory.samples[-1] if memory.samples else None)
                minute_rows.append(row)
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")
                out.flush()
    memory.stop.set()
    last = [b for b in blocks if int((b["received_at"] - began) // 60) == len(minute_rows)]
    if last:
        minute_rows.append(report_minute(len(minute_rows), last, memory.sample()))
    return {"ready": ready, "seconds": round(time.monotonic() - began, 1), "blocks": blocks, "events": events,
            "log": log, "minutes": minute_rows, "memory": memory.samples}


def switches_and_barge_ins(session: dict) -> tuple[list[float], list[dict]]:
    """Added latency of each utterance's first block; each barge-in's stop time and the speech after it."""
    blocks, log = session["blocks"], session["log"]
    speech = [b for b in blocks if b.get("chunk_to_frames_s") is not None]
    steady = statistics.median(b["chunk_to_frames_s"] for b in speech) if speech else 0.0
    added = []
    for start in log["utterances"][1:]:
        first = next((b for b in speech if b["input_samples"][1] > start), None)
        if first is not None and first["input_samples"][0] <= start + 1600:
            added.append(round(first["chunk_to_frames_s"] - steady, 3))
    barge = []
    for offset, sent in log["interrupts"]:
        after = [b for b in blocks if b["received_at"] > sent]
        silent = next((b for b in after if not b["speech"]), None)
        speaking = [b for b in after if b["speech"] and b["input_samples"][1] <= offset]
        barge.append({"stop_s": None if silent is None else round(silent["received_at"] - sent, 3),
                      "speech_blocks_after": len(speaking)})
    return added, barge


def main(argv: list[str] | None = None) -> int:
    began = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_dir", help="a checkpoint set (default: full-size random weights)")
    parser.add_argument("--lora_path_dmd")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--live-size", help="pin the setting (default: auto, as serve)")
    parser.add_argument("--live-steps", type=int)
    parser.add_argument("--seconds", type=float, default=600.0, help="session length (default 10 minutes)")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="end the session this long after start")
    parser.add_argument("--utterance-s", type=float, default=8.0)
    parser.add_argument("--gap-s", type=float, default=3.0)
    parser.add_argument("--barge-every", type=int, default=4)
    parser.add_argument("--barge-after-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    deadline = began + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)
    build = time.perf_counter()
    if args.ckpt_dir:
        backend = Backend.load(ckpt_dir=args.ckpt_dir, lora=args.lora_path_dmd, device=args.device, dtype=args.dtype,
                               placement=Placement(weight_dtype="fp8" if args.fp8 else "bf16"))
    else:
        backend = random_backend(args.device, args.fp8)
    build_s = time.perf_counter() - build
    setting = live_setting(args, backend)
    print(describe(setting), file=sys.stderr, flush=True)
    warm = time.perf_counter()
    if args.device.startswith("cuda"):  # as serve: the CPU runs eagerly, nothing to warm
        backend.warm(setting.size, setting.sample_steps, DEFAULTS.attention)
    warm_s = time.perf_counter() - warm
    work = args.out
    image, audio = work / "image.png", work / "speech.wav"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 720, 3), dtype=np.uint8)).save(image)
    write_audio(audio, 30.0)
    with wave.open(str(audio)) as wav:  # read without PyAV, which the GPU machines lack
        speech = from_pcm16(wav.readframes(wav.getnframes()))
    with open(work / "minutes.jsonl", "w") as out, \
            LocalServer(backend, default_size=setting.size, max_area=parse_size("704*384"), live_setting=setting,
                        live_idle_limit_s=60) as server:
        session = run_session(server, image, speech, args, deadline, out)
    image.unlink()
    audio.unlink()
    added, barge = switches_and_barge_ins(session)
    dropped = sum(e.get("dropped_s", 0) for e in session["events"] if e["type"] == "lag")
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "weights": args.ckpt_dir or ("random 14B fp8" if args.fp8 else "random 14B bf16"),
        "setting": setting.info(), "build_s": round(build_s, 1), "warm_s": round(warm_s, 1),
        "session_s": session["seconds"], "blocks": len(session["blocks"]),
        "lag_events": [e for e in session["events"] if e["type"] == "lag"], "dropped_audio_s": round(dropped, 3),
        "late_blocks": sum(m["late_blocks"] for m in session["minutes"]),
        "silence_to_speech_added_s": added, "barge_ins": barge, "minutes": session["minutes"],
        "other_events": [e for e in session["events"] if e["type"] != "lag"],
        "pid": os.getpid(),
    }
    print(json.dumps(report))
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
