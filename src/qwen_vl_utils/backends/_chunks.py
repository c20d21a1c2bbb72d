"""Helpers shared by the backends that decode by frame index in batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

from ..container._probe import VideoInfo

#: frames decoded per batch: large enough to amortise a call, small enough to bound full-resolution memory
BATCH = 8


def avi_reordering(info: VideoInfo) -> Optional[str]:
    """Index-based decoders take AVI's decode-order counters for presentation times: B-frames come out of order."""
    if info.container == "avi" and info.has_b_frames:
        return "it returns the frames of AVI files with B-frames out of order"
    return None


def timeline_gaps(info: VideoInfo, name: str) -> Optional[str]:
    """Streams on which the index-based decoders (torchcodec 0.13, decord 0.6) return frames other than the ones
    a player shows, measured: an edit list that hides frames, a start inside a GOP, damage, a frame size that
    changes mid-stream, MPEG-TS, AVI with B-frames."""
    if info.hidden_frames:
        return (
            f"{name} does not follow the edit list that hides {info.hidden_frames} frames of this file "
            "(the pre-roll of a cut): its frames are not the ones a player shows"
        )
    if info.container in ("h264", "hevc"):  # a raw elementary stream: no timestamps to seek by
        return f"{name} cannot seek in a raw {info.container.upper()} elementary stream"
    if info.damaged:
        return f"{name} numbers frames by packet, not as a player shows a damaged file (frames lost to the damage)"
    if info.leading_frames:
        return f"{name} numbers the frames before the first one a player shows (the file starts inside a GOP)"
    if info.size_changes:
        return f"{name} returns wrong or repeated frames when the frame size changes mid-stream"
    if info.container == "mpegts":
        return f"{name} numbers the frames of MPEG-TS files from the wrong start (frame 8 for frame 0, measured)"
    return avi_reordering(info)


def batches(indices: list[int], last: int) -> Iterator[tuple[list[int], list[int]]]:
    """(requested, clamped) index batches; indices past the decoder's last frame repeat that frame."""
    for i in range(0, len(indices), BATCH):
        chunk = indices[i : i + BATCH]
        yield chunk, [min(j, last) for j in chunk]
