import math

import pytest
import torch

from liveavatar.geometry import FRAMEPACK_BUCKETS, ClipGeometry
from liveavatar.models.rope import apply_rotation, block_positions, condition_positions, rotation
from liveavatar.models.tiny import save_tiny_transformer
from liveavatar.models.transformer import CausalS2VTransformer, TransformerConfig
from liveavatar.runtime.caches import CondCache, JoinedKVCache, KVCache
from liveavatar.testing import parity

LATENT_H, LATENT_W = 8, 16

# Parameters per top-level group of the 14B release (counted from its safetensors headers).
RELEASE_GROUP_PARAMETERS = {
    "patch_embedding": 332_800, "text_embedding": 47_196_160, "time_embedding": 27_535_360,
    "time_projection": 157_317_120, "blocks": 14_055_772_160, "head": 337_984, "cond_encoder": 332_800,
    "casual_audio_encoder": 95_051_545, "audio_injector": 1_887_928_320, "trainable_cond_mask": 15_360,
    "frame_packer": 23_936_000,
}


def test_full_size_model_has_the_release_key_set():
    with torch.device("meta"):
        model = CausalS2VTransformer(TransformerConfig.full_14b())
    state = model.state_dict()
    assert len(state) == 1260
    assert sum(p.numel() for p in model.parameters()) == 16_295_755_609
    groups = {}
    for key, value in state.items():
        groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + value.numel()
    assert groups == RELEASE_GROUP_PARAMETERS
    assert tuple(state["head.head.weight"].shape) == (64, 5120)
    assert tuple(state["audio_injector.injector_adain_layers.11.linear.weight"].shape) == (10240, 5120)
    assert tuple(state["casual_audio_encoder.weights"].shape) == (1, 25, 1, 1)


def test_fixture_a_passes_at_strict_tolerance(fixtures_dir, capsys):
    assert parity.main([str(fixtures_dir), "--only", "A"]) == 0, capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_transformer(tmp_path_factory.mktemp("dit"), seed=3)
    return CausalS2VTransformer.from_pretrained(folder, device="cpu", dtype=torch.float32)


def cond_tokens(latent_hw) -> int:
    return condition_positions(*latent_hw, ref_frame=TransformerConfig.REF_FRAME, buckets=FRAMEPACK_BUCKETS).shape[0]


def caches(model, *, kv_tokens, latent_hw=(LATENT_H, LATENT_W), cond_capacity=None, joined=True):
    """A KV set of ``kv_tokens`` tokens and a cond cache for ``latent_hw`` (or ``cond_capacity``); the KV set
    holds the cond rows beside its ring (the device form), or with ``joined=False`` concatenates them."""
    c = model.config
    dims = dict(num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.head_dim, device=model.device,
                dtype=model.dtype)
    cond = CondCache(capacity=cond_capacity or cond_tokens(latent_hw), **dims)
    kv = JoinedKVCache(capacity=kv_tokens, cond_capacity=cond.capacity, **dims) if joined else \
        KVCache(capacity=kv_tokens, **dims)
    return kv, cond


def make_inputs(model, seed=0, frames=3, latent_hw=(LATENT_H, LATENT_W)):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    return {
        "text": model.text_kv(torch.randn(5, c.text_dim, generator=g)),
        "ref": torch.randn(1, c.in_dim, 1, h, w, generator=g),
        "motion": torch.randn(1, c.in_dim, 19, h, w, generator=g),
        "x": [torch.randn(c.in_dim, frames, h, w, generator=g) for _ in range(6)],
        "audio": [torch.randn(1, c.audio_layers, c.audio_dim, 4 * frames, generator=g) for _ in range(6)],
    }


class SlidingWindow:
    """A KV set without a ring: each layer keeps the last ``capacity`` tokens in the order they came, by
    concatenating and cutting (what the ring buffer's modular writes must be equivalent to)."""

    def __init__(self, model, capacity: int):
        self.capacity = capacity
        self.keys = [None] * model.config.num_layers
        self.values = [None] * model.config.num_layers

    def reserve(self, start_token: int, tokens: int) -> None:
        pass

    def sync_cond(self, cond, motion_rotation) -> None:
        pass

    def attention_inputs(self, layer, k, v, cond, cond_rotation, rope):
        old_k, old_v = self.keys[layer], self.values[layer]
        self.keys[layer] = (k if old_k is None else torch.cat([old_k, k], dim=1))[:, -self.capacity:]
        self.values[layer] = (v if old_v is None else torch.cat([old_v, v], dim=1))[:, -self.capacity:]
        cond_k, cond_v = cond.entries(layer)
        return (torch.cat([rope(cond_k, *cond_rotation), self.keys[layer]], dim=1),
                torch.cat([cond_v, self.values[layer]], dim=1))


