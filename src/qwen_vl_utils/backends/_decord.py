"""decord: batched random access. Its bundled FFmpeg has no AV1, its seeks land on wrong frames in HEVC and
MPEG-4 part 2, and it corrupts rotated streams: those go to PyAV with a warning (``unsupported``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import decord
import numpy as np

from .._probe import VideoInfo
from .._sources import Source
from ._chunks import avi_reordering, batches

NAME = "decord"
APPLIES_ROTATION = False


def unsupported(info: VideoInfo) -> Optional[str]:
    if info.codec in ("av1", "libdav1d", "libaom-av1"):
        return "decord 0.6 bundles an FFmpeg that cannot decode AV1"
    if info.codec in ("hevc", "mpeg4"):
        return f"decord 0.6 seeks to the wrong frames in {info.codec.upper()} streams"
    if info.rotation:
        return "decord 0.6 returns corrupt frames for videos with rotation metadata"
    return avi_reordering(info)


def read(source: Source, info: VideoInfo, indices: list[int], threads: int) -> Iterator[tuple[int, np.ndarray]]:
    reader = decord.VideoReader(source.open(), ctx=decord.cpu(0), num_threads=threads)
    try:
        last = len(reader) - 1
        for wanted, clamped in batches(indices, last):
            data = reader.get_batch(clamped).asnumpy()
            yield from zip(wanted, data)
    finally:
        del reader
