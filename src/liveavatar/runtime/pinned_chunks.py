"""How pinned host memory is carved into tensors, as plain arithmetic.

PyTorch's pinned allocator rounds every allocation up to a power of two (a 5.2 GB tensor would take
8 GiB), so `liveavatar.runtime.transfer.PinnedArena` carves tensors out of power-of-two chunks of at least
1 GiB instead, each tensor at the next 256-byte boundary of the current chunk, a new chunk when it does not
fit. The planner packs the same allocation sizes in the same order with `packed_bytes`, so the pinned
bytes it predicts are the bytes the arena takes (tails of chunks included). Imports nothing.
"""
from __future__ import annotations

from typing import Iterable

SLOT_ALIGNMENT = 256
CHUNK_BYTES = 1 << 30


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the slot alignment."""
    return -(-nbytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


class ChunkPacker:
    """The arena's bookkeeping: where the next tensor goes and when a chunk must be opened."""

    def __init__(self):
        self.chunk_bytes = 0  # size of the chunk being carved (0: none yet)
        self.used = 0  # bytes of it carved so far
        self.total_bytes = 0  # every chunk opened

    def place(self, nbytes: int) -> tuple[int, int]:
        """(offset of a tensor of ``nbytes`` in the current chunk, bytes of the chunk to open first or 0)."""
        nbytes = max(1, nbytes)
        start = aligned(self.used)
        opened = 0
        if start + nbytes > self.chunk_bytes:
            opened = max(CHUNK_BYTES, 1 << (nbytes - 1).bit_length())
            self.chunk_bytes, start = opened, 0
            self.total_bytes += opened
        self.used = start + nbytes
        return start, opened


def packed_bytes(sizes: Iterable[int]) -> int:
    """Bytes of the chunks an arena opens for tensors of ``sizes`` allocated in that order."""
    packer = ChunkPacker()
    for nbytes in sizes:
        packer.place(nbytes)
    return packer.total_bytes