def stream(model, inputs, *, blocks, cache_blocks=4, shifts=None, latent_hw=(LATENT_H, LATENT_W),
           start_block=0, timestep=857.69, without_ring=False):
    """Sink + ``blocks`` consecutive block calls on one cache; returns the outputs. ``without_ring``: the KV
    set is a `SlidingWindow` of the same length instead of the ring buffer."""
    frames = inputs["x"][0].shape[1]
    kv_tokens = cache_blocks * frames * (latent_hw[0] // 2) * (latent_hw[1] // 2)
    kv, cond = caches(model, kv_tokens=kv_tokens, latent_hw=latent_hw)
    if without_ring:
        kv = SlidingWindow(model, kv_tokens)
    model.prefill_sink(cond, inputs["text"], inputs["ref"], inputs["motion"])
    outs = []
    for b in range(blocks):
        shift = 30 if shifts is None else shifts[b]
        outs.append(model.forward_block(inputs["x"][b], timestep, inputs["text"], inputs["audio"][b], kv, cond,
                                        start_frame=(start_block + b) * frames, ref_rope_offset=shift))
    return outs


def test_same_inputs_give_the_same_output(tiny):
    inputs = make_inputs(tiny)
    first = stream(tiny, inputs, blocks=3)
    second = stream(tiny, inputs, blocks=3)
    for a, b in zip(first, second):
        assert a.shape == (16, 3, LATENT_H, LATENT_W)
        assert torch.equal(a, b)


def test_earlier_blocks_in_the_cache_change_the_output(tiny):
    inputs = make_inputs(tiny)
    with_history = stream(tiny, inputs, blocks=2)[1]
    other = dict(inputs, x=[torch.randn_like(inputs["x"][0])] + inputs["x"][1:])
    with_other_history = stream(tiny, other, blocks=2)[1]
    assert (with_history - with_other_history).abs().max() > 1e-4


def test_reference_frame_position_follows_the_rolling_rule(tiny):
    """The reference frame sits at max(30, start_frame + shift): below frame 30 the shift has no effect."""
    inputs = make_inputs(tiny)
    early = [stream(tiny, inputs, blocks=1, shifts=[s], start_block=1)[0] for s in (4, 27)]
    assert torch.equal(early[0], early[1])  # frames 3+4 and 3+27 are both <= 30
    late = [stream(tiny, inputs, blocks=1, shifts=[s], start_block=20)[0] for s in (4, 27)]
    assert (late[0] - late[1]).abs().max() > 1e-4


def _assert_same_blocks(got, want):
    for block, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"block {block}: {m}")


def test_ring_buffer_wraps_like_a_window_kept_without_a_ring(tiny):
    inputs = make_inputs(tiny)
    # 6 blocks through a 2-block ring (it wraps at blocks 2..5): the same outputs as a sliding window kept by
    # concatenation (the attention does not depend on the order of the keys, only on which ones it sees).
    run = dict(blocks=6, cache_blocks=2, shifts=[4, 9, 30, 17, 5, 22])
    ring = stream(tiny, inputs, **run)
    _assert_same_blocks(ring, stream(tiny, inputs, **run, without_ring=True))
    # The window matters: a cache long enough never to evict gives other outputs once the ring has wrapped.
    unbounded = stream(tiny, inputs, **dict(run, cache_blocks=6))
    torch.testing.assert_close(unbounded[1], ring[1], rtol=1e-5, atol=1e-5)
    assert (unbounded[5] - ring[5]).abs().max() > 1e-4


