"""The FP8 activation quantiser's scale rule on one GPU: one scale per tensor (the reference's) against one
per row (token), inside a compiled region shaped as a DiT block's FFN half (layer norm + modulation, FP8
linear 5120 -> 13824, tanh-GELU, FP8 linear 13824 -> 5120, gated residual) at the 14B widths.

    python benchmarks/fp8_activation_scale.py            # tokens of one 704*384 block (3168) and 384*256 (1152)

Per token count and kernel: microseconds per region call (CUDA events, median of 5 runs of 20 calls, after
a warm-up that compiles), kernels launched per call, and the relative L2 error of the region's output
against the same region with bf16 linears. Prints one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn


def region(ffn_in, ffn_out, x, shift, scale, gate):
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6)
    hidden = F.gelu(ffn_in((normed * (1 + scale) + shift).to(x.dtype)), approximate="tanh")
    return (x.float() + ffn_out(hidden).float() * gate).to(x.dtype)


def median_call_us(function, *args, runs: int = 5, calls: int = 20) -> float:
    """Microseconds per call of ``function(*args)``: CUDA events, the median of ``runs`` runs of ``calls``."""
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            function(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="3168,1152")
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    args = parser.parse_args(argv)

    from liveavatar.runtime.fp8 import FP8Linear

    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    linears = [nn.Linear(args.dim, args.ffn).to(device, dtype), nn.Linear(args.ffn, args.dim).to(device, dtype)]
    shift, scale, gate = (0.1 * torch.randn(args.dim, device=device) for _ in range(3))
    compiled = torch.compile(region, dynamic=False, fullgraph=True)
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(1, tokens, args.dim, device=device, dtype=dtype)
        x[:, : tokens // 10] *= 8  # some tokens far larger than the rest, as in a DiT's residual stream
        with torch.no_grad():
            reference = region(*linears, x, shift, scale, gate).float()
            for kernel in ("bf16", "scaled_mm", "scaled_mm_rows"):
                layers = linears if kernel == "bf16" else [FP8Linear.from_linear(l, kernel=kernel) for l in linears]
                for _ in range(3):
                    out = compiled(*layers, x, shift, scale, gate)
                torch.cuda.synchronize()
                us_per_call = median_call_us(compiled, *layers, x, shift, scale, gate)
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    compiled(*layers, x, shift, scale, gate)
                    torch.cuda.synchronize()
                kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
                error = float((out.float() - reference).norm() / reference.norm())
                print(json.dumps({"tokens": tokens, "kernel": kernel, "us_per_call": round(us_per_call, 1),
                                  "kernels_per_call": len(kernels), "rel_l2_vs_bf16_eager": round(error, 5),
                                  "kernel_names": sorted(set(k[:60] for k in kernels))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
