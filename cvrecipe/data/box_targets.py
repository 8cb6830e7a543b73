"""A split's box targets: variable-length boxes per image behind the few operations a split's
targets need (length, taking rows, slicing a batch), so a detection split is a Split like any other.

    flat     (M, 6) float32 rows [x1, y1, x2, y2, class, image], pixels in the split's image frame
    offsets  (N + 1,) int64: image i's boxes are rows offsets[i]:offsets[i + 1] (data/ragged.py)

Taking rows re-numbers the image column 0..n-1, so a batch's boxes travel as one (m, 6) array
(torch-side: data/ragged.py `to_targets` turns it into torchvision's per-image dicts).
"""
from __future__ import annotations

import numpy as np



def take(flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The boxes of images `rows` (a batch), re-indexed 0..len(rows)-1: (m, 6) and (len(rows) + 1,)."""
    rows = np.asarray(rows, np.int64)
    counts = offsets[rows + 1] - offsets[rows]
    index = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows]) if len(rows) else np.zeros(0, int)
    out = flat[index.astype(np.int64)].copy()
    out[:, 5] = np.repeat(np.arange(len(rows)), counts)
    return out, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class BoxTargets:
    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat = np.asarray(flat, np.float32).reshape(-1, 6)
        self.offsets = np.asarray(offsets, np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.flat) or (np.diff(self.offsets) < 0).any():
            raise ValueError(f"box offsets must run 0..{len(self.flat)} without decreasing, got "
                             f"{self.offsets[:3].tolist()}...{self.offsets[-1:].tolist()} over {len(self.flat)} rows")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes + self.offsets.nbytes

    @property
    def labels(self) -> np.ndarray:
        """(M,) int64 class of every box."""
        return self.flat[:, 4].astype(np.int64)

    def __getitem__(self, index) -> "BoxTargets":
        """Images `index` (a slice or an integer array), their image column re-numbered from 0."""
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64).reshape(-1)
        return BoxTargets(*take(self.flat, self.offsets, rows))

    def boxes_of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i's (n, 4) float32 boxes and (n,) int64 labels."""
        part = self.flat[self.offsets[i]:self.offsets[i + 1]]
        return part[:, :4], part[:, 4].astype(np.int64)

    def resized(self, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> "BoxTargets":
        """The boxes of images resized from (H, W) `old_hw` to `new_hw`."""
        flat = self.flat.copy()
        flat[:, [0, 2]] *= new_hw[1] / old_hw[1]
        flat[:, [1, 3]] *= new_hw[0] / old_hw[0]
        return BoxTargets(flat, self.offsets)

    def __repr__(self) -> str:
        return f"BoxTargets({len(self)} images, {len(self.flat)} boxes)"
