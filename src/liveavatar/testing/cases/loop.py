"""Fixture kind B: the sampling loop end to end (single-GPU offline / online decode, and the TPP pipeline).

The variant comes from the manifest: a ``world_size`` (TPP) means our ``streaming`` mode with one rd list
per step (rank); otherwise ``single_gpu`` mode with ``generate_kwargs.enable_online_decode``. The loop runs
on the injected text context, audio features and noise, with the recorded ``relative_dist`` draws, and
with conditioning latents computed by our VAE from ``in.ref_pixel_values`` (compared to ``cond.*``).
Every shape, length, step count and tolerance is read from the manifest.

With ``ranks`` the DiT steps run in the timestep pipeline over that many local processes (gloo), each
loading the fixture's DiT; the loop, the decode and every comparison stay in this process.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from liveavatar.geometry import ClipGeometry
from liveavatar.models.quantised_attention import SelfAttention
from liveavatar.models.transformer import CausalS2VTransformer
from liveavatar.models.vae import WanVAE
from liveavatar.options import Mode
from liveavatar.runtime.caches import build_caches
from liveavatar.runtime.conditioning import WholeFileAudio, encode_reference
from liveavatar.runtime.executors import BlockExecutor, SequentialFactory
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.sampler import BlockLatents, VideoFrames, make_decoder, recorded_ref_rope_offsets, sample
from liveavatar.runtime.schedule import FlowMatchSchedule
from liveavatar.testing.parity import Comparison, Fixture, Tolerance, compare

DIT_WEIGHTS = "weights/dit"
VAE_WEIGHTS = "weights/vae/Wan2.1_VAE.pth"


class _RecordingExecutor:
    """Runs ``inner`` and keeps the clip and the (ref, motion) latents of every sink prefill, to check them
    against ``cond.*``."""

    def __init__(self, inner: BlockExecutor, *, blocks_per_clip: int):
        self.inner = inner
        self.depth = inner.depth
        self.blocks_per_clip = blocks_per_clip
        self.prefills: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.clip = 0  # the clip of the next block submitted

    def prefill(self, ref_latents, motion_latents):
        self.prefills[self.clip] = (ref_latents, motion_latents)
        self.inner.prefill(ref_latents, motion_latents)

    def submit(self, job):
        self.clip = job.clip + 1 if job.block == self.blocks_per_clip - 1 else job.clip
        self.inner.submit(job)

    def collect(self):
        return self.inner.collect()


@contextmanager
def _executor_factory(fixture: Fixture, geometry: ClipGeometry, text: torch.Tensor, steps: int, ranks: int | None,
                      attention: str):
    """A `SequentialFactory`, or the step ranks' executor factory over ``ranks`` local processes (stopped on
    exit), whose ranks run the ``attention`` mode."""
    if not ranks or ranks < 2:
        yield SequentialFactory()
        return
    from liveavatar.runtime.multi_gpu import StageSpec, spawn_step_ranks

    spec = StageSpec(str(fixture.path(DIT_WEIGHTS)), Placement(), "cpu", "float32", threads=torch.get_num_threads())
    step_ranks = spawn_step_ranks([spec] * (ranks - 1), torch.device("cpu"), sample_steps=steps)
    try:
        yield step_ranks.executor(geometry, text, attention)
    finally:
        step_ranks.close()


def _exact(name: str, got: list, expected: list) -> Comparison:
    """A bookkeeping check (schedule, geometry): values must match the manifest exactly."""
    return compare(name, torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                   Tolerance(0.0, 0.0))


def _trace_names(manifest: dict) -> dict[tuple[int, int, int], str]:
    """(clip, block, step) -> the trace tensor name of that DiT call."""
    names = {}
    for entry in manifest.get("trace", []):
        prefix = f"trace.rank{entry['rank']}.call{entry['call']}" if "rank" in entry else f"trace.call{entry['call']}"
        names[(entry["clip"], entry["block"], entry["step"])] = prefix + ".out"
    return names


def run(fixture: Fixture, ranks: int | None = None, placement: Placement = Placement(),
        self_attention: SelfAttention = SelfAttention()) -> Iterator[Comparison]:
    """The fixture's comparisons; ``placement`` changes how the caches are stored, ``self_attention`` the
    blocks' self-attention (an FP8 KV or a quantised-attention run measures its error against the float32
    results)."""
    manifest = fixture.manifest
    kwargs = manifest["generate_kwargs"]
    tpp = "world_size" in manifest
    mode = Mode.STREAMING if tpp else Mode.SINGLE_GPU
    online = bool(kwargs.get("enable_online_decode", False)) and not tpp
    num_clips = manifest["n_clips"]

    height, width = manifest["generated_hw"]
    geometry = ClipGeometry(height, width, kwargs["infer_frames"])
    yield _exact("geometry (latent hw, frame tokens, latent frames, blocks, kv tokens)",
                 [geometry.latent_height, geometry.latent_width, geometry.frame_tokens, geometry.latent_frames,
                  geometry.blocks_per_clip, geometry.kv_tokens],
                 [*manifest["latent_hw"], manifest["frame_seq_len"], manifest["latent_frames_per_clip"],
                  manifest["blocks_per_clip"], manifest["kv_cache_length_tokens"]])

    recorded = manifest["scheduler"]
    schedule = FlowMatchSchedule.create(kwargs["sampling_steps"], shift=recorded["shift"],
                                        num_train_timesteps=recorded["num_train_timesteps"])
    yield _exact("schedule timesteps + sigmas", schedule.timesteps.tolist() + schedule.sigmas.tolist(),
                 recorded["timesteps"] + recorded["sigmas"])

    dtype = torch.float32
    model = CausalS2VTransformer.from_pretrained(fixture.path(DIT_WEIGHTS), device="cpu", dtype=dtype)
    model.self_attention = self_attention
    vae = WanVAE.from_checkpoint(fixture.path(VAE_WEIGHTS), device="cpu", dtype=dtype)

    reference = encode_reference(vae, fixture["in.ref_pixel_values"].unsqueeze(0), mode)
    first_ref, first_motion = ("cond.ref_latents", "cond.motion_latents") if tpp else \
        ("cond.clip0.ref_latents", "cond.clip0.motion_latents_last19")
    yield fixture.compare(first_ref, reference.ref, "cond_latents")
    yield fixture.compare(first_motion, reference.dit_motion, "cond_latents")

    trace_names = {key: name for key, name in _trace_names(manifest).items() if name in fixture}
    trace_got: dict[str, torch.Tensor] = {}

    def record_forward(clip, block, step, x, velocity):
        name = trace_names.get((clip, block, step))
        if name is not None:
            trace_got[name] = velocity.clone()

    if tpp:
        per_rank = manifest["relative_dist_draws_per_rank"]
        draws = recorded_ref_rope_offsets([per_rank[str(step)] for step in range(schedule.num_steps)])
    else:
        draws = recorded_ref_rope_offsets(manifest["relative_dist_draws"])
    clips: dict[int, list[torch.Tensor]] = {}
    frames: list[torch.Tensor] = []
    audio = WholeFileAudio(fixture["in.audio_emb"], geometry)
    with _executor_factory(fixture, geometry, fixture["in.context"], schedule.num_steps, ranks,
                           self_attention.mode) as factory:
        steps = factory.local_steps(schedule.num_steps)
        caches = build_caches(model, placement, geometry, steps, device="cpu", dtype=dtype) if steps else None
        executor = _RecordingExecutor(factory(model, caches, schedule, model.text_kv(fixture["in.context"]),
                                              on_forward=record_forward),
                                      blocks_per_clip=geometry.blocks_per_clip)
        for event in sample(executor, make_decoder(mode, vae, reference, geometry), reference, audio, geometry,
                            noise=lambda clip: fixture[f"in.noise.clip{clip}"].to(dtype), ref_rope_offset=draws,
                            num_steps=schedule.num_steps, total_blocks=num_clips * geometry.blocks_per_clip, mode=mode, online_decode=online):
            if isinstance(event, BlockLatents):
                clips.setdefault(event.clip, []).append(event.latents)
            elif isinstance(event, VideoFrames):
                frames.append(event.frames)

    if trace_got:
        names = [name for name in trace_names.values() if name in trace_got]
        yield fixture.compare(f"trace.*.out ({len(names)} DiT calls)", torch.stack([trace_got[n] for n in names]),
                              "trace_out", ref=torch.stack([fixture[n] for n in names]))
    for clip in range(num_clips):
        yield fixture.compare(f"out.latents.clip{clip}", torch.cat(clips[clip], dim=1), "latents")

    prefill_clips = manifest["sink_prefill_clips"] if tpp else manifest["prefill_clips"]
    yield _exact("sink prefilled before clips", sorted(executor.prefills), prefill_clips)
    if tpp and "out.ref_latents_broadcast" in fixture:
        yield fixture.compare("out.ref_latents_broadcast", torch.cat(clips[0], dim=1)[None, :, 0:1], "ref_broadcast")
        if 1 in executor.prefills:
            yield fixture.compare("out.ref_latents_broadcast (clip 1 sink)", executor.prefills[1][0], "ref_broadcast",
                                  ref=fixture["out.ref_latents_broadcast"])
    for clip in prefill_clips[1:]:
        if f"cond.clip{clip}.ref_latents" in fixture and clip in executor.prefills:
            ref, motion = executor.prefills[clip]
            yield fixture.compare(f"cond.clip{clip}.ref_latents", ref, "cond_latents")
            yield fixture.compare(f"cond.clip{clip}.motion_latents_last19", motion, "cond_latents")

    video = torch.cat(frames, dim=1)
    yield _exact("video frames", [video.shape[1]], [manifest["video_frames"]])
    yield fixture.compare("out.video", video[:, ::manifest["video_frame_stride"]], "video")
