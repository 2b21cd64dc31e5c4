"""The sampling loop: rd policies, bookkeeping of both reference behaviours, and the loop fixtures (kind B).

The bookkeeping tests drive the real loop with a stand-in executor and VAE whose outputs carry the id of
the latent frame they come from, so every clip/block/frame index the loop computes can be checked.
"""
import json

import numpy as np
import pytest
import torch

from liveavatar.geometry import ClipGeometry
from liveavatar.io.video_writer import pixels_to_uint8
from liveavatar.options import ONLINE_DECODE_IGNORED, Mode, RequestOptions
from liveavatar.runtime.conditioning import (
    StreamedAudio,
    WholeFileAudio,
    clip_noise,
    encode_reference,
    waveform_chunks,
)
from liveavatar.runtime.sampler import (
    BlockLatents,
    DecodedFrames,
    VideoFrames,
    make_decoder,
    recorded_ref_rope_offsets,
    ref_rope_offsets,
    sample,
)
from liveavatar.testing import parity

# ------------------------------------------------------------------------------------------------ rd


def test_seeded_single_gpu_draws_match_an_official_run_seeded_the_same(fixtures_dir):
    manifest = json.loads((fixtures_dir / "B_loop_offline.json").read_text())
    seed = manifest["generate_kwargs"]["python_random_seed"]
    draw = ref_rope_offsets("seeded", base_seed=seed, mode="single_gpu", num_steps=4)
    calls = [(entry["step"]) for entry in manifest["trace"]]
    assert [draw(step) for step in calls] == manifest["relative_dist_draws"]


def test_seeded_streaming_draws_match_tpp_ranks_seeded_base_plus_rank(fixtures_dir):
    manifest = json.loads((fixtures_dir / "B_loop_tpp.json").read_text())
    seeds = manifest["python_random_seed_per_rank"]
    base = seeds["0"]
    assert all(seeds[str(rank)] == base + rank for rank in range(4))
    draw = ref_rope_offsets("seeded", base_seed=base, mode="streaming", num_steps=4)
    per_rank = manifest["relative_dist_draws_per_rank"]
    calls = len(per_rank["0"])
    got = {str(step): [] for step in range(4)}
    for _ in range(calls):  # the loop's order: block by block, steps 0..3 inside a block
        for step in range(4):
            got[str(step)].append(draw(step))
    assert got == per_rank


def test_fixed_random_and_bad_policies():
    fixed = ref_rope_offsets(17, base_seed=0, mode="streaming", num_steps=4)
    assert {fixed(step) for step in range(4)} == {17}
    entropy = ref_rope_offsets("random", base_seed=0, mode="single_gpu", num_steps=4)
    assert all(4 <= entropy(0) <= 30 for _ in range(200))
    for bad in (3, 31, "sometimes", 2.5, True):
        with pytest.raises(ValueError, match="ref_rope_offset"):
            ref_rope_offsets(bad, base_seed=0, mode="streaming", num_steps=4)


def test_recorded_draws_replay_in_order_and_per_step():
    shared = recorded_ref_rope_offsets([5, 6, 7])
    assert [shared(3), shared(0), shared(1)] == [5, 6, 7]
    per_step = recorded_ref_rope_offsets([[10, 11], [20, 21]])
    assert [per_step(1), per_step(0), per_step(0), per_step(1)] == [20, 10, 11, 21]


