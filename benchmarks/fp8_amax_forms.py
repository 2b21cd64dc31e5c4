"""The per-tensor FP8 activation quantiser's amax on one GPU, in the three places a DiT block compiles it:
after the attention (the o projection's input, made by an extern kernel), after the FFN's GELU, and after a
layer norm with the modulation. Each compiled region ends in `quantize_per_tensor`'s codes and scale; the
amax is taken over the whole tensor at once ("flat", as before) or as the maxima of the rows reduced once
more ("rows", `liveavatar.runtime.fp8.tensor_amax`), which must give the same codes bit for bit.

    python benchmarks/fp8_amax_forms.py            # 3168 tokens (one 704*384 block) and 1152 (384*256)

Prints one JSON line per (tokens, place, form): microseconds per region call (CUDA events, median of 5 runs
of 20 calls after a warm-up that compiles), the region's kernels with their microseconds, and whether the
codes and scale equal the flat form's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from fp8_activation_scale import median_call_us  # noqa: E402


def quantize(x: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's quantiser ("rows"), or the same with the amax taken over the whole tensor at once."""
    from liveavatar.runtime.fp8 import FP8_DTYPE, FP8_MAX, quantize_per_tensor, scale_for_amax

    if form == "rows":
        return quantize_per_tensor(x)
    scale = scale_for_amax(x.abs().amax().float())
    return x.to(torch.float32).mul(scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.reciprocal()


def after_attention(attended: torch.Tensor, form: str):
    return quantize(attended.flatten(-2).reshape(-1, attended.shape[-2] * attended.shape[-1]), form)


def after_gelu(hidden: torch.Tensor, form: str):
    return quantize(F.gelu(hidden, approximate="tanh"), form)


def after_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, form: str):
    normed = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    return quantize((normed * (1 + scale) + shift).to(torch.bfloat16).reshape(-1, x.shape[-1]), form)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="3168,1152")
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--heads", type=int, default=40)
    args = parser.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from liveavatar.models.attention import attention

    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    for tokens in (int(t) for t in args.tokens.split(",")):
        q, k, v = (torch.randn(1, tokens, args.heads, args.dim // args.heads, device=device, dtype=dtype)
                   for _ in range(3))
        places = {
            "after_attention": (after_attention, (attention(q, k, v),)),  # the strides the kernel returns
            "after_gelu": (after_gelu, (torch.randn(tokens, args.ffn, device=device, dtype=dtype),)),
            "after_norm": (after_norm, (4 * torch.randn(1, tokens, args.dim, device=device),
                                        0.1 * torch.randn(args.dim, device=device),
                                        0.1 * torch.randn(args.dim, device=device))),
        }
        for place, (function, inputs) in places.items():
            baseline = None
            for form in ("flat", "rows"):
                torch._dynamo.reset()
                compiled = torch.compile(function, dynamic=False, fullgraph=True)
                with torch.no_grad():
                    for _ in range(3):
                        codes, inverse = compiled(*inputs, form)
                    torch.cuda.synchronize()
                    us_per_call = median_call_us(compiled, *inputs, form)
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        compiled(*inputs, form)
                        torch.cuda.synchronize()
                kernels = {e.key[:70]: round(e.self_device_time_total, 1) for e in prof.key_averages()
                           if e.self_device_time_total > 0}
                if baseline is None:
                    baseline = (codes.view(torch.uint8).clone(), inverse.clone())
                same = bool(torch.equal(codes.view(torch.uint8), baseline[0]) and torch.equal(inverse, baseline[1]))
                print(json.dumps({"tokens": tokens, "place": place, "form": form,
                                  "input_strides": list(inputs[0].stride()),
                                  "us_per_call": round(us_per_call, 1), "same_as_flat": same,
                                  "kernels_us": kernels}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
