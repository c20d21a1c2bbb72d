"""decord: batched random access. Its bundled FFmpeg has no AV1, its seeks land on wrong frames in HEVC and
MPEG-4 part 2, it corrupts rotated streams and cannot open files without a frame count or duration in the
header (live/piped MKV), and it does not follow edit lists or mid-stream size changes: those go to PyAV with a
warning (``unsupported``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import decord
import numpy as np

from ..container._probe import VideoInfo
from ..sources._resolve import Source
from ._chunks import batches, timeline_gaps

NAME = "decord"
APPLIES_ROTATION = False


#: it seeks to the keyframes the container flags, mere recovery points too (see video._backend_for)
SEEKS_TO_FLAGGED_KEYFRAMES = True


def unsupported(info: VideoInfo) -> Optional[str]:
    if info.codec in ("av1", "libdav1d", "libaom-av1"):
        return "decord 0.6 bundles an FFmpeg that cannot decode AV1"
    if info.codec in ("hevc", "mpeg4"):
        return f"decord 0.6 seeks to the wrong frames in {info.codec.upper()} streams"
    if info.rotation:
        return "decord 0.6 returns corrupt frames for videos with rotation metadata"
    if not info.length_in_header:
        return (
            "decord 0.6 cannot open a file whose header gives neither a frame count nor a duration "
            "(as live and piped muxers write MKV/WebM, without cues)"
        )
    return timeline_gaps(info, "decord 0.6")


def read(source: Source, info: VideoInfo, indices: list[int], threads: int) -> Iterator[tuple[int, np.ndarray]]:
    # decord reads a file object whole into memory: give it a path (a remote file is copied to a temporary one)
    reader = decord.VideoReader(source.open(local=True), ctx=decord.cpu(0), num_threads=threads)
    try:
        last = len(reader) - 1
        for wanted, clamped in batches(indices, last):
            data = reader.get_batch(clamped).asnumpy()
            yield from zip(wanted, data)
    finally:
        del reader
