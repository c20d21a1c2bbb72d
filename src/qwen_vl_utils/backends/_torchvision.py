"""torchvision: the name 0.0.14 used, kept so that ``video_reader="torchvision"`` and
``FORCE_QWENVL_VIDEO_READER=torchvision`` keep working; the frames are decoded by PyAV.

0.0.14 called ``torchvision.io.read_video``, which decodes the whole span from the first to the last sampled
frame into memory and finds frames by assuming a constant frame rate. That route is gone: torchvision 0.22+
removed ``read_video``, and torchvision often cannot be imported next to a CPU build of torch. PyAV, which is
what ``read_video`` decoded with, gives the same frames exactly, seeking and bounded in memory; torchvision is
never imported. The first use says so once in the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, Optional

from ..container._probe import VideoInfo
from ..sources._resolve import Source
from . import _pyav

NAME = "torchvision"
APPLIES_ROTATION = _pyav.APPLIES_ROTATION
logger = logging.getLogger("qwen_vl_utils")
_lock = threading.Lock()
_said = False


def _say_once() -> None:
    global _said
    with _lock:
        if not _said:
            _said = True
            logger.info(
                "qwen-vl-utils: the torchvision backend decodes through PyAV (what torchvision.io.read_video "
                "used); torchvision itself is not used"
            )


def unsupported(info: VideoInfo) -> Optional[str]:
    return _pyav.unsupported(info)


def read(source: Source, info: VideoInfo, indices: list[int], threads: int) -> Iterator[tuple[int, Any]]:
    _say_once()
    yield from _pyav.read(source, info, indices, threads)
