"""Helpers shared by the backends that decode by frame index in batches."""

from __future__ import annotations

from collections.abc import Iterator

#: frames decoded per batch: large enough to amortise a call, small enough to bound full-resolution memory
BATCH = 8


def batches(indices: list[int], last: int) -> Iterator[tuple[list[int], list[int]]]:
    """(requested, clamped) index batches; indices past the decoder's last frame repeat that frame."""
    for i in range(0, len(indices), BATCH):
        chunk = indices[i : i + BATCH]
        yield chunk, [min(j, last) for j in chunk]
