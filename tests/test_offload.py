"""Layer streaming and host/FP8 KV placements on the tiny DiT: the CPU emulates the host/device split, so
what is checked is the ordering logic (which layer sits in which slot, which entries are fetched and
written back): outputs must be bit-identical to the resident run, and in steady state every copy must
have been issued ahead of use."""
import pytest
import torch

from liveavatar.geometry import ClipGeometry
from liveavatar.models.tiny import save_tiny_transformer
from liveavatar.models.transformer import CausalS2VTransformer, TransformerConfig
from liveavatar.runtime.caches import CondCache, HostKVCache, KVCache, build_caches
from liveavatar.runtime.caches.host import _complement
from liveavatar.runtime.layer_streaming import place_dit
from liveavatar.runtime.placement import Placement, spread_layers

LATENT_H, LATENT_W = 8, 16
CACHE_BLOCKS = 2  # the ring buffer wraps from the third block on
GEOMETRY = ClipGeometry(8 * LATENT_H, 8 * LATENT_W, 12 * CACHE_BLOCKS)  # a clip of CACHE_BLOCKS blocks
STEPS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_transformer(tmp_path_factory.mktemp("dit"), seed=5)


@pytest.fixture(scope="module")
def inputs():
    c = TransformerConfig.tiny()
    g = torch.Generator().manual_seed(1)
    return {
        "text": torch.randn(6, c.text_dim, generator=g),
        "ref": torch.randn(1, c.in_dim, 1, LATENT_H, LATENT_W, generator=g),
        "motion": torch.randn(1, c.in_dim, 19, LATENT_H, LATENT_W, generator=g),
        "x": [torch.randn(c.in_dim, 3, LATENT_H, LATENT_W, generator=g) for _ in range(4)],
        "audio": [torch.randn(1, c.audio_layers, c.audio_dim, 12, generator=g) for _ in range(4)],
    }


def load(checkpoint, placement=Placement()):
    """The tiny DiT placed as ``placement`` says, its layer streamer and its caches (from the factory)."""
    model = CausalS2VTransformer.from_pretrained(checkpoint, device="cpu", dtype=torch.float32)
    layers = place_dit(model, placement, "cpu") if placement != Placement() else None
    return model, layers, build_caches(model, placement, GEOMETRY, range(STEPS), device="cpu", dtype=torch.float32)


def run(model, inputs, caches, on_forward=None):
    """Prefill, 4 blocks x STEPS steps (one KV set per step, as the sampler), a re-prefill before block 2."""
    text_kv = model.text_kv(inputs["text"])
    kv_sets, cond = [caches.kv_sets[step] for step in range(STEPS)], caches.cond
    model.prefill_sink(cond, text_kv, inputs["ref"], inputs["motion"])
    outputs = []
    for block in range(4):
        if block == 2:
            model.prefill_sink(cond, text_kv, inputs["ref"] * 0.5, inputs["motion"])
        for step in range(STEPS):
            outputs.append(model.forward_block(inputs["x"][block], 1000.0 - 300 * step, text_kv,
                                               inputs["audio"][block], kv_sets[step], cond, start_frame=3 * block,
                                               ref_rope_offset=7))
            if on_forward is not None:
                on_forward(block, step)
    return outputs, kv_sets, cond


@pytest.fixture(scope="module")
def resident(checkpoint, inputs):
    model, _, caches = load(checkpoint)
    return run(model, inputs, caches)[0]


@pytest.fixture(scope="module")
def concatenating(checkpoint, inputs):
    """The resident run with KV sets that concatenate the window with the cond rows, as host-resident and
    FP8 sets do (the resident bf16 sets hold the cond rows beside their rings, an even step's ring before
    them: the same keys, in another order)."""
    model, _, caches = load(checkpoint)
    c = model.config
    dims = dict(num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.head_dim)
    caches.kv_sets = {step: KVCache(capacity=GEOMETRY.kv_tokens, **dims) for step in caches.kv_sets}
    caches.cond = CondCache(capacity=GEOMETRY.cond_tokens, **dims)
    return run(model, inputs, caches)[0]


