"""The VAE decode and the frames' way to the host, overlapped with the next block's denoising.

`OverlappedDecoder` wraps a decoder of the sampling loop (streaming mode's `BlockStreamDecoder`). A block's
decode, its conversion to uint8 pixels and their copy into pinned host memory are queued on a second,
high-priority CUDA stream that waits only for the block's latents; the frames come out at the next block
(`add_block` returns the previous block's frames, `flush` the last ones). By then the loop has queued the
next block's forwards, so the GPU keeps denoising while the host waits for the frames and writes them out:
the host never holds up the GPU, and the decode fills the gaps between the DiT's kernels.
"""
from __future__ import annotations

from collections import deque

import torch

from liveavatar.io.video_writer import uint8_frames


class OverlappedDecoder:
    """Runs ``inner``'s ``add_block`` on its own CUDA stream; returns (frames, uint8 host pixels) pairs one
    block late."""

    def __init__(self, inner, device: torch.device):
        self.inner = inner
        self.stream = torch.cuda.Stream(device, priority=-1)  # frames out as early as the DiT allows
        self.pending: deque = deque()

    def add_block(self, latents: torch.Tensor):
        """Queue a block's decode; returns the previous block's (frames [3, T, H, W], pixels [T, H, W, 3])
        or None."""
        ready = torch.cuda.Event()
        ready.record()  # after the work that made the latents
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            latents.record_stream(self.stream)
            frames = self.inner.add_block(latents)
            if frames is not None:
                pixels = uint8_frames(frames)
                host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(pixels, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self.pending.append((frames, host, done))
        return self._take() if len(self.pending) > 1 else None

    def flush(self) -> list:
        """The frames still queued, in order (the loop is over)."""
        out = []
        while self.pending:
            out.append(self._take())
        return out

    def _take(self):
        frames, host, done = self.pending.popleft()
        done.synchronize()
        consumer = torch.cuda.current_stream()
        consumer.wait_event(done)  # device-side users of the frames see them finished
        frames.record_stream(consumer)
        return frames, host.numpy()