def test_positions_run_past_the_reference_table(tiny):
    inputs = make_inputs(tiny)
    # Blocks beyond the reference's 45,000-frame RoPE table, through a one-block ring (its write position
    # is the absolute token index modulo its length): as the window kept without a ring, and not the
    # outputs of the same blocks at the start of the video (the positions reach the keys).
    run = dict(blocks=3, cache_blocks=1, start_block=20_000, shifts=[4, 9, 30])
    far = stream(tiny, inputs, **run)
    _assert_same_blocks(far, stream(tiny, inputs, **run, without_ring=True))
    near = stream(tiny, inputs, **dict(run, start_block=0))
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(far, near))


def test_rotation_matches_float16_rounded_angles_at_any_position():
    head_dim = 128
    frame = 123_456
    cos, sin = rotation(torch.tensor([[frame, 3, 7], [-frame, 3, 7]]), head_dim, torch.float64)
    pair_frequency = 1.0 / 10000 ** (2 * 5 / 44)  # frame pair 5 of the 22 frame pairs
    expected = torch.tensor(frame * pair_frequency, dtype=torch.float64)
    assert cos[0, 0, 5] == torch.cos(expected).half().double()
    assert sin[0, 0, 5] == torch.sin(expected).half().double()
    assert sin[1, 0, 5] == -sin[0, 0, 5]  # negative frames are the conjugate rotation
    row_frequency = 1.0 / 10000 ** (2 * 2 / 42)  # row pair 2 sits after the 22 frame pairs
    assert cos[0, 0, 22 + 2] == torch.cos(torch.tensor(3 * row_frequency, dtype=torch.float64)).half().double()


