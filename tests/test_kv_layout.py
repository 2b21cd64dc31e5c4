"""The KV set that holds the cond rows beside its ring (`JoinedKVCache`) against the concatenating one
(`KVCache`, the reference's form): the same attention over a first clip that is not yet full and over a
ring that has wrapped, after a sink refresh, with whole-block and per-token writes; the ring counts from
the first token written."""
from types import SimpleNamespace

import pytest
import torch

from liveavatar.geometry import FRAMEPACK_BUCKETS, ClipGeometry
from liveavatar.models.attention import attention
from liveavatar.models.rope import GridRotation, apply_rotation, condition_positions, rotation, rotation_dtype
from liveavatar.models.transformer import CausalS2VTransformer, TransformerConfig
from liveavatar.runtime.caches import CondCache, JoinedKVCache, KVCache, build_caches
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.planner.hardware import HARDWARE_PRESETS
from liveavatar.runtime.planner.memory import Workload, dit_inventory, memory_components

LAYERS, HEADS, HEAD_DIM = 2, 3, 32
LATENT_HW = (8, 16)  # 4x8 tokens per frame
FRAME_TOKENS = 32


def _cond(dtype, generator, scale=1.0, spare=5, into=None):
    """A prefilled cond cache of random rows (``into``: prefill that one)."""
    positions = condition_positions(*LATENT_HW, ref_frame=30, buckets=FRAMEPACK_BUCKETS)
    cond = into or CondCache(num_layers=LAYERS, capacity=positions.shape[0] + spare, num_heads=HEADS,
                             head_dim=HEAD_DIM, dtype=dtype)
    cond.begin(positions, FRAME_TOKENS, LATENT_HW)
    cos_sin = rotation(positions, HEAD_DIM, rotation_dtype(dtype))
    for layer in range(LAYERS):
        k, v = (scale * torch.randn(1, positions.shape[0], HEADS, HEAD_DIM, generator=generator).to(dtype)
                for _ in "kv")
        cond.write(layer, k, v, apply_rotation(k, *cos_sin))
    return cond