@pytest.mark.parametrize("placement", [
    Placement(streamed_layers=(0, 1, 2)),
    Placement(streamed_layers=(1,)),
    Placement(kv_location="host"),
    Placement(cond_location="host"),
    Placement(kv_location="host", cond_location="host", streamed_layers=(0, 2)),
], ids=lambda p: p.describe())
def test_streamed_placements_are_bit_identical_to_the_resident_run(checkpoint, inputs, resident, concatenating,
                                                                  placement):
    model, layers, caches = load(checkpoint, placement)
    outputs, kv_sets, cond = run(model, inputs, caches)
    for got, expected in zip(outputs, resident if placement.joins_cond else concatenating):
        assert torch.equal(got, expected)
    for got, expected in zip(outputs, resident):  # the keys' order only
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if placement.kv_location == "host":
        assert all(isinstance(kv, HostKVCache) for kv in kv_sets)
        assert kv_sets[0].storage.tensors[0][0].device.type == "cpu"
    if placement.streams_layers:
        assert layers.streamed_layers == placement.streamed_layers
        # Streamed weights point into the unit's host buffer or a slot, never into a private copy.
        unit = layers.units[placement.streamed_layers[0]]
        storage = model.blocks[unit.layer].ffn[0].weight.untyped_storage().data_ptr()
        hosts = {host.untyped_storage().data_ptr() for *_, host, _ in unit.entries}
        assert storage in {slot.untyped_storage().data_ptr() for slot in layers.slots} | hosts


def test_copies_are_issued_ahead_of_use_in_steady_state(checkpoint, inputs):
    placement = Placement(kv_location="host", cond_location="host", streamed_layers=(0, 1, 2))
    model, layers, cache_set = load(checkpoint, placement)
    caches = cache_set.streamer
    counts = []
    run(model, inputs, cache_set, on_forward=lambda block, step: counts.append(
        (block, step, layers.on_demand, layers.copies, caches.on_demand, caches.fetched_bytes)))
    for previous, entry in zip(counts, counts[1:]):
        if entry[0] in (1, 3):  # forwards of blocks that follow a block (not a new sink prefill)
            assert (entry[2], entry[4]) == (previous[2], previous[4]), f"a copy was made on demand: {counts}"
    # Three streamed blocks through two slots: three unit copies per forward, none of them on demand.
    assert counts[-1][3] - counts[-2][3] == 3
    assert layers.on_demand == 1  # only the very first unit, before anything could be prefetched
    assert caches.fetched_bytes > 0


def test_host_kv_fetches_only_entries_the_block_does_not_overwrite(checkpoint, inputs):
    model, _, cache_set = load(checkpoint, Placement(kv_location="host"))
    run(model, inputs, cache_set)
    caches = cache_set.streamer
    c = model.config
    frame_tokens = GEOMETRY.frame_tokens
    per_token_layer = 2 * c.dim * 4  # K and V, float32
    block_tokens, capacity = 3 * frame_tokens, 3 * CACHE_BLOCKS * frame_tokens

    def kept(block):  # tokens already in a set before `block`, minus the ring slots the block overwrites
        valid = min(block * block_tokens, capacity)
        return valid - (block_tokens if block * block_tokens >= capacity else 0)

    forwards = sum(kept(block) * c.num_layers for block in range(4)) * STEPS
    prefetched_next = kept(4) * 2  # the first two layers of the forward that would come next
    assert caches.fetched_bytes == (forwards + prefetched_next) * per_token_layer


def test_fp8_kv_on_the_host_equals_fp8_kv_on_the_device_and_stays_close(checkpoint, inputs, resident):
    device_model, _, device_caches = load(checkpoint, Placement(kv_dtype="fp8"))
    on_device, kv_sets, _ = run(device_model, inputs, device_caches)
    assert type(kv_sets[0]) is KVCache and kv_sets[0].storage.tensors[0].dtype == torch.float8_e4m3fn
    host_model, _, host_caches = load(checkpoint, Placement(kv_dtype="fp8", kv_location="host"))
    on_host = run(host_model, inputs, host_caches)[0]
    for a, b, exact in zip(on_device, on_host, resident):
        assert torch.equal(a, b)
        assert (a - exact).norm() <= 0.05 * exact.norm()
    float32_bytes = 4 * sum(t.numel() for t in kv_sets[0].storage.tensors[:2])
    assert kv_sets[0].nbytes < 0.3 * float32_bytes


