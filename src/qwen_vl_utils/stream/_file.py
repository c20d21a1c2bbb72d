"""Reading a file for :mod:`stream`: every frame in display order, or only what the targets need.

Skipping decides, for each packet before it is decoded, whether it is a target, a frame the decoder may drop if
nothing refers to it, or a packet not to decode at all (:class:`_Lookahead`). The packets to decode are cut into
segments at keyframes that start a closed GOP (a fresh decoder there gives the same frames), and segments are
decoded in parallel by one decoder per worker thread, in turn, while one thread reads the file front to back:
one pass, no seek. Frames come back in display order. Anything that cannot be proven exact raises
:class:`_Inexact`, and :mod:`stream` decodes the file again without skipping.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import math
import threading
from typing import Any, Callable, Iterator, Optional

from .. import _cancel
from ..container._probe import decode_or_conceal
from ._handoff import STOPPED, Handoff


class _Inexact(Exception):
    """Skipping could not be proven exact for this file: decode it again without skipping."""


#: codecs whose packets each hold one frame and which honour ``skip_frame`` packet by packet (as in the PyAV
#: backend); other codecs are decoded in full
_ONE_FRAME_PER_PACKET = frozenset({"h264", "hevc"})


def _from_keyframe(packets: Iterator[Any]) -> Iterator[Any]:
    """The packets from the first keyframe on (after a seek, a demuxer may start inside a GOP)."""
    for packet in packets:
        if packet.is_keyframe and packet.size:
            yield packet
            yield from packets
            return


def _decode_exactly(cc: Any, packet: Any) -> list:
    """A segment decoder's frames; a packet the decoder rejects (a damaged slice) loses its frame, which the
    packet numbering cannot know: decode again, numbering frames as they come out (:class:`_Inexact`)."""
    import av

    try:
        return cc.decode(packet)
    except av.error.InvalidDataError as exc:
        raise _Inexact(f"a packet the decoder rejects ({exc})") from None


def _shown_packets(packets: Iterator[Any]) -> Iterator[Any]:
    return (p for p in packets if p.size)


class _Counting:
    """Every frame, in display order; index = display ordinal (after a seek: from the file's index)."""

    def __init__(self, run: Any, stream: Any, packets: Iterator[Any], index: Any) -> None:
        self.stream, self.packets, self.index = stream, packets, index
        self.last_shown = -1

    def __iter__(self) -> Iterator[tuple]:
        cc = self.stream.codec_context
        for packet in itertools.chain(self.packets, [None]):  # None: flush the decoder at the end
            for frame in decode_or_conceal(cc, packet):
                ordinal = self.index.ordinal_of(frame.pts) if self.index is not None else self.last_shown + 1
                if ordinal is None or ordinal <= self.last_shown:  # no timestamp, or one out of order
                    ordinal = self.last_shown + 1
                self.last_shown = ordinal
                yield ordinal, frame


class _Skipping:
    """Only what the targets need, as ``(display ordinal, frame)`` for the targets alone: non-reference frames
    that are not targets are dropped by the decoder (``skip_frame=NONREF``, decided per packet), and packets
    after a GOP's last target up to the next keyframe that starts a closed GOP are not decoded at all. Decisions
    need each packet's display ordinal before it is decoded: :class:`_Lookahead` holds packets back until it is
    known. With ``workers`` > 1, segments (closed GOPs, :func:`_segments`) are decoded in parallel
    (:class:`_Parallel`); else by the stream's own decoder, in order."""

    #: packets held back at least (the ordinal of a packet needs those reordered around it)
    MIN_DEPTH = 64

    def __init__(self, run: Any, stream: Any, packets: Iterator[Any], index: Any, workers: int = 1) -> None:
        self.stream, self.packets, self.workers = stream, packets, workers
        src_fps, grid = run.fps, run.grid
        depth = max(self.MIN_DEPTH, min(512, math.ceil(2 * src_fps / grid.fps) + 32))
        from ..container._nal import fresh_start_check

        wanted = lambda r: grid.covers((r - 1) / src_fps if r else None, r / src_fps)  # noqa: E731
        self.look = _Lookahead(depth, wanted, index, fresh_start_check(stream.codec_context), run.first_pts)
        self.token = run.producer.token
        self.last_shown = -1

    def __iter__(self) -> Iterator[tuple]:
        events = _segments(self._decisions(), cut=self.workers > 1)
        if self.workers > 1:
            yield from _Parallel(events, self._decoder, self.workers, self.token)
        else:
            decoder = _SegmentDecoder(self.stream.codec_context)
            for event in events:
                yield from decoder.finish() if event is _END_SEGMENT else decoder.feed(*event)
        self.last_shown = self.look.last_ordinal

    def _decisions(self) -> Iterator[tuple]:
        for packet in self.packets:
            yield from self.look.push(packet)
        yield from self.look.flush()

    def _decoder(self) -> _SegmentDecoder:
        """A decoder of its own for a worker, set up like the stream's (extradata, size, colour signalling)."""
        import av

        from .._util import usable_cpus
        from ..video import _decoder_threads

        template = self.stream.codec_context
        cc = av.CodecContext.create(template.name, "r")
        for name in ("extradata", "width", "height", "pix_fmt", "color_range", "colorspace", "color_primaries"):
            value = getattr(template, name)
            if value is not None:
                setattr(cc, name, value)
        cc.color_trc = template.color_trc
        cc.options = {"has_b_frames": str(template.reorder_depth)}  # the container's reorder delay, as the stream's
        cc.thread_type = "AUTO"
        cc.thread_count = _decoder_threads() or max(1, usable_cpus() // self.workers)
        return _SegmentDecoder(cc)


#: the end of a segment in the events of :func:`_segments`
_END_SEGMENT = object()
#: packets a segment holds at least before a closed GOP starts a new one (a fresh decoder costs a little)
MIN_SEGMENT = 32


def _segments(decisions: Iterator[tuple], cut: bool) -> Iterator[Any]:
    """The packets to decode as ``(packet, ordinal, want)``, with :data:`_END_SEGMENT` where a segment ends: at
    the first packet not to decode (the frames before it come out now, not a GOP later), and, with ``cut`` (for
    decoders in parallel), before a keyframe that starts a closed GOP once the segment holds
    :data:`MIN_SEGMENT` packets. Where decoding resumes after undecoded packets is always such a keyframe, so
    every segment can start on a fresh decoder."""
    fed = 0
    for packet, rank, want, restart in decisions:
        if want is None:
            if fed:
                yield _END_SEGMENT
                fed = 0
            continue
        if cut and restart and fed >= MIN_SEGMENT:
            yield _END_SEGMENT
            fed = 0
        fed += 1
        yield packet, rank, want
    if fed:
        yield _END_SEGMENT


class _SegmentDecoder:
    """One decoder fed the packets of segments, one segment after another; yields the targets it decodes as
    ``(ordinal, frame)`` and raises _Inexact when a target does not come out."""

    def __init__(self, cc: Any) -> None:
        self.cc = cc
        self.ranks: dict = {}  # pts -> display ordinal, for the packets fed and not yet out of the decoder
        self.wanted: collections.deque = collections.deque()  # ordinals of the targets fed, in order
        self.skipping: Optional[bool] = None

    def feed(self, packet: Any, rank: Optional[int], want: bool) -> Iterator[tuple]:
        if rank is not None:
            self.ranks[packet.pts] = rank
            if want:
                self.wanted.append(rank)
        if (not want) != self.skipping:
            self.skipping = not want
            self.cc.skip_frame = "NONREF" if self.skipping else "DEFAULT"
        yield from self._out(_decode_exactly(self.cc, packet))

    def finish(self) -> Iterator[tuple]:
        """The end of a segment: drain the decoder, check every target came out, make it ready for the next."""
        self.cc.skip_frame, self.skipping = "DEFAULT", False
        yield from self._out(self.cc.decode(None))
        if self.wanted:
            raise _Inexact(f"frame {self.wanted[0]} did not come out of the decoder")
        self.ranks.clear()
        self.cc.flush_buffers()

    def _out(self, frames: Any) -> Iterator[tuple]:
        ranks, wanted = self.ranks, self.wanted
        for frame in frames:
            rank = ranks.pop(frame.pts, None)
            if rank is None:
                raise _Inexact(f"a frame came out that no packet announced (pts {frame.pts})")
            if wanted and wanted[0] < rank:  # a target that never came out: decode again without skipping
                raise _Inexact(f"frame {wanted[0]} did not come out of the decoder")
            if wanted and wanted[0] == rank:
                wanted.popleft()
                yield rank, frame
            if len(ranks) > 4096:  # frames dropped by the decoder never come out: forget those before this one
                for pts in [p for p in ranks if p < frame.pts]:
                    del ranks[pts]


_DONE = object()


class _Segment:
    """A segment on its way through a worker: its decoded targets, then _END_SEGMENT (or an exception)."""

    def __init__(self, queues: list) -> None:
        self.out = Handoff(8)
        queues.append(self.out)


class _Parallel:
    """Segments decoded by ``workers`` threads with a decoder each, segment ``i`` by worker ``i % workers``,
    while a demux thread reads the file and deals packets out; the targets come back in display order.

    Every queue is bounded (memory stays flat whatever the GOP length): the demux thread waits on a worker
    whose inbox is full, a worker on a segment the consumer has not reached yet, and the consumer drains
    segments in order, so the oldest segment always moves. Any exit (an error, _Inexact, a close) stops and
    joins every thread before the iteration returns."""

    def __init__(self, events: Iterator[Any], decoder: Callable[[], _SegmentDecoder], workers: int, token: Any):
        self.events, self.decoder, self.workers, self.token = events, decoder, workers, token
        self.stop = threading.Event()
        self.order = Handoff(2 * workers)  # segments as dealt out, then _DONE
        self.inboxes = [Handoff(64) for _ in range(workers)]
        self.queues = [self.order, *self.inboxes]  # (and each segment's: stopped together, waking every thread)
        self._lock = threading.Lock()

    def abort(self) -> None:
        """Stop: every thread waiting on a queue wakes at once (also called by the stream's token on a close)."""
        self.stop.set()
        with self._lock:
            queues = list(self.queues)
        for q in queues:
            q.stop()

    def __iter__(self) -> Iterator[tuple]:
        threads = [threading.Thread(target=self._deal, name="qwen-vl-stream-demux", daemon=True)]
        threads += [
            threading.Thread(target=self._work, args=(box,), name="qwen-vl-stream-decode", daemon=True)
            for box in self.inboxes
        ]
        self.token.register(self)  # a close wakes every waiting thread
        try:
            for t in threads:
                t.start()
            last = -1
            while (segment := self._get(self.order, consumer=True)) is not _DONE:
                if isinstance(segment, BaseException):
                    raise segment
                while (item := self._get(segment.out, consumer=True)) is not _END_SEGMENT:
                    if isinstance(item, BaseException):
                        raise item
                    if item[0] <= last:
                        raise _Inexact(f"frame {item[0]} came out after frame {last}")
                    last = item[0]
                    yield item
        finally:
            self.abort()
            for t in threads:
                if t.ident is not None:
                    t.join()

    def _put(self, q: Handoff, item: Any) -> None:
        self._check()
        if not q.put(item):
            raise _Stopped

    def _check(self) -> None:
        if self.stop.is_set() or self.token.cancelled:
            raise _Stopped

    def _get(self, q: Handoff, consumer: bool = False) -> Any:
        item = q.get()
        if item is STOPPED:
            if consumer:  # a close: the stream's Cancelled
                _cancel.check(self.token)
            self._check()
            raise _Stopped  # (not reached: a queue is stopped only with the rest)
        return item

    def _deal(self) -> None:
        """The demux thread: reads and decides on the file's packets (under the stream's cancellation)."""
        with _cancel.scope(self.token):
            try:
                dealt = 0
                box = None
                for event in self.events:
                    self._check()
                    if box is None:
                        with self._lock:
                            segment = _Segment(self.queues)
                            if self.stop.is_set():
                                segment.out.stop()
                        self._put(self.order, segment)
                        box = self.inboxes[dealt % self.workers]
                        dealt += 1
                        self._put(box, segment)
                    self._put(box, event)
                    if event is _END_SEGMENT:
                        box = None
                self._put(self.order, _DONE)
            except _Stopped:
                return
            except BaseException as exc:  # raised by the consumer after the segments dealt before it
                with contextlib.suppress(_Stopped):
                    self._put(self.order if box is None else box, exc)  # a segment under way: in its place
            finally:
                for box in self.inboxes:
                    with contextlib.suppress(_Stopped):
                        self._put(box, _DONE)

    def _work(self, inbox: Handoff) -> None:
        """A worker: decodes its segments in the order dealt; a failure goes to each of its segments after."""
        decoder: Optional[_SegmentDecoder] = None
        segment: Any = None
        failure: Optional[BaseException] = None
        try:
            while (event := self._get(inbox)) is not _DONE:
                self._check()  # a close: not one more packet decoded
                if isinstance(event, _Segment):
                    segment = event
                    if failure is not None:
                        self._put(segment.out, failure)
                    continue
                if failure is not None:
                    continue
                if isinstance(event, BaseException):  # the demux thread failed in this segment
                    failure = event
                    self._put(segment.out, event)
                    continue
                try:
                    if decoder is None:
                        decoder = self.decoder()
                    frames = decoder.finish() if event is _END_SEGMENT else decoder.feed(*event)
                    for item in frames:
                        self._put(segment.out, item)
                    if event is _END_SEGMENT:
                        self._put(segment.out, _END_SEGMENT)
                except _Stopped:
                    raise
                except BaseException as exc:
                    failure = exc
                    self._put(segment.out, exc)
        except _Stopped:
            return


class _Stopped(Exception):
    """The parallel decode is being torn down: a thread leaves."""


class _Lookahead:
    """Packets in decode order, held back ``depth`` packets so that each one's display ordinal is known when it
    is fed: the ordinal of a shown packet is the number of shown packets with a smaller timestamp, and with
    frames reordered by fewer than ``depth`` packets all of those have been read by then.

    Each packet leaves as ``(packet, ordinal or None, want, restart)``: ``want`` True for a target, False for a
    frame the decoder may drop if nothing refers to it, None for a packet not to decode at all: one before a
    keyframe that starts a closed GOP (none of the packets read after it shows before it, and ``fresh`` says a
    fresh decoder gets it right: not a mere recovery point), with no target in between; ``restart`` True for
    such a keyframe (a fresh decoder may start there).
    A timestamp that breaks these assumptions (missing, repeated, reordered too far) raises _Inexact."""

    #: packets after a keyframe that must show after it for its GOP to count as closed
    CLOSED_AFTER = 16

    def __init__(
        self,
        depth: int,
        wanted: Callable[[int], bool],
        index: Any = None,
        fresh: Optional[Callable] = None,
        first_pts: Optional[int] = None,
    ) -> None:
        self.depth = depth
        self.first_pts = first_pts  # packets before it show in no player (a start inside a GOP): no ordinal
        self.wanted = wanted
        # does a keyframe packet start a picture that a fresh decoder gets right (_nal)?
        self.fresh = fresh or (lambda packet: True)
        self.checked: tuple = (None, False)  # the last keyframe checked by fresh, and the answer
        self.window: collections.deque = collections.deque()  # packets read, not yet fed
        self.active: list = []  # sorted timestamps of shown packets, but those retired
        self.retired = 0  # shown packets whose timestamps are below every later one
        self.retired_max: Optional[int] = None
        self.index = index  # after a seek: the file's index, for the ordinal of the first packet
        self.base: Optional[int] = None if index is not None else 0
        self.clean = 0  # leading packets of the window known to be neither targets nor keyframes
        self.drop_until: Any = None  # the keyframe before which packets are not decoded
        self.keep_until: Any = None  # a target ahead: nothing before it is dropped

    def _unshown(self, packet: Any) -> bool:
        """A packet no player shows: hidden by an edit list, or before the first frame shown."""
        return packet.is_discard or (self.first_pts is not None and packet.pts < self.first_pts)

    @property
    def last_ordinal(self) -> int:
        return (self.base or 0) + self.retired + len(self.active) - 1

    def push(self, packet: Any) -> Iterator[tuple]:
        if packet.pts is None:
            raise _Inexact("a packet without a timestamp")
        if packet.is_corrupt:  # damage: the decoder may drop frames or show them out of order
            raise _Inexact("a damaged packet")
        if not self._unshown(packet):
            pts = packet.pts
            i = bisect.bisect_left(self.active, pts)
            if (i < len(self.active) and self.active[i] == pts) or (
                self.retired_max is not None and pts <= self.retired_max
            ):
                raise _Inexact(f"packet timestamp {pts} repeats, or is reordered further than {self.depth} packets")
            self.active.insert(i, pts)
        self.window.append(packet)
        while len(self.window) > self.depth:
            yield self._leave(final=False)

    def flush(self) -> Iterator[tuple]:
        while self.window:
            yield self._leave(final=True)

    def _rank(self, pts: int) -> int:
        if self.base is None:  # the first packet after a seek: its place in the whole file
            self.base = bisect.bisect_left(self.index.pts, self.active[0]) if self.active else 0
            self.index = None
        return self.base + self.retired + bisect.bisect_left(self.active, pts)

    def _leave(self, final: bool) -> tuple:
        packet = self.window.popleft()
        self.clean = max(0, self.clean - 1)
        rank = None if self._unshown(packet) else self._rank(packet.pts)
        if packet is self.keep_until:
            self.keep_until, self.clean = None, 0
        restart = packet.is_keyframe and not self._unshown(packet) and self._closed(packet, 0)
        if packet is self.drop_until:  # decoding resumes here
            self.drop_until, self.clean, restart = None, 0, True
        if rank is not None and self.wanted(rank):
            decision: Optional[bool] = True
        else:
            decision = None if self._droppable(final) else False
        self._retire()
        return packet, rank, decision, restart

    def _droppable(self, final: bool) -> bool:
        """May the packet that just left go undecoded? Scans the window up to a target or a keyframe."""
        if self.drop_until is not None:
            return True
        if self.keep_until is not None or final:
            return False
        window = self.window
        for i in range(self.clean, len(window)):
            p = window[i]
            if p.is_keyframe and not self._unshown(p):
                if self._closed(p, i + 1):
                    self.drop_until = p
                    return True
                self.clean = i
                return False
            if not self._unshown(p) and self.wanted(self._rank(p.pts)):
                self.keep_until = p
                return False
        self.clean = len(window)
        return False

    def _closed(self, key: Any, first: int) -> bool:
        """Does the keyframe ``key`` start a closed GOP: the CLOSED_AFTER packets from ``window[first]`` on (those
        read after it) all show after it?"""
        window = self.window
        if len(window) - first < self.CLOSED_AFTER:
            return False
        if not all(window[j].pts > key.pts for j in range(first, first + self.CLOSED_AFTER)):
            return False
        if self.checked[0] is not key:
            self.checked = (key, self.fresh(key))
        return self.checked[1]

    def _retire(self) -> None:
        """Keep ``active`` short: timestamps below every packet still in the window are final."""
        if len(self.active) <= 3 * self.depth:
            return
        low = min((p.pts for p in self.window if not self._unshown(p)), default=None)
        while len(self.active) > 2 * self.depth and (low is None or self.active[0] < low):
            self.retired_max = self.active.pop(0)
            self.retired += 1
