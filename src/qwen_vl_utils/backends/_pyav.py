"""PyAV: the default backend. Seeks to the keyframe before a target when that skips frames, otherwise
decodes straight through; converts to RGB only the frames it returns."""

from __future__ import annotations

import bisect
import queue
import threading
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from .. import _cancel
from .._util import usable_cpus
from ..container._mp4 import sample_table
from ..container._nal import fresh_start_check
from ..container._probe import VideoInfo, decode_or_conceal, decoded_frames, open_container, seek_start
from ..sources._resolve import Source

NAME = "pyav"
APPLIES_ROTATION = False


def unsupported(info: VideoInfo) -> Optional[str]:
    return None


class _Index:
    """Presentation order of the frames a player shows, from the container's sample table where it has one
    (MP4/MOV: the moov box alone, so a remote file is not read end to end for it), else from packet headers; no
    decoding. Packets an edit list hides (``discard``: the pre-roll a cut needs from its keyframe) get no
    ordinal, and FFmpeg's decoder drops their frames; their keyframes are still where decoding starts. Neither do
    frames before ``first_pts`` (:attr:`VideoInfo.first_pts`: a file starting inside a GOP), which no decoder
    shows."""

    def __init__(
        self, container: Any, stream: Any, source: Optional[Source] = None, first_pts: Optional[int] = None
    ) -> None:
        samples = _samples_from_table(container, stream, source)
        if samples is None:
            samples = _samples_from_packets(container, stream)
        pts, keys, hidden = [], [], []
        self.decode_pos: list = []  # per packet in decode order: (ordinal-to-be pts, byte position, size)
        for p, key, pos, size, discard in samples:
            if p is None:
                pts = []
                break
            (hidden if discard or (first_pts is not None and p < first_pts) else pts).append(p)
            if key:
                keys.append(p)
            self.decode_pos.append((p, pos, size))
        self.pts = sorted(pts)
        self.ordinal = {p: i for i, p in enumerate(self.pts)}
        # each keyframe as (ordinal of the first shown frame at or after it, its pts); of two, the later
        starts = {bisect.bisect_left(self.pts, k): k for k in sorted(keys)}
        self.keyframes = sorted(starts) or [0]
        self.flagged = bool(starts)  # the container flags keyframes (else decoding starts wherever a seek lands)
        self.key_pts = [starts[o] for o in self.keyframes] if starts else self.pts[:1]
        # hidden packets between shown ones (an edit list of several edits): decode straight through instead
        self.hidden_inside = bool(self.pts) and any(self.pts[0] < h < self.pts[-1] for h in hidden)
        self.check_start = fresh_start_check(stream.codec_context)
        self.struck: set = set()  # pts of keyframes found to be mere recovery points: no decode starts there

    def byte_ranges(self, targets: list, slack: int = 4) -> list:
        """Byte ranges of the packets that decoding ``targets`` reads: from each target's keyframe to the
        target's own packet, plus ``slack`` packets of decoder delay; [] when positions are unknown."""
        if not self.decode_pos or any(pos is None or pos < 0 for _, pos, _ in self.decode_pos):
            return []
        decode_index = {p: i for i, (p, _, _) in enumerate(self.decode_pos)}
        ranges = []
        for t in targets:
            k = self.keyframe_before(t)
            first = decode_index.get(self.keyframe_pts(k))
            last = decode_index.get(self.pts[min(t, len(self.pts) - 1)])
            if first is None or last is None:
                return []
            last = min(len(self.decode_pos) - 1, max(first, last) + slack)
            _, start, _ = self.decode_pos[first]
            _, end_pos, end_size = self.decode_pos[last]
            ranges.append((start, end_pos + end_size))
        return ranges

    @property
    def usable(self) -> bool:
        return bool(self.pts) and len(self.ordinal) == len(self.pts) and not self.hidden_inside

    def ordinal_of(self, pts: Optional[int]) -> Optional[int]:
        if pts is None:
            return None
        o = self.ordinal.get(pts)
        if o is None:
            o = max(0, bisect.bisect_right(self.pts, pts) - 1)
        return o

    def keyframe_before(self, target: int) -> int:
        i = max(0, bisect.bisect_right(self.keyframes, target) - 1)
        while i > 0 and self.key_pts[i] in self.struck:
            i -= 1
        return self.keyframes[i]

    def fresh_start(self, packet: Any) -> bool:
        """Does a fresh decoder get the frames right from this keyframe packet on? If not, the keyframe is
        struck: decoding never starts there again (found when first sought, not by reading every keyframe)."""
        if self.check_start(packet):
            return True
        self.struck.add(packet.pts)
        return False

    def keyframe_pts(self, key: int) -> int:
        """The pts of the keyframe that decoding from ordinal ``key`` (a ``keyframe_before``) starts at."""
        return self.key_pts[bisect.bisect_left(self.keyframes, key)]


def _samples_from_table(container: Any, stream: Any, source: Optional[Source]) -> Optional[list]:
    if source is None:
        return None
    target = source.open()
    f = open(target, "rb") if isinstance(target, str) else target  # noqa: SIM115 - closed below
    try:
        size = f.seek(0, 2)
        table = sample_table(container, stream, f, size)
    finally:
        f.close()
    if table is None:
        return None
    return list(zip(table.pts, table.key, table.pos, table.size, table.discard))


