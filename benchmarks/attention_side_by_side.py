"""Judge the quantised attention on your own checkpoint: the same request (same seed) rendered with bf16
attention and with ``--attention int8`` (or fp8), written side by side (bf16 left) into one mp4 with the
audio, and the PSNR of every frame of the quantised video against the bf16 one printed.

    PYTHONPATH=src python benchmarks/attention_side_by_side.py --ckpt_dir ckpt/Wan2.2-S2V-14B \\
        --image portrait.jpg --audio speech.wav --prompt "a woman talking" --attention int8 \\
        --output side_by_side.mp4 [--num_clip 2 --size 704*384 --sample_steps 4 --weights fp8]

The bf16 frames are kept in memory until the quantised run has made its own (about 0.8 MB per frame at
704*384; 2 clips = 93 frames by default). Where the quantised kernel cannot run (the CPU, GPUs before
sm_89) both runs use bf16 and every PSNR is infinite.
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when they are equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--audio", required=True)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--attention", choices=("int8", "fp8"), default="int8")
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--num_clip", type=int, default=2)
    parser.add_argument("--sample_steps", type=int, default=4)
    parser.add_argument("--base_seed", type=int, default=420)
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--lora", default=None, help="the LoRA (default: the release's, as `generate`)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from liveavatar.api import LiveAvatarPipeline
    from liveavatar.checkpoints.layout import LORA_REPO
    from liveavatar.geometry import FPS
    from liveavatar.io.video_writer import Mp4Writer, check_output_path
    from liveavatar.options import RequestOptions
    from liveavatar.request import resolve_request

    check_output_path(args.output, overwrite=args.overwrite)
    pipe = LiveAvatarPipeline.from_pretrained(args.ckpt_dir, lora=args.lora or LORA_REPO, device=args.device,
                                              fp8=args.weights == "fp8")

    def request(attention: str):
        options = RequestOptions(size=args.size, num_clip=args.num_clip, sample_steps=args.sample_steps,
                                 base_seed=args.base_seed, attention=attention)
        return resolve_request(args.image, args.audio, args.prompt, options)

    print("rendering with bf16 attention", flush=True)
    reference = [frame.image for frame in pipe.stream(request("bf16"))]
    quantised = request(args.attention)
    height, width = quantised.geometry.height, quantised.geometry.width
    print(f"rendering with {pipe.engine.self_attention(args.attention).name}", flush=True)
    values = []
    with Mp4Writer(args.output, width=2 * width, height=height, fps=FPS, audio_path=args.audio,
                   overwrite=args.overwrite) as writer:
        for frame, left in zip(pipe.stream(quantised), reference):
            values.append(psnr(frame.image, left))
            print(f"frame {frame.index:5d}  PSNR {values[-1]:6.2f} dB", flush=True)
            writer.write(np.concatenate([left, frame.image], axis=1))
    finite = [v for v in values if math.isfinite(v)]
    summary = (f"mean {sum(finite) / len(finite):.2f} dB, min {min(finite):.2f} dB" if finite
               else "every frame identical")
    print(f"{len(values)} frames, PSNR of {args.attention} against bf16: {summary}; wrote {writer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
