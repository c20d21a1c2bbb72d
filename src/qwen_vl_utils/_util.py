"""Small helpers shared across the library: cores, environment variables."""

from __future__ import annotations

import os
from typing import Callable

from ._errors import InvalidOptionError

__all__ = ["env_flag", "env_int", "usable_cpus"]


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def env_int(name: str, default: int, parse: Callable[[str], int] = int) -> int:
    """An integer environment variable, read now; a typed error naming it when it does not parse."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise InvalidOptionError(f"environment variable {name}={raw!r} is not a valid number") from exc


def env_flag(name: str) -> bool:
    """A boolean environment variable: 1, true, yes or on (any case) is true."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
