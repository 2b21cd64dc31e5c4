"""The fast path on the CPU: compiled regions against eager (and how often they compile), the CUDA-graph
runner's bookkeeping with a stand-in graph, the RoPE tables, the fast-path policy."""
import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from liveavatar.geometry import ClipGeometry
from liveavatar.models.regions import EAGER
from liveavatar.models.rope import GridRotation, block_positions, rotation
from liveavatar.models.tiny import save_tiny_transformer
from liveavatar.models.transformer import CausalS2VTransformer
from liveavatar.runtime.caches import JoinedKVCache, build_caches
from liveavatar.runtime.compile import (
    COMPILE_ENV,
    GRAPHS_ENV,
    FastPath,
    compile_counters,
    compile_regions,
    configure_compiler,
    resolve_fast_path,
)
from liveavatar.runtime.executors import BlockJob, ForwardGraphs, SequentialExecutor
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.planner.speed import forward_path
from liveavatar.runtime.schedule import FlowMatchSchedule

# 64x128 pixels: an 8x16 latent, 32 tokens per frame; 48-frame clips are 4 blocks, the KV ring one clip.
GEOMETRY = ClipGeometry(64, 128, 48)
STEPS = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_transformer(tmp_path_factory.mktemp("dit"), seed=4)


def _model(folder):
    return CausalS2VTransformer.from_pretrained(folder, device="cpu", dtype=torch.float32)


def _requests(model, placement, *, requests=2, blocks=6, graphs=None, after_block=None):
    """Per request: sink prefill, ``blocks`` blocks (the first clip fills the KV window, block 4 wraps the
    ring and follows a sink refresh), a new text each request; returns every block's clean latents."""
    c = model.config
    caches = build_caches(model, placement, GEOMETRY, range(STEPS), device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    h, w = GEOMETRY.latent_height, GEOMETRY.latent_width
    outputs = []
    for _ in range(requests):
        caches.reset()
        text_kv = model.text_kv(torch.randn(6, c.text_dim, generator=g))
        executor = SequentialExecutor(model, caches, FlowMatchSchedule.create(STEPS), text_kv, graphs=graphs)
        ref, motion = torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 16, 19, h, w, generator=g)
        executor.prefill(ref, motion)
        for index in range(blocks):
            clip, block = divmod(index, GEOMETRY.blocks_per_clip)
            if index == GEOMETRY.blocks_per_clip:
                executor.prefill(ref * 0.5, motion)
            noise = torch.randn(16, 3, h, w, generator=g)
            audio = torch.randn(1, c.audio_layers, c.audio_dim, 12, generator=g)
            draws = tuple(9 + step for step in range(STEPS))
            executor.submit(BlockJob(clip, block, GEOMETRY.start_frame(clip, block), noise, audio, draws))
            outputs.append(executor.collect())
            if after_block is not None:
                after_block()
    caches.close()
    return outputs


def test_inductor_regions_match_eager_and_compile_only_in_the_first_block(folder, tmp_path):
    """Compiled with Inductor (C++ on the CPU): the same video as eager within float32 rounding, and after
    the first request's first block nothing compiles again: not while the KV window fills, at the ring
    wrap, at the sink refresh or in the second request."""
    configure_compiler(tmp_path)
    model = _model(folder)
    eager = _requests(model, Placement())
    fallback = compile_regions(model)
    counts = []
    compiled = _requests(model, Placement(), after_block=lambda: counts.append(compile_counters()["compiles"]))
    assert fallback.error is None
    assert counts[0] > 0 and len(set(counts)) == 1, counts  # the sink prefill's and the first block's shapes
    assert compile_counters()["graph_breaks"] == 0
    errors = [((a - b).norm() / a.norm()).item() for a, b in zip(eager, compiled)]
    assert max(errors) < 2e-5, errors  # float32 rounding of fused reductions, carried through the KV cache


def test_compiled_regions_serve_streamed_layers_and_host_caches_without_recompiling(folder):
    """A placement whose layers and caches stream from host memory (hooks, slot rebinding) runs the same
    compiled regions: bit-identical to eager with an eager backend, no compile after the first block."""
    placement = Placement(streamed_layers=(1, 2), kv_location="host", cond_location="host")
    from liveavatar.runtime.layer_streaming import place_dit

    eager_model, compiled_model = _model(folder), _model(folder)
    place_dit(eager_model, placement, "cpu")
    place_dit(compiled_model, placement, "cpu")
    eager = _requests(eager_model, placement, requests=1, blocks=5)
    compile_regions(compiled_model, backend="aot_eager")
    counts = []
    compiled = _requests(compiled_model, placement, requests=1, blocks=5,
                         after_block=lambda: counts.append(compile_counters()["compiles"]))
    assert len(set(counts)) == 1, counts
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_inductor_runs_streamed_layers_with_the_resident_bits(folder, tmp_path):
    """Compiled with Inductor, blocks whose weights stream through slots give the resident run's bits and
    compile nothing of their own (an H100's compiled one-GPU run that streamed 4 layers differed from a
    resident pipeline by up to 11 levels of 255; this keeps the CPU side of that question answered)."""
    configure_compiler(tmp_path)
    from liveavatar.runtime.layer_streaming import place_dit

    placement = Placement(streamed_layers=(1, 2))
    resident, streamed = _model(folder), _model(folder)
    place_dit(streamed, placement, "cpu")
    compile_regions(resident)
    compile_regions(streamed)
    expected = _requests(resident, Placement(), requests=1, blocks=5)
    compiles = compile_counters()["compiles"]
    got = _requests(streamed, placement, requests=1, blocks=5)
    assert compile_counters()["compiles"] == compiles
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


