"""Slots: a first-come-first-served counting semaphore shared by event loops and threads, with a bounded queue.

The lanes of :mod:`~qwen_vl_utils.aio` (downloads, decodes, one per remote host) and the synchronous image
decodes are :class:`Slots`. Capacities and the queue bound are callables, read at each acquire, so a new
process policy takes effect at once. A slot is handed over to the first waiter, on its own event loop or
thread; a waiter that is cancelled before it is granted leaves the queue, one granted as it was cancelled
passes the slot on. Each grant's queue wait is recorded, so an operator can see saturation (:meth:`stats`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from . import _cancel
from ._errors import OverloadedError

__all__ = ["Lease", "Slots", "bounded"]


#: queue waits kept for the percentiles of :meth:`Slots.stats`
_RECENT = 1024


class _Waiter:
    """One queued acquire: granted on its event loop (``loop``) or by setting ``event`` (a thread)."""

    __slots__ = ("event", "future", "loop", "since")

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self.loop = loop
        self.future = loop.create_future() if loop is not None else None
        self.event = threading.Event() if loop is None else None
        self.since = time.monotonic()


class Slots:
    """At most ``capacity()`` holders; at most ``max_waiting()`` waiters (None: unbounded), then
    :class:`OverloadedError`."""

    def __init__(
        self,
        name: str,
        capacity: Callable[[], int],
        max_waiting: Callable[[], Optional[int]] = lambda: None,
        hint: str = "",
    ) -> None:
        self.name = name
        self._capacity = capacity
        self._max_waiting = max_waiting
        self._hint = hint
        self._lock = threading.Lock()
        self._used = 0
        self._waiters: deque = deque()
        self._granted = 0
        self._waited_total = 0.0
        self._waited_max = 0.0
        self._recent: deque = deque(maxlen=_RECENT)
        self._refused = 0

    @property
    def in_use(self) -> int:
        return self._used

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._used and not self._waiters

    # -- taking a slot ------------------------------------------------------------------------------------------

    def _take_or_queue(self, waiter: _Waiter, admitted: bool = False) -> bool:
        """Take a free slot (True), or queue ``waiter`` (False); over the queue bound: OverloadedError. Work
        ``admitted`` already (taking back a slot it lent) queues first and is never refused."""
        with self._lock:
            if self._used < max(1, self._capacity()) and (admitted or not self._waiters):
                self._used += 1
                self._record(0.0)
                return True
            if admitted:
                self._waiters.appendleft(waiter)
                return False
            bound = self._max_waiting()
            if bound is not None and len(self._waiters) >= bound:
                self._refused += 1
                raise OverloadedError(
                    f"{self.name}: {len(self._waiters)} requests are already waiting for one of {self._used} slots "
                    f"in use; retry later{self._hint}"
                )
            self._waiters.append(waiter)
            return False

    async def acquire(self) -> None:
        waiter = _Waiter(asyncio.get_running_loop())
        if self._take_or_queue(waiter):
            return
        try:
            await waiter.future
        except asyncio.CancelledError:
            if not self._leave(waiter) and waiter.future.done() and not waiter.future.cancelled():
                self.release()  # granted as we were cancelled: pass it on
            raise

    def acquire_blocking(
        self, check: Callable[[], None] = _cancel.check, slice_seconds: float = 0.05, admitted: bool = False
    ) -> None:
        """From a thread: wait for a slot, running ``check()`` between slices (it raises to stop waiting)."""
        waiter = _Waiter(None)
        if self._take_or_queue(waiter, admitted):
            return
        try:
            while not waiter.event.wait(slice_seconds):
                check()
        except BaseException:
            if not self._leave(waiter):  # granted meanwhile: give it back
                self.release()
            raise

    def _leave(self, waiter: _Waiter) -> bool:
        """Take a waiter that gave up off the queue; False if it had been granted already."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                return True
            return False

    def release(self) -> None:
        """Give a slot back: to the first waiter (on its own loop or thread), or to the pool."""
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if waiter.event is not None:
                    self._record(time.monotonic() - waiter.since)
                    waiter.event.set()
                    return
                try:
                    waiter.loop.call_soon_threadsafe(self._grant, waiter)
                except RuntimeError:  # that loop is closed: its waiter is gone
                    continue
                self._record(time.monotonic() - waiter.since)
                return
            self._used -= 1

    def _grant(self, waiter: _Waiter) -> None:
        if waiter.future.cancelled():
            self.release()
        else:
            waiter.future.set_result(None)

    # -- what an operator sees ----------------------------------------------------------------------------------

    def _record(self, waited: float) -> None:  # (under the lock)
        self._granted += 1
        self._waited_total += waited
        self._waited_max = max(self._waited_max, waited)
        self._recent.append(waited)

    def stats(self) -> dict:
        """In use, capacity, waiting now; grants so far with their queue waits (total, max, and the median and
        99th percentile of the last 1024); refusals for a full queue."""
        with self._lock:
            recent = sorted(self._recent)
            waiting = len(self._waiters)
            oldest = time.monotonic() - self._waiters[0].since if self._waiters else 0.0
            out = {
                "in_use": self._used,
                "capacity": max(1, self._capacity()),
                "waiting": waiting,
                "oldest_wait_s": round(oldest, 6),
                "granted": self._granted,
                "refused": self._refused,
                "wait_total_s": round(self._waited_total, 6),
                "wait_max_s": round(self._waited_max, 6),
            }
        out["wait_p50_s"] = round(_percentile(recent, 0.50), 6)
        out["wait_p99_s"] = round(_percentile(recent, 0.99), 6)
        return out


def _percentile(ordered: list, q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Lease:
    """A slot held by work on a thread, which may lend it out while it blocks on something else (a decode
    waiting for the network gives its decode slot back, :func:`qwen_vl_utils._cancel.network`). Only the
    thread the work runs on lends it (:attr:`owner`, set when the work starts): threads the work starts
    itself (parallel decoders) decode under the slot and never lend it, so the slot is neither lent twice nor
    decoded under while lent."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.held = True  # (taken by the caller before the lease is made)
        self.owner: Optional[int] = None  # the thread the work runs on (threading.get_ident)
        self._lock = threading.Lock()

    def lend(self) -> bool:
        """Give the slot back for a while, if this is the owner thread and it holds it; True if it did."""
        if threading.get_ident() != self.owner:
            return False
        with self._lock:
            if not self.held:
                return False
            self.held = False
        self.slots.release()
        return True

    def resume(self) -> None:
        """Take the slot back after :meth:`lend`: work already running, so ahead of new arrivals and never
        refused for a full queue."""
        self.slots.acquire_blocking(admitted=True)
        with self._lock:
            self.held = True

    def close(self) -> None:
        with self._lock:
            if not self.held:
                return
            self.held = False
        self.slots.release()


def bounded(slots: Slots, work: Callable[[], Any]) -> Any:
    """``work()`` in one of ``slots``, from a thread (waiting, cancellably, in arrival order)."""
    slots.acquire_blocking()
    try:
        return work()
    finally:
        slots.release()
