"""torchcodec: FFmpeg through C++, exact frame index from a scan of the file. Files whose edit list hides frames,
whose frame size changes mid-stream, or AVI with B-frames, go to PyAV with a warning (``unsupported``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
from torchcodec.decoders import VideoDecoder

from ..container._probe import VideoInfo
from ..sources._resolve import Source
from ._chunks import batches, timeline_gaps

NAME = "torchcodec"
APPLIES_ROTATION = True  # torchcodec >= 0.8 turns frames upright from the display matrix


#: it seeks to the keyframes the container flags, mere recovery points too (see video._backend_for)
SEEKS_TO_FLAGGED_KEYFRAMES = True


def unsupported(info: VideoInfo) -> Optional[str]:
    return timeline_gaps(info, "torchcodec 0.13")


def read(source: Source, info: VideoInfo, indices: list[int], threads: int) -> Iterator[tuple[int, np.ndarray]]:
    decoder = VideoDecoder(source.open(), seek_mode="exact", num_ffmpeg_threads=threads, dimension_order="NHWC")
    last = decoder.metadata.num_frames - 1
    for wanted, clamped in batches(indices, last):
        data = decoder.get_frames_at(indices=clamped).data.numpy()
        yield from zip(wanted, data)
