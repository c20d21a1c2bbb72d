"""Progress bars on stderr for long runs (the CLI's decodes, dataset runs): tqdm's bar, with its rate, ETA and
unit, shown only on a terminal and only once the work has taken over a second. tqdm is imported when a bar is
first drawn, never by ``import qwen_vl_utils``."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, Union

#: seconds of work before a bar appears: quick runs print nothing
DELAY = 1.0


class Progress:
    """``update(done, total, label)`` with absolute positions; ``close()`` clears the bar. ``total=None``: a
    count and a rate, without a bar or an ETA; a callable: called once, when the bar first appears (a count that
    costs a pass over a file is paid only by runs long enough to show it)."""

    def __init__(self, enabled: bool, unit: str = "it") -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.unit = unit
        self.start = time.monotonic()
        self._bar: Any = None

    def update(self, done: int, total: Union[int, Callable[[], Optional[int]], None] = None, label: str = "") -> None:
        if not self.enabled:
            return
        waited = time.monotonic() - self.start
        if self._bar is None:
            if waited < DELAY:
                return
            try:
                from tqdm import tqdm
            except ImportError:  # a dependency, but an environment may lack it: no bar rather than a failed run
                self.enabled = False
                return
            if callable(total):
                total = total()
            self._bar = tqdm(
                total=total, initial=done, unit=self.unit, file=sys.stderr, leave=False, dynamic_ncols=True
            )
            self._bar.start_t -= waited  # the rate and the elapsed time count from the start of the work
        bar = self._bar
        if callable(total):
            total = bar.total  # counted once, when the bar appeared
        if label:
            bar.set_postfix_str(label[:40], refresh=False)
        if total != bar.total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
