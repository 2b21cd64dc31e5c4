"""How pinned host memory is carved into tensors, as plain arithmetic.

PyTorch's pinned allocator rounds every allocation up to a power of two (a 5.2 GB tensor would take
8 GiB), so `liveavatar.runtime.transfer.PinnedArena` carves tensors out of power-of-two chunks of at least
1 GiB instead: each tensor goes to the first chunk with room for it (at a 256-byte boundary), so smaller
tensors fill the tails that larger ones left; a new chunk opens when none has room. The planner packs the
same allocation sizes in the same order with `packed_bytes`, so the pinned bytes it predicts are the
bytes the arena takes (what is left of the chunks included). Imports nothing.
"""
from __future__ import annotations

import functools
from typing import Iterable

SLOT_ALIGNMENT = 256
CHUNK_BYTES = 1 << 30


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the slot alignment."""
    return -(-nbytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


class ChunkPacker:
    """The arena's bookkeeping: which chunk and offset the next tensor gets, and when a chunk opens."""

    def __init__(self):
        self.chunks: list[list[int]] = []  # [size, bytes carved so far] of every chunk opened
        self.total_bytes = 0

    def place(self, nbytes: int) -> tuple[int, int, int]:
        """(chunk index, offset, bytes of a chunk opened for it or 0) for a tensor of ``nbytes``."""
        nbytes = max(1, nbytes)
        for index, (size, used) in enumerate(self.chunks):
            start = aligned(used)
            if start + nbytes <= size:
                self.chunks[index][1] = start + nbytes
                return index, start, 0
        opened = max(CHUNK_BYTES, 1 << (nbytes - 1).bit_length())
        self.chunks.append([opened, nbytes])
        self.total_bytes += opened
        return len(self.chunks) - 1, 0, opened


def packed_bytes(sizes: Iterable[int]) -> int:
    """Bytes of the chunks an arena opens for tensors of ``sizes`` allocated in that order."""
    return _packed_bytes(tuple(sizes))


@functools.lru_cache(maxsize=4096)  # the planner packs the same layers and caches for many placements
def _packed_bytes(sizes: tuple[int, ...]) -> int:
    packer = ChunkPacker()
    for nbytes in sizes:
        packer.place(nbytes)
    return packer.total_bytes
