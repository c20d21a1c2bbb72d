"""Small helpers shared across the library: cores, environment variables, warnings' stack levels."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from ._errors import InvalidOptionError

__all__ = ["caller_stacklevel", "env_flag", "env_int", "parse_flag", "usable_cpus"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _env(name: str, default: Any, parse: Callable[[str], Any], problem: Callable[[str, ValueError], str]) -> Any:
    """An environment variable read now through ``parse``; unset: ``default``; a typed error naming it when
    ``parse`` raises ValueError."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise InvalidOptionError(f"environment variable {problem(raw, exc)}") from exc


def env_int(name: str, default: int, parse: Callable[[str], int] = int) -> int:
    """An integer environment variable, read now; a typed error naming it when it does not parse."""
    return _env(name, default, parse, lambda raw, _: f"{name}={raw!r} is not a valid number")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_flag(raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off (any case); anything else is a ValueError, never a silent 'off'."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


def env_flag(name: str) -> bool:
    """A boolean environment variable (unset: False); a typo is a typed error naming the variable."""
    return _env(name, False, parse_flag, lambda _, exc: f"{name}: {exc}")


def caller_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that points at the first frame outside
    this package (the user's call), however deep in the library the warning is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
