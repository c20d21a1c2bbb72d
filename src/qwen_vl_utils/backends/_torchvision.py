"""torchvision: ``torchvision.io.read_video`` where the installed torchvision still has it.

Recent torchvision (0.22+) removed its video reader, and torchvision often cannot be imported next to a
CPU build of torch. Then this backend decodes through PyAV, which is what ``read_video`` used, and says
so once in the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from .._probe import VideoInfo
from .._sources import Source
from . import _pyav

NAME = "torchvision"
APPLIES_ROTATION = False
logger = logging.getLogger("qwen_vl_utils")
_once = threading.Lock()
_read_video: Any = None
_checked = False


def _load() -> Any:
    global _read_video, _checked
    with _once:
        if not _checked:
            _checked = True
            try:
                from torchvision.io import read_video  # type: ignore[import-not-found]

                _read_video = read_video
            except Exception as exc:  # missing, removed (0.22+), or an operator mismatch with torch
                logger.info(
                    "qwen-vl-utils: torchvision.io.read_video is not available here (%s: %s); the torchvision "
                    "backend decodes through PyAV, which is what read_video used",
                    type(exc).__name__,
                    exc,
                )
    return _read_video


def unsupported(info: VideoInfo) -> Optional[str]:
    return None


def read(source: Source, info: VideoInfo, indices: list[int], threads: int) -> Iterator[tuple[int, np.ndarray]]:
    read_video = _load()
    if read_video is None or source.path is None:
        yield from _pyav.read(source, info, indices, threads)
        return
    # read_video decodes a whole time window into memory: bound it to the frames planned
    start, end = indices[0] / info.fps, (indices[-1] + 1) / info.fps
    video, _, _ = read_video(source.path, start_pts=start, end_pts=end, pts_unit="sec", output_format="THWC")
    frames = video.numpy()
    first = indices[0]
    for i in indices:
        yield i, frames[min(i - first, len(frames) - 1)]