def _samples_from_packets(container: Any, stream: Any) -> list:
    return [(p.pts, p.is_keyframe, p.pos, p.size, p.is_discard) for p in container.demux(stream) if p.size]


class _Rgb:
    """A frame's RGB conversion, deferred to the caller's worker threads and done once however many targets
    share the frame (a gap, or the end of a stream repeated): converting one PyAV frame from two threads at
    once hangs or crashes."""

    def __init__(self, frame: Any) -> None:
        self.frame: Any = frame
        self.lock = threading.Lock()
        self.rgb: Optional[np.ndarray] = None

    def __call__(self) -> np.ndarray:
        with self.lock:
            if self.rgb is None:
                self.rgb = self.frame.to_ndarray(format="rgb24")
                self.frame = None
            return self.rgb


def read(source: Source, info: VideoInfo, indices: list[int], threads: int) -> Iterator[tuple[int, Any]]:
    """Targets spread over several GOPs are split into contiguous groups, each decoded by its own
    single-threaded decoder in its own thread (PyAV releases the GIL): after every seek a frame-threaded
    decoder must refill its pipeline, so independent decoders use the cores better. Frames arrive in any
    order; the caller places them by index."""
    container = open_container(source)
    try:
        stream = container.streams.video[0]
        # AVI stores decode-order counters, not presentation times, and around damage a decoder drops frames and
        # may show some out of order: count frames in output order instead, as a player shows them
        usable = container.format.name != "avi" and not info.damaged
        index = _Index(container, stream, source, info.first_pts) if usable else None
        workers = threads or usable_cpus()
        groups = _split(indices, index, workers) if index is not None and index.usable else [indices]
        if index is not None and index.usable:
            source.will_need(index.byte_ranges(indices))
        if len(groups) > 1:
            container.close()
            yield from _parallel(source, index, groups)
            return
        _configure(stream, threads, single=False)
        if index is not None and index.usable:
            yield from _read_seeking(container, stream, index, indices)
        else:
            seek_start(container)
            yield from _read_through(decoded_frames(container, stream), indices, 0)
    finally:
        container.close()


def _configure(stream: Any, threads: int, single: bool) -> None:
    cc = stream.codec_context
    cc.thread_type = "SLICE" if single else "AUTO"
    cc.thread_count = 1 if single else threads


def _split(indices: list[int], index: _Index, workers: int) -> list[list[int]]:
    """Contiguous groups of targets, each starting in a different GOP; one group when that cannot help."""
    if workers < 2 or len(indices) < 2:
        return [indices]
    n = min(workers, len(indices))
    size = -(-len(indices) // n)
    groups: list[list[int]] = []
    for chunk in (indices[i : i + size] for i in range(0, len(indices), size)):
        if groups and index.keyframe_before(chunk[0]) == index.keyframe_before(groups[-1][-1]):
            groups[-1].extend(chunk)  # same GOP as the previous group's end: no independent work to split
        else:
            groups.append(list(chunk))
    return groups


_DONE = object()


def _parallel(source: Source, index: _Index, groups: list[list[int]]) -> Iterator[tuple[int, Any]]:
    results: queue.Queue = queue.Queue(maxsize=4 * len(groups))
    stop = threading.Event()
    token = _cancel.current()  # the caller's: its decoders stop at the next packet when it is cancelled

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work(group: list[int]) -> None:
        try:
            with _cancel.scope(token):
                _work(group)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)
        finally:
            put(_DONE)

    def _work(group: list[int]) -> None:
        container = open_container(source)
        try:
            stream = container.streams.video[0]
            _configure(stream, 1, single=True)
            for item in _read_seeking(container, stream, index, group):
                if stop.is_set():
                    return
                put(item)
        finally:
            container.close()

    pool = [threading.Thread(target=work, args=(g,), name="qwen-vl-decode", daemon=True) for g in groups]
    for t in pool:
        t.start()
    try:
        running = len(pool)
        while running:
            try:
                item = results.get(timeout=0.05)
            except queue.Empty:
                _cancel.check(token)
                continue
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for t in pool:
            t.join()


def _read_through(frames: Iterator[Any], targets: list[int], start: int) -> Iterator[tuple[int, Any]]:
    """Count frames from ordinal ``start``; yield the targets; past the end, repeat the last frame."""
    ti, ordinal, frame = 0, start - 1, None
    for frame in frames:
        ordinal += 1
        if ordinal >= targets[ti]:
            ti = yield from _emit(frame, ordinal, targets, ti)
            if ti == len(targets):
                return
    yield from _repeat_last(frame, ordinal, targets, ti)


