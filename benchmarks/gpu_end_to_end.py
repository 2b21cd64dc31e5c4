"""End to end on a GPU with full-size random weights: 2 clips at 704*384 in bfloat16, VAE and mp4 included.

    python benchmarks/gpu_end_to_end.py                 # prints one JSON object
    python benchmarks/gpu_end_to_end.py --fp8           # FP8 DiT linears (for cards that cannot hold bf16)
    python benchmarks/gpu_end_to_end.py --config tiny --device cpu --size 128*64   # smoke test of the script

Builds the 14B DiT (the release's configuration) and the full-width VAE on the meta device and materialises
them directly on the GPU with random weights (no checkpoint, no host copy), and a random full-size wav2vec2
(XLSR-53 structure) for the audio features. The text encoder is replaced by a random 4096-wide context (a
prompt-cache hit in a real run; the 11 GB umT5 is not part of the generation loop). Then it runs the public
`LiveAvatarPipeline.stream` on a synthetic 720x400 image (-> 704x384, as the reference's example) and
synthetic audio, writing every block's frames to an H.264 mp4 with the audio muxed as it arrives, on a
writer thread as `generate` does. The DiT takes the fast path (compiled regions, CUDA graphs, the decode
overlapped on a second stream; `liveavatar.runtime.compile`) unless --no-compile; a first run in a process
compiles (the time to first frame then includes it) unless the compile cache is warm.

Reported: time to first frame (from the request), time per block (between the frame bursts of consecutive
blocks; block 0 of clip 1 includes the sink refresh), video FPS over the steady clips (every clip after the
first, whole: the KV window full, and the sink refresh each clip pays counted once per clip, as
`gpu_fast_path.py` and `bench` count it; with the overlapped decode the last interval, the flush, left out;
the median block, which leaves the refresh out, beside it), peak allocated/reserved GPU memory, peak
host RSS, build time. Resident bf16 at 704*384 needs about 75 GiB (DiT 30.4 GiB + four KV sets 38.7 GiB +
cond cache, activations, VAE): use an H200, or --fp8 on an 80 GB card.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GiB = 2**30
CLIP_FRAMES = 48  # the default infer_frames (`liveavatar.settings`), which `pipe.stream` uses here


class RandomTextContext:
    """Stands in for the prompt-cached umT5 (`TextEncoder`): a fixed random context [L, 4096], always a cache
    hit, so no encoder is loaded and the engine keeps its caches."""

    def __init__(self, width: int, device, dtype, tokens: int = 32):
        generator = torch.Generator("cpu").manual_seed(1)
        self.device = torch.device(device)
        self.context = torch.randn(tokens, width, generator=generator).to(device, dtype)

    def is_cached(self, prompt: str) -> bool:
        return True

    def encode(self, prompt: str) -> torch.Tensor:
        return self.context

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


def random_wav2vec2(width: int, device, dtype, seed: int = 2):
    """XLSR-53's structure (24 stable-layer-norm layers, 50 Hz conv front end) at the given width, with
    weights drawn from ``seed`` (transformers draws them from the global generator: two runs must make the
    same video)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from liveavatar.models.audio_features import AudioFeatureExtractor

    full = width == 1024
    config = Wav2Vec2Config(hidden_size=width, num_hidden_layers=24, num_attention_heads=16 if full else 2,
                            intermediate_size=4 * width, conv_dim=[512 if full else 16] * 7,
                            conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                            feat_extract_norm="layer", do_stable_layer_norm=True,
                            num_conv_pos_embeddings=128 if full else 16, num_conv_pos_embedding_groups=16 if full else 4,
                            vocab_size=33)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Wav2Vec2ForCTC(config)
    model = model.to(dtype).eval().requires_grad_(False)
    processor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    return AudioFeatureExtractor(processor, model, device=device, dtype=dtype)


