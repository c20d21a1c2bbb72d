"""A bounded hand-over queue that a close empties of waiters at once.

``queue.Queue`` waiters poll to notice a close (0.1 s per thread and per stage, several stages deep, longer on a
loaded machine). A :class:`Handoff` is stopped instead: every blocked ``get`` returns :data:`STOPPED` and every
blocked ``put`` returns False, at once, and so does every later call.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable, Optional

__all__ = ["STOPPED", "Handoff"]

#: what ``get`` returns from a stopped queue
STOPPED = object()


class Handoff(queue.Queue):
    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.stopped = False

    def stop(self) -> None:
        """From any thread: wake every waiter; from now on ``get`` gives STOPPED and ``put`` drops the item."""
        with self.mutex:
            self.stopped = True
            self.not_empty.notify_all()
            self.not_full.notify_all()

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> bool:  # type: ignore[override]
        """True once ``item`` is queued; False if the queue is stopped; ``queue.Full`` after ``timeout``."""
        with self.not_full:
            self._wait(
                self.not_full, lambda: self.maxsize > 0 and len(self.queue) >= self.maxsize, timeout, queue.Full
            )
            if self.stopped:
                return False
            self.queue.append(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()
            return True

    def put_dropping(self, item: Any, droppable: Callable[[Any], bool], carry: Callable[[Any, Any], None]) -> bool:
        """Queue ``item`` without waiting: while the queue is full, the oldest ``droppable`` item is removed to
        make room (a live stream staying at the present), and ``carry(removed, successor)`` tells the droppable
        item that now comes next (or ``item``). False if the queue is stopped."""
        with self.not_full:
            if self.stopped:
                return False
            while self.maxsize > 0 and len(self.queue) >= self.maxsize:
                at = next((i for i, x in enumerate(self.queue) if droppable(x)), None)
                if at is None:
                    break
                oldest = self.queue[at]
                del self.queue[at]
                self.unfinished_tasks -= 1
                carry(oldest, next((x for x in list(self.queue)[at:] if droppable(x)), item))
            self.queue.append(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()
            return True

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """The next item; STOPPED if the queue is stopped; ``queue.Empty`` after ``timeout``."""
        with self.not_empty:
            self._wait(self.not_empty, lambda: not self.queue, timeout, queue.Empty)
            if self.stopped:
                return STOPPED
            item = self.queue.popleft()
            self.not_full.notify()
            return item

    def _wait(self, condition: Any, blocked: Any, timeout: Optional[float], error: type) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while not self.stopped and blocked():
            if end is None:
                condition.wait()
                continue
            left = end - time.monotonic()
            if left <= 0:
                raise error
            condition.wait(left)