def _read_seeking(container: Any, stream: Any, index: _Index, targets: list[int]) -> Iterator[tuple[int, Any]]:
    """Seek to the keyframe before a target when that skips frames; otherwise decode on. Every packet that
    is not a target is sent with ``skip_frame=NONREF``: the decoder drops it if nothing refers to it. If a
    target does not come out after all, seek back and decode that stretch again without skipping."""
    wanted = set(targets)
    frames: Optional[Iterator[Any]] = None
    position = 0  # ordinal of the next frame the current decode run will produce
    frame, ordinal = None, -1
    careful_until = -1  # after a recovery, no skipping up to this target
    ti = 0
    while ti < len(targets):
        target = targets[ti]
        key = index.keyframe_before(target)
        if frames is None or key > position:
            frames, position = _seek(container, stream, index, key, wanted, careful_until), key
        for frame in frames:
            ordinal = index.ordinal_of(frame.pts)
            if ordinal is None:
                continue
            position = ordinal + 1
            if ordinal < target:
                continue
            if ordinal > target and target > careful_until:  # the target was dropped: decode that GOP again
                careful_until = target
                frames, position = _seek(container, stream, index, key, wanted, careful_until), key
                break
            ti = yield from _emit(frame, ordinal, targets, ti)
            break
        else:  # end of stream: fewer decodable frames than packets (truncated, dropped frames)
            yield from _repeat_last(frame, ordinal, targets, ti)
            return


def _emit(frame: Any, ordinal: int, targets: list[int], ti: Any) -> Any:
    """Yield this frame for every target up to its ordinal; return the next target's position."""
    rgb = _Rgb(frame)
    while ti < len(targets) and targets[ti] <= ordinal:
        yield targets[ti], rgb
        ti += 1
    return ti


#: frames a stream may end short of its header's count (a dropped trailing frame) before it is
#: treated as truncated
END_TOLERANCE = 2


def _repeat_last(frame: Any, ordinal: int, targets: list[int], ti: int) -> Iterator[tuple[int, Any]]:
    if ti == len(targets):
        return
    if frame is None or targets[-1] - ordinal > END_TOLERANCE:
        raise EOFError(
            f"the stream ends after frame {ordinal}, before frame {targets[-1]}: the file is truncated or corrupt"
        )
    rgb = _Rgb(frame)
    for t in targets[ti:]:
        yield t, rgb


#: decoders whose packets each hold exactly one frame and which read ``skip_frame`` packet by packet; AV1 and
#: VP9 pack hidden reference frames into other frames' packets, so a packet's timestamp does not say which
#: frame dropping it would lose
_ONE_FRAME_PER_PACKET = frozenset({"h264", "hevc"})


def _skippable(ordinal: Optional[int], wanted: set, careful_until: int) -> bool:
    """May this packet's frame be dropped if it is a non-reference frame?"""
    return ordinal is not None and ordinal > careful_until and ordinal not in wanted


#: seeks that may land past the keyframe asked for (MPEG-TS seeks by a binary search on timestamps) are retried
#: from an earlier keyframe this many times, then from the start
SEEK_RETRIES = 4


def _packets_from(container: Any, stream: Any, index: _Index, key: int) -> Iterator[Any]:
    """Packets from a keyframe at or before ordinal ``key``. A seek that lands after it (an MPEG-TS seek can
    overshoot to a later keyframe) is retried from an earlier keyframe, finally from the first. A keyframe that
    is only a recovery point (:mod:`~qwen_vl_utils.container._nal`) is struck from the index and decoding starts
    at an earlier one."""
    start: Optional[int] = key
    overshoots = 0
    while True:
        if start is None:  # the last resort: the container's very beginning
            seek_start(container)
        else:
            container.seek(index.keyframe_pts(start), stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)
        # from the first keyframe packet: a seek by dts (MPEG-TS) can land on a B-frame just after the keyframe
        any_packet = start is None or not index.flagged
        first = next((p for p in packets if p.size and p.pts is not None and (p.is_keyframe or any_packet)), None)
        if start is None:
            break
        landed = None if first is None else index.ordinal_of(first.pts)
        if landed is None or landed > key:  # past the keyframe asked for, or no keyframe after the landing
            overshoots += 1
            past = start if overshoots < SEEK_RETRIES else index.keyframes[0]
        elif first.is_keyframe and not index.fresh_start(first):
            past = min(start, landed)
        else:
            break
        start = index.keyframe_before(past - 1) if past > index.keyframes[0] else None
    if first is not None:  # (an exhausted PyAV demuxer raises StopIteration again: not followed)
        yield first
        yield from packets


def _seek(container: Any, stream: Any, index: _Index, key: int, wanted: set, careful_until: int) -> Iterator[Any]:
    """Decode from the keyframe ``key``, deciding packet by packet whether non-reference frames may be dropped
    (exact, unlike a decision made on the frames coming out, which lag the packets going in)."""
    cc = stream.codec_context
    one_frame_per_packet = cc.name in _ONE_FRAME_PER_PACKET
    skipping = None
    for packet in _packets_from(container, stream, index, key):
        _cancel.check()  # a cancelled caller stops within a packet's decode, not a whole GOP's
        skip = one_frame_per_packet and _skippable(index.ordinal.get(packet.pts), wanted, careful_until)
        if skip != skipping:
            cc.skip_frame = "NONREF" if skip else "DEFAULT"
            skipping = skip
        yield from decode_or_conceal(cc, packet)