class RerunGraph:
    """A CPU stand-in for a CUDA graph: "replay" reruns what was recorded into the recorded output, so it
    sees new inputs only through the runner's static buffers (as a real graph would)."""

    def __init__(self, run):
        self.run = run
        self.output = run()

    def replay(self):
        self.output.copy_(self.run())


def test_graph_runner_replays_new_inputs_from_static_buffers(folder):
    model = _model(folder)
    plain = _requests(model, Placement(), requests=3)
    graphs = ForwardGraphs(model, capture=lambda run: ((graph := RerunGraph(run)), graph.output))
    replayed = _requests(model, Placement(), requests=3, graphs=graphs)
    for a, b in zip(plain, replayed):
        assert torch.equal(a, b)
    # Keys: (step, window length 1..4 blocks). Request 1 runs every key once directly and captures the
    # full-window ones on their second use; request 2 captures the fill-phase keys; request 3 only replays.
    forwards = 3 * 6 * STEPS
    assert graphs.captures == STEPS * GEOMETRY.blocks_per_clip
    assert graphs.direct == STEPS * GEOMETRY.blocks_per_clip
    assert graphs.replays == forwards - graphs.direct
    assert graphs.failed is None


class TracedGraph:
    """A stricter CPU stand-in: like a CUDA graph it freezes every host-side decision of the recorded
    forward. ``make_fx`` records the aten ops with every tensor they touch (weights, caches, static buffers,
    the KV set's write slot) held by reference, so a replay sees new values only through those tensors and
    writes where the recorded views point: a slot or window length baked in would show."""

    def __init__(self, run):
        self.graph = make_fx(run)()
        self.output = self.graph()

    def replay(self):
        self.output.copy_(self.graph())


def test_replayed_graphs_write_each_block_into_its_own_slot(folder):
    """Graphs recorded with the joined KV layout and replayed for later blocks (other ring slots, the sink
    refreshed, the next requests) give the forwards' results: the slot comes from the KV set's device
    index, the window length and the cond rows from the graph's key."""
    model = _model(folder)
    assert isinstance(build_caches(model, Placement(), GEOMETRY, [0], device="cpu", dtype=torch.float32
                                   ).kv_sets[0], JoinedKVCache)
    plain = _requests(model, Placement(), requests=2)
    graphs = ForwardGraphs(model, capture=lambda run: ((graph := TracedGraph(run)), graph.output))
    replayed = _requests(model, Placement(), requests=2, graphs=graphs)
    assert graphs.replays > graphs.captures > 0 and graphs.failed is None
    errors = [((a - b).norm() / a.norm()).item() for a, b in zip(plain, replayed)]
    assert max(errors) < 1e-5, errors  # traced ops may decompose composites (float32 rounding only)


def test_grid_rotation_equals_the_per_position_rotation():
    for dtype in (torch.float64, torch.float32):
        grid = GridRotation(32, dtype, "cpu")
        for start in (0, 27, 90_003):
            expected = rotation(block_positions(start, 3, 4, 8), 32, dtype)
            assert all(torch.equal(a, b) for a, b in zip(grid(start, 3, 4, 8), expected))


def test_fast_path_policy(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    monkeypatch.delenv(GRAPHS_ENV, raising=False)
    assert not resolve_fast_path("cpu").compile  # eager by default on the CPU
    assert resolve_fast_path("cpu", compile=True) == resolve_fast_path("cpu", compile=True)
    assert resolve_fast_path("cpu", compile=True).compile and not resolve_fast_path("cpu", compile=True).cuda_graphs
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert resolve_fast_path("cpu").compile
    assert not resolve_fast_path("cpu", compile=False).compile  # the argument wins over the environment
    monkeypatch.setenv(COMPILE_ENV, "off")
    assert resolve_fast_path("cpu").name == "eager"
    monkeypatch.setenv(COMPILE_ENV, "maybe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not resolve_fast_path("cpu").compile
    assert any(COMPILE_ENV in str(w.message) for w in caught)


def test_speed_model_gives_resident_placements_graphs():
    assert forward_path(Placement()) == "graphs"
    assert forward_path(Placement(streamed_layers=(3,))) == "compiled"
    assert forward_path(Placement(kv_location="host")) == "compiled"
    assert forward_path(Placement(), compiled=False) == "eager"
    assert EAGER.map(lambda name, function: function) == EAGER


def test_the_engine_gives_inductor_the_planned_compile_workers(folder, tmp_path, monkeypatch):
    """`Placement.compile_workers` reaches Inductor before anything compiles: 0 is one compile thread (no
    worker pool, the kernels compile in this process), None leaves Inductor's own count."""
    import torch._inductor.config as inductor

    from liveavatar.runtime.engine import Engine

    monkeypatch.setenv("LIVEAVATAR_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the engine points it at the cache; restored
    monkeypatch.setattr(inductor, "compile_threads", 7)
    compiled = FastPath(compile=True, cuda_graphs=False)
    for workers, threads in ((0, 1), (6, 6), (None, 6)):
        Engine(_model(folder), None, None, None, placement=Placement(compile_workers=workers),
               device=torch.device("cpu"), dtype=torch.float32, fast_path=compiled)
        assert inductor.compile_threads == threads


def test_compiler_chooses_kernel_tilings_by_rule_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    """Inductor's deterministic mode (no tiling chosen by timing) is on, so that every process compiles the
    same summation orders; a TORCHINDUCTOR_DETERMINISTIC the user exported is left as it is."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "deterministic", False)
    monkeypatch.delenv("TORCHINDUCTOR_DETERMINISTIC", raising=False)
    configure_compiler(tmp_path)
    assert inductor.deterministic is True
    monkeypatch.setattr(inductor, "deterministic", False)
    monkeypatch.setenv("TORCHINDUCTOR_DETERMINISTIC", "0")
    configure_compiler(tmp_path)
    assert inductor.deterministic is False
