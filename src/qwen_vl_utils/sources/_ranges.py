"""Remote files read by range: a seekable, read-only file object over HTTP range requests or an object store.

The rest of the library sees an ordinary binary file object (``Source.open()``): FFmpeg reads the container
index where it lies (both ends of the file when ``moov`` is at the end) and then only the parts it decodes.
Behind it, a :class:`RangedFile` keeps the state every reader of one file shares:

- a bounded block cache (least recently used blocks go first), so parallel decoders and the probe reuse what
  was fetched once;
- sequential readahead: a reader moving forward fetches ever larger spans per request (up to 8 MiB), so a
  decoder running through a GOP costs a few requests, not one per 32 KiB read;
- :meth:`RangedFile.prefetch`: byte ranges the frame plan will need, merged when close and fetched on a few
  connections in the background while earlier GOPs decode;
- all of it under one :class:`~._http.Transfer`: the deadline, the byte limit counted on bytes actually
  received, retries (a range broken off by a reset resumes where it stopped), cancellation.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from .. import _cancel
from .._errors import DecodeError, NetworkError

__all__ = ["BLOCK", "RangedFile", "merge_ranges"]

BLOCK = 1 << 18  # 256 KiB: the unit of caching and of a random read
MAX_SPAN_BLOCKS = 32  # 8 MiB: the largest single request of sequential readahead
CACHE_BYTES = 96 << 20  # per remote file; least recently used blocks are dropped past it
PREFETCH_AHEAD = 48 << 20  # prefetched bytes not yet read, at most
PREFETCH_CONNECTIONS = 3
MERGE_GAP = 1 << 18  # ranges closer than this are fetched as one (256 KiB: about a round trip's worth)

#: fetch(start, end) -> the bytes [start, end), exactly; raises a QwenVLError
Fetch = Callable[[int, int], bytes]


def merge_ranges(ranges: list, gap: Optional[int] = None) -> list:
    """Sorted, merged ``(start, end)`` ranges; two ranges closer than ``gap`` (MERGE_GAP) become one."""
    gap = MERGE_GAP if gap is None else gap
    out: list = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(r) for r in out]


class RangedFile:
    """Shared state of one remote file: its size, a block cache, readahead and prefetch."""

    def __init__(self, name: str, size: int, fetch: Fetch, first: bytes = b"", on_close: Any = None) -> None:
        self.name = name
        self.size = size
        self._fetch = fetch
        self._on_close = on_close
        self._cond = threading.Condition()
        self._blocks: OrderedDict = OrderedDict()  # block number -> bytes
        self._pending: dict = {}  # block number -> Future, while a request for it is in flight
        self._prefetched: set = set()  # prefetched blocks not read yet
        self._pool: Optional[ThreadPoolExecutor] = None
        self._closed = False
        self._error: Optional[BaseException] = None
        for k in range(-(-len(first) // BLOCK)):  # the bytes the first request brought, whole blocks only
            chunk = first[k * BLOCK : (k + 1) * BLOCK]
            if len(chunk) == BLOCK or k * BLOCK + len(chunk) == size:
                self._blocks[k] = chunk

    @property
    def nblocks(self) -> int:
        return -(-self.size // BLOCK)

    def reader(self) -> RemoteReader:
        """A new independent, seekable file object over this file."""
        return RemoteReader(self)

    # -- blocks -----------------------------------------------------------------------------------------------

    def has(self, k: int) -> bool:
        """Is block ``k`` cached or on its way?"""
        with self._cond:
            return k in self._blocks or k in self._pending

    def block(self, k: int, span: int = 1) -> bytes:
        """Block ``k``, fetching it (and up to ``span - 1`` missing blocks after it, in one request) if needed."""
        while True:
            with self._cond:
                self._check_open()
                data = self._blocks.get(k)
                if data is not None:
                    self._blocks.move_to_end(k)
                    self._prefetched.discard(k)
                    self._cond.notify_all()
                    return data
                waiting = self._pending.get(k)
                if waiting is None:
                    first, last = self._claim(k, span)
            with _cancel.network():  # a decode slot held meanwhile is lent out
                if waiting is not None:
                    _cancel.result(waiting)  # its fetcher's error, if it failed; a cancelled caller stops at once
                    continue
                self._load(first, last)

    def _claim(self, k: int, span: int) -> tuple[int, int]:
        """Mark the missing blocks k, k+1, ... (up to ``span``) as in flight; returns [first, last)."""
        last = k
        while last < min(self.nblocks, k + span) and last not in self._blocks and last not in self._pending:
            self._pending[last] = Future()
            last += 1
        return k, last

    def _load(self, first: int, last: int, prefetch: bool = False) -> None:
        """Fetch blocks [first, last) in one request and publish them; on failure their waiters see the error."""
        start, end = first * BLOCK, min(self.size, last * BLOCK)
        try:
            data = self._fetch(start, end)
            if len(data) != end - start:
                raise NetworkError(
                    f"video source {self.name}: the server sent {len(data)} bytes for the range {start}-{end - 1}; "
                    "the file may have changed while it was read"
                )
        except BaseException as exc:
            with self._cond:
                for k in range(first, last):
                    fut = self._pending.pop(k, None)
                    if fut is not None:
                        fut.set_exception(exc)
                self._cond.notify_all()
            raise
        with self._cond:
            for k in range(first, last):
                self._blocks[k] = data[(k - first) * BLOCK : (k - first + 1) * BLOCK]
                if prefetch:
                    self._prefetched.add(k)
                self._pending.pop(k).set_result(None)
            self._evict()
            self._cond.notify_all()

    def _evict(self) -> None:
        while len(self._blocks) * BLOCK > CACHE_BYTES:
            victim = next((k for k in self._blocks if k not in self._prefetched), None)
            if victim is None:
                victim = next(iter(self._blocks))
                self._prefetched.discard(victim)
            del self._blocks[victim]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed remote file")

    # -- prefetch ----------------------------------------------------------------------------------------------

    def prefetch(self, ranges: list) -> None:
        """Fetch these byte ranges in the background (merged, in order, on a few connections), at most
        ``PREFETCH_AHEAD`` bytes ahead of what readers have consumed."""
        spans = []
        for start, end in merge_ranges(ranges):
            first, last = max(0, start // BLOCK), min(self.nblocks, -(-end // BLOCK))
            for k in range(first, last, MAX_SPAN_BLOCKS):
                spans.append((k, min(last, k + MAX_SPAN_BLOCKS)))
        if not spans:
            return
        with self._cond:
            self._check_open()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PREFETCH_CONNECTIONS, thread_name_prefix="qwen-vl-prefetch")
            for first, last in spans:
                self._pool.submit(self._prefetch_span, first, last)

    def _prefetch_span(self, first: int, last: int) -> None:
        with self._cond:
            while not self._closed and len(self._prefetched) * BLOCK >= PREFETCH_AHEAD:
                self._cond.wait(0.5)
            if self._closed or self._error is not None:
                return
            k = first
            claims = []
            while k < last:
                if k in self._blocks or k in self._pending:
                    k += 1
                    continue
                a, b = self._claim(k, last - k)
                claims.append((a, b))
                k = b
        for n, (a, b) in enumerate(claims):
            if self._closed:
                self._release(claims[n:], ValueError("the remote file was closed"))
                return
            try:
                self._load(a, b, prefetch=True)
            except BaseException as exc:  # readers of these blocks see the error; the rest are let go
                with self._cond:
                    self._error = exc
                self._release(claims[n + 1 :], exc)
                return

    def _release(self, claims: list, exc: BaseException) -> None:
        """Give up claimed blocks that will not be fetched: their waiters get ``exc`` (and may fetch again)."""
        with self._cond:
            for a, b in claims:
                for k in range(a, b):
                    fut = self._pending.pop(k, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
            self._cond.notify_all()

    # -- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop prefetching (requests in flight are aborted, none is started) and drop the cache."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
            self._blocks.clear()
            self._cond.notify_all()
        if self._on_close is not None:
            self._on_close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._release([(k, k + 1) for k in list(self._pending)], ValueError("the remote file was closed"))


class RemoteReader(io.RawIOBase):
    """A seekable, read-only binary file object over a :class:`RangedFile` (one per decoder)."""

    def __init__(self, shared: RangedFile) -> None:
        self._shared = shared
        self._pos = 0
        self._last = -2  # the last block read, to detect sequential reading
        self._run = 0
        self._failed = False  # a read raised: later reads are the end of the file (see readinto)
        self.name = shared.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._shared.size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` as far as the file allows (never short before the end, as some readers expect).

        After a read raised (a timeout, a cancellation), later reads return nothing: FFmpeg, which calls back
        into this file, then stops and PyAV raises the first error it stashed, instead of printing each later
        one to stderr as "PyAV library exception being dropped"."""
        if self._failed:
            return 0
        try:
            return self._fill(buffer)
        except BaseException:
            self._failed = True
            raise

    def _fill(self, buffer: Any) -> int:
        shared = self._shared
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < shared.size:
            k, offset = divmod(self._pos, BLOCK)
            if shared.has(k) or k not in (self._last, self._last + 1):
                self._run = 0  # readahead grows only over a run of sequential misses
            elif k != self._last:
                self._run += 1
            span = min(MAX_SPAN_BLOCKS, 1 << min(self._run // 2, 5))  # 1, 1, 2, 2, 4, 4, ... blocks
            data = shared.block(k, span)
            self._last = k
            n = min(len(view) - done, len(data) - offset)
            if n <= 0:
                raise DecodeError(f"video source {shared.name}: read past the end of a block")
            view[done : done + n] = data[offset : offset + n]
            self._pos += n
            done += n
        return done

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._shared.size - self._pos)
        buf = bytearray(min(size, max(0, self._shared.size - self._pos)))
        return bytes(buf[: self.readinto(buf)])
