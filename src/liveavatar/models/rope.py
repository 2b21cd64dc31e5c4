"""Rotary position embedding of the causal S2V DiT, computed on the fly from integer token positions.

Every token has a (frame, row, column) position. A head of width D has D/2 rotation pairs (dims 2j, 2j+1
as real/imaginary parts): the first D/2 - 2*(D/2 // 3) pairs turn with the frame index, the next D/2 // 3
with the row, the last D/2 // 3 with the column.

The reference looks the rotations up in a 45,000-row float64 table and stores the per-token result as
complex32, i.e. cos/sin rounded to float16 — that rounding is part of its numerics and is kept here. The
angles are computed from the positions instead of a table, so frame indices have no upper bound (the
reference raises IndexError after ~2 hours of video), and negative frames equal the reference's complex
conjugate of the |frame| row.
"""
from __future__ import annotations

import numpy as np
import torch

THETA = 10000.0


def pair_split(head_dim: int) -> tuple[int, int, int]:
    """Number of rotation pairs driven by (frame, row, column)."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def _inverse_frequencies(head_dim: int) -> torch.Tensor:
    """float64 [D/2]: frame frequencies, then row, then column ones (each axis has its own 1/θ^(2k/n))."""
    parts = []
    for pairs in pair_split(head_dim):
        width = 2 * pairs
        parts.append(1.0 / torch.pow(THETA, torch.arange(0, width, 2, dtype=torch.float64).div(width)))
    return torch.cat(parts)


def rotation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision in which the rotation is applied to q/k of ``dtype``.

    The reference rotates in float64. For float32 activations that is what we do too; for bf16/fp16
    activations float32 is already exact (products of an 8/11-bit mantissa with the float16 cos/sin fit
    in 24 bits, and the single rounding of the sum equals float64's rounding followed by the cast).
    """
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def rotation(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [N, 1, D/2] (broadcast over heads) for integer ``positions`` [N, 3] = (frame, row, col).

    The angles are computed in float64 like the reference table, rounded to float16 like its complex32
    storage, then returned in ``dtype`` (see ``rotation_dtype``).
    """
    inverse = _inverse_frequencies(head_dim).to(positions.device)
    axis = torch.repeat_interleave(torch.arange(3, device=positions.device),
                                   torch.tensor(pair_split(head_dim), device=positions.device))
    cos, sin = _cos_sin(positions.to(torch.float64)[:, axis] * inverse, dtype)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def _cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 angles -> cos and sin rounded to float16 (the reference's complex32), returned in ``dtype``."""
    return torch.cos(angles).to(torch.float16).to(dtype), torch.sin(angles).to(torch.float16).to(dtype)


class GridRotation:
    """Rotations of whole latent grids (every token of frames ``start..start+f-1`` x rows x columns), the
    shape of a block and of the reference frame in the sink, from per-axis tables.

    A token's rotation is its frame's pairs, then its row's, then its column's, so the row and column
    tables are computed once per grid size and only the frames' few values per call. The values equal
    ``rotation(block_positions(...))`` exactly (the same float64 products, the same float16 rounding).
    """

    def __init__(self, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.dtype, self.device = dtype, torch.device(device)
        frame_pairs, row_pairs, _ = pair_split(head_dim)
        inverse = _inverse_frequencies(head_dim).to(self.device)
        self.frame_inverse = inverse[:frame_pairs]
        self.row_inverse = inverse[frame_pairs:frame_pairs + row_pairs]
        self.col_inverse = inverse[frame_pairs + row_pairs:]
        self._plane: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _axis(self, start: int, count: int, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # arange makes the positions on the device from the scalars: no host copy, so nothing waits.
        positions = torch.arange(start, start + count, dtype=torch.float64, device=self.device)
        return _cos_sin(positions[:, None] * inverse, self.dtype)

    def plane(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [rows, cols, row+column pairs] of one frame's grid (computed once per size)."""
        if (rows, cols) not in self._plane:
            row_cos, row_sin = self._axis(0, rows, self.row_inverse)
            col_cos, col_sin = self._axis(0, cols, self.col_inverse)
            self._plane[rows, cols] = tuple(
                torch.cat([r[:, None].expand(-1, cols, -1), c[None].expand(rows, -1, -1)], dim=-1)
                for r, c in ((row_cos, col_cos), (row_sin, col_sin)))
        return self._plane[rows, cols]

    def __call__(self, start_frame: int, frames: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [frames*rows*cols, 1, D/2] of the grid's tokens in frame, row, column order."""
        frame_parts = self._axis(start_frame, frames, self.frame_inverse)
        out = []
        for frame, plane in zip(frame_parts, self.plane(rows, cols)):
            grid = torch.cat([frame[:, None, None].expand(-1, rows, cols, -1), plane.expand(frames, -1, -1, -1)],
                             dim=-1)
            out.append(grid.reshape(frames * rows * cols, 1, -1))
        return out[0], out[1]


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., N, heads, D] by the per-token (cos, sin) [N, 1, D/2]; the result is cast through
    float32 back to x's dtype, as the reference does."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)
    return rotated.to(torch.float32).to(x.dtype)


def _axis_positions(start: int, count: int, target: int) -> np.ndarray:
    """The reference's position rule along one axis: ``count`` points of linspace(start, start+target-1),
    truncated toward zero; a negative start is mirrored (positions -|...|)."""
    if start >= 0:
        return np.linspace(start, start + target - 1, count).astype(int)
    return -np.linspace(-start, -start - target + 1, count).astype(int)


def grid_positions(start: tuple[int, int, int], extent: tuple[int, int, int],
                   target: tuple[int, int, int]) -> torch.Tensor:
    """Positions [F*H*W, 3] of a frame-major token grid of size ``extent`` whose (frame, row, column)
    indices spread over ``target`` starting at ``start``."""
    axes = [torch.from_numpy(_axis_positions(s, n, t)) for s, n, t in zip(start, extent, target)]
    frames, rows, cols = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([frames, rows, cols], dim=-1).reshape(-1, 3).to(torch.long)


def block_positions(start_frame: int, frames: int, rows: int, cols: int) -> torch.Tensor:
    """Positions of a block of noisy tokens whose first latent frame has absolute index ``start_frame``."""
    return grid_positions((start_frame, 0, 0), (frames, rows, cols), (frames, rows, cols))


def condition_positions(latent_h: int, latent_w: int, *, ref_frame: int,
                        buckets: tuple[int, ...]) -> torch.Tensor:
    """Sink positions of the condition tokens, in sequence order: the reference frame (at ``ref_frame``)
    and the frame-packed motion groups, newest first (bucket i packs ``buckets[i]`` latents with a
    2^i-times coarser grid; its frames sit at -(buckets[0]+…+buckets[i]) onwards)."""
    rows, cols = latent_h // 2, latent_w // 2
    groups = [grid_positions((ref_frame, 0, 0), (1, rows, cols), (1, rows, cols))]
    for index, frames in enumerate(buckets):
        ratio = 2 ** index
        start = -sum(buckets[: index + 1])
        groups.append(grid_positions((start, 0, 0), (frames // ratio, rows // ratio, cols // ratio),
                                     (frames, rows, cols)))
    return torch.cat(groups)
