"""Host<->device copies ordered by CUDA events, and pinned host memory carved from large chunks.

Shared by the layer streamer (weights of streamed blocks) and the host-resident caches. On the CPU the
same calls copy immediately, so the ordering logic built on them runs (and is tested) without a GPU.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from liveavatar.runtime.pinned_chunks import ChunkPacker


class Copier:
    """Host<->device copies on two side streams ordered by events (CUDA), or immediate copies (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)

    def marker(self):
        """An event after everything queued so far on the compute stream (None on the CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, after: Iterable = (),
             to_host: bool = False):
        """Copy every (destination, source) pair once the events in `after` have happened; returns the
        event of the copy's completion (None on the CPU, where the copy is done on return)."""
        if not self.cuda:
            for destination, source in pairs:
                destination.copy_(source)
            return None
        stream = self.d2h if to_host else self.h2d
        with torch.cuda.stream(stream):
            for event in after:
                if event is not None:
                    stream.wait_event(event)
            for destination, source in pairs:
                destination.copy_(source, non_blocking=True)
                if to_host:  # the source may be a temporary of the compute stream
                    source.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def wait(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)


class PinnedArena:
    """Host memory for streamed weights and host caches, pinned when the device is a GPU.

    Tensors are carved out of power-of-two chunks of at least 1 GiB (`liveavatar.runtime.pinned_chunks`
    says why and is the packing rule the planner predicts with). The chunks are freed with the arena and
    the last tensor carved from them.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self.chunks: list[torch.Tensor] = []
        self.packer = ChunkPacker()

    @property
    def nbytes(self) -> int:
        """Bytes of every chunk opened so far (pinned when ``pin``)."""
        return self.packer.total_bytes

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        index, start, opened = self.packer.place(nbytes)
        if opened:
            self.chunks.append(torch.empty(opened, dtype=torch.uint8, pin_memory=self.pin))
        return self.chunks[index][start:start + nbytes].view(dtype).view(shape).zero_()
