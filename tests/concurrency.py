"""Counting what runs at once, for the tests of thread pools and decode slots."""

from __future__ import annotations

import threading
import time
from typing import Any


class InFlight:
    """Counts the threads inside ``with`` at once, and the most there ever were (``peak``)."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def __enter__(self) -> InFlight:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


def track_decodes(monkeypatch: Any) -> InFlight:
    """Count image decodes in flight; each one is held 20 ms so that decodes that may overlap do."""
    from qwen_vl_utils import image

    decodes, real = InFlight(), image.decode_rgb

    def tracked(img: Any, name: str) -> Any:
        with decodes:
            time.sleep(0.02)
            return real(img, name)

    monkeypatch.setattr(image, "decode_rgb", tracked)
    return decodes
