import pytest
import torch

from liveavatar.models.vae import VAEConfig, WanVAE, save_tiny_vae
from liveavatar.testing.cases import vae as vae_case
from liveavatar.testing.parity import Fixture


@pytest.fixture(scope="module")
def tiny_vae_path(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth", seed=3, base_dim=4)


@pytest.fixture(scope="module")
def tiny_vae(tiny_vae_path):
    return WanVAE.from_checkpoint(tiny_vae_path)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_fixture_c_passes(fixtures_dir):
    results = list(vae_case.run(Fixture(fixtures_dir / "C_vae.json")))
    assert len(results) >= 10
    assert [r.name for r in results if not r.passed] == []


def test_full_size_layout_matches_the_release_checkpoint():
    # The release's Wan2.1_VAE.pth has 194 keys and 126,892,531 parameters.
    with torch.device("meta"):
        state = WanVAE(VAEConfig()).state_dict()
    assert len(state) == 194
    assert sum(t.numel() for t in state.values()) == 126_892_531
    assert state["decoder.upsamples.7.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert state["encoder.middle.1.norm.gamma"].shape == (384, 1, 1)


def test_config_is_inferred_from_weights(tiny_vae, tmp_path):
    assert tiny_vae.config == VAEConfig(base_dim=4)
    wider = WanVAE.from_checkpoint(save_tiny_vae(tmp_path / "v.pth", base_dim=12))
    assert wider.config == VAEConfig(base_dim=12)


def test_save_tiny_vae_is_seeded(tmp_path):
    a = torch.load(save_tiny_vae(tmp_path / "a.pth", seed=1, base_dim=4), weights_only=True)
    b = torch.load(save_tiny_vae(tmp_path / "b.pth", seed=1, base_dim=4), weights_only=True)
    c = torch.load(save_tiny_vae(tmp_path / "c.pth", seed=2, base_dim=4), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.head.2.weight"], c["decoder.head.2.weight"])


def test_stream_decode_equals_full_decode(tiny_vae):
    z = _randn(1, 16, 7 + 10 * 3, 3, 5)  # TPP schedule: 7 warm-up latents, then blocks of 3
    full = tiny_vae.decode(z)
    assert full.shape == (1, 3, 1 + 4 * 36, 24, 40) and full.dtype == torch.float32
    decoder = tiny_vae.stream_decoder()
    pieces = [decoder.decode(z[:, :, :7])] + [decoder.decode(z[:, :, s:s + 3]) for s in range(7, 37, 3)]
    assert [p.shape[2] for p in pieces] == [25] + [12] * 10
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=2e-4, rtol=1e-4)


def test_stream_decoder_state_does_not_grow(tiny_vae):
    decoder = tiny_vae.stream_decoder()
    footprints = []
    for block in range(6):
        decoder.decode(_randn(1, 16, 3, 3, 5, seed=block))
        footprints.append((len(decoder.state.frames), decoder.state_nbytes()))
    assert len(set(footprints[1:])) == 1
    for cached in decoder.state.frames.values():
        if isinstance(cached, torch.Tensor):
            # at most the 2 frames a causal conv needs, owning its storage (no view of a bigger tensor)
            assert cached.shape[2] <= 2
            assert cached.untyped_storage().nbytes() == cached.numel() * cached.element_size()


def test_stream_encode_equals_full_encode(tiny_vae):
    video = _randn(1, 3, 1 + 4 * 5, 16, 24).clamp(-1, 1)
    full = tiny_vae.encode(video)
    assert full.shape == (1, 16, 6, 2, 3)
    encoder = tiny_vae.stream_encoder()
    pieces = [encoder.encode(video[:, :, a:b]) for a, b in [(0, 5), (5, 13), (13, 17), (17, 21)]]
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=1e-5, rtol=1e-5)


def test_reference_encodes(tiny_vae):
    image = _randn(1, 3, 1, 16, 24, seed=5).clamp(-1, 1)
    single = tiny_vae.encode(image)
    repeated5 = tiny_vae.encode(image.repeat(1, 1, 5, 1, 1))
    motion = tiny_vae.encode(image.repeat(1, 1, 73, 1, 1))
    assert single.shape == (1, 16, 1, 2, 3) and repeated5.shape == (1, 16, 2, 2, 3)
    assert motion.shape == (1, 16, 19, 2, 3)
    # Causal: the first latent only sees the first frame; the later ones see the repeats and differ.
    torch.testing.assert_close(repeated5[:, :, :1], single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(motion[:, :, :2], repeated5, atol=1e-5, rtol=1e-5)
    assert (repeated5[:, :, 1] - single[:, :, 0]).abs().max() > 1e-3


def test_bad_inputs_name_the_fix(tiny_vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        tiny_vae.encode(torch.zeros(1, 3, 4, 16, 24))
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_vae.encode(torch.zeros(1, 3, 1, 20, 24))
    encoder = tiny_vae.stream_encoder()
    encoder.encode(torch.zeros(1, 3, 1, 16, 24))
    with pytest.raises(ValueError, match="multiple of 4"):
        encoder.encode(torch.zeros(1, 3, 5, 16, 24))
    with pytest.raises(ValueError, match="latents must be"):
        tiny_vae.decode(torch.zeros(1, 4, 2, 2, 3))


def _one_line_error(path):
    with pytest.raises(ValueError) as error:
        WanVAE.from_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    return message


def test_bad_checkpoint_files(tiny_vae_path, tmp_path):
    assert "not found" in _one_line_error(tmp_path / "absent.pth")

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(_randn(4096).numpy().tobytes())
    assert "corrupt or truncated" in _one_line_error(corrupt)

    truncated = tmp_path / "truncated.pth"
    data = tiny_vae_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _one_line_error(truncated)

    foreign = tmp_path / "t5.pth"
    torch.save({"token_embedding.weight": torch.zeros(10, 4), "norm.weight": torch.ones(4)}, foreign)
    assert "not a Wan 2.1 VAE" in _one_line_error(foreign)

    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    assert "not a Wan 2.1 VAE" in _one_line_error(not_a_dict)

    state = torch.load(tiny_vae_path, weights_only=True)
    incomplete = tmp_path / "incomplete.pth"
    torch.save({k: v for k, v in state.items() if k != "decoder.head.2.bias"}, incomplete)
    assert "1 missing" in _one_line_error(incomplete)

    misshapen = tmp_path / "misshapen.pth"
    torch.save({**state, "decoder.conv1.bias": torch.zeros(5)}, misshapen)
    assert "decoder.conv1.bias" in _one_line_error(misshapen)


def test_bfloat16_runs_on_cpu(tiny_vae_path, tiny_vae):
    vae = WanVAE.from_checkpoint(tiny_vae_path, dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    video = _randn(1, 3, 5, 16, 24, seed=7).clamp(-1, 1)
    latents = vae.encode(video)
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 2, 2, 3)
    reference = tiny_vae.encode(video)
    assert (latents - reference).abs().mean() < 0.05 * reference.abs().mean()
    decoder = vae.stream_decoder()
    frames = decoder.decode(reference)
    assert frames.dtype == torch.float32 and frames.shape == (1, 3, 5, 16, 24)
    assert frames.abs().max() <= 1 and (frames - tiny_vae.decode(reference)).abs().mean() < 0.05
    # the carried state is kept in the conv compute dtype
    assert {t.dtype for t in decoder.state.frames.values()} == {torch.bfloat16}


def _blocks(decoder, z):
    """The streaming schedule: 7 warm-up latents, then blocks of 3."""
    return [decoder.decode(z[:, :, :7])] + [decoder.decode(z[:, :, s:s + 3]) for s in range(7, z.shape[2], 3)]


def test_fixed_buffer_decoder_equals_the_eager_one_block_by_block(tiny_vae_path):
    from liveavatar.runtime.decoding import SteadyDecoder

    eager, fixed = WanVAE.from_checkpoint(tiny_vae_path), WanVAE.from_checkpoint(tiny_vae_path)
    fixed.steady_decoder = SteadyDecoder(fixed)
    for request in range(2):  # the second stream takes over the first one's buffers
        z = _randn(1, 16, 7 + 4 * 3, 3, 5, seed=10 + request)
        stream = fixed.stream_decoder()
        for expected, got in zip(_blocks(eager.stream_decoder(), z), _blocks(stream, z)):
            assert torch.equal(got, expected)
        assert stream.steady is not None
    assert len(fixed.steady_decoder.streams) == 1
    fixed.stream_decoder().decode(z[:, :, :7])  # a newer stream settles and takes the buffers over
    with pytest.raises(RuntimeError, match="taken over"):
        stream.decode(z[:, :, :1])


def test_compiled_decoder_has_one_graph_for_every_block_and_stream(tiny_vae_path):
    from torch._dynamo.utils import counters

    from liveavatar.runtime.compile import compile_decoder

    eager, fast = WanVAE.from_checkpoint(tiny_vae_path), WanVAE.from_checkpoint(tiny_vae_path)
    fallback = compile_decoder(fast, cuda_graphs=False, backend="aot_eager")  # the graph, not the codegen
    before = counters["stats"]["unique_graphs"]
    for request in range(2):
        z = _randn(1, 16, 7 + 3 * 3, 3, 5, seed=20 + request)
        # The second stream's blocks arrive as their own tensors, so its latent frames have other strides than
        # the first's (as a CUDA-graph capture's copy does): that must not compile a second graph.
        blocks = _blocks(fast.stream_decoder(), z if request == 0 else z.clone(memory_format=torch.channels_last_3d))
        for expected, got in zip(_blocks(eager.stream_decoder(), z), blocks):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert fallback.error is None
    assert counters["stats"]["unique_graphs"] - before == 1
