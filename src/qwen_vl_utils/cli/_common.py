"""What every command shares: exit codes, the element flags (the one place they become element keys) and the
error line printed for a failed source."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any

EXIT_OK, EXIT_SOURCE_FAILED, EXIT_USAGE = 0, 1, 2


def add_element_flags(p: argparse.ArgumentParser, stream: bool = False) -> None:
    """The element keys as flags; ``stream``: only those a stream uses (no frame counts, no clip budget, PyAV)."""
    p.add_argument("--patch-size", type=int, choices=(14, 16), default=14, help="14: Qwen2.5-VL, 16: Qwen3-VL")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--fps", type=float, help="frames sampled per second (default 2)")
    if not stream:
        rate.add_argument("--nframes", type=int, help="exact number of frames")
        p.add_argument("--min-frames", type=int)
        p.add_argument("--max-frames", type=int)
    p.add_argument("--min-pixels", type=int)
    p.add_argument("--max-pixels", type=int)
    if not stream:
        p.add_argument("--total-pixels", type=int)
    p.add_argument("--resized-height", type=int)
    p.add_argument("--resized-width", type=int)
    p.add_argument("--start", type=float, help="video_start, seconds")
    p.add_argument("--end", type=float, help="video_end, seconds")
    if not stream:
        p.add_argument("--backend", choices=("pyav", "torchcodec", "decord", "torchvision"))


_KEYS = {
    "fps": "fps",
    "nframes": "nframes",
    "min_frames": "min_frames",
    "max_frames": "max_frames",
    "min_pixels": "min_pixels",
    "max_pixels": "max_pixels",
    "total_pixels": "total_pixels",
    "resized_height": "resized_height",
    "resized_width": "resized_width",
    "start": "video_start",
    "end": "video_end",
    "backend": "video_reader",
}
_IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


def element_from_args(args: argparse.Namespace, kind: str, source: Any) -> dict[str, Any]:
    """The element dict the library receives for these flags."""
    ele: dict[str, Any] = {kind: source}
    for flag, key in _KEYS.items():
        value = getattr(args, flag, None)
        if value is not None and (kind == "video" or key in _IMAGE_KEYS):
            ele[key] = value
    return ele


def error_line(source: str, exc: BaseException, debug: bool) -> str:
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return f"error: {source}: {type(exc).__name__}: {exc}"
