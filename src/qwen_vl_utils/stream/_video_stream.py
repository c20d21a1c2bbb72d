"""Streaming: a long or live video as chunks of a few frames, decoded in one pass, in flat memory.

:func:`stream_video` reads its source once, front to back, and yields a :class:`VideoChunk` as soon as the
last frame of its time window is decoded. Frames are taken on one grid for the whole stream: for each target
time ``k / fps`` (``k = 0, 1, ...``) the first decoded frame at or after it; ``chunk_seconds * fps`` grid
points make a chunk. The work happens on a producer thread that stays at most :data:`READ_AHEAD` chunks ahead
of the consumer; closing the stream (``close()``, ``break`` out of a ``with`` block, garbage collection) stops
that thread, the decoder, sockets and helper threads before returning.

Two timelines:

- **files** (anything seekable: paths, URLs read by range, object stores, bytes, seekable file objects): a
  frame's index is its display ordinal, the same numbering as ``fetch_video``'s ``frames_indices``, and its
  time is ``index / fps`` with the container's frame rate; skipping is exact (see :class:`._file._Lookahead`).
- **live** (pipes, HTTP bodies without range support, HLS, UDP): a frame's time is its presentation
  timestamp relative to the first frame, and its index the frame slot ``round(time * fps)`` at the stream's
  nominal rate, so that ``index / fps`` stays the real time even when frames are lost.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import numbers
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, NamedTuple, Optional

from .. import _cancel
from .._errors import DecodeError, FetchTimeoutError, InvalidOptionError, QwenVLError, SourceTooLargeError, describe
from .._options import VideoOptions, check_backend, patch_factor, video_options
from .._util import usable_cpus
from ..container._probe import decode_or_conceal, refuse_picture
from ..sources._policy import FetchPolicy, get_fetch_policy
from ._audio import AUDIO_LAG, StreamAudio
from ._file import (
    _ONE_FRAME_PER_PACKET,
    _Counting,
    _from_keyframe,
    _Inexact,
    _shown_packets,
    _Skipping,
)
from ._handoff import STOPPED, Handoff

__all__ = ["READ_AHEAD", "VideoChunk", "VideoStream", "stream_video"]

#: chunks decoded ahead of the consumer, at most
READ_AHEAD = 2
#: a grid point within this many grid periods of a frame's time counts as reached (float noise)
_EPS = 1e-6
#: element keys that have no meaning for a stream, and what to use instead
_NOT_FOR_STREAMS = {
    "total_pixels": "a whole clip's pixel budget has no meaning for an endless stream; bound each frame with "
    "max_pixels (or resized_height/resized_width)",
    "nframes": "a stream has no fixed number of frames; sample it with fps",
    "min_frames": "a stream has no fixed number of frames; sample it with fps",
    "max_frames": "a stream has no fixed number of frames; sample it with fps, bound it with video_end",
    "sample_fps": "it describes a list of frames, which stream_video does not take",
    "frames_indices": "it picks frames for fetch_video (to reproduce a chunk); a stream samples with fps",
    "raw_fps": "it describes a list of frames, which stream_video does not take",
    "timestamps": "it describes a list of frames, which stream_video does not take",
}


@dataclass(frozen=True)
class VideoChunk:
    """``chunk_seconds`` of a stream: ``frames`` a Tx3xHxW tensor (T even, HxW the same for the whole stream),
    ``metadata`` for transformers' Qwen3-VL video processor (``fps``, absolute ``frames_indices``,
    ``total_num_frames``, ``video_backend``), ``start``/``end`` its window in seconds on the source's timeline,
    ``index`` its number (0, 1, ...)."""

    frames: Any
    metadata: dict
    start: float
    end: float
    index: int
    # chunks dropped just before this one (``on_lag="drop"``: the consumer fell behind a live source). Not in
    # ``metadata``, which goes to transformers' VideoMetadata as it is
    dropped: int = 0
    # the source's own presentation time of the chunk's first frame, in seconds (its timestamp as the container
    # states it: an MPEG-TS from a broadcast starts at its clock, not at 0); None where the frame has none
    source_time: Optional[float] = None
    # the wall-clock time of the chunk's first frame, Unix seconds, where the source dates its frames (HLS with
    # EXT-X-PROGRAM-DATE-TIME); else None
    wall_time: Optional[float] = None
    # with audio=True: the sound of the chunk's window [start, end), 16 kHz mono float32 in [-1, 1], exactly
    # round(end * 16000) - round(start * 16000) samples counted from the first chunk's start (chunks tile the
    # track), silence where the source has none; else None
    audio: Any = None


class VideoStream:
    """The iterator :func:`stream_video` returns: ``for chunk in stream``, ``close()``, or ``with``."""

    def __init__(self, settings: _Settings) -> None:
        self._producer = _Producer(settings)
        self._chunks = _chunks(self._producer)

    def __iter__(self) -> VideoStream:
        return self

    def __next__(self) -> VideoChunk:
        return next(self._chunks)

    def close(self) -> None:
        """Stop decoding and release the decoder, threads, sockets and temporary files now. From another thread
        while one waits in ``next()``: that ``next()`` ends the iteration, and releases everything itself."""
        self._producer.cancel()
        with contextlib.suppress(ValueError):  # "generator already executing": the other thread cleans up
            self._chunks.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Settings:
    options: VideoOptions  # the element's, checked once by stream_video
    value: Any
    fps: float  # grid points per second
    per_chunk: int  # grid points per chunk
    chunk_seconds: float
    factor: int
    start: Optional[float]
    end: Optional[float]
    policy: FetchPolicy
    torch_dtype: Any
    on_lag: str = "block"
    audio: bool = False


#: what a live stream does when its consumer falls behind
ON_LAG = ("block", "drop")


def stream_video(
    ele: dict,
    chunk_seconds: float = 1.0,
    image_patch_size: int = 14,
    *,
    policy: Optional[FetchPolicy] = None,
    backend: Optional[str] = None,
    on_lag: str = "block",
    audio: bool = False,
) -> VideoStream:
    """Decode ``ele["video"]`` once, front to back, and yield :class:`VideoChunk` objects of ``chunk_seconds``.

    Element keys as for ``fetch_video``: ``video`` (a file, URL, bytes, binary file object or pipe, an HLS
    playlist URL, ``udp://HOST:PORT`` when the fetch policy allows ``udp``), ``fps`` (default 2.0),
    ``video_start``, ``video_end``, ``min_pixels``, ``max_pixels``, ``resized_height``/``resized_width``,
    ``dtype``, ``video_reader``. ``chunk_seconds * fps`` must be a whole number of frames. Options are checked
    now; the source is opened on the first ``next()``. Decoding is PyAV's (``backend``/``video_reader`` may
    only name ``pyav``).

    ``on_lag`` is what a live source (pipe, HLS, UDP, an HTTP body) does when the consumer is slower than real
    time: ``"block"`` holds the source back (its writer waits, HLS falls behind its live edge); ``"drop"`` keeps
    decoding at the source's pace and drops the oldest chunks not yet taken, so the next chunk is the present
    (``VideoChunk.dropped`` says how many went before it). A file waits for its reader either way.

    ``audio=True``: each chunk also carries ``audio``, the sound of its window (16 kHz mono float32 for the Omni
    processors), decoded from the same pass over the source; a source without sound is a ``DecodeError``."""
    return VideoStream(_settings(ele, chunk_seconds, image_patch_size, policy, backend, on_lag, audio))


def _settings(
    ele: Any,
    chunk_seconds: Any,
    image_patch_size: Any,
    policy: Any,
    backend: Any,
    on_lag: Any = "block",
    audio: Any = False,
) -> _Settings:
    from ..video import FPS, _require_torch, _torch_dtype
    from ._live import check_source

    options = video_options(ele)
    if "video" not in ele:
        raise InvalidOptionError(f"a video element needs a 'video' key holding the source; got keys {sorted(ele)}")
    for key, why in _NOT_FOR_STREAMS.items():
        if getattr(options, key) is not None:
            raise InvalidOptionError(f"{key}={ele[key]!r} cannot be used with stream_video: {why}")
    chosen = check_backend(backend, "backend") or options.video_reader
    if chosen not in (None, "pyav"):
        raise InvalidOptionError(
            f"stream_video decodes with PyAV only (one sequential pass over the stream, which {chosen} cannot "
            f"do on a pipe or a live feed); got {chosen!r}: leave 'video_reader'/backend unset or give 'pyav'"
        )
    fps = float(options.fps or FPS)
    if (
        not isinstance(chunk_seconds, numbers.Real)
        or isinstance(chunk_seconds, bool)
        or not (math.isfinite(chunk_seconds) and chunk_seconds > 0)
    ):
        raise InvalidOptionError(f"chunk_seconds={chunk_seconds!r} must be a number of seconds > 0")
    per_chunk = round(chunk_seconds * fps)
    if per_chunk < 1 or abs(chunk_seconds * fps - per_chunk) > 1e-6:
        raise InvalidOptionError(
            f"chunk_seconds * fps = {chunk_seconds:g} * {fps:g} = {chunk_seconds * fps:g} frames: every chunk must "
            "hold the same whole number of frames (2 per chunk is one temporal patch: e.g. 1 s at fps=2)"
        )
    start, end = options.video_start, options.video_end
    if start is not None and end is not None and start >= end:
        raise InvalidOptionError(f"video_start ({start}) must be before video_end ({end})")
    if on_lag not in ON_LAG:
        raise InvalidOptionError(f"on_lag={on_lag!r} must be one of {', '.join(map(repr, ON_LAG))}")
    if not isinstance(audio, bool):
        raise InvalidOptionError(f"audio={audio!r} must be True or False")
    torch = _require_torch()
    policy = get_fetch_policy(policy)
    check_source(ele["video"], policy)
    factor = patch_factor(image_patch_size, policy)
    _check_budget(options, factor, policy)
    return _Settings(
        options=options,
        value=ele["video"],
        fps=fps,
        per_chunk=per_chunk,
        chunk_seconds=float(chunk_seconds),
        factor=factor,
        start=None if start is None else float(start),
        end=None if end is None else float(end),
        policy=policy,
        torch_dtype=_torch_dtype(torch, options.dtype),
        on_lag=on_lag,
        audio=audio,
    )


def _check_budget(options: VideoOptions, factor: int, policy: FetchPolicy) -> None:
    """Pixel keys that no frame could honour (max_pixels under min_pixels, a size over the policy's limit) are
    refused by the call, as the other bad values are: tried on a 16:9 frame, as each stream's first frame is."""
    from ..video import FRAME_FACTOR, VIDEO_MAX_TOKEN_NUM, video_frame_size

    video_frame_size(
        replace(options, total_pixels=VIDEO_MAX_TOKEN_NUM * factor**2), FRAME_FACTOR, 720, 1280, factor, policy
    )


# --- the grid and the chunks ----------------------------------------------------------------------------------


class _Grid:
    """Target times ``k / fps``; ``[first, stop)`` are the targets inside ``[video_start, video_end)``."""

    def __init__(self, fps: float, start: Optional[float], end: Optional[float]) -> None:
        self.fps = fps
        self.first = math.ceil((start or 0.0) * fps - _EPS)
        self.stop = math.ceil(end * fps - _EPS) if end is not None else None

    def reached(self, t: float) -> int:
        """How many targets are at or before ``t``."""
        return max(0, math.floor(t * self.fps + _EPS) + 1)

    def covers(self, t_prev: Optional[float], t: float) -> bool:
        """Is a frame shown at ``t``, after one at ``t_prev``, the first at or after some target?"""
        lo = max(self.first, 0 if t_prev is None else self.reached(t_prev))
        hi = self.reached(t) if self.stop is None else min(self.stop, self.reached(t))
        return lo < hi


@dataclass
class _Chunk:
    index: int
    start: float
    end: float
    frames: list  # a _Slot per target, in order
    out: Any = None  # the tensor the frames are written into
    fps: float = 0.0
    total: int = 0
    dropped: int = 0  # chunks dropped just before this one (on_lag="drop")
    source_time: Optional[float] = None
    wall_time: Optional[float] = None
    audio: Any = None

    def video_chunk(self) -> VideoChunk:
        """On the consumer's thread: wait for the frames to be in place, pad, describe."""
        from ..video import FRAME_FACTOR

        out = self.out
        for slot in self.frames:
            slot.future.result()
        indices = [slot.index for slot in self.frames]
        while len(indices) % FRAME_FACTOR:  # whole temporal patches: the last frame again
            out[len(indices)].copy_(out[len(indices) - 1])
            indices.append(indices[-1])
        tensor = out if len(indices) == len(out) else out[: len(indices)].clone()
        metadata = {
            "fps": self.fps,
            "frames_indices": indices,
            "total_num_frames": max(self.total, indices[-1] + 1),
            "video_backend": "pyav",
        }
        return VideoChunk(
            tensor,
            metadata,
            self.start,
            self.end,
            self.index,
            self.dropped,
            self.source_time,
            self.wall_time,
            self.audio,
        )


class _Slot(NamedTuple):
    index: int  # the frame's index
    future: Future  # done once the frame's pixels are in place (in every chunk the frame serves)


class _Chunker:
    """Assigns frames, in display order, to the grid's targets and groups them into chunks."""

    def __init__(self, grid: _Grid, per_chunk: int, chunk_seconds: float, origin: float) -> None:
        self.grid = grid
        self.per_chunk = per_chunk
        self.chunk_seconds = chunk_seconds
        self.origin = origin
        self.next = grid.first  # the next target without a frame
        self.frames: list = []

    @property
    def finished(self) -> bool:
        return self.grid.stop is not None and self.next >= self.grid.stop

    @property
    def chunk_index(self) -> int:
        return (self.next - self.grid.first) // self.per_chunk

    def add(self, t: float, place: Callable[[int, int], _Slot]) -> list:
        """A decoded frame shown at ``t``: the chunks it completes. ``place(chunk, position)`` puts the frame in
        each target it is the first frame at or after, and returns the slot."""
        reached = self.grid.reached(t)
        if self.grid.stop is not None:
            reached = min(reached, self.grid.stop)
        done = []
        while self.next < reached:
            self.frames.append(place(self.chunk_index, len(self.frames)))
            self.next += 1
            if len(self.frames) == self.per_chunk:
                done.append(self._chunk(self.chunk_index - 1, None))
        return done

    def finish(self, stream_end: float) -> Optional[_Chunk]:
        """The last, partial chunk at the end of the stream (None if it has no frame)."""
        if not self.frames:
            return None
        return self._chunk(self.chunk_index, stream_end)

    def rewind(self) -> None:
        """Forget the frames of the chunk in progress (its frames are decoded again)."""
        self.next -= len(self.frames)
        self.frames = []

    def _chunk(self, j: int, stream_end: Optional[float]) -> _Chunk:
        start = self.origin + j * self.chunk_seconds
        end = start + self.chunk_seconds
        if stream_end is not None:
            end = max(start, min(end, stream_end))
        frames, self.frames = self.frames, []
        return _Chunk(j, start, end, frames)


# --- the consumer's side ---------------------------------------------------------------------------------------


def _chunks(producer: _Producer) -> Iterator[VideoChunk]:
    try:
        producer.start()
        while True:
            item = producer.get()
            if item is None:
                return
            yield item
    finally:
        producer.close()


_END = object()


def _is_chunk(item: Any) -> bool:
    return isinstance(item, _Chunk)


def _carry_dropped(dropped: _Chunk, successor: _Chunk) -> None:
    """A chunk dropped for a slow consumer: the chunk that comes next says how many went before it."""
    successor.dropped += dropped.dropped + 1


class _Producer:
    """The thread that opens, demuxes, decodes and resizes, handing finished chunks over a bounded queue."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.token = _cancel.Token()
        self.queue = Handoff(READ_AHEAD)
        self.thread = threading.Thread(target=self._run, name="qwen-vl-stream", daemon=True)
        self.done = threading.Event()  # set as the producer exits (not Thread.is_alive(): a Ctrl-C landing in
        # its lock handling can leave the Thread object wrong on Python 3.11)
        self.input: Any = None
        self.dropping = False  # a live source under on_lag="drop": chunks are handed over without waiting

    def start(self) -> None:
        self.thread.start()

    def get(self) -> Optional[VideoChunk]:
        """The next chunk; None at the end of the stream, or once the stream was closed (from any thread)."""
        item = self._next_item()
        if item is None or item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        try:
            return item.video_chunk()
        except (QwenVLError, MemoryError):
            raise
        except Exception as exc:  # a frame's conversion or resize failed on its pool thread
            if self.token.cancelled:  # closed while the chunk's frames were resizing: their work was cancelled
                return None
            raise DecodeError(f"a frame of {describe(self.settings.value)} could not be converted ({exc})") from exc

    def _next_item(self) -> Any:
        while not self.token.cancelled:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:  # a producer that ended for any reason but a close left something behind
                if self.done.is_set() and self.queue.empty() and not self.token.cancelled:
                    raise DecodeError(f"decoding {describe(self.settings.value)} stopped unexpectedly") from None
                continue
            return None if self.token.cancelled or item is STOPPED else item
        return None

    def put(self, item: Any) -> None:
        if self.dropping and isinstance(item, _Chunk):
            if self.token.cancelled or not self.queue.put_dropping(item, _is_chunk, _carry_dropped):
                raise _cancel.Cancelled("the stream was closed")
            return
        if self.token.cancelled or not self.queue.put(item):  # (a close stops the queue: no wait)
            raise _cancel.Cancelled("the stream was closed")

    def cancel(self) -> None:
        """From any thread: the producer stops at its next read, frame or hand-over; a hand-over waiting for
        room, and a consumer waiting for a chunk, return at once."""
        self.token.cancel()
        self.queue.stop()
        if self.input is not None:
            self.input.close_readers()

    def close(self) -> None:
        self.cancel()
        if self.thread.ident is None:  # never started (start() failed)
            return
        self.done.wait()
        self.thread.join()

    def _run(self) -> None:
        try:
            with _cancel.scope(self.token):
                _Run(self.settings, self).run()
            self.put(_END)
        except _cancel.Cancelled:
            if not self.token.cancelled:
                self._hand_over(DecodeError("the stream was cancelled"))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._hand_over(exc)
        finally:
            self.done.set()

    def _hand_over(self, exc: BaseException) -> None:
        with contextlib.suppress(_cancel.Cancelled):
            self.put(exc)


# --- decoding ------------------------------------------------------------------------------------------------------


class _Run:
    """One stream's decoding on the producer thread."""

    def __init__(self, settings: _Settings, producer: _Producer) -> None:
        self.s = settings
        self.producer = producer
        self.grid = _Grid(settings.fps, settings.start, settings.end)
        self.chunker = _Chunker(self.grid, settings.per_chunk, settings.chunk_seconds, settings.start or 0.0)
        self.size: Optional[tuple] = None  # (coded width, coded height, quarter turns)
        self.fps = 0.0  # the source's frame rate: metadata["fps"]
        self.total: Optional[int] = None  # frames in a file; None: count as they come (live, no count in the header)
        self.first_pts: Optional[int] = None  # frames before it are never shown (a file starting inside a GOP)
        self.last_index = -1
        self.last_time = -math.inf
        self.pool: Optional[ThreadPoolExecutor] = None
        self.buffers: dict = {}  # chunk number -> its tensor, while frames are written into it
        self.first_times: dict = {}  # chunk number -> (source time, wall time) of its first frame
        self.time_base: Any = None  # the video stream's
        self.out_size = (0, 0)
        self.audio: Optional[StreamAudio] = None  # with audio=True: the sound, and the chunks waiting for theirs
        self.waiting: collections.deque = collections.deque()
        self.source: Any = None  # a file's source (its sound may be read again from it)

    def run(self) -> None:
        from .._frame_resize import resize_pool
        from ._live import open_input

        self.pool = resize_pool("qwen-vl-stream-resize")
        try:
            inp = open_input(self.s.value, self.s.policy, self.producer.token)
            self.producer.input = _Handle(inp)
            try:
                if inp.live:
                    self.producer.dropping = self.s.on_lag == "drop"
                    self._live(inp)
                else:
                    self._file(inp)
            finally:
                if self.audio is not None:
                    self.audio.close_own()
                inp.close()
        finally:
            # the chunks handed over may still be resizing: they finish, unless the consumer has gone
            self.pool.shutdown(wait=True, cancel_futures=self.producer.token.cancelled)

    # -- chunks ---------------------------------------------------------------------------------------------------

    def frame(self, index: int, t: float, frame: Any, wall: Optional[float] = None) -> None:
        """A decoded frame, in display order (``wall``: its wall-clock time, where the source dates it)."""
        self.last_index, self.last_time = index, t
        places: list = []  # every (chunk tensor, position) this frame fills
        done: Future = Future()

        def place(j: int, pos: int) -> _Slot:
            places.append(self._buffer(j)[pos])
            if pos == 0:
                self.first_times.setdefault(j, (_source_time(frame, self.time_base), wall))
            return _Slot(index, done)

        completed = self.chunker.add(t, place)
        if places:  # written into every chunk it serves before any of them is handed over: chunks own their memory
            task = self.pool.submit(self._prepare_all, frame, places, done)
            task.add_done_callback(lambda f: f.cancelled() and done.cancel())
        for chunk in completed:
            self.hand_over(chunk, index + 1)  # a live stream's frames so far: up to the one completing the chunk
        if self.waiting:
            self.release(t)

    def _prepare_all(self, frame: Any, places: list, done: Future) -> None:
        """The frame into its first place, then copied into the others (a frame serving targets in two chunks:
        a consumer changing one chunk in place must not change the other)."""
        try:
            self._prepare(frame, places[0])
            for out in places[1:]:
                out.copy_(places[0])
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)

    def _buffer(self, j: int) -> Any:
        """Chunk ``j``'s tensor, allocated when its first frame is placed; frames are written straight into it."""
        out = self.buffers.get(j)
        if out is None:
            import torch

            from ..video import FRAME_FACTOR

            h, w = self.out_size
            t = self.s.per_chunk + (-self.s.per_chunk) % FRAME_FACTOR
            out = self.buffers[j] = torch.empty((t, 3, h, w), dtype=self.s.torch_dtype)
        return out

    def finish(self, stream_end: float) -> None:
        last = self.chunker.finish(stream_end)
        if last is not None:
            self.hand_over(last, self.last_index + 1)
        if self.audio is not None:
            self.audio.end()
            self.release(math.inf)

    def hand_over(self, chunk: _Chunk, seen: int) -> None:
        """A complete chunk goes to the consumer now (its frames may still be resizing: the consumer waits), or,
        with audio, once its sound has been decoded too."""
        chunk.out = self.buffers.pop(chunk.index)
        chunk.source_time, chunk.wall_time = self.first_times.pop(chunk.index, (None, None))
        chunk.fps = self.fps
        chunk.total = self.total if self.total is not None else seen
        if self.audio is None:
            self.producer.put(chunk)
        else:
            self.waiting.append(chunk)

    def release(self, t: float) -> None:
        """The chunks whose sound is complete go to the consumer, in order, the video being at time ``t``. One
        whose sound lags by more than AUDIO_LAG: a file's is read by a demuxer of its own, a live source's is
        silence where it has none."""
        audio = self.audio
        stop = self.s.options.video_end
        while self.waiting:
            chunk = self.waiting[0]
            first, last = audio.window(chunk.start, chunk.end)
            upto = last if stop is None else max(first, min(last, audio.window(chunk.start, stop)[1]))
            if not audio.ready(upto):
                if t - chunk.end <= AUDIO_LAG:
                    return
                if audio.live:
                    audio.drain()
                else:
                    audio.read_own(self.source, upto)
            chunk.audio = audio.take(first, last, upto)  # (none after video_end: a last chunk may reach past it)
            self.producer.put(self.waiting.popleft())

    def set_size(self, width: int, height: int, rotation: int, name: str) -> None:
        """The one output size of the stream, from the first frame's (displayed) size and the pixel budget."""
        from .._errors import AspectRatioError
        from ..video import FRAME_FACTOR, VIDEO_MAX_TOKEN_NUM, video_frame_size

        k = (rotation // 90) % 4
        shown_w, shown_h = (height, width) if k % 2 else (width, height)
        # a two-frame clip's budget: the per-frame limits of fetch_video, no whole-clip total
        options = replace(self.s.options, total_pixels=VIDEO_MAX_TOKEN_NUM * self.s.factor**2)
        try:
            h, w = video_frame_size(options, FRAME_FACTOR, shown_h, shown_w, self.s.factor, self.s.policy)
        except AspectRatioError as exc:
            raise AspectRatioError(f"video {name}: {exc}") from None
        self.size = (h, w, k) if k % 2 else (w, h, k)
        self.out_size = (h, w)

    def _prepare(self, frame: Any, out: Any) -> None:
        """On a pool thread: the frame in RGB, resized, turned upright, written into ``out`` (3xHxW)."""
        import torch

        from .._frame_resize import resize_frame

        coded_w, coded_h, k = self.size
        rgb = frame.to_ndarray(format="rgb24")
        if not k:  # straight into the chunk's tensor
            resize_frame(rgb, coded_w, coded_h, out.numpy())
            return
        chw = torch.from_numpy(resize_frame(rgb, coded_w, coded_h)).permute(2, 0, 1)
        out.copy_(torch.rot90(chw, k, dims=(1, 2)))

    # -- files ------------------------------------------------------------------------------------------------------

    def _file(self, inp: Any) -> None:
        from ..container._probe import probe_video
        from ..video import plan_frames

        source = inp.source
        if source.obj is not None:
            raise InvalidOptionError(f"cannot decode {source.name} as a video; give a file, URL, bytes or a stream")
        # a container without a frame count in its header (MPEG-TS, Matroska, WebM) is not read through first:
        # its frames are counted as they come, as a live stream's, and its first chunk needs only its own bytes
        info = probe_video(source, count=False)
        plan_frames(info, self.s.options, self.s.policy, source.name)  # the window and the policy's limits
        self.fps = info.fps
        self.total = info.num_frames if info.exact_count else None
        self.first_pts = info.first_pts
        width, height = info.width, info.height
        self.set_size(width, height, info.rotation, source.name)
        if self.s.audio:
            self.source = source
            self.audio = StreamAudio(self.chunker.origin, info.start_time, live=False)
        skip = info.codec in _ONE_FRAME_PER_PACKET and info.container != "avi"
        while True:
            try:
                last = self._decode_file(source, info, skip)
                break
            except _Inexact:
                for slot in self.chunker.frames:  # the chunk in progress is decoded again: let its writes finish
                    with contextlib.suppress(Exception):
                        slot.future.result()
                self.chunker.rewind()
                skip = False
        if info.exact_count and not self.chunker.finished and last < info.num_frames - 1 - _END_TOLERANCE:
            raise DecodeError(
                f"{source.name} ends after frame {last} of the {info.num_frames} its header announces: the file is "
                "truncated or corrupt"
            )
        self.finish(min((last + 1) / self.fps, self.s.end or math.inf))

    def _decode_file(self, source: Any, info: Any, skip: bool) -> int:
        """One pass over the file; returns the last frame's index. Raises _Inexact to be run again."""
        from ..backends._pyav import _configure
        from ..container._probe import open_container
        from ..video import _decoder_threads

        container = open_container(source)
        try:
            stream = container.streams.video[0]
            self.time_base = stream.time_base
            _configure(stream, _decoder_threads(), single=False)
            if self.audio is not None:
                self.audio.attach(container, source.name)
            index, packets = self._seek(container, stream, source, info)
            if skip:
                frames: Any = _Skipping(self, stream, packets, index, workers=min(_MAX_DECODERS, usable_cpus()))
            else:
                frames = _Counting(self, stream, packets, index)
            last = -1
            for ordinal, frame in frames:
                last = max(last, ordinal)
                if not info.exact_count:  # the policy's limits, checked as the frames come
                    self._check_limits(ordinal, ordinal / self.fps, source.name)
                self.frame(ordinal, ordinal / self.fps, frame)
                if self.chunker.finished:
                    if self.waiting:  # the sound after the window's last frame: read on its own, not demuxed to
                        self.release(math.inf)  # the end of the file
                    # the window is complete: a file read by range stops its reads in flight now (its readahead
                    # asks for up to 8 MiB at a time; the decoder threads are joined on the way out)
                    if source.ranged is not None:
                        source.close()
                    break
            return max(last, frames.last_shown)
        except (QwenVLError, _Inexact, MemoryError):
            raise
        except Exception as exc:
            raise DecodeError(f"{source.name} could not be decoded ({type(exc).__name__}: {exc})") from exc
        finally:
            container.close()

    def _seek(self, container: Any, stream: Any, source: Any, info: Any) -> tuple:
        """(the file's index or None, the packets to decode). With video_start: one seek to the keyframe before
        the first target (the index then numbers the frames after it); else from the beginning."""
        from ..container._probe import seek_start

        # AVI: no timestamps to seek by (as the PyAV backend). A file without a frame count in its header: its
        # index would read the whole file, so it is read from the start, the packets before the window undecoded
        if not self.s.start or info.container == "avi" or not info.exact_count:
            return None, _shown_packets(self._demux(container, stream))
        from ..backends._pyav import _Index

        index = _Index(container, stream, source, info.first_pts)
        if index.usable:
            target = math.ceil((self.grid.first / self.grid.fps - _EPS / self.grid.fps) * self.fps)
            key = index.keyframe_before(min(max(0, target), len(index.pts) - 1))
            for _ in range(3):  # a seek by timestamp can land past the keyframe (MPEG-TS): then one further back
                if key == 0:  # (and a keyframe that is a mere recovery point is struck: one further back)
                    break
                container.seek(index.keyframe_pts(key), stream=stream, backward=True, any_frame=False)
                packets = _from_keyframe(self._demux(container, stream))
                first = next(packets, None)
                landed = first is not None and first.pts is not None and first.pts <= index.keyframe_pts(key)
                if landed and index.fresh_start(first):
                    return index, _shown_packets(itertools.chain([first], packets))
                key = index.keyframe_before(key - 1)
        seek_start(container)
        return None, _shown_packets(self._demux(container, stream))

    def _demux(self, container: Any, stream: Any) -> Iterator[Any]:
        """The video stream's packets; with audio, the sound's are demuxed with them and decoded on the way."""
        if self.audio is None:
            return container.demux(stream)
        return self.audio.split(container.demux(stream, container.streams[self.audio.index]))

    # -- live streams -------------------------------------------------------------------------------------------------

    def _live(self, inp: Any) -> None:
        import av

        from ..container._probe import _rate

        reader = inp.reader
        try:
            opener = getattr(reader, "open_container", None)  # a protocol FFmpeg speaks itself (RTSP, RTMP, SRT)
            container = opener() if opener else av.open(reader, mode="r", format=inp.format, metadata_errors="ignore")
        except (QwenVLError, MemoryError):
            raise
        except Exception as exc:
            raise _live_error(inp, exc) from exc
        try:
            if not container.streams.video:
                raise DecodeError(f"{inp.name} has no video stream; give a stream with video")
            stream = container.streams.video[0]
            refuse_picture(stream, inp.name)
            self.time_base = stream.time_base
            if self.s.audio:
                self.audio = StreamAudio(self.chunker.origin, None, live=True)
                self.audio.attach(container, inp.name)
            from ..backends._pyav import _configure
            from ..video import _decoder_threads

            _configure(stream, _decoder_threads(), single=False)
            rate = _rate(stream)
            self.fps = float(rate) if rate else 1000.0  # no rate: a millisecond timeline
            header_frames = int(stream.frames or 0)
            self.total = header_frames if header_frames > 0 else None
            clock = _LiveClock(self.fps)
            dates = _SegmentTimes(inp.reader)
            for frame in _decode_all(container, stream, inp, dates.packet, self.audio):
                if self.size is None:
                    self.set_size(frame.width, frame.height, round(getattr(frame, "rotation", 0) or 0) % 360, inp.name)
                restart, wall = dates.frame(frame)
                index, t = clock.place(frame, restart)
                if self.audio is not None:
                    self.audio.set_offset(clock.offset)
                if self.chunker.finished:  # (read on only for the sound of the chunks waiting for it)
                    self.release(t)
                    if not self.waiting:
                        break
                    continue
                self._check_limits(index, t, inp.name)
                self.frame(index, t, frame, wall)
                if self.chunker.finished and not self.waiting:
                    break
        except (QwenVLError, MemoryError):
            raise
        except Exception as exc:
            raise _live_error(inp, exc) from exc
        finally:
            container.close()
        if self.size is None:
            raise DecodeError(f"video source {inp.name} ended before its first decodable frame")
        self.finish(min(self.last_time + 1 / self.fps, self.s.end or math.inf))

    def _check_limits(self, index: int, t: float, name: str) -> None:
        policy = self.s.policy
        if policy.max_video_seconds is not None and t > policy.max_video_seconds:
            raise SourceTooLargeError(
                f"video {name} went on past the limit of {policy.max_video_seconds:g} s "
                "(set video_end, or raise FetchPolicy.max_video_seconds)"
            )
        if policy.max_video_frames is not None and index >= policy.max_video_frames:
            raise SourceTooLargeError(
                f"video {name} went on past the limit of {policy.max_video_frames} frames "
                "(set video_end, or raise FetchPolicy.max_video_frames)"
            )


class _Handle:
    """What the consumer's thread may do to an input while the producer uses it: unblock its reads."""

    def __init__(self, inp: Any) -> None:
        self.inp = inp

    def close_readers(self) -> None:
        if self.inp.reader is not None:
            self.inp.reader.close()


def _decode_all(
    container: Any, stream: Any, inp: Any, seen: Callable[[Any], None], audio: Optional[StreamAudio] = None
) -> Iterator[Any]:
    """Every frame of a live stream (each packet shown to ``seen`` first; with ``audio``, the sound's packets
    decoded into it); DecodeError when it ends cut off (in the middle of a packet)."""
    cut = False
    reader = inp.reader
    ends = getattr(reader, "ends", lambda exc: False)
    packets = _packets(container, [stream] if audio is None else [stream, container.streams[audio.index]], ends)
    try:
        for packet in packets if audio is None else audio.split(packets):
            if packet.size == 0:  # the demuxer's end (one such packet per stream): the decoder is flushed below
                continue
            _cancel.check()  # a close: at the next packet, whatever the source
            seen(packet)
            if hasattr(reader, "seen"):
                reader.seen()
            cut = packet.is_corrupt  # a damaged packet mid-stream (a lost datagram) is concealed; at the end, cut off
            try:
                yield from decode_or_conceal(stream.codec_context, packet)  # a bit error must not end a feed
            except Exception as exc:
                if isinstance(exc, (QwenVLError, MemoryError)):
                    raise
                raise _live_error(inp, exc) from exc
    except FetchTimeoutError:  # a stall (a UDP feed's sender stopping): the frames decoded so far come out first
        yield from stream.codec_context.decode(None)
        raise
    yield from stream.codec_context.decode(None)
    if cut or (container.format.name == "mpegts" and reader.bytes_read % 188 and reader.bytes_read % 192):
        raise DecodeError(
            f"video source {inp.name} ended in the middle of a packet after {reader.bytes_read} bytes: the stream "
            "was cut off"
        )


def _packets(container: Any, streams: list, ends: Callable[[BaseException], bool]) -> Iterator[Any]:
    """The demuxer's packets, up to an error that the source says is its end."""
    packets = container.demux(*streams)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except Exception as exc:
            if ends(exc):
                return
            raise
        yield packet


def _live_error(inp: Any, exc: BaseException) -> QwenVLError:
    typed = getattr(inp.reader, "error", None)  # a protocol FFmpeg reads itself: its own errors, typed
    if typed is not None:
        return typed(exc)
    return DecodeError(f"video source {inp.name} is not a decodable video stream ({type(exc).__name__}: {exc})")


#: decoders working on a file's GOPs in parallel, at most (one per core)
_MAX_DECODERS = 4
#: frames a file may end short of its header's count (as the PyAV backend allows) before it is truncated
_END_TOLERANCE = 2


#: seconds a live stream's timestamps may leap forward and still be a gap in the video (a dropped stretch, shown
#: as the last frame held); a larger leap is a discontinuity (it made 3,602 chunks of one frame for 4 s of video)
FORWARD_GAP = 10.0


def _source_time(frame: Any, time_base: Any) -> Optional[float]:
    """The frame's timestamp in seconds (a frame from a decoder of its own has no time base: the stream's)."""
    pts, tb = frame.pts, frame.time_base or time_base
    return None if pts is None or tb is None else float(pts * tb)


class _SegmentTimes:
    """For a source read in segments (HLS): which segment each frame came from, told by its packet's position
    in the byte stream, so that a frame gets its segment's date (EXT-X-PROGRAM-DATE-TIME plus the frame's
    timestamp past the segment's first) and the first frame after an EXT-X-DISCONTINUITY restarts the timeline.
    Other sources: nothing."""

    KEPT = 1024  # packets and segments remembered (the decoder's delay is far shorter)

    def __init__(self, reader: Any) -> None:
        self.segment_at = getattr(reader, "segment_at", None)
        self.by_pts: dict = {}  # packet pts -> its segment
        self.first_pts: dict = {}  # segment sequence -> pts of its first frame shown

    def packet(self, packet: Any) -> None:
        if self.segment_at is None or packet.pts is None:
            return
        seg = self.segment_at(packet.pos)
        if seg is not None:
            self.by_pts[packet.pts] = seg
            if len(self.by_pts) > self.KEPT:
                self.by_pts.pop(next(iter(self.by_pts)))

    def frame(self, frame: Any) -> tuple:
        """(whether the frame starts a new timeline, its wall-clock time or None)."""
        seg = self.by_pts.pop(frame.pts, None) if frame.pts is not None else None
        if seg is None:
            return False, None
        first = seg.sequence not in self.first_pts
        if first:
            self.first_pts[seg.sequence] = frame.pts
            if len(self.first_pts) > self.KEPT:
                self.first_pts.pop(next(iter(self.first_pts)))
        base = self.first_pts[seg.sequence]
        wall = None
        if seg.date is not None and frame.time_base is not None:
            wall = seg.date + float((frame.pts - base) * frame.time_base)
        return first and seg.discontinuity, wall


class _LiveClock:
    """Time and index of live frames: time from the presentation timestamp, relative to the first frame (a
    jump back, as at an HLS discontinuity, or forward by more than FORWARD_GAP continues the timeline instead);
    index the frame slot at the nominal rate, kept strictly increasing."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self.offset: Optional[float] = None
        self.t = -math.inf
        self.index = -1

    def place(self, frame: Any, restart: bool = False) -> tuple:
        """(index, time) of ``frame``; ``restart``: the source says a new timeline starts with it (an HLS
        EXT-X-DISCONTINUITY), whatever its timestamp."""
        pts, tb = frame.pts, frame.time_base
        if pts is None or tb is None:
            t = self.t + 1 / self.fps if self.index >= 0 else 0.0
        else:
            raw = float(pts * tb)
            if self.offset is None:
                self.offset = raw
            t = raw - self.offset
            # a discontinuity (an HLS discontinuity, an encoder restart, a camera clock step): a jump back, or
            # forward by more than FORWARD_GAP; the timeline continues one frame after the last
            jumped = t < self.t - 0.5 or (self.index >= 0 and t > self.t + FORWARD_GAP)
            if self.index >= 0 and (jumped or restart):
                self.offset -= self.t + 1 / self.fps - t
                t = self.t + 1 / self.fps
        self.t = max(t, self.t)
        self.index = max(self.index + 1, round(self.t * self.fps))
        return self.index, self.t