def test_rotation_preserves_relative_positions():
    """q·k after RoPE depends on the position difference only (up to the float16 cos/sin rounding)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 4, 32, generator=g, dtype=torch.float64)
    def score(q_frame, k_frame):
        rq = apply_rotation(q, *rotation(torch.tensor([[q_frame, 2, 5]]), 32, torch.float64))
        rk = apply_rotation(k, *rotation(torch.tensor([[k_frame, 2, 5]]), 32, torch.float64))
        return (rq * rk).sum(-1)
    assert torch.allclose(score(40, 33), score(90_040, 90_033), atol=5e-3)


def test_motion_token_positions_follow_the_reference_rule():
    # The reference's 704*384 example: 24x44 patch grid (latent 48x88).
    positions = condition_positions(48, 88, ref_frame=30, buckets=(1, 2, 16))
    s = 24 * 44
    assert positions.shape[0] == 2 * s + 2 * (12 * 22)
    assert set(positions[:s, 0].tolist()) == {30} and set(positions[s:2 * s, 0].tolist()) == {-1}
    two_x = positions[2 * s:2 * s + 12 * 22]
    assert set(two_x[:, 0].tolist()) == {-3}
    assert sorted(set(two_x[:, 1].tolist())) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
    assert sorted(set(two_x[:, 2].tolist())) == list(range(0, 41, 2)) + [43]
    four_x = positions[2 * s + 12 * 22:]
    assert sorted(set(four_x[:, 0].tolist())) == [-19, -14, -9, -4]
    assert sorted(set(four_x[:, 1].tolist())) == [0, 4, 9, 13, 18, 23]
    assert sorted(set(four_x[:, 2].tolist())) == [0, 4, 8, 12, 17, 21, 25, 30, 34, 38, 43]
    assert block_positions(12, 3, 2, 2)[:, 0].tolist() == [12] * 4 + [13] * 4 + [14] * 4


def test_cond_cache_is_sized_from_the_real_token_count(tiny):
    assert cond_tokens((48, 88)) == 2640 == ClipGeometry(384, 704, 48).cond_tokens  # 704*384 in the reference
    assert cond_tokens((160, 90)) == 2 * 3600 + 40 * 22 + 4 * 20 * 11  # 1280*720: beyond the reference's 2800
    for height, width in [(64, 64), (128, 256), (704, 384), (1280, 704), (192, 64)]:
        geometry = ClipGeometry(height, width, 48)
        assert geometry.cond_tokens == cond_tokens((geometry.latent_height, geometry.latent_width))
    big = (32, 48)
    inputs = make_inputs(tiny, latent_hw=big)
    out = stream(tiny, inputs, blocks=1, latent_hw=big)[0]
    assert out.shape == (16, 3, *big)
    _, too_small = caches(tiny, kv_tokens=1, cond_capacity=cond_tokens(big) - 1)
    with pytest.raises(ValueError, match="cond_tokens"):
        tiny.prefill_sink(too_small, inputs["text"], inputs["ref"], inputs["motion"])


def test_no_pose_latents_equals_zero_pose_latents(tiny):
    inputs = make_inputs(tiny)
    outs = []
    for cond_states in (None, torch.zeros_like(inputs["x"][0])):
        kv, cond = caches(tiny, kv_tokens=12 * 32)
        tiny.prefill_sink(cond, inputs["text"], inputs["ref"], inputs["motion"])
        outs.append(tiny.forward_block(inputs["x"][0], 1000.0, inputs["text"], inputs["audio"][0], kv, cond,
                                       start_frame=0, ref_rope_offset=12, cond_states=cond_states))
    assert torch.equal(outs[0], outs[1])


def test_text_keys_and_values_follow_a_changed_text(tiny):
    inputs = make_inputs(tiny)
    baseline = stream(tiny, inputs, blocks=1)[0]
    other_text = tiny.text_kv(torch.randn(9, tiny.config.text_dim))
    changed = stream(tiny, dict(inputs, text=other_text), blocks=1)[0]
    assert (changed - baseline).abs().max() > 1e-4
    # A raw encoder output is embedded on the fly.
    raw = torch.randn(4, tiny.config.text_dim)
    assert torch.equal(stream(tiny, dict(inputs, text=tiny.text_kv(raw)), blocks=1)[0],
                       stream(tiny, dict(inputs, text=tiny.text_kv(tiny.embed_text(raw))), blocks=1)[0])


def test_bad_calls_give_clear_errors(tiny):
    inputs = make_inputs(tiny)
    c = tiny.config
    kv, cond = caches(tiny, kv_tokens=12 * 32)
    call = dict(start_frame=0, ref_rope_offset=10)
    with pytest.raises(ValueError, match="prefill_sink"):
        tiny.forward_block(inputs["x"][0], 1000.0, inputs["text"], inputs["audio"][0], kv, cond, **call)
    tiny.prefill_sink(cond, inputs["text"], inputs["ref"], inputs["motion"])
    with pytest.raises(ValueError, match="audio must be"):
        tiny.forward_block(inputs["x"][0], 1000.0, inputs["text"], inputs["audio"][0][..., :8], kv, cond, **call)
    with pytest.raises(ValueError, match="prefilled for 8x16"):
        tiny.forward_block(torch.randn(16, 3, 8, 8), 1000.0, inputs["text"], inputs["audio"][0], kv, cond, **call)
    with pytest.raises(ValueError, match="latent size 8x15 must be even"):
        tiny.prefill_sink(cond, inputs["text"], inputs["ref"][..., :15], inputs["motion"][..., :15])
    with pytest.raises(ValueError, match="text context must be"):
        tiny.embed_text(torch.randn(5, c.text_dim + 1))
    small_kv, _ = caches(tiny, kv_tokens=2 * 32)
    with pytest.raises(ValueError, match="does not fit a KV cache"):
        tiny.forward_block(inputs["x"][0], 1000.0, inputs["text"], inputs["audio"][0], small_kv, cond, **call)


def test_bfloat16_run_tracks_the_float32_run(tmp_path):
    folder = save_tiny_transformer(tmp_path, seed=5)
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = CausalS2VTransformer.from_pretrained(folder, device="cpu", dtype=dtype)
        assert all(p.dtype == dtype for p in model.parameters())
        inputs = make_inputs(model, seed=2)
        outs.append(stream(model, inputs, blocks=2)[1])
    assert outs[1].dtype == torch.bfloat16
    error = (outs[1].float() - outs[0]).norm() / outs[0].norm()
    assert error < 0.05, error
    assert math.isfinite(error)


def test_the_blocks_self_attention_runs_through_the_models_seam(tiny):
    from liveavatar.models.quantised_attention import SelfAttention, resolve_self_attention

    inputs = make_inputs(tiny)
    exact = stream(tiny, inputs, blocks=2)
    try:
        tiny.self_attention = resolve_self_attention("int8", "cpu", reference=True)
        quantised = stream(tiny, inputs, blocks=2)
    finally:
        tiny.self_attention = SelfAttention()
    for a, b in zip(exact, quantised):
        error = ((a - b).abs().max() / a.abs().max()).item()
        assert 0 < error < 1e-2  # the window's self-attention is quantised, and stays close