def _run(caches, cond_caches, dtype, *, block_frames, starts, refresh_at):
    """Attention outputs of every (block, step, layer), step i through ``caches[i]`` (one KV set per step,
    as the sampler runs them); the sink is refreshed before block ``refresh_at`` (``cond_caches``: the two
    prefilled cond caches, or a function of the block index that prefills one when the sink changes).
    Same random inputs for every run."""
    generator = torch.Generator().manual_seed(11)
    grid = GridRotation(HEAD_DIM, rotation_dtype(dtype), "cpu")
    cond_of = cond_caches if callable(cond_caches) else lambda index: cond_caches[index >= refresh_at]
    outputs = []
    for index, start_frame in enumerate(starts):
        cond = cond_of(index)
        tokens = block_frames * FRAME_TOKENS
        motion = rotation(cond.positions[cond.ref_tokens:], HEAD_DIM, rotation_dtype(dtype))
        for step, cache in enumerate(caches):
            cache.reserve(start_frame * FRAME_TOKENS, tokens)
            cache.sync_cond(cond, motion)
            ref_cos, ref_sin = grid(30 + 7 * index + step, 1, 4, 8)  # the reference frame rolls every forward
            cond_rotation = (torch.cat([ref_cos, motion[0]]), torch.cat([ref_sin, motion[1]]))
            for layer in range(LAYERS):
                q, k, v = (torch.randn(1, tokens, HEADS, HEAD_DIM, generator=generator).to(dtype) for _ in "qkv")
                keys, values = cache.attention_inputs(layer, k, v, cond, cond_rotation, apply_rotation)
                outputs.append((keys.shape[1], attention(q, keys, values).float()))
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_frames, capacity_frames", [(3, 12), (2, 7)])
@pytest.mark.parametrize("layout", ["cond first", "ring first", "pair"])
def test_joined_layout_attends_like_the_concatenation(dtype, block_frames, capacity_frames, layout):
    """Two steps' KV sets, alone ([cond | ring] or [ring, filled from its end | cond], cond rows shorter than
    their capacity) or as a pair sharing one copy of the cond rows ([ring A | cond | ring B]); 3-frame
    blocks in a 4-block ring (whole-slot writes) and 2-frame blocks in a 7-frame ring (per-token writes,
    blocks straddling the wrap): 6 blocks fill the first clip, wrap the ring and follow a sink refresh.
    [cond | ring] gives the concatenation's attention exactly (the same keys in the same order); a ring
    before the cond rows orders its keys otherwise: float rounding (measured max abs 7e-7 float32, 1e-3 bf16)."""
    paired = layout == "pair"
    generator = torch.Generator().manual_seed(5)
    positions = condition_positions(*LATENT_HW, ref_frame=30, buckets=FRAMEPACK_BUCKETS).shape[0]
    spare = 0 if paired else 5
    conds = [_cond(dtype, generator, spare=spare), _cond(dtype, generator, scale=0.5, spare=spare)]
    dims = dict(num_layers=LAYERS, capacity=capacity_frames * FRAME_TOKENS, num_heads=HEADS, head_dim=HEAD_DIM,
                dtype=dtype)
    joined = JoinedKVCache.pair(cond_capacity=positions, **dims) if paired else \
        [JoinedKVCache(cond_capacity=positions + spare, ring_first=layout == "ring first", **dims) for _ in range(2)]
    concatenating = [KVCache(**dims) for _ in range(2)]
    run = dict(block_frames=block_frames, starts=[block_frames * b for b in range(6)], refresh_at=4)
    want = _run(concatenating, conds, dtype, **run)
    got = _run(joined, conds, dtype, **run)
    assert joined[0].slot_tokens == (block_frames * FRAME_TOKENS if capacity_frames % block_frames == 0 else 1)
    assert [n for n, _ in got] == [n for n, _ in want]
    assert want[0][0] < want[-1][0]  # the first clip's window was not full, the last one is
    worst = max((a - b).abs().max().item() for (_, a), (_, b) in zip(got, want))
    if layout == "cond first":
        assert worst == 0.0, worst
    else:
        assert 0.0 < worst < (2e-6 if dtype == torch.float32 else 4e-3), worst
    # The rings hold what the concatenating caches hold, position by position.
    for cache, reference in zip(joined, concatenating):
        for layer in range(LAYERS):
            for a, b in zip(cache.ring_entries(layer), reference.ring_entries(layer)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_resident_cond_cache_writes_the_sets_rows_during_the_prefill(dtype):
    """`build_caches`' resident form: the cond cache writes the values and roped motion keys into the
    pair's shared buffer during the prefill and keeps only the reference frame's keys (what the planner
    counts); the attention is exactly the one of a pair that copies them from a full cond cache."""
    model = SimpleNamespace(config=SimpleNamespace(num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM))
    geometry = ClipGeometry(8 * LATENT_HW[0], 8 * LATENT_HW[1], 48)
    caches = build_caches(model, Placement(), geometry, range(2), device="cpu", dtype=dtype)
    assert caches.cond.nbytes == LAYERS * FRAME_TOKENS * HEADS * HEAD_DIM * dtype.itemsize
    run = dict(block_frames=3, starts=[3 * b for b in range(6)], refresh_at=4)
    generator = torch.Generator().manual_seed(5)
    conds = [_cond(dtype, generator, spare=0), _cond(dtype, generator, scale=0.5, spare=0)]
    pulled = JoinedKVCache.pair(num_layers=LAYERS, capacity=geometry.kv_tokens, cond_capacity=geometry.cond_tokens,
                                num_heads=HEADS, head_dim=HEAD_DIM, dtype=dtype)
    want = _run(pulled, conds, dtype, **run)
    generator = torch.Generator().manual_seed(5)

    def prefill(index):
        if index in (0, run["refresh_at"]):
            _cond(dtype, generator, scale=0.5 if index else 1.0, into=caches.cond)
        return caches.cond

    got = _run([caches.kv_sets[0], caches.kv_sets[1]], prefill, dtype, **run)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    with pytest.raises(RuntimeError, match="reference frame"):
        caches.cond.entries(0)


def test_a_reversed_ring_refuses_to_mix_slot_and_token_writes():
    first, _ = JoinedKVCache.pair(num_layers=1, capacity=4 * FRAME_TOKENS, cond_capacity=8, num_heads=HEADS,
                                  head_dim=HEAD_DIM)
    first.reserve(0, 2 * FRAME_TOKENS)  # whole 2-frame slots
    with pytest.raises(ValueError, match="slots"):
        first.reserve(2 * FRAME_TOKENS, FRAME_TOKENS)


def test_an_empty_ring_starting_past_token_0_attends_only_to_what_it_wrote():
    """A video whose first block starts at block 5 sees only that block in its window (not 5 blocks of
    slots never written), exactly as one that starts at block 0 with the same inputs."""
    generator = torch.Generator().manual_seed(2)
    conds = [_cond(torch.float32, generator)] * 2
    dims = dict(num_layers=LAYERS, capacity=12 * FRAME_TOKENS, num_heads=HEADS, head_dim=HEAD_DIM)
    for make in (lambda: KVCache(**dims), lambda: JoinedKVCache(cond_capacity=conds[0].capacity, **dims)):
        at_zero = _run([make()], conds, torch.float32, block_frames=3, starts=[0, 3], refresh_at=9)
        late = make()
        at_five = _run([late], conds, torch.float32, block_frames=3, starts=[15, 18], refresh_at=9)
        assert [n for n, _ in at_five] == [n for n, _ in at_zero]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(at_five, at_zero))
        assert late.length == 6 * FRAME_TOKENS
        with pytest.raises(ValueError, match="does not follow"):
            late.reserve(30 * FRAME_TOKENS, 3 * FRAME_TOKENS)  # would leave frames 21..29 unwritten


@pytest.mark.parametrize("placement", [Placement(), Placement(kv_dtype="fp8")], ids=lambda p: p.describe())
def test_the_planner_counts_the_bytes_the_caches_take(placement):
    """The planner's KV-set and cond-cache bytes are the caches' allocations, the joined sets' copies of
    the cond rows included (the placement decisions rest on them)."""
    config = TransformerConfig.tiny()
    with torch.device("meta"):
        model = CausalS2VTransformer(config)
    geometry = ClipGeometry(64, 128, 48)
    caches = build_caches(model, placement, geometry, range(3), device="meta", dtype=torch.bfloat16)
    assert all(isinstance(kv, JoinedKVCache) == placement.joins_cond for kv in caches.kv_sets.values())
    work = Workload(geometry.height, geometry.width, geometry.infer_frames, sample_steps=3)
    components = {c.name.split(" (")[0]: c.nbytes
                  for c in memory_components(dit_inventory(config), work, placement, HARDWARE_PRESETS["h100"])}
    storages = {id(kv.storage): kv.nbytes for kv in caches.kv_sets.values()}  # a pair shares one
    assert len(storages) == (2 if placement.joins_cond else 3)
    assert components["KV sets"] == sum(storages.values()) == caches.nbytes - caches.cond.nbytes
    assert components["cond cache"] == caches.cond.nbytes
