"""Layer streaming and host/FP8 KV placements on the tiny DiT: the CPU emulates the host/device split, so
what is checked is the ordering logic (which layer sits in which slot, which entries are fetched and
written back): outputs must be bit-identical to the resident run, and in steady state every copy must
have been issued ahead of use."""
import pytest
import torch

from liveavatar.models.transformer import CausalS2VTransformer, TransformerConfig, save_tiny_transformer
from liveavatar.runtime.offload import Fp8KVCache, HostKVCache, _complement, install_cache_placement, place_dit
from liveavatar.runtime.placement import Placement, spread_layers

LATENT_H, LATENT_W = 8, 16
CACHE_BLOCKS = 2  # the ring buffer wraps from the third block on
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


def load(checkpoint, placement=None):
    model = CausalS2VTransformer.from_pretrained(checkpoint, device="cpu", dtype=torch.float32)
    streamers = (None, None)
    if placement is not None:
        streamers = (place_dit(model, placement, "cpu"), install_cache_placement(model, placement))
    return model, streamers


def run(model, inputs, on_forward=None):
    """Prefill, 4 blocks x STEPS steps (one KV set per step, as the sampler), a re-prefill before block 2."""
    c = model.config
    text = model.embed_text(inputs["text"])
    kv_sets = [model.new_kv_cache(cache_frames=3 * CACHE_BLOCKS, frame_tokens=c.frame_tokens(LATENT_H, LATENT_W))
               for _ in range(STEPS)]
    cond = model.new_cond_cache(cond_tokens=c.cond_tokens(LATENT_H, LATENT_W))
    model.prefill_sink(cond, text, inputs["ref"], inputs["motion"])
    outputs = []
    for block in range(4):
        if block == 2:
            model.prefill_sink(cond, text, inputs["ref"] * 0.5, inputs["motion"])
        for step in range(STEPS):
            outputs.append(model.forward_block(inputs["x"][block], 1000.0 - 300 * step, text, inputs["audio"][block],
                                               kv_sets[step], cond, start_frame=3 * block, ref_rope_shift=7))
            if on_forward is not None:
                on_forward(block, step)
    return outputs, kv_sets, cond


@pytest.fixture(scope="module")
def resident(checkpoint, inputs):
    return run(load(checkpoint)[0], inputs)[0]


@pytest.mark.parametrize("placement", [
    Placement(streamed_layers=(0, 1, 2)),
    Placement(streamed_layers=(1,)),
    Placement(kv_location="host"),
    Placement(cond_location="host"),
    Placement(kv_location="host", cond_location="host", streamed_layers=(0, 2)),
], ids=lambda p: p.describe())
def test_streamed_placements_are_bit_identical_to_the_resident_run(checkpoint, inputs, resident, placement):
    model, (layers, caches) = load(checkpoint, placement)
    outputs, kv_sets, cond = run(model, inputs)
    for got, expected in zip(outputs, resident):
        assert torch.equal(got, expected)
    if placement.kv_location == "host":
        assert all(isinstance(kv, HostKVCache) for kv in kv_sets)
        assert kv_sets[0].host.tensors[0][0].device.type == "cpu"
    if placement.streams_layers:
        assert layers.streamed_layers == placement.streamed_layers
        # Streamed weights point into the unit's host buffer or a slot, never into a private copy.
        unit = layers.units[placement.streamed_layers[0]]
        storage = model.blocks[unit.layer].ffn[0].weight.untyped_storage().data_ptr()
        assert storage in {slot.data_ptr() for slot in layers.slots} | {unit.host.data_ptr()}


def test_copies_are_issued_ahead_of_use_in_steady_state(checkpoint, inputs):
    placement = Placement(kv_location="host", cond_location="host", streamed_layers=(0, 1, 2))
    model, (layers, caches) = load(checkpoint, placement)
    counts = []
    run(model, inputs, on_forward=lambda block, step: counts.append(
        (block, step, layers.on_demand, layers.copies, caches.on_demand, caches.fetched_bytes)))
    for previous, entry in zip(counts, counts[1:]):
        if entry[0] in (1, 3):  # forwards of blocks that follow a block (not a new sink prefill)
            assert (entry[2], entry[4]) == (previous[2], previous[4]), f"a copy was made on demand: {counts}"
    # Three streamed blocks through two slots: three unit copies per forward, none of them on demand.
    assert counts[-1][3] - counts[-2][3] == 3
    assert layers.on_demand == 1  # only the very first unit, before anything could be prefetched
    assert caches.fetched_bytes > 0


