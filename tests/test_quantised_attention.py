"""The quantised self-attention (`liveavatar.models.quantised_attention`): the PyTorch reference against exact
attention, the Triton kernel against the reference under Triton's CPU interpreter, the fallback, and (on
an FP8-capable GPU) the compiled op and CUDA-graph replay against eager."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from liveavatar.models.attention import attention
from liveavatar.models.quantised_attention import SelfAttention, kernel_problem, resolve_self_attention
from liveavatar.models.sage_reference import BLOCK_N, reference_attention


def _inputs(lq=150, lk=200, heads=2, dim=64, key_bias=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, lq, heads, dim, generator=gen)
    k = torch.randn(1, lk, heads, dim, generator=gen) + key_bias * torch.randn(1, 1, heads, dim, generator=gen)
    return q, k, torch.randn(1, lk, heads, dim, generator=gen)


def _relative_max(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("mode, bound", [("int8", 0.06), ("fp8", 0.12)])
def test_reference_is_close_to_exact_attention(mode, bound):
    q, k, v = _inputs()
    error = _relative_max(reference_attention(q, k, v, mode), attention(q, k, v))
    assert 1e-4 < error < bound  # quantised (not exact), and within what the method gives on random data


def test_key_smoothing_makes_a_channel_bias_on_k_free():
    q, k, v = _inputs(key_bias=0.0)
    bias = 40 * torch.randn(1, 1, 2, 64, generator=torch.Generator().manual_seed(1))
    smoothed = reference_attention(q, k + bias, v, "int8")
    # Exact attention ignores the bias (softmax is shift-invariant per query); with the mean subtracted the
    # quantised K is the same up to the float rounding of the mean (which moves a few INT8 roundings).
    # Unsmoothed, the bias would set K's scales and its INT8 step would grow 10-fold.
    assert _relative_max(smoothed, reference_attention(q, k, v, "int8")) < 1e-2


_INTERPRETED_KERNEL_CHECK = """
import torch
from liveavatar.models import sage_kernels
from liveavatar.models.attention import attention
from liveavatar.models.sage_reference import BLOCK_N, reference_attention
from test_quantised_attention import _inputs, _relative_max

q, k, v = _inputs(lq=130, lk=BLOCK_N * 2 + 9)  # a partial query block and a partial key block
for mode in ("int8", "fp8"):
    kernel = sage_kernels.quantised_attention(q, k, v, mode == "int8")
    assert _relative_max(kernel, reference_attention(q, k, v, mode)) < 1e-5, mode
bf16 = sage_kernels.quantised_attention(*(t.bfloat16() for t in (q, k, v)), True)
# The method's own error at this size is 0.058 (int8) / 0.073 (fp8) of the largest output, with K blocks of 64 or
# 128 keys alike (measured with the reference); bf16 inputs add their rounding.
assert bf16.dtype == torch.bfloat16 and _relative_max(bf16, attention(q, k, v)) < 0.08
print("kernel matches")
"""


def test_kernel_matches_the_reference_in_the_triton_interpreter():
    pytest.importorskip("triton")
    # Triton reads TRITON_INTERPRET when it is imported (its library functions are jit-decorated then), so
    # the interpreted kernel runs in a process of its own.
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    run = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNEL_CHECK], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "kernel matches" in run.stdout, run.stderr[-3000:]


def test_cpu_falls_back_to_bf16_with_one_notice():
    with pytest.warns(UserWarning, match="--attention int8: .*cpu.*runs in bf16"):
        choice = resolve_self_attention("int8", "cpu")
    assert (choice.mode, choice.runs, choice.implementation) == ("int8", "bf16", "sdpa")
    assert choice.name.startswith("bf16 (int8 asked")
    q, k, v = _inputs()
    assert torch.equal(choice(q, k, v), attention(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_self_attention("bf16", "cpu") == SelfAttention()
        assert "PyTorch reference" in resolve_self_attention("fp8", "cpu", reference=True).name
    with pytest.raises(ValueError, match="attention 'int4': expected one of bf16, int8, fp8"):
        resolve_self_attention("int4", "cpu")


needs_kernel = pytest.mark.skipif(kernel_problem("cuda" if torch.cuda.is_available() else "cpu", 128) is not None,
                                  reason="needs an FP8-capable NVIDIA GPU with Triton")


@needs_kernel
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_gpu_kernel_graph_replay_and_compile_match_eager(mode):
    op = resolve_self_attention(mode, "cuda", head_dim=128)
    q, k, v = (t.cuda().bfloat16() for t in _inputs(lq=300, lk=1000, heads=4, dim=128))
    assert _relative_max(op(q, k, v), reference_attention(q, k, v, mode)) < 2e-2
    static = [t.clone() for t in (q, k, v)]
    op(*static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op(*static)
    fresh = [t.cuda().bfloat16() for t in _inputs(lq=300, lk=1000, heads=4, dim=128, seed=1)]
    for buffer, value in zip(static, fresh):
        buffer.copy_(value)
    graph.replay()
    assert torch.equal(captured, op(*fresh))
    compiled = torch.compile(lambda q, k, v: op(q * 2, k, v), fullgraph=True)
    assert torch.equal(compiled(q, k, v), op(q * 2, k, v))


def test_an_engine_resolves_each_mode_once():
    from liveavatar.runtime.engine import Engine
    from liveavatar.runtime.placement import Placement

    engine = Engine(None, None, None, None, placement=Placement(), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.warns(UserWarning, match="--attention fp8"):
        first = engine.self_attention("fp8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second notice
        assert engine.self_attention("fp8") is first and first.runs == "bf16"


def test_attention_is_a_request_option_the_server_and_the_planner_carry():
    from liveavatar.errors import ArgumentError
    from liveavatar.geometry import ClipGeometry
    from liveavatar.options import RequestOptions
    from liveavatar.runtime.planner.memory import Workload
    from liveavatar.serve.uploads import Limits, form_options

    limits = Limits(upload_bytes=2**20, audio_seconds=60.0, max_area=704 * 384, max_steps=4, default_size="704*384",
                    default_attention="int8")
    assert form_options({}, limits).attention == "int8"  # the server's default
    assert form_options({"attention": " FP8 "}, limits).attention == "fp8"  # a request's own
    with pytest.raises(ArgumentError, match="attention 'int4': expected one of bf16, int8, fp8"):
        RequestOptions(attention="int4")
    options = RequestOptions(attention="int8")
    assert Workload.of(ClipGeometry(384, 704, 48), options, run_dtype_bytes=2).attention == "int8"