def test_noise_is_a_cpu_generator_seeded_per_clip(fixtures_dir):
    tensors = parity.Fixture(fixtures_dir / "B_loop_offline.json")
    kwargs = tensors.manifest["generate_kwargs"]
    height, width = tensors.manifest["generated_hw"]
    geometry = ClipGeometry(height, width, kwargs["infer_frames"])
    for clip in range(tensors.manifest["n_clips"]):
        noise = clip_noise(kwargs["seed"], clip, geometry, device="cpu", dtype=torch.float32)
        assert torch.equal(noise, tensors[f"in.noise.clip{clip}"])
    assert clip_noise(1, 0, geometry, device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16


# ------------------------------------------------------------------------- bookkeeping with stand-ins

H, W = 64, 64  # latent 8x8


class IdVAE:
    """Causal stand-in: latent frame k <- pixel frames 4k-3..4k (k=0 <- frame 0); decode gives the first
    latent 1 frame and every later one 4, each frame carrying the latent's value."""

    def encode(self, video):
        frames = video.shape[2]
        latents = 1 + (frames - 1) // 4
        means = [video[:, :, 0].mean()] + [video[:, :, 4 * k - 3:4 * k + 1].mean() for k in range(1, latents)]
        return torch.stack(means).view(1, 1, latents, 1, 1).expand(1, 16, latents, H // 8, W // 8).float()

    def decode(self, z):
        return IdStreamDecoder().decode(z)

    def stream_decoder(self):
        return IdStreamDecoder()


class IdStreamDecoder:
    def __init__(self):
        self.started = False

    def decode(self, z):
        values = z[0, 0, :, 0, 0].float()
        repeats = torch.full((values.numel(),), 4)
        if not self.started:
            repeats[0] = 1
            self.started = True
        frames = values.repeat_interleave(repeats)
        return frames.view(1, 1, -1, 1, 1).expand(1, 3, -1, H, W).clone()


class RecordingExecutor:
    """Denoises block (clip, block) to latents whose frame f holds the id 1000 + 100*clip + 10*block + f;
    ``depth`` blocks may be in flight (a pipeline's view of submit/collect)."""

    def __init__(self, depth=1):
        self.depth = depth
        self.log = []
        self.pending = []

    def prefill(self, ref_latents, motion_latents):
        self.log.append(("prefill", ref_latents.clone(), motion_latents.clone()))

    def submit(self, job):
        assert len(self.pending) < self.depth, "more blocks submitted than the executor's depth"
        self.log.append(("block", job.clip, job.block, job.start_frame, job.noise.clone(), job.audio.clone(),
                         job.ref_rope_offsets))
        ids = torch.tensor([1000 + 100 * job.clip + 10 * job.block + f for f in range(job.noise.shape[1])],
                           dtype=torch.float32)
        self.pending.append(ids.view(1, -1, 1, 1).expand_as(job.noise).clone())

    def collect(self):
        return self.pending.pop(0)


class EndingAudio:
    """Whole-file features that end after ``blocks`` blocks (a live source that stops)."""

    def __init__(self, features, geometry, blocks):
        self.whole, self.blocks, self.geometry = WholeFileAudio(features, geometry), blocks, geometry

    def block(self, clip, block):
        if clip * self.geometry.blocks_per_clip + block >= self.blocks:
            return None
        return self.whole.block(clip, block)


class LateDecoder:
    """The overlapped decoder's contract without CUDA: a block's (frames, uint8 pixels) come out when the
    next block is added, the last ones at ``flush``."""

    def __init__(self, inner):
        self.inner, self.pending = inner, []

    def add_block(self, latents):
        self.pending += [DecodedFrames(d.frames, pixels_to_uint8(d.frames)) for d in self.inner.add_block(latents)]
        return [self.pending.pop(0)] if len(self.pending) > 1 else []

    def flush(self):
        out, self.pending = self.pending, []
        return out


def _run(mode, num_clips, *, online=False, infer_frames=48, depth=1, audio_blocks=None, late=False):
    geometry = ClipGeometry(H, W, infer_frames)
    reference_pixels = torch.full((1, 3, 1, H, W), 0.25)
    reference = encode_reference(IdVAE(), reference_pixels, mode)
    audio = torch.arange(num_clips * infer_frames, dtype=torch.float32).view(1, 1, 1, -1).expand(1, 25, 2, -1)
    executor = RecordingExecutor(depth)
    features = WholeFileAudio(audio, geometry) if audio_blocks is None else EndingAudio(audio, geometry, audio_blocks)
    events = []
    decoder = make_decoder(mode, IdVAE(), reference, geometry)
    for event in sample(executor, LateDecoder(decoder) if late else decoder, reference, features, geometry,
                        total_blocks=None if audio_blocks else num_clips * geometry.blocks_per_clip, mode=mode,
                        online_decode=online, ref_rope_offset=recorded_ref_rope_offsets(range(4, 31)), num_steps=2,
                        noise=lambda clip: torch.full((16, geometry.latent_frames, 8, 8), float(clip))):
        # Record how many blocks had been denoised when each event reached the consumer.
        events.append((event, sum(1 for entry in executor.log if entry[0] == "block")))
    return geometry, reference, executor, events


def _video(events):
    frames = [event for event, _ in events if isinstance(event, VideoFrames)]
    assert [f.start for f in frames] == [sum(g.count for g in frames[:i]) for i in range(len(frames))]
    return torch.cat([f.frames[0, :, 0, 0] for f in frames])


def _block_ids(clip, block, geometry):
    return [1000 + 100 * clip + 10 * block + f for f in range(3)]


@pytest.mark.parametrize("infer_frames", [48, 24])
def test_blocks_positions_noise_and_audio_slices(infer_frames):
    geometry, _, executor, _ = _run("streaming", 3, infer_frames=infer_frames)
    blocks = [entry for entry in executor.log if entry[0] == "block"]
    assert len(blocks) == 3 * geometry.blocks_per_clip
    for index, (_, clip, block, start_frame, noise, audio, _) in enumerate(blocks):
        assert (clip, block) == divmod(index, geometry.blocks_per_clip)
        assert start_frame == 3 * index
        assert noise.shape == (16, 3, 8, 8) and bool((noise == clip).all())
        first = clip * infer_frames + block * geometry.frames_per_block
        assert audio[0, 0, 0].tolist() == list(range(first, first + 12))


def test_streaming_mode_rolls_the_sink_and_decodes_every_block_at_once():
    geometry, reference, executor, events = _run("streaming", 3)
    prefills = [entry for entry in executor.log if entry[0] == "prefill"]
    assert len(prefills) == 2  # before clip 0 and clip 1 only
    kinds = [entry[0] for entry in executor.log]
    assert kinds[:geometry.blocks_per_clip + 2] == ["prefill"] + ["block"] * geometry.blocks_per_clip + ["prefill"]
    assert torch.equal(prefills[0][1], reference.ref)
    assert bool((prefills[1][1] == 1000).all()) and prefills[1][1].shape == (1, 16, 1, 8, 8)  # clip 0 frame 0
    assert torch.equal(prefills[0][2], prefills[1][2])  # motion latents never change
    assert reference.motion.shape[2] == 19 and reference.history.shape[2] == 73
    # Each block's job carries its RoPE offsets, one per step, drawn in submit order (4, 5 | 6, 7 | ...).
    draws = [entry[6] for entry in executor.log if entry[0] == "block"]
    assert draws[:3] == [(4, 5), (6, 7), (8, 9)] and len(draws) == 3 * geometry.blocks_per_clip
    # Every block's frames reach the consumer before the next block is denoised.
    frame_events = [(event, done) for event, done in events if isinstance(event, VideoFrames)]
    assert [done for _, done in frame_events] == list(range(1, 3 * geometry.blocks_per_clip + 1))
    assert [event.count for event, _ in frame_events] == [9] + [12] * (3 * geometry.blocks_per_clip - 1)
    video = _video(events)
    assert video.numel() == geometry.video_frames(3) == 3 * 48 - 3
    expected = [float(i) for c in range(3) for b in range(4) for i in _block_ids(c, b, geometry) for _ in range(4)][3:]
    assert video.tolist() == expected


@pytest.mark.parametrize("online", [False, True])
def test_single_gpu_mode_decodes_each_clip_with_its_history(online):
    geometry, reference, executor, events = _run("single_gpu", 3, online=online)
    assert reference.history.shape[2] == 5 * 73 and reference.motion.shape[2] == 92
    assert reference.dit_motion.shape[2] == 19
    prefills = [entry for entry in executor.log if entry[0] == "prefill"]
    assert len(prefills) == (2 if online else 1)
    if online:
        # ref <- clip 0's first latent; motion <- the re-encoded history of 320 reference + 45 new frames.
        assert bool((prefills[1][1] == 1000).all())
        history = [0.25] * (365 - 45) + [float(i) for b in range(4) for i in _block_ids(0, b, geometry)
                                          for _ in range(4)][3:]
        expected_motion = IdVAE().encode(torch.tensor(history).view(1, 1, -1, 1, 1))[:, :, -19:]
        assert torch.allclose(prefills[1][2], expected_motion)
    frame_events = [(event, done) for event, done in events if isinstance(event, VideoFrames)]
    assert [done for _, done in frame_events] == [4, 8, 12]  # once per clip, right after its last block
    video = _video(events)
    assert video.numel() == 3 * 48 - 3
    expected = [float(i) for c in range(3) for b in range(4) for i in _block_ids(c, b, geometry) for _ in range(4)][3:]
    assert video.tolist() == expected


def test_single_clip_never_refreshes_the_sink():
    _, _, executor, events = _run("streaming", 1)
    assert sum(1 for entry in executor.log if entry[0] == "prefill") == 1
    assert _video(events).numel() == 45


def test_online_decode_belongs_to_single_gpu_mode_and_unknown_modes_are_refused():
    streaming = RequestOptions(enable_online_decode=True)
    assert not streaming.online_decode and streaming.notices == (ONLINE_DECODE_IGNORED,)
    single = RequestOptions(mode="single_gpu", enable_online_decode=True)
    assert single.online_decode and single.notices == () and single.mode is Mode.SINGLE_GPU
    with pytest.raises(ValueError, match="^mode 'tpp': expected one of streaming, single_gpu"):
        RequestOptions(mode="tpp")


@pytest.mark.parametrize("mode", ["streaming", "single_gpu"])
def test_blocks_in_flight_give_the_same_video_and_sink_refresh(mode):
    """An executor that holds several blocks before handing them back (a pipeline) changes nothing the
    consumer sees but when: the same blocks, prefills (with the same latents) and frames."""
    _, _, one, one_events = _run(mode, 3, online=mode == "single_gpu")
    _, _, deep, deep_events = _run(mode, 3, online=mode == "single_gpu", depth=3)
    assert _video(one_events).tolist() == _video(deep_events).tolist()
    prefills = [[entry[1:] for entry in ex.log if entry[0] == "prefill"] for ex in (one, deep)]
    assert len(prefills[0]) == len(prefills[1])
    for a, b in zip(*prefills):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [e[:4] for e in one.log if e[0] == "block"] == [e[:4] for e in deep.log if e[0] == "block"]


def test_streaming_runs_until_the_audio_ends():
    geometry, _, executor, events = _run("streaming", 3, audio_blocks=6)
    assert sum(1 for entry in executor.log if entry[0] == "block") == 6
    assert _video(events).numel() == 6 * 12 - 3
    with pytest.raises(ValueError, match="whole clips"):
        _run("single_gpu", 3, audio_blocks=6)


def test_a_decoder_one_block_late_gives_the_same_video_with_host_pixels():
    _, _, _, in_line = _run("streaming", 2)
    _, _, executor, late = _run("streaming", 2, late=True)
    assert _video(in_line).tolist() == _video(late).tolist()
    frames = [(event, blocks_done) for event, blocks_done in late if isinstance(event, VideoFrames)]
    assert [blocks_done for _, blocks_done in frames] == [2, 3, 4, 5, 6, 7, 8, 8]  # block k after block k+1
    assert all(np.array_equal(event.uint8(), pixels_to_uint8(event.frames)) and event.pixels is not None
               for event, _ in frames)


def test_block_events_carry_the_clean_latents():
    _, _, _, events = _run("streaming", 2)
    blocks = [event for event, _ in events if isinstance(event, BlockLatents)]
    assert [(b.clip, b.block) for b in blocks] == [(c, b) for c in range(2) for b in range(4)]
    assert all(b.latents[0, :, 0, 0].tolist() == [1000 + 100 * b.clip + 10 * b.block + f for f in range(3)]
               for b in blocks)


# ------------------------------------------------------------------------------------- loop fixtures

def test_tpp_loop_fixture_passes(fixtures_dir, capsys):
    assert parity.main([str(fixtures_dir), "--only", "B_loop_tpp"]) == 0, capsys.readouterr().out


# The single-GPU fixtures decode 104 latents and re-encode 365 frames per clip (the reference's own cost):
# about 75 s each on one CPU thread, the suite's slowest tests, but the loop's parity depends on them.
@pytest.mark.parametrize("name", ["B_loop_offline", "B_loop_online"])
def test_single_gpu_loop_fixtures_pass(fixtures_dir, capsys, name):
    assert parity.main([str(fixtures_dir), "--only", name]) == 0, capsys.readouterr().out


class _ChunkStreamer:
    """Stands in for StreamingAudioFeatures: one block per 1000 samples pushed, the rest at finish()."""

    def __init__(self):
        self.samples = 0
        self.made = 0

    def _blocks(self, upto):
        blocks = []
        while self.made < upto:
            blocks.append(torch.full((1, 25, 2, 12), float(self.made)))
            self.made += 1
        return blocks

    def push(self, chunk):
        self.samples += len(chunk)
        return self._blocks(self.samples // 1000)

    def finish(self):
        return self._blocks(self.samples // 1000 + 1)


def test_streamed_audio_hands_out_blocks_in_order_and_zeros_past_the_end():
    geometry = ClipGeometry(64, 64, 48)
    audio = StreamedAudio(_ChunkStreamer(), waveform_chunks(np.zeros(4500, np.float32), 700), geometry,
                          feature_shape=(25, 2))
    got = [audio.block(clip, block) for clip in range(2) for block in range(4)]
    assert [g[0, 0, 0, 0].item() for g in got[:5]] == [0, 1, 2, 3, 4]  # 4 pushed + 1 from finish()
    assert all(g.shape == (1, 25, 2, 12) for g in got) and all(bool((g == 0).all()) for g in got[5:])
    with pytest.raises(ValueError, match="in order"):
        audio.block(0, 0)
