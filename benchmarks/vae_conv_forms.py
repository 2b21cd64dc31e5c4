"""Where the streaming VAE decode's time goes, convolution by convolution, and which form of each runs fastest.

    python benchmarks/vae_conv_forms.py [--size 704*384]                  # GPU
    python benchmarks/vae_conv_forms.py --device cpu --tiny --size 64*64  # smoke test

Records every convolution of one steady block (3 latent frames, after a stream's 7 warm-up latents) of the
streaming decoder at full width with random weights, with the input it got; then times each recorded call in
several forms and sums them: the eager decoder's own call (``conv3d``, NCDHW), the same in channels_last_3d,
and a causal 3x3x3 convolution as one 2-D convolution over the three frames each output frame reads, stacked on
the channels (``stacked2d``: the input gathered as [T_out, 3C, H, W] and the weight as [C_out, 3C, 3, 3]; same
sums, other order), NCHW and channels_last, or as three 2-D convolutions over frame-shifted views of a
channels_last_3d input, summed (``summed2d_cl``: no gather). Each form with cuDNN's algorithm search off and on
(torch.backends.cudnn.benchmark). The 2-D convolutions (spatial resampling) are timed as they are. Prints the
per-form totals (ms per block), the top layers, and the largest difference of each form from the eager call.
Writes $OUT/vae_conv_forms.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F


def record_convs(vae, latents: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None, dict]]:
    """(kind, input, weight, bias, keyword arguments) of every convolution of one steady block."""
    calls = []
    originals = {"conv3d": F.conv3d, "conv2d": F.conv2d}

    def recorder(kind):
        def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            # The decoder runs under autocast: its convolutions compute in the weights' dtype.
            calls.append((kind, x.detach().to(weight.dtype).clone(), weight, bias,
                          dict(stride=stride, padding=padding, dilation=dilation, groups=groups)))
            return originals[kind](x, weight, bias, stride, padding, dilation, groups)
        return conv

    decoder = vae.stream_decoder()
    decoder.decode(latents[:, :, :7])
    torch.nn.functional.conv3d, torch.nn.functional.conv2d = recorder("conv3d"), recorder("conv2d")
    try:
        decoder.decode(latents[:, :, 7:10])
    finally:
        torch.nn.functional.conv3d, torch.nn.functional.conv2d = originals["conv3d"], originals["conv2d"]
    return calls


def stacked2d(x: torch.Tensor, weight: torch.Tensor, bias, memory_format) -> torch.Tensor:
    """A stride-1 3-D convolution without temporal padding as one 2-D convolution: output frame t reads input
    frames t..t+kt-1, stacked on the channel axis."""
    b, c, t, h, w = x.shape
    kt = weight.shape[2]
    frames = t - kt + 1
    stacked = torch.stack([x[:, :, i:i + frames] for i in range(kt)], dim=1)  # [b, kt, c, frames, h, w]
    stacked = stacked.permute(0, 3, 1, 2, 4, 5).reshape(b * frames, kt * c, h, w)
    flat_weight = weight.permute(0, 2, 1, 3, 4).reshape(weight.shape[0], kt * c, *weight.shape[3:])
    out = F.conv2d(stacked.contiguous(memory_format=memory_format), flat_weight.contiguous(memory_format=memory_format),
                   bias)
    return out.reshape(b, frames, -1, *out.shape[-2:]).permute(0, 2, 1, 3, 4)


def summed2d(x_cl: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """The same as ``kt`` 2-D convolutions over frame-shifted views, summed: with the activations in
    channels_last_3d a run of frames is already a channels_last batch of images, so nothing is copied."""
    b, c, t, h, w = x_cl.shape
    kt = weight.shape[2]
    frames = t - kt + 1
    images = x_cl.permute(0, 2, 1, 3, 4)  # [b, t, c, h, w], a view
    out = None
    for i in range(kt):
        tap = weight[:, :, i].contiguous(memory_format=torch.channels_last)
        part = F.conv2d(images[:, i:i + frames].reshape(b * frames, c, h, w), tap, bias if i == 0 else None)
        out = part if out is None else out.add_(part)
    return out.reshape(b, frames, -1, *out.shape[-2:]).permute(0, 2, 1, 3, 4)


def forms(kind: str, x, weight, bias, kwargs):
    """name -> a callable computing the call in that form (only the forms that apply to it)."""
    conv = F.conv3d if kind == "conv3d" else F.conv2d
    cl = torch.channels_last_3d if kind == "conv3d" else torch.channels_last
    x_cl, w_cl = x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl)
    out = {"native": lambda: conv(x, weight, bias, **kwargs), "channels_last": lambda: conv(x_cl, w_cl, bias, **kwargs)}
    plain = kwargs["stride"] in (1, (1, 1, 1)) and kwargs["padding"] in (0, (0, 0, 0)) and kwargs["groups"] == 1
    if kind == "conv3d" and plain and weight.shape[2] > 1:
        out["stacked2d"] = lambda: stacked2d(x, weight, bias, torch.contiguous_format)
        out["stacked2d_cl"] = lambda: stacked2d(x, weight, bias, torch.channels_last)
        out["summed2d_cl"] = lambda: summed2d(x_cl, weight, bias)
    return out


def time_call(fn, sync, repeats: int) -> float:
    fn()
    sync()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - began) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="base width 8 (smoke test)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    from liveavatar.models.vae import VAEConfig
    from liveavatar.runtime.bench import random_vae

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_grad_enabled(False)
    vae = random_vae(VAEConfig(base_dim=8) if args.tiny else VAEConfig(), device=device, dtype=dtype,
                     generator=torch.Generator(device).manual_seed(0))
    width, height = (int(v) for v in args.size.split("*"))
    latents = torch.randn(1, 16, 10, height // 8, width // 8, generator=torch.Generator("cpu").manual_seed(1))
    calls = record_convs(vae, latents.to(device))
    totals: dict[str, dict[str, float]] = {}
    worst: dict[str, float] = defaultdict(float)
    layers = []
    for search in (False, True):
        torch.backends.cudnn.benchmark = search
        for index, (kind, x, weight, bias, kwargs) in enumerate(calls):
            candidates = forms(kind, x, weight, bias, kwargs)
            reference = candidates["native"]().float()
            row = {"index": index, "kind": kind, "input": list(x.shape), "weight": list(weight.shape),
                   "cudnn_benchmark": search}
            for name, fn in candidates.items():
                key = f"{name}{'+search' if search else ''}"
                row[key] = time_call(fn, sync, args.repeats) * 1000
                # A form that does not apply to this call counts it in the native form.
                worst[key] = max(worst[key], float((fn().float() - reference).abs().max()))
            for name in ("native", "channels_last", "stacked2d", "stacked2d_cl", "summed2d_cl"):
                key = f"{name}{'+search' if search else ''}"
                totals.setdefault(key, {"ms": 0.0})["ms"] += row.get(key, row[f"native{'+search' if search else ''}"])
            layers.append(row)
    report = {"size": args.size, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__, "calls": len(calls), "totals_ms_per_block": totals,
              "max_abs_vs_native": worst, "layers": layers}
    (Path(os.environ.get("OUT", ".")) / "vae_conv_forms.json").write_text(json.dumps(report, indent=1))
    print(f"{len(calls)} convolutions per steady block at {args.size}; ms per block (sum of the calls):")
    for key, total in sorted(totals.items(), key=lambda item: item[1]["ms"]):
        print(f"  {key:24s} {total['ms']:8.2f} ms   max |diff| vs native {worst.get(key, 0.0):.3g}")
    slowest = sorted((r for r in layers if not r["cudnn_benchmark"]), key=lambda r: -r["native"])[:8]
    for row in slowest:
        forms_ms = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float))
        print(f"  #{row['index']} {row['kind']} in {row['input']} w {row['weight']}: {forms_ms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
