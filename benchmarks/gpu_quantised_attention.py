"""The quantised self-attention kernel at the real shape, on one GPU: correctness against the PyTorch
reference and the exact attention, speed against PyTorch's bf16 SDPA backends (cuDNN, flash), a sweep of
kernel tilings, CUDA-graph replay against eager, and the op inside ``torch.compile``.

    PYTHONPATH=src python3 benchmarks/gpu_quantised_attention.py [--json OUT.json]

Default shape: one 704*384 block's self-attention per layer (3168 queries; 15312 keys = the 4-block KV
window + the condition tokens; 40 heads of 128). K gets a per-channel bias (the outliers K smoothing is for).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from liveavatar.models.quantised_attention import kernel_problem, resolve_self_attention
from liveavatar.models.sage_reference import reference_attention

SWEEP = ((64, 8, 3), (128, 8, 3), (128, 4, 3), (128, 8, 4), (128, 8, 2))


def relative(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"max": ((a - b).abs().max() / b.abs().max()).item(), "mean": ((a - b).abs().mean() / b.abs().mean()).item()}


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lq", type=int, default=3168)
    parser.add_argument("--lk", type=int, default=15312)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=150, help="stop the tiling sweep past this")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    problem = kernel_problem("cuda" if torch.cuda.is_available() else "cpu", args.dim)
    if problem:
        print(f"this benchmark needs the kernel: {problem}", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    from liveavatar.models import sage_kernels

    began = time.perf_counter()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "shape": vars(args)}
    print(report, flush=True)
    gen = torch.Generator("cuda").manual_seed(0)
    shape_q, shape_k = (1, args.lq, args.heads, args.dim), (1, args.lk, args.heads, args.dim)

    def inputs():
        q = torch.randn(shape_q, device="cuda", generator=gen)
        bias = 2 * torch.randn(1, 1, args.heads, args.dim, device="cuda", generator=gen)
        k = torch.randn(shape_k, device="cuda", generator=gen) + bias
        return q.bfloat16(), k.bfloat16(), torch.randn(shape_k, device="cuda", generator=gen).bfloat16()

    q, k, v = inputs()
    exact = sdpa(q.float(), k.float(), v.float())
    report["accuracy"] = {"bf16 sdpa vs exact": relative(sdpa(q, k, v), exact)}
    for mode in ("int8", "fp8"):
        kernel = resolve_self_attention(mode, "cuda", head_dim=args.dim)(q, k, v)
        reference = reference_attention(q, k, v, mode)
        report["accuracy"][mode] = {"kernel vs reference": relative(kernel, reference),
                                    "kernel vs exact": relative(kernel, exact),
                                    "reference vs exact": relative(reference, exact)}
    del exact
    print(json.dumps(report["accuracy"], indent=1), flush=True)

    flops = 4 * args.lq * args.lk * args.heads * args.dim
    timings = report["ms"] = {}

    def timed(name, fn):
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        timings[name] = {"ms": ms, "tflops": flops / ms / 1e9}
        print(f"{name}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOPS", flush=True)

    timed("bf16 sdpa (default)", lambda: sdpa(q, k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(backend):
                timed(f"bf16 sdpa ({backend.name})", lambda: sdpa(q, k, v))
        except RuntimeError as error:
            timings[f"bf16 sdpa ({backend.name})"] = str(error).splitlines()[0]
    for mode in ("int8", "fp8"):
        int8 = mode == "int8"
        op = resolve_self_attention(mode, "cuda", head_dim=args.dim)
        timed(f"{mode} op (quantise + attend)", lambda: op(q, k, v))
        timed(f"{mode} quantise", lambda: sage_kernels.quantise(q, k, v, int8))
        for block_n, warps, stages in SWEEP:
            if time.perf_counter() - began > args.budget_s:
                break
            config = sage_kernels.KernelConfig(block_n, warps, stages)
            prepared, out = sage_kernels.quantise(q, k, v, int8, config), torch.empty_like(q)
            try:
                timed(f"{mode} attend {block_n}x{warps}w{stages}s", lambda: sage_kernels.attend(prepared, out, config))
            except Exception as error:  # a tiling the compiler rejects (shared memory): recorded, not fatal
                timings[f"{mode} attend {block_n}x{warps}w{stages}s"] = f"{type(error).__name__}: {error}"[:200]

    # CUDA graph: captured once, replayed on new inputs copied into the captured buffers, against eager.
    graph_checks = report["cuda_graph_replay_equals_eager"] = {}
    for mode in ("int8", "fp8"):
        op = resolve_self_attention(mode, "cuda", head_dim=args.dim)
        static = [t.clone() for t in (q, k, v)]
        op(*static)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            captured = op(*static)
        torch.cuda.current_stream().wait_stream(stream)
        fresh = inputs()
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        graph_checks[mode] = bool(torch.equal(captured, op(*fresh)))
    compiled_checks = report["compiled_equals_eager"] = {}
    for mode in ("int8", "fp8"):
        op = resolve_self_attention(mode, "cuda", head_dim=args.dim)

        def block(q, k, v):
            return op(q * 2.0, k, v).float().sum(-1)

        start = time.perf_counter()
        compiled = torch.compile(block, fullgraph=True)(q, k, v)
        compiled_checks[mode] = {"equal": bool(torch.allclose(compiled, block(q, k, v), rtol=1e-3, atol=1e-3)),
                                 "compile_s": round(time.perf_counter() - start, 1)}
    report["wall_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps({k: report[k] for k in ("cuda_graph_replay_equals_eager", "compiled_equals_eager", "wall_s")}),
          flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
