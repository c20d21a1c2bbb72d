"""Cancellation of work running in a thread: a token that the caller sets and the work checks.

The asyncio API runs the library's ordinary synchronous code in worker threads. Each piece of work runs inside
``scope(token)``; the code checks :func:`check` between frames, images and network reads, and every network
transfer started inside the scope registers itself, so that :meth:`Token.cancel` also shuts down sockets
blocked in a read. Code outside any scope never sees a token: the synchronous API is unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Optional

from ._errors import QwenVLError

__all__ = ["Cancelled", "Token", "check", "current", "network", "result", "scope"]


class Cancelled(QwenVLError):
    """The work was cancelled by its caller (a cancelled asyncio task, an expired timeout)."""


class Token:
    """Set once, from any thread; the work it scopes stops at its next check."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._live: set = set()
        #: a slot the work holds and lends out while it waits on the network (see :func:`network`)
        self.lease: Any = None

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def cancel(self) -> None:
        self.event.set()
        with self._lock:
            live = list(self._live)
        for transfer in live:
            transfer.abort()

    def register(self, transfer: Any) -> None:
        """A transfer working for this token (kept for the token's life: a token lives as long as its call)."""
        with self._lock:
            self._live.add(transfer)
        if self.event.is_set():
            transfer.abort()


_local = threading.local()


def current() -> Optional[Token]:
    return getattr(_local, "token", None)


class scope:
    """Run the block (on this thread) under ``token``."""

    def __init__(self, token: Optional[Token]) -> None:
        self.token = token

    def __enter__(self) -> Optional[Token]:
        self.previous = current()
        _local.token = self.token
        return self.token

    def __exit__(self, *exc: object) -> None:
        _local.token = self.previous


def check(token: Optional[Token] = None) -> None:
    """Raise :class:`Cancelled` if this thread's work (or ``token``) was cancelled."""
    token = token if token is not None else current()
    if token is not None and token.event.is_set():
        raise Cancelled("cancelled by the caller")


@contextlib.contextmanager
def network() -> Any:
    """The block waits on the network: a CPU slot this thread's work holds (its token's ``lease``, a decode slot
    in the asyncio API) is lent out meanwhile and taken back after, so a ranged read or a frame fetched by URL
    never keeps a core's slot idle. Nested blocks lend it once; only the thread the work runs on lends it."""
    token = current()
    lease = token.lease if token is not None else None
    lent = lease is not None and lease.lend()
    try:
        yield
    finally:
        if lent:
            lease.resume()


def result(future: Future, between: Callable[[], None] = check, slice_seconds: float = 0.05) -> Any:
    """``future.result()``, waited for in slices with ``between()`` run after each unfinished one (it raises to
    stop waiting: a cancellation, a deadline). The future's own error is raised as it is: since Python 3.11 the
    wait's timeout is the builtin ``TimeoutError``, of which :class:`FetchTimeoutError` is a subclass, so a
    timeout is the wait's only while the future is not done."""
    while True:
        try:
            return future.result(timeout=slice_seconds)
        except (TimeoutError, FutureTimeout):
            if future.done():
                return future.result()  # its own error (or, finished just now, its value)
            between()
