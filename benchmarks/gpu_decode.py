"""The streaming VAE decode alone on one GPU: the eager decoder against the fast path's steady step
(compiled, CUDA graphs, channels_last_3d), at full width with random weights.

    python benchmarks/gpu_decode.py                                   # 704*384 and 384*256, every variant
    python benchmarks/gpu_decode.py --device cpu --tiny --sizes 64*64 --variants eager,fixed   # smoke test

One stream per size and variant runs as the engine's streaming decoder does: 7 warm-up latent frames, then
blocks of 3 latent frames (12 pixel frames). Per size and variant: seconds per block (host clock, synchronised
after each block; mean over the measured blocks after ``--warmup-blocks``), the 7 warm-up latents' time
(the steady step compiles there, from the 4th latent frame on) and the first block's (the graph is
captured there), graphs compiled in the stream (1 per size), a second stream of the size (must compile
nothing: it takes the first one's buffers over), peak allocated memory, and against the eager
decoder's frames (uint8, as written to the video): max and mean absolute difference, PSNR, and the share of
pixels clamped at -1 or 1 (random weights). With ``--profile``, a kernel table of one steady block of the
eager, compiled and graphs_cl variants (the last two's step without graph replay only where its capture
failed) goes to $OUT/profile_decode_<size>_<variant>.txt.

Variants: eager (today's decoder, every frame eager), fixed (the fixed-buffer step, eager), compiled,
graphs (compiled + CUDA graphs), compiled_cl (compiled in channels_last_3d without graphs: what a placement
that streams DiT layers runs), graphs_cl (channels_last_3d with graphs: what a resident placement runs).
Writes $OUT/decode.json after every row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

GiB = 2**30
VARIANTS = ("eager", "fixed", "compiled", "graphs", "compiled_cl", "graphs_cl")


def uint8(frames: torch.Tensor) -> torch.Tensor:
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def stream_blocks(vae, latents: torch.Tensor, sync) -> tuple[list[torch.Tensor], list[float]]:
    """Decode ``latents`` [1, 16, 7 + 3n, h, w] as warm-up + blocks; returns (uint8 frames on the host per
    block, seconds per block incl. the warm-up as entry 0)."""
    decoder = vae.stream_decoder()
    pieces, times = [], []
    for start, end in [(0, 7)] + [(s, s + 3) for s in range(7, latents.shape[2], 3)]:
        began = time.perf_counter()
        frames = decoder.decode(latents[:, :, start:end])
        sync()
        times.append(time.perf_counter() - began)
        pieces.append(uint8(frames[0]).cpu())
    return pieces, times


def compare(reference: list[torch.Tensor], pieces: list[torch.Tensor]) -> dict:
    a = torch.cat([p.flatten() for p in reference]).float()
    b = torch.cat([p.flatten() for p in pieces]).float()
    diff = (a - b).abs()
    mse = float((diff ** 2).mean())
    per_block = [int((x.float() - y.float()).abs().max()) for x, y in zip(reference, pieces)]
    return {"max_abs": int(diff.max()), "mean_abs": round(float(diff.mean()), 4),
            "psnr_db": round(10 * math.log10(255 ** 2 / mse), 2) if mse else float("inf"),
            "max_abs_per_block": per_block}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="704*384,384*256")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="base width 8 (smoke test)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--warmup-blocks", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms per shape (torch.backends.cudnn.benchmark)")
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    from torch._dynamo.utils import counters

    from liveavatar.models.vae import VAEConfig
    from liveavatar.runtime.bench import random_vae
    from liveavatar.runtime.compile import compile_decoder, configure_compiler

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    configure_compiler(workers=None)
    generator = torch.Generator(device).manual_seed(0)
    vae = random_vae(VAEConfig(base_dim=8) if args.tiny else VAEConfig(), device=device, dtype=dtype,
                     generator=generator)
    report = {"meta": {"torch": torch.__version__, "cuda": torch.version.cuda,
                       "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": args.dtype,
                       "blocks": args.blocks, "warmup_blocks": args.warmup_blocks,
                       "cudnn_benchmark": args.cudnn_benchmark,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, "rows": []}
    try:
        import triton
        report["meta"]["triton"] = triton.__version__
    except ImportError:
        pass
    sizes = args.sizes.split(",")
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    latent_frames = 7 + 3 * (args.warmup_blocks + args.blocks)
    inputs = {}
    for size in sizes:
        width, height = (int(v) for v in size.split("*"))
        latent_gen = torch.Generator("cpu").manual_seed(1)
        inputs[size] = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=latent_gen).to(device)
    references: dict[str, list[torch.Tensor]] = {}
    for variant in variants:
        if variant == "fixed":
            from liveavatar.runtime.decoding import SteadyDecoder
            vae.steady_decoder = SteadyDecoder(vae)
        elif variant != "eager":
            compile_decoder(vae, cuda_graphs=variant.startswith("graphs"), channels_last=variant.endswith("_cl"))
        for size in sizes:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            before = counters["stats"]["unique_graphs"]
            pieces, times = stream_blocks(vae, inputs[size], sync)
            after_first = counters["stats"]["unique_graphs"]
            first = times[1]
            measured = times[1 + args.warmup_blocks:]
            compiles_in_stream = after_first - before
            # A second stream of the size: takes the buffers over; must compile nothing.
            second_pieces, _ = stream_blocks(vae, inputs[size][:, :, :7 + 6], sync)
            row = {"size": size, "variant": variant, "block_s": round(statistics.fmean(measured), 4),
                   "block_s_min": round(min(measured), 4), "warmup_7_latents_s": round(times[0], 3),
                   "first_block_s": round(first, 3), "compiles": compiles_in_stream,
                   "compiles_second_stream": counters["stats"]["unique_graphs"] - after_first,
                   "peak_alloc_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 2) if cuda else None}
            steady = vae.steady_decoder
            if steady is not None:
                row.update(captures=steady.captures, replays=steady.replays, graphs_failed=steady.failed)
            if variant == "eager":
                references[size] = pieces
            elif size in references:
                row["vs_eager"] = compare(references[size], pieces)
                row["second_stream_vs_eager"] = compare(references[size][:3], second_pieces)
            clamped = torch.cat([p.flatten() for p in pieces])
            row["clamped_share"] = round(float(((clamped == 0) | (clamped == 255)).float().mean()), 4)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "decode.json").write_text(json.dumps(report, indent=1))
            if args.profile and variant in ("eager", "compiled", "graphs_cl"):
                profile(vae, inputs[size], f"{size}_{variant}", out, sync)
    print(f"\n| size | variant | s/block | first block | compiles (2nd stream) | peak GiB | vs eager max/mean/PSNR |")
    print("|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        vs = row.get("vs_eager")
        numbers = f"{vs['max_abs']} / {vs['mean_abs']} / {vs['psnr_db']} dB" if vs else "—"
        print(f"| {row['size']} | {row['variant']} | {row['block_s']} | {row['first_block_s']} | "
              f"{row['compiles']} ({row['compiles_second_stream']}) | {row['peak_alloc_gib']} | {numbers} |")
    return 0


def profile(vae, latents, size: str, out: Path, sync) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    decoder = vae.stream_decoder()
    decoder.decode(latents[:, :, :10])
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.decode(latents[:, :, 10:13])
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    (out / f"profile_decode_{size.replace('*', 'x')}.txt").write_text(table)
    print(table[:3000], flush=True)


if __name__ == "__main__":
    sys.exit(main())