def write_audio(path: Path, seconds: float) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    signal = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--fp8", action="store_true", help="FP8 linears in the DiT (converted block by block)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", choices=["14b", "tiny"], default="14b")
    parser.add_argument("--no-compile", action="store_true", help="the eager DiT (default: the fast path on CUDA)")
    args = parser.parse_args(argv)
    from liveavatar.devices import configure_cuda_allocator, resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU here; this script measures the full-size model on a GPU"}))
        return 2

    from liveavatar.api import LiveAvatarPipeline
    from liveavatar.io.video_writer import BackgroundWriter, Mp4Writer
    from liveavatar.models.transformer import TransformerConfig
    from liveavatar.models.vae import VAEConfig
    from liveavatar.geometry import FRAMES_PER_BLOCK, size_for_area
    from liveavatar.runtime.bench import build_random_models, engine_report
    from liveavatar.runtime.compile import resolve_fast_path
    from liveavatar.runtime.engine import Engine
    from liveavatar.runtime.placement import Placement
    from liveavatar.options import RequestOptions, parse_size

    dtype = torch.bfloat16
    if cuda:
        configure_cuda_allocator()
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    config = TransformerConfig.full_14b() if args.config == "14b" else TransformerConfig.tiny()
    placement = Placement(weight_dtype="fp8" if args.fp8 else "bf16")
    vae_config = VAEConfig() if args.config == "14b" else VAEConfig(base_dim=8)
    transformer, vae, _, _ = build_random_models(placement, config=config, vae_config=vae_config, device=device,
                                                 dtype=dtype)
    engine = Engine(transformer, vae, RandomTextContext(config.text_dim, device, dtype),
                    random_wav2vec2(config.audio_dim, device, dtype), placement=placement, device=device, dtype=dtype,
                    fast_path=resolve_fast_path(device, compile=False if args.no_compile else None))
    pipe = LiveAvatarPipeline(engine)
    if cuda:
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as work:
        audio = Path(work) / "speech.wav"
        write_audio(audio, args.clips * CLIP_FRAMES / 25 + 0.5)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 720, 3), dtype=np.uint8))
        requested = time.perf_counter()
        frames = pipe.stream(image, audio, "a person talking", size=args.size, num_clip=args.clips)
        burst_times, frame_count, first_frame_s, batch = [], 0, None, []
        height, width = size_for_area(image.height, image.width, parse_size(args.size))
        # As `generate` writes: the mp4 is encoded on its own thread, a block's frames at a time.
        with BackgroundWriter(Mp4Writer(Path(work) / "out.mp4", width=width, height=height,
                                        audio_path=audio)) as writer:
            for frame in frames:
                now = time.perf_counter()
                if frame.index == 0 or (frame.index >= 9 and (frame.index - 9) % FRAMES_PER_BLOCK == 0):
                    burst_times.append(now)
                    if first_frame_s is None:
                        first_frame_s = now - requested
                    if batch:
                        writer.write(np.stack(batch))
                        batch = []
                batch.append(frame.image)
                frame_count += 1
            if batch:
                writer.write(np.stack(batch))
        total_s = time.perf_counter() - requested
        mp4_bytes = (Path(work) / "out.mp4").stat().st_size

    block_s = [b - a for a, b in zip(burst_times, burst_times[1:])]
    if engine.decodes_one_block_late(RequestOptions()) and len(block_s) > 1:
        # The last block's frames come at the flush, one unshared decode after its denoise, while every
        # earlier block's came as the next one denoised: that interval is not a block period.
        block_s = block_s[:-1]
    # Interval i is block i + 1's time: from the first block of clip 1 on, whole clips. A median alone (what
    # this script reported until 2026-12-07) drops the sink refresh of every clip and ran 30 % faster than
    # gpu_fast_path.py's mean on an H100; the stream pays the refresh once per clip.
    blocks_per_clip = CLIP_FRAMES // FRAMES_PER_BLOCK
    steady = block_s[blocks_per_clip - 1:] or block_s
    report = {
        "config": args.config, "size": args.size, "width": width, "height": height, "clips": args.clips,
        "frames": frame_count, "dtype": "bfloat16", "fp8": args.fp8, **engine_report(engine),
        "ttff_s": round(first_frame_s, 3),
        "block_s": [round(s, 3) for s in block_s],
        "block_s_median": round(statistics.median(block_s), 3) if block_s else None,
        "block_s_steady_mean": round(statistics.fmean(steady), 3) if steady else None,
        "video_fps": round(FRAMES_PER_BLOCK / statistics.fmean(steady), 2) if steady else None,
        "video_fps_median_block": round(FRAMES_PER_BLOCK / statistics.median(block_s), 2) if block_s else None,
        "total_s": round(total_s, 2),
        "build_s": round(build_s, 1),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 2) if cuda else None,
        "host_rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2),
        "mp4_bytes": mp4_bytes,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
