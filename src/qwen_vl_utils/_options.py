"""Element keys: the one place that checks every option the library reads, for type and range.

Every reader of an element goes through these functions, so a bad value fails the same way everywhere (before
any download or decode) with an :class:`InvalidOptionError` that names the key, the value and what is allowed::

    image_options(ele) -> ImageOptions        min_pixels, max_pixels, resized, jpeg_draft
    video_options(ele) -> VideoOptions        min_pixels, max_pixels, total_pixels, resized, fps, nframes,
                                              min_frames, max_frames, video_start, video_end, dtype,
                                              timestamps, sample_fps, raw_fps, video_reader
    patch_factor(size, policy) -> int         image_patch_size * SPATIAL_MERGE_SIZE (2), a size the policy accepts
    check_dtype(value, key) -> str | None     "float32" or "uint8"
    check_backend(value, key) -> str | None   a backend name from ``backends.BACKENDS``
    check_number(value, key) -> number | None one numeric key, by the table below

Options are checked once, where an element enters the library (``fetch_image``, ``fetch_video``,
``count_visual_tokens``, ``stream_video``, the asyncio twins); the checked object travels inward. The inner
functions that also take an element (``image_target_size``, ``smart_nframes``, ``plan_frames``,
``video_frame_size``) take its checked options as they are (:func:`as_image_options`, :func:`as_video_options`).

The options objects are frozen dataclasses holding the checked values, ``None`` for a key that is absent (a key
whose value is ``None``, JSON's ``null``, counts as absent); defaults are applied by the readers, which know the
patch factor. Numbers are ``int``/``float`` (numpy scalars too, never ``bool`` or strings, never NaN or
infinity), returned as ``int`` or ``float``. ``resized`` is ``(resized_height, resized_width)`` truncated to
integers as 0.0.14 did, and needs both keys. The rules:

==================================  ===========================================================
key                                 allowed
==================================  ===========================================================
min_pixels, min_frames, video_start a number >= 0
max_pixels, total_pixels, fps,      a number > 0
nframes, sample_fps, raw_fps,
video_end
max_frames                          a number >= 2 (one temporal patch)
resized_height, resized_width       a number >= 1, both or neither
timestamps                          a list of numbers >= 0, non-decreasing
dtype                               "float32" (or "float") / "uint8", torch or numpy dtypes
video_reader                        a backend name: pyav, torchcodec, decord, torchvision
jpeg_draft                          True or False
image_patch_size (an argument)      a positive integer (14.0 too) the policy accepts (14, 16)
==================================  ===========================================================

Cross-key rules that need the video (``fps`` with ``nframes``, ``video_start`` before ``video_end``, ``nframes``
within the frame count, one timestamp per frame) stay where the video is known (``video.py``).
"""

from __future__ import annotations

import itertools
import math
import numbers
import reprlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from ._errors import InvalidOptionError, describe
from .sources._policy import FetchPolicy, get_fetch_policy

__all__ = [
    "ImageOptions",
    "VideoOptions",
    "as_image_options",
    "as_video_options",
    "check_backend",
    "check_dtype",
    "check_number",
    "image_options",
    "patch_factor",
    "video_options",
]

Number = Union[int, float]

#: patches merged per side into one token: every resized side is a multiple of image_patch_size * this
SPATIAL_MERGE_SIZE = 2

#: key -> (lowest allowed value, whether the lowest value itself is excluded, what the key means)
_NUMBERS: dict[str, tuple[float, bool, str]] = {
    "min_pixels": (0, False, "pixels per image or frame, lower bound"),
    "max_pixels": (0, True, "pixels per image or frame, upper bound"),
    "total_pixels": (0, True, "pixel budget of the whole clip"),
    "resized_height": (1, False, "target height in pixels"),
    "resized_width": (1, False, "target width in pixels"),
    "fps": (0, True, "frames sampled per second"),
    "nframes": (0, True, "number of frames to sample"),
    "min_frames": (0, False, "fewest frames sampled by fps"),
    "max_frames": (2, False, "most frames sampled by fps"),
    "video_start": (0, False, "start of the window in seconds"),
    "video_end": (0, True, "end of the window in seconds"),
    "audio_start": (0, False, "start of the audio window in seconds"),
    "audio_end": (0, True, "end of the audio window in seconds"),
    "sample_fps": (0, True, "frames per second of a frame list"),
    "raw_fps": (0, True, "frame rate of the frame list's source"),
}

#: key -> highest allowed value: far beyond any real video, low enough that arithmetic on it stays finite
_HIGHEST: dict[str, float] = {
    "fps": 1e6,
    "sample_fps": 1e6,
    "raw_fps": 1e6,
    "nframes": 1e7,
    "min_frames": 1e7,
    "max_frames": 1e7,
    "resized_height": 1 << 16,
    "resized_width": 1 << 16,
    "video_start": 1e9,
    "video_end": 1e9,
    "audio_start": 1e9,
    "audio_end": 1e9,
}