def test_host_kv_fetches_only_entries_the_block_does_not_overwrite(checkpoint, inputs):
    model, (_, caches) = load(checkpoint, Placement(kv_location="host"))
    run(model, inputs)
    c = model.config
    frame_tokens = c.frame_tokens(LATENT_H, LATENT_W)
    per_token_layer = 2 * c.dim * 4  # K and V, float32
    block_tokens, capacity = 3 * frame_tokens, 3 * CACHE_BLOCKS * frame_tokens

    def kept(block):  # tokens already in a set before `block`, minus the ring slots the block overwrites
        valid = min(block * block_tokens, capacity)
        return valid - (block_tokens if block * block_tokens >= capacity else 0)

    forwards = sum(kept(block) * c.num_layers for block in range(4)) * STEPS
    prefetched_next = kept(4) * 2  # the first two layers of the forward that would come next
    assert caches.fetched_bytes == (forwards + prefetched_next) * per_token_layer


def test_fp8_kv_on_the_host_equals_fp8_kv_on_the_device_and_stays_close(checkpoint, inputs, resident):
    device_model, _ = load(checkpoint, Placement(kv_dtype="fp8"))
    on_device, kv_sets, _ = run(device_model, inputs)
    assert isinstance(kv_sets[0], Fp8KVCache) and kv_sets[0].buffer.tensors[0].dtype == torch.float8_e4m3fn
    host_model, _ = load(checkpoint, Placement(kv_dtype="fp8", kv_location="host"))
    on_host = run(host_model, inputs)[0]
    for a, b, exact in zip(on_device, on_host, resident):
        assert torch.equal(a, b)
        assert (a - exact).norm() <= 0.05 * exact.norm()
    float32_bytes = 4 * sum(t.numel() for t in kv_sets[0].buffer.tensors[:2])
    assert kv_sets[0].nbytes < 0.3 * float32_bytes


def test_fp8_weights_streamed_equal_fp8_weights_resident(checkpoint, inputs):
    resident_fp8 = run(load(checkpoint, Placement(weight_dtype="fp8"))[0], inputs)[0]
    streamed_fp8 = run(load(checkpoint, Placement(weight_dtype="fp8", streamed_layers=(0, 1, 2)))[0], inputs)[0]
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
    from liveavatar.models.transformer import save_tiny_lora
    from liveavatar.runtime.offload import load_placed_dit

    folder = save_tiny_transformer(tmp_path / "dit", seed=2)
    lora = save_tiny_lora(tmp_path / "lora.safetensors", TransformerConfig.tiny(), rank=4, alpha=2.0, seed=0)
    reference = CausalS2VTransformer.from_pretrained(folder, device="cpu", dtype=torch.float32, lora=lora)
    placement = Placement(streamed_layers=(0, 2), kv_location="host")
    placed = load_placed_dit(folder, placement, device="cpu", dtype=torch.float32, lora=lora)
    assert isinstance(placed.new_kv_cache(cache_frames=3, frame_tokens=32), HostKVCache)
    for got, expected in zip(run(placed, inputs)[0], run(reference, inputs)[0]):
        assert torch.equal(got, expected)


def test_pinned_arena_carves_aligned_tensors_from_shared_chunks():
    from liveavatar.runtime.offload import PinnedArena

    arena = PinnedArena(pin=False)
    a = arena.zeros((3, 5), torch.bfloat16)
    b = arena.zeros((7,), torch.float32)
    chunk = a.untyped_storage().data_ptr()
    assert b.untyped_storage().data_ptr() == chunk  # carved from the same chunk
    gap = b.data_ptr() - a.data_ptr()
    assert gap % 256 == 0 and gap >= a.nbytes
    big = arena.zeros((PinnedArena.CHUNK_BYTES,), torch.uint8)  # no longer fits behind b: a new chunk
    assert big.untyped_storage().data_ptr() != chunk and big.untyped_storage().nbytes() == PinnedArena.CHUNK_BYTES
    assert float(a.sum()) == 0 and float(b.sum()) == 0


def test_host_kv_sets_of_a_finished_request_are_released(checkpoint, inputs):
    import gc
    import weakref

    model, (_, caches) = load(checkpoint, Placement(kv_location="host"))
    _, first_sets, _ = run(model, inputs)
    first = [weakref.ref(kv) for kv in first_sets]
    del first_sets
    second = run(model, inputs)[1]  # a new request: new KV sets through the same streamer
    gc.collect()
    assert all(ref() is None for ref in first)
    assert caches.kv_caches == second