def test_fp8_weights_streamed_equal_fp8_weights_resident(checkpoint, inputs):
    model, _, caches = load(checkpoint, Placement(weight_dtype="fp8"))
    resident_fp8 = run(model, inputs, caches)[0]
    model, _, caches = load(checkpoint, Placement(weight_dtype="fp8", streamed_layers=(0, 1, 2)))
    streamed_fp8 = run(model, inputs, caches)[0]
    for a, b in zip(resident_fp8, streamed_fp8):
        assert torch.equal(a, b)


def test_ring_complement_and_layer_spreading():
    assert _complement(10, ((3, 2),)) == [(0, 3), (5, 10)]
    assert _complement(4, ((6, 2),)) == [(0, 4)]
    assert _complement(12, ((10, 2), (0, 1))) == [(1, 10)]
    assert spread_layers(4, 40) == (9, 19, 29, 39)
    assert 0 not in spread_layers(39, 40) and len(set(spread_layers(39, 40))) == 39
    assert spread_layers(40, 40) == tuple(range(40))
    with pytest.raises(ValueError):
        place_dit(CausalS2VTransformer(TransformerConfig.tiny()), Placement(streamed_layers=(3,)), "cpu")


def test_load_placed_dit_merges_the_lora_and_places_the_blocks(tmp_path, inputs):
    from liveavatar.models.tiny import save_tiny_lora
    from liveavatar.runtime.loading import load_placed_dit

    folder = save_tiny_transformer(tmp_path / "dit", seed=2)
    lora = save_tiny_lora(tmp_path / "lora.safetensors", TransformerConfig.tiny(), rank=4, alpha=2.0, seed=0)
    reference = CausalS2VTransformer.from_pretrained(folder, device="cpu", dtype=torch.float32, lora=lora)
    placement = Placement(streamed_layers=(0, 2), kv_location="host")
    placed, layers = load_placed_dit(folder, placement, device="cpu", dtype=torch.float32, lora=lora)
    assert layers.streamed_layers == (0, 2)
    placed_caches = build_caches(placed, placement, GEOMETRY, range(STEPS), device="cpu", dtype=torch.float32)
    assert isinstance(placed_caches.kv_sets[0], HostKVCache)
    # The same cache form (host KV sets concatenate the cond rows): only the DiT's loading differs.
    reference_caches = build_caches(reference, Placement(kv_location="host"), GEOMETRY, range(STEPS), device="cpu",
                                    dtype=torch.float32)
    for got, expected in zip(run(placed, inputs, placed_caches)[0], run(reference, inputs, reference_caches)[0]):
        assert torch.equal(got, expected)


def test_pinned_arena_carves_aligned_tensors_from_shared_chunks():
    from liveavatar.runtime.pinned_chunks import CHUNK_BYTES
    from liveavatar.runtime.transfer import PinnedArena

    arena = PinnedArena(pin=False)
    a = arena.zeros((3, 5), torch.bfloat16)
    b = arena.zeros((7,), torch.float32)
    chunk = a.untyped_storage().data_ptr()
    assert b.untyped_storage().data_ptr() == chunk  # carved from the same chunk
    gap = b.data_ptr() - a.data_ptr()
    assert gap % 256 == 0 and gap >= a.nbytes
    big = arena.zeros((CHUNK_BYTES,), torch.uint8)  # no longer fits behind b: a new chunk
    assert big.untyped_storage().data_ptr() != chunk and big.untyped_storage().nbytes() == CHUNK_BYTES
    assert float(a.sum()) == 0 and float(b.sum()) == 0


def test_reset_caches_serve_a_second_video_in_the_same_storage(checkpoint, inputs, concatenating):
    model, _, caches = load(checkpoint, Placement(kv_location="host", cond_location="host"))
    run(model, inputs, caches)
    storage = [caches.kv_sets[step].storage.tensors[0][0].data_ptr() for step in range(STEPS)]
    caches.reset()
    outputs, kv_sets, _ = run(model, inputs, caches)  # a second video through the same caches and streamer
    assert [kv.storage.tensors[0][0].data_ptr() for kv in kv_sets] == storage
    assert caches.streamer.kv_sets == kv_sets
    for got, expected in zip(outputs, concatenating):
        assert torch.equal(got, expected)
