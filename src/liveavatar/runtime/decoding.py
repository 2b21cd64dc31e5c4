"""The VAE decode on the fast path, and the frames' way to the host, overlapped with the next block's
denoising.

`SteadyDecoder` runs a settled decoder stream (`liveavatar.models.vae.FixedStreamState`) one latent frame at
a time as one compiled step (static shapes: one compile per latent size, nothing recompiles across blocks,
clips or requests), replayed as a CUDA graph where the placement keeps everything resident. The first
three latent frames of a stream (the causal start, where the state still grows) run eagerly.

`OverlappedDecoder` wraps a decoder of the sampling loop (streaming mode's `BlockStreamDecoder`). A block's
decode, its conversion to uint8 pixels and their copy into pinned host memory are queued on a second,
high-priority CUDA stream that waits only for the block's latents; the frames come out at the next block
(`add_block` returns the previous block's frames, `flush` the last ones). By then the loop has queued the
next block's forwards, so the GPU keeps denoising while the host waits for the frames and writes them out:
the host never holds up the GPU, and the decode fills the gaps between the DiT's kernels.
"""
from __future__ import annotations

import warnings
from collections import deque
from typing import Callable

import torch

from liveavatar.io.video_writer import uint8_frames
from liveavatar.models.vae import FixedStreamState, StreamState, WanVAE, decode_latent_frame
from liveavatar.runtime.executors.graphs import cuda_capture
from liveavatar.runtime.sampler import DecodedFrames


class SteadyDecoder:
    """``WanVAE.steady_decoder`` on the fast path: the fixed buffers of one stream per latent size, kept for
    the engine's life (a new stream of the same size takes them over), and the step that continues it.

    ``step``: `decode_latent_frame` or its compiled form; ``cuda_graphs``: capture each size's step at its
    second call and replay it from then on (the first call compiles and warms the kernels); ``memory_format``
    of the buffers (``torch.channels_last_3d`` where it measures faster)."""

    def __init__(self, vae: WanVAE, step: Callable = decode_latent_frame, *, cuda_graphs: bool = False,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.vae, self.step, self.cuda_graphs, self.memory_format = vae, step, cuda_graphs, memory_format
        self.streams: dict[tuple, _FixedStream] = {}
        self.captures = self.replays = 0
        self.failed: str | None = None

    def start(self, settled: StreamState, latent_shape: torch.Size) -> "_FixedStream":
        """The step continuing ``settled`` (one stream per size at a time: the engine runs one request at a
        time; a stream that was taken over refuses to run)."""
        key = (tuple(latent_shape), self.vae.dtype)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = _FixedStream(self, FixedStreamState(settled, self.memory_format))
        else:
            stream.state.load(settled)
        stream.generation += 1
        return stream.handle()


class _FixedStream:
    def __init__(self, owner: SteadyDecoder, state: FixedStreamState):
        self.owner, self.state = owner, state
        self.generation = 0
        self.calls = 0
        self.graph = self.static_z = self.static_frames = None

    def handle(self) -> Callable[[torch.Tensor], torch.Tensor]:
        generation = self.generation

        def step(z: torch.Tensor) -> torch.Tensor:
            if generation != self.generation:
                raise RuntimeError("this VAE decode stream was taken over by a newer stream of the same size")
            return self.run(z)

        return step

    def run(self, z: torch.Tensor) -> torch.Tensor:
        owner = self.owner
        # A latent frame sliced from its block has the block's strides; the compiled step is specialised on
        # strides, so the capture's own contiguous copy would recompile inside the capture, which CUDA refuses
        # (seen on an H100: "operation not permitted when stream is capturing").
        z = z.contiguous()
        self.calls += 1
        if self.graph is None and owner.cuda_graphs and owner.failed is None and self.calls > 1:
            self._capture(z)
        if self.graph is None:
            return owner.step(owner.vae, z, self.state)
        self.static_z.copy_(z)
        self.graph.replay()
        owner.replays += 1
        return self.static_frames.clone()

    def _capture(self, z: torch.Tensor) -> None:
        owner = self.owner
        self.static_z = z.clone()
        try:
            # Its own pool: the decode runs on another stream while the DiT's graphs replay.
            self.graph, self.static_frames = cuda_capture(torch.cuda.graph_pool_handle())(
                lambda: owner.step(owner.vae, self.static_z, self.state))
        except Exception as error:  # an op that cannot be captured here: the compiled step runs as it is
            owner.failed = f"{type(error).__name__}: {error}"
            warnings.warn(f"CUDA graph capture of the VAE decode failed ({owner.failed}); it runs without graphs")
            self.graph = None
            return
        owner.captures += 1


class OverlappedDecoder:
    """Runs ``inner``'s ``add_block`` on its own CUDA stream; hands its frames out, with their uint8 host
    pixels, one block late."""

    def __init__(self, inner, device: torch.device):
        self.inner = inner
        self.stream = torch.cuda.Stream(device, priority=-1)  # frames out as early as the DiT allows
        self.pending: deque = deque()

    def add_block(self, latents: torch.Tensor) -> list[DecodedFrames]:
        """Queue a block's decode; returns the previous block's frames (none for the first block)."""
        ready = torch.cuda.Event()
        ready.record()  # after the work that made the latents
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            latents.record_stream(self.stream)
            for decoded in self.inner.add_block(latents):
                frames = decoded.frames
                pixels = uint8_frames(frames)
                host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(pixels, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self.pending.append((frames, host, done))
        return [self._take()] if len(self.pending) > 1 else []

    def flush(self) -> list[DecodedFrames]:
        """The frames still queued, in order (the loop is over)."""
        out = []
        while self.pending:
            out.append(self._take())
        return out

    def _take(self) -> DecodedFrames:
        frames, host, done = self.pending.popleft()
        done.synchronize()
        consumer = torch.cuda.current_stream()
        consumer.wait_event(done)  # device-side users of the frames see them finished
        frames.record_stream(consumer)
        return DecodedFrames(frames, host.numpy())
