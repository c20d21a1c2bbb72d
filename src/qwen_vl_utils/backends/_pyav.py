"""PyAV: the default backend. Seeks to the keyframe before a target when that skips frames, otherwise
decodes straight through; converts to RGB only the frames it returns."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from .._probe import VideoInfo, open_container
from .._sources import Source

NAME = "pyav"
APPLIES_ROTATION = False


def unsupported(info: VideoInfo) -> Optional[str]:
    return None


class _Index:
    """Presentation order of every packet, from packet headers only (no decoding)."""

    def __init__(self, container: Any, stream: Any) -> None:
        pts, keys = [], []
        for packet in container.demux(stream):
            if not packet.size:
                continue
            if packet.pts is None:
                pts = []
                break
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
        self.pts = sorted(pts)
        self.ordinal = {p: i for i, p in enumerate(self.pts)}
        self.keyframes = sorted(self.ordinal[p] for p in keys) or [0]

    @property
    def usable(self) -> bool:
        return bool(self.pts) and len(self.ordinal) == len(self.pts)

    def ordinal_of(self, pts: Optional[int]) -> Optional[int]:
        if pts is None:
            return None
        o = self.ordinal.get(pts)
        if o is None:
            o = max(0, bisect.bisect_right(self.pts, pts) - 1)
        return o

    def keyframe_before(self, target: int) -> int:
        return self.keyframes[max(0, bisect.bisect_right(self.keyframes, target) - 1)]


def _rgb(frame: Any) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def read(source: Source, info: VideoInfo, indices: list[int], threads: int) -> Iterator[tuple[int, np.ndarray]]:
    container = open_container(source)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        # AVI stores decode-order counters, not presentation times: count frames in output order instead
        index = _Index(container, stream) if container.format.name != "avi" else None
        if index is not None and index.usable:
            yield from _read_seeking(container, stream, index, indices)
        else:
            container.seek(0)
            yield from _read_through(container.decode(stream), indices, 0)
    finally:
        container.close()


def _read_through(frames: Iterator[Any], targets: list[int], start: int) -> Iterator[tuple[int, np.ndarray]]:
    """Count frames from ordinal ``start``; yield the targets; past the end, repeat the last frame."""
    ti, ordinal, frame = 0, start - 1, None
    for frame in frames:
        ordinal += 1
        if ordinal >= targets[ti]:
            ti = yield from _emit(frame, ordinal, targets, ti)
            if ti == len(targets):
                return
    yield from _repeat_last(frame, ordinal, targets, ti)


def _read_seeking(container: Any, stream: Any, index: _Index, targets: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    frames: Optional[Iterator[Any]] = None
    position = 0  # ordinal of the next frame the current decode run will produce
    frame, ordinal = None, -1
    ti = 0
    while ti < len(targets):
        key = index.keyframe_before(targets[ti])
        if frames is None or key > position:
            frames = _seek(container, stream, index, key)
        for frame in frames:
            ordinal = index.ordinal_of(frame.pts)
            if ordinal is None:
                continue
            position = ordinal + 1
            if ordinal >= targets[ti]:
                ti = yield from _emit(frame, ordinal, targets, ti)
                break
        else:  # end of stream: fewer decodable frames than packets (truncated, dropped frames)
            yield from _repeat_last(frame, ordinal, targets, ti)
            return


def _emit(frame: Any, ordinal: int, targets: list[int], ti: Any) -> Any:
    """Yield this frame for every target up to its ordinal; return the next target's position."""
    rgb = _rgb(frame)
    while ti < len(targets) and targets[ti] <= ordinal:
        yield targets[ti], rgb
        ti += 1
    return ti


#: frames a stream may end short of its header's count (edit lists, a dropped trailing frame) before it is
#: treated as truncated
END_TOLERANCE = 2


def _repeat_last(frame: Any, ordinal: int, targets: list[int], ti: int) -> Iterator[tuple[int, np.ndarray]]:
    if ti == len(targets):
        return
    if frame is None or targets[-1] - ordinal > END_TOLERANCE:
        raise EOFError(
            f"the stream ends after frame {ordinal}, before frame {targets[-1]}: the file is truncated or corrupt"
        )
    rgb = _rgb(frame)
    for t in targets[ti:]:
        yield t, rgb


def _seek(container: Any, stream: Any, index: _Index, key: int) -> Iterator[Any]:
    container.seek(index.pts[key], stream=stream, backward=True, any_frame=False)
    return container.decode(stream)