_DTYPES = {"float32": "float32", "float": "float32", "uint8": "uint8"}

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = 8


def _show(value: Any) -> str:
    """The value as a message shows it: its repr, shortened; arrays and tensors by their shape."""
    if not isinstance(value, type) and getattr(value, "ndim", 0):
        return describe(value)
    return _short.repr(value)


def _invalid(key: str, value: Any, allowed: str) -> InvalidOptionError:
    hint = "; give the number itself, not its text" if isinstance(value, (str, bytes)) and "number" in allowed else ""
    return InvalidOptionError(f"invalid {key}={_show(value)} ({type(value).__name__}): {key} must be {allowed}{hint}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's bool is not a Real


def check_number(value: Any, key: str) -> Optional[Number]:
    """``value`` checked against the rule for ``key`` (see the table above); ``None`` stays ``None``."""
    if value is None:
        return None
    low, strict, meaning = _NUMBERS[key]
    high = _HIGHEST.get(key, math.inf)
    allowed = f"a number {'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
    allowed += f" ({meaning})"
    try:
        finite = _is_real(value) and math.isfinite(float(value))
    except OverflowError:  # an int past float's range
        finite = False
    if not finite or value < low or (strict and value == low) or value > high:
        raise _invalid(key, value, allowed)
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _resized(ele: dict) -> Optional[tuple[int, int]]:
    height = check_number(ele.get("resized_height"), "resized_height")
    width = check_number(ele.get("resized_width"), "resized_width")
    if height is None and width is None:
        return None
    if height is None or width is None:
        given, missing = ("resized_height", "resized_width") if width is None else ("resized_width", "resized_height")
        raise InvalidOptionError(
            f"{given}={ele[given]!r} needs {missing} too: give both (the target size), or neither "
            "(min_pixels/max_pixels decide the size)"
        )
    return int(height), int(width)


def _flag(value: Any, key: str) -> Optional[bool]:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _invalid(key, value, "True or False")


def _non_decreasing(key: str, value: Any, allowed: str, whole: bool = False) -> tuple:
    """``value`` as a tuple of finite numbers >= 0 in non-decreasing order (``whole``: integers, at least one);
    anything else is an InvalidOptionError naming ``key``."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise _invalid(key, value, allowed)
    items = list(value)
    fit = all(_is_real(x) and math.isfinite(x) and x >= 0 and (not whole or x == int(x)) for x in items)
    if not fit or (whole and not items):
        raise _invalid(key, value, allowed)
    out = tuple(int(x) if whole else float(x) for x in items)
    if any(b < a for a, b in itertools.pairwise(out)):
        raise _invalid(key, value, allowed)
    return out


def _timestamps(value: Any) -> Optional[tuple[float, ...]]:
    if value is None:
        return None
    return _non_decreasing("timestamps", value, "a list of seconds, one per frame: numbers >= 0, non-decreasing")


def check_dtype(value: Any, key: str = "dtype") -> Optional[str]:
    """``"float32"`` or ``"uint8"`` for any spelling of those two dtypes (string, torch, numpy); ``None`` stays."""
    if value is None:
        return None
    allowed = "'float32' or 'uint8' (a string, a torch dtype or a numpy dtype)"
    if isinstance(value, str):
        name = value.strip().lower()
        name = name[len("torch.") :] if name.startswith("torch.") else name
    elif type(value).__module__ == "torch":  # torch.float32 / torch.uint8, without importing torch
        name = str(value)[len("torch.") :]
    elif isinstance(value, bool) or _is_real(value):
        raise _invalid(key, value, allowed)
    else:
        try:
            name = np.dtype(value).name
        except TypeError:
            raise _invalid(key, value, allowed) from None
    if name not in _DTYPES:
        raise _invalid(key, value, allowed)
    return _DTYPES[name]


def check_backend(value: Any, key: str = "video_reader") -> Optional[str]:
    """A video reader backend's name, lower-cased; ``None`` stays ``None``. Whether it loads is checked later."""
    if value is None:
        return None
    from .backends import BACKENDS, available_backends

    name = value.strip().lower() if isinstance(value, str) else None
    if name not in BACKENDS:
        raise _invalid(
            key,
            value,
            f"a video reader backend name, one of {', '.join(BACKENDS)} "
            f"(available: {', '.join(available_backends()) or 'none'})",
        )
    return name


def patch_factor(image_patch_size: Any, policy: Optional[FetchPolicy] = None) -> int:
    """``image_patch_size * 2``: the side every resized image and frame is a multiple of. Only the sizes the
    fetch policy accepts (``patch_sizes``: 14 and 16, the models' own) pass: a request's patch size decides
    the output's size."""
    if (
        not _is_real(image_patch_size)
        or not math.isfinite(image_patch_size)
        or image_patch_size != int(image_patch_size)
        or image_patch_size <= 0
    ):
        raise InvalidOptionError(
            f"image_patch_size={_show(image_patch_size)} is not valid: it must be a positive integer "
            "(14 for Qwen2.5-VL, 16 for Qwen3-VL)"
        )
    allowed = get_fetch_policy(policy).patch_sizes
    if allowed is not None and int(image_patch_size) not in allowed:
        raise InvalidOptionError(
            f"image_patch_size={_show(image_patch_size)} is not one the fetch policy accepts "
            f"({', '.join(map(str, allowed))}: 14 for Qwen2.5-VL, 16 for Qwen3-VL); another model's size needs "
            "FetchPolicy(patch_sizes=...) or patch_sizes=None"
        )
    return int(image_patch_size) * SPATIAL_MERGE_SIZE


def _element(ele: Any, kind: str) -> dict:
    if not isinstance(ele, dict):
        raise InvalidOptionError(f"{kind} element must be a dict, got {describe(ele)}")
    return ele


@dataclass(frozen=True)
class ImageOptions:
    min_pixels: Optional[Number] = None
    max_pixels: Optional[Number] = None
    resized: Optional[tuple[int, int]] = None  # (resized_height, resized_width)
    jpeg_draft: Optional[bool] = None


@dataclass(frozen=True)
class VideoOptions:
    min_pixels: Optional[Number] = None
    max_pixels: Optional[Number] = None
    total_pixels: Optional[Number] = None
    resized: Optional[tuple[int, int]] = None  # (resized_height, resized_width)
    fps: Optional[Number] = None
    nframes: Optional[Number] = None
    min_frames: Optional[Number] = None
    max_frames: Optional[Number] = None
    video_start: Optional[Number] = None
    video_end: Optional[Number] = None
    dtype: Optional[str] = None  # "float32" or "uint8"
    timestamps: Optional[tuple[float, ...]] = None
    sample_fps: Optional[Number] = None
    raw_fps: Optional[Number] = None
    video_reader: Optional[str] = None
    frames_indices: Optional[tuple[int, ...]] = None  # exactly these frames of a file (a stream chunk's, again)


#: the sampling keys ``frames_indices`` replaces
_SAMPLING = ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end")


def _frames_indices(ele: dict) -> Optional[tuple[int, ...]]:
    value = ele.get("frames_indices")
    if value is None:
        return None
    allowed = "a non-empty list of frame indices (integers >= 0, non-decreasing), as a chunk's metadata gives them"
    indices = _non_decreasing("frames_indices", value, allowed, whole=True)
    both = [key for key in _SAMPLING if ele.get(key) is not None]
    if both:
        raise InvalidOptionError(
            f"frames_indices picks the frames itself: give it without {', '.join(both)} (they choose frames too)"
        )
    return indices


def image_options(ele: Any) -> ImageOptions:
    """The checked options of an image element (``InvalidOptionError`` for a bad value)."""
    ele = _element(ele, "an image")
    return ImageOptions(
        min_pixels=check_number(ele.get("min_pixels"), "min_pixels"),
        max_pixels=check_number(ele.get("max_pixels"), "max_pixels"),
        resized=_resized(ele),
        jpeg_draft=_flag(ele.get("jpeg_draft"), "jpeg_draft"),
    )


_VIDEO_NUMBERS = (
    "min_pixels",
    "max_pixels",
    "total_pixels",
    "fps",
    "nframes",
    "min_frames",
    "max_frames",
    "video_start",
    "video_end",
    "sample_fps",
    "raw_fps",
)


def video_options(ele: Any) -> VideoOptions:
    """The checked options of a video element, for every video form (``InvalidOptionError`` for a bad value)."""
    ele = _element(ele, "a video")
    return VideoOptions(
        **{key: check_number(ele.get(key), key) for key in _VIDEO_NUMBERS},
        resized=_resized(ele),
        dtype=check_dtype(ele.get("dtype")),
        timestamps=_timestamps(ele.get("timestamps")),
        video_reader=check_backend(ele.get("video_reader")),
        frames_indices=_frames_indices(ele),
    )


def as_image_options(ele: Union[dict, ImageOptions]) -> ImageOptions:
    """Checked options as they are; an element's, checked."""
    return ele if isinstance(ele, ImageOptions) else image_options(ele)


def as_video_options(ele: Union[dict, VideoOptions]) -> VideoOptions:
    """Checked options as they are; an element's, checked."""
    return ele if isinstance(ele, VideoOptions) else video_options(ele)
