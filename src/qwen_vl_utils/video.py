"""Videos: one frame plan computed from one probe, decoded by any backend, resized frame by frame.

The flow for a video file::

    resolve_source -> probe_video (PyAV) -> plan_frames (pure) -> backend.read(indices) -> resize each frame

so every backend returns the same ``frames_indices`` and shapes, and peak memory follows the output size,
not the length or resolution of the video.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import numpy as np

from . import _cancel
from . import backends as _backends
from ._errors import (
    AspectRatioError,
    DecodeError,
    InvalidOptionError,
    QwenVLError,
    SourceTooLargeError,
    describe,
)
from ._frame_resize import resize_frame as _resize
from ._frame_resize import resize_pool as _resize_pool
from ._frame_resize import resize_threads as _resize_threads
from ._options import VideoOptions, as_video_options, check_backend, check_dtype, patch_factor, video_options
from ._util import caller_stacklevel, env_int
from .container._probe import PacketSpan, VideoInfo, packet_span, probe_video
from .image import (
    array_to_pil,
    ceil_by_factor,
    check_output_size,
    decode_rgb,
    floor_by_factor,
    open_image,
    oriented_size,
    round_by_factor,
    smart_resize,
    visual_tokens,
)
from .sources._policy import FetchPolicy, get_fetch_policy
from .sources._resolve import Source, resolve_source

__all__ = [
    "FPS",
    "FPS_MAX_FRAMES",
    "FPS_MIN_FRAMES",
    "FRAME_FACTOR",
    "MAX_NUM_WORKERS_FETCH_VIDEO",
    "MODEL_SEQ_LEN",
    "VIDEO_MAX_TOKEN_NUM",
    "VIDEO_MIN_TOKEN_NUM",
    "VIDEO_READER_BACKENDS",
    "BackendFallbackWarning",
    "FramePlan",
    "fetch_video",
    "get_video_reader_backend",
    "plan_frames",
    "smart_nframes",
]

logger = logging.getLogger("qwen_vl_utils")

VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_NUM_WORKERS_FETCH_VIDEO = 8
try:  # 0.0.14 reads it at import; a bad value fails typed where it is used (_model_seq_len), not the import
    MODEL_SEQ_LEN = int(float(os.environ.get("MODEL_SEQ_LEN", 128000)))
except ValueError:
    MODEL_SEQ_LEN = 128000


class BackendFallbackWarning(UserWarning):
    """The chosen backend cannot decode this stream; another seek-capable backend decoded it."""


def _model_seq_len() -> int:
    return env_int("MODEL_SEQ_LEN", MODEL_SEQ_LEN, lambda raw: int(float(raw)))  # "1e5" works, as in 0.0.14


# --- the frame plan ---------------------------------------------------------------------------------------


def smart_nframes(ele: Union[dict[str, Any], VideoOptions], total_frames: int, video_fps: Union[int, float]) -> int:
    """How many frames to sample, with qwen-vl-utils 0.0.14's rules (``fps`` or ``nframes``, ``min_frames``,
    ``max_frames``, an even count, at most ``FPS_MAX_FRAMES``).

    Unlike 0.0.14, a clip of fewer than ``FRAME_FACTOR`` frames gives ``FRAME_FACTOR`` (the last frame is
    repeated) instead of raising.
    """
    options = as_video_options(ele)
    if options.fps is not None and options.nframes is not None:
        raise InvalidOptionError("give either 'fps' or 'nframes' in a video element, not both")
    if total_frames < FRAME_FACTOR:
        return FRAME_FACTOR
    if options.nframes is not None:
        nframes = max(FRAME_FACTOR, round_by_factor(options.nframes, FRAME_FACTOR))
        if nframes > total_frames:
            raise InvalidOptionError(
                f"nframes={options.nframes} is more than the {total_frames} frames in the video (or window); "
                f"ask for at most {floor_by_factor(total_frames, FRAME_FACTOR)}, or use 'fps'"
            )
        return int(nframes)
    fps = FPS if options.fps is None else options.fps
    if not video_fps or video_fps <= 0:
        raise InvalidOptionError(f"the video's frame rate must be positive, got {video_fps}")
    min_frames = ceil_by_factor(FPS_MIN_FRAMES if options.min_frames is None else options.min_frames, FRAME_FACTOR)
    max_frames = options.max_frames if options.max_frames is not None else min(FPS_MAX_FRAMES, total_frames)
    max_frames = floor_by_factor(max_frames, FRAME_FACTOR)
    nframes = total_frames / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    nframes = floor_by_factor(nframes, FRAME_FACTOR)
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise InvalidOptionError(
            f"the sampling options give {nframes} frames, outside [{FRAME_FACTOR}, {total_frames}]; "
            "check fps, min_frames and max_frames"
        )
    return int(nframes)


def linspace_round(start: int, end: int, n: int) -> list[int]:
    """``torch.linspace(start, end, n).round().long()`` exactly, without torch.

    torch computes in float32 with a fused multiply-add (one rounding): ``start + step * i`` for the first
    half, ``end - step * (n - 1 - i)`` for the rest. ``step * i`` is exact in float64 (24-bit by 24-bit
    mantissas), so adding in float64 and rounding once to float32 reproduces it; then round half to even.
    """
    if n == 1:
        return [int(start)]
    f32, f64 = np.float32, np.float64
    step = f64((f32(end) - f32(start)) / f32(n - 1))
    i = np.arange(n, dtype=f64)
    half = n // 2
    lo = (f64(f32(start)) + step * i[:half]).astype(f32)
    hi = (f64(f32(end)) - step * (n - 1 - i[half:])).astype(f32)
    return [int(v) for v in np.round(np.concatenate([lo, hi]))]


@dataclass(frozen=True)
class FramePlan:
    """Which source frames to read: a pure function of the probe and the element."""

    indices: list[int]
    start_frame: int
    end_frame: int
    sample_fps: float
    fps: float
    total_num_frames: int

    @property
    def nframes(self) -> int:
        return len(self.indices)

    @property
    def unique_indices(self) -> list[int]:
        return sorted(set(self.indices))


def plan_frames(
    info: VideoInfo, ele: Union[dict[str, Any], VideoOptions], policy: Optional[FetchPolicy] = None, name: str = ""
) -> FramePlan:
    """Choose the source frames for ``ele`` or its checked options (``fps``/``nframes``/``min_frames``/
    ``max_frames``/``video_start``/``video_end``) from a probe. Indices are absolute source frame indices."""
    fps, total = info.fps, info.num_frames
    start_frame, end_frame = 0, total - 1
    options = as_video_options(ele)
    if options.frames_indices is not None:
        return _given_frames(options.frames_indices, info, get_fetch_policy(policy), name)
    start, end = options.video_start, options.video_end
    if start is not None or end is not None:
        max_duration = total / fps
        if start is not None and end is not None and start >= end:
            raise InvalidOptionError(f"video_start ({start}) must be before video_end ({end}) for {name}")
        if start is not None and start >= max_duration:
            raise InvalidOptionError(
                f"video_start ({start} s) is at or after the end of {name} ({max_duration:.3f} s, {total} frames)"
            )
        if start is not None:
            start_frame = min(math.ceil(min(start, max_duration) * fps), total - 1)
        if end is not None:
            end_frame = min(math.floor(min(end, max_duration) * fps), total - 1)
        if start_frame > end_frame:  # a window shorter than one frame: the frame on screen at its start
            start_frame = end_frame = min(math.floor((start or 0.0) * fps), total - 1)
    window = end_frame - start_frame + 1
    policy = get_fetch_policy(policy)
    if policy.max_video_frames is not None and window > policy.max_video_frames:
        raise SourceTooLargeError(
            f"video {name} has {window} frames to decode, over the limit of {policy.max_video_frames} "
            "(set video_start/video_end, or raise FetchPolicy.max_video_frames)"
        )
    if policy.max_video_seconds is not None and window / fps > policy.max_video_seconds:
        raise SourceTooLargeError(
            f"video {name} is {window / fps:.1f} s long, over the limit of {policy.max_video_seconds:g} s "
            "(set video_start/video_end, or raise FetchPolicy.max_video_seconds)"
        )
    nframes = smart_nframes(options, total_frames=window, video_fps=fps)
    indices = linspace_round(start_frame, end_frame, nframes)
    return FramePlan(
        indices=indices,
        start_frame=start_frame,
        end_frame=end_frame,
        sample_fps=nframes / max(window, 1e-6) * fps,
        fps=fps,
        total_num_frames=total,
    )


def _given_frames(given: tuple, info: VideoInfo, policy: FetchPolicy, name: str) -> FramePlan:
    """The plan of an element's ``frames_indices``: exactly those frames (a stream chunk's, to reproduce it with
    the single call), padded to whole temporal patches with the last one, as a chunk is."""
    fps, total = info.fps, info.num_frames
    if given[-1] >= total:
        raise InvalidOptionError(
            f"frames_indices asks for frame {given[-1]} of {name}, which has {total} frames (indices 0 to {total - 1})"
        )
    window = given[-1] - given[0] + 1
    if policy.max_video_frames is not None and window > policy.max_video_frames:
        raise SourceTooLargeError(
            f"video {name} has {window} frames to decode for frames_indices, over the limit of "
            f"{policy.max_video_frames} (raise FetchPolicy.max_video_frames)"
        )
    indices = list(given) + [given[-1]] * (-len(given) % FRAME_FACTOR)
    distinct = len(set(indices))
    sample_fps = (distinct - 1) / (given[-1] - given[0]) * fps if distinct > 1 else fps
    first, last = given[0], given[-1]
    return FramePlan(indices, first, last, sample_fps=sample_fps, fps=fps, total_num_frames=total)


def video_frame_size(
    ele: Union[dict[str, Any], VideoOptions],
    nframes: int,
    height: int,
    width: int,
    factor: int,
    policy: Optional[FetchPolicy] = None,
) -> tuple[int, int]:
    """(resized_height, resized_width) for every frame, under 0.0.14's per-frame and total pixel budgets; a
    frame larger than the decompression-bomb limit (``max_image_pixels``) is refused before anything is decoded
    (``min_pixels`` wins over the other budgets, as in 0.0.14, so only this limit bounds it)."""
    rh, rw = _frame_size(as_video_options(ele), nframes, height, width, factor)
    policy = get_fetch_policy(policy)
    limit = policy.max_image_pixels
    if rh * rw > limit:
        raise SourceTooLargeError(
            f"video frames of {rw}x{rh} = {rh * rw} pixels (from min_pixels/resized_height/resized_width) are over "
            f"the limit of {limit} (FetchPolicy.max_image_pixels); ask for smaller frames"
        )
    check_output_size(rh, rw, policy, "video frames")
    return rh, rw


def _frame_size(options: VideoOptions, nframes: int, height: int, width: int, factor: int) -> tuple[int, int]:
    if options.resized is not None:
        return smart_resize(*options.resized, factor=factor)
    min_pixels = VIDEO_MIN_TOKEN_NUM * factor * factor if options.min_pixels is None else options.min_pixels
    total_pixels = options.total_pixels
    if total_pixels is None:
        total_pixels = _model_seq_len() * factor * factor * 0.9
    max_pixels = max(
        min(VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05)
    )
    wanted = max_pixels if options.max_pixels is None else options.max_pixels
    if wanted > max_pixels:
        logger.warning("The given max_pixels[%s] exceeds limit[%s].", wanted, max_pixels)
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=min(wanted, max_pixels))


# --- backends ------------------------------------------------------------------------------------------------


def get_video_reader_backend(backend: Optional[str] = None) -> str:
    """The backend that decodes videos: ``backend``, else ``FORCE_QWENVL_VIDEO_READER`` (read now, not at
    import), else the fastest one that really loads here."""
    name = check_backend(backend, "backend") or check_backend(
        os.environ.get("FORCE_QWENVL_VIDEO_READER") or None, "FORCE_QWENVL_VIDEO_READER"
    )
    if name is not None:
        _backends.load_backend(name)
        return name
    auto = _backends.auto_backend()
    if auto is None:
        raise InvalidOptionError("no video reader backend can be loaded; install one with: pip install av")
    return auto


_warned_lock = threading.Lock()
_warned: set = set()


def _backend_for(name: str, info: VideoInfo, source: Any) -> Any:
    module = _backends.load_backend(name)
    reason = module.unsupported(info)
    if reason is None and getattr(module, "SEEKS_TO_FLAGGED_KEYFRAMES", False):
        from .container._nal import CHECKED
        from .container._probe import recovery_point_keyframes

        if info.codec in CHECKED and recovery_point_keyframes(source):
            reason = (
                "its keyframes after the first are recovery points (intra refresh), not IDR frames: decoding "
                "from them gives wrong frames (decord 0.6 returns them) or none (torchcodec 0.13 fails)"
            )
    if reason is None:
        return module
    warnings.warn(
        f"qwen-vl-utils: the {name} backend cannot decode {source.name}: {reason}. Decoding it with pyav instead "
        "(set FORCE_QWENVL_VIDEO_READER or the element's 'video_reader' to choose a backend).",
        BackendFallbackWarning,
        stacklevel=caller_stacklevel(),
    )
    return _backends.load_backend("pyav")


def _decoder_threads() -> int:
    return max(0, env_int("QWENVL_DECODER_THREADS", 0))


# --- decoding and resizing ---------------------------------------------------------------------------------------


Allocate = Callable[[int, int, int], np.ndarray]


def _numpy_frames(t: int, h: int, w: int) -> np.ndarray:
    return np.empty((t, h, w, 3), dtype=np.uint8)


def _read_frames(
    module: Any,
    source: Source,
    info: VideoInfo,
    plan: FramePlan,
    size: tuple[int, int],
    on_frame: Optional[Callable[[int, int], None]] = None,
    allocate: Allocate = _numpy_frames,
) -> np.ndarray:
    """Decode the planned frames into ``allocate(T, H, W)`` ((T, H, W, 3) or (T, 3, H, W), any dtype), each
    resized to ``size`` (a frame already of that size is stored as it is).

    The backend decodes on this thread while a small pool converts, resizes and stores each frame as it
    arrives (Pillow and numpy release the GIL), with a bounded number of full-resolution frames in flight.
    The one boundary where backend exceptions become :class:`DecodeError`."""
    height, width = size
    k = 0 if module.APPLIES_ROTATION else info.rotation // 90
    coded_w, coded_h = (height, width) if k % 2 else (width, height)
    out = allocate(plan.nframes, height, width)
    channels_first = out.shape[1:] == (3, height, width)
    positions: dict[int, list[int]] = {}
    for pos, idx in enumerate(plan.indices):
        positions.setdefault(idx, []).append(pos)
    expected = plan.unique_indices

    def store(idx: int, frame: Any) -> None:
        if callable(frame):  # a backend may defer the RGB conversion to this worker
            frame = frame()
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise DecodeError(f"{module.NAME} returned a frame of shape {frame.shape} for {source.name}")
        # without resizing (size is the video's own), a frame after a mid-stream size change is brought to size
        first, *more = positions[idx]
        if channels_first and not k:  # written in place, channels-first, by the resize's last pass
            _resize(frame, coded_w, coded_h, out[first])
        else:
            small = _resize(frame, coded_w, coded_h)
            if k:
                small = np.rot90(small, k)
            out[first] = small.transpose(2, 0, 1) if channels_first else small
        for pos in more:
            out[pos] = out[first]

    workers = _resize_threads()
    seen = 0
    try:
        with _resize_pool("qwen-vl-resize") as pool:
            pending: deque = deque()
            frames = contextlib.closing(module.read(source, info, expected, _decoder_threads()))
            with frames as decoded:  # closed at once on error: a backend's decoder threads stop with it
                for idx, frame in decoded:
                    _cancel.check()  # a cancelled caller stops the decode at the next frame
                    pending.append(pool.submit(store, idx, frame))
                    while len(pending) > 2 * workers or (pending and pending[0].done()):
                        pending.popleft().result()
                        seen += 1
                        if on_frame is not None:
                            on_frame(seen, len(expected))
            while pending:
                pending.popleft().result()
                seen += 1
    except QwenVLError:
        raise
    except MemoryError as exc:
        if not type(exc).__module__.startswith("av."):  # PyAV's is FFmpeg's ENOMEM: corrupt sizes, not memory
            raise
        raise _undecodable(module, source, exc) from exc
    except Exception as exc:
        raise _undecodable(module, source, exc) from exc
    if seen != len(expected):
        raise DecodeError(f"the {module.NAME} backend returned {seen} of {len(expected)} frames for {source.name}")
    return out


def _undecodable(module: Any, source: Source, exc: BaseException) -> DecodeError:
    return DecodeError(
        f"the {module.NAME} backend could not decode {source.name} ({type(exc).__name__}: {exc}); "
        "the file may be truncated or corrupt"
    )


def _require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise InvalidOptionError(
            f"video output is a torch tensor, and torch is not installed: {_backends.TORCH_HINT}"
        ) from exc
    return torch


def _to_tensor(frames: np.ndarray, dtype: Any = None) -> Any:
    """(T, H, W, 3) uint8 -> contiguous (T, 3, H, W) torch tensor: float32 0..255 (0.0.14) or uint8."""
    torch = _require_torch()
    dtype = _torch_dtype(torch, dtype)
    chw = torch.from_numpy(frames).permute(0, 3, 1, 2)
    return chw.to(dtype=dtype, memory_format=torch.contiguous_format)


def _torch_dtype(torch: Any, dtype: Any) -> Any:
    """The torch dtype for a ``dtype`` argument or key (checked), else ``QWENVL_VIDEO_DTYPE``, else float32."""
    name = check_dtype(dtype) or check_dtype(os.environ.get("QWENVL_VIDEO_DTYPE") or None, "QWENVL_VIDEO_DTYPE")
    return torch.uint8 if name == "uint8" else torch.float32


# --- frame lists and decoded arrays --------------------------------------------------------------------------


def _frame_list_metadata(options: VideoOptions, n_given: int, n_out: int) -> tuple[dict, float]:
    """0.0.14's fps/raw_fps convention, with frame indices on the source's timeline so that the Qwen3-VL
    processor's timestamps (index / fps) are right; explicit per-frame ``timestamps`` win."""
    if options.frames_indices is not None:
        raise InvalidOptionError(
            "frames_indices picks frames of an encoded video (a file, URL or bytes); a list of frames or an array is "
            "taken whole: give only the frames you want"
        )
    sample_fps = options.sample_fps or options.fps or FPS
    if options.timestamps is not None:
        ts = list(options.timestamps)
        if len(ts) != n_given:
            raise InvalidOptionError(
                f"'timestamps' must be {n_given} non-decreasing, non-negative seconds (one per frame), got {len(ts)}"
            )
        ts += [ts[-1]] * (n_out - n_given)
        # a millisecond time base keeps frames_indices integral while the processor's index/fps is exact
        fps = float(options.raw_fps or 1000.0)
        indices = [round(t * fps) for t in ts]
        if options.sample_fps is None and n_given > 1 and ts[n_given - 1] > ts[0]:
            sample_fps = (n_given - 1) / (ts[n_given - 1] - ts[0])
        total = indices[-1] + 1
    else:
        fps = float(options.raw_fps or sample_fps)
        indices = [round(i * fps / sample_fps) for i in range(n_given)]
        indices += [indices[-1]] * (n_out - n_given)  # padding repeats the last frame, and its time
        total = round(n_given / sample_fps * fps)
    return {"fps": fps, "frames_indices": indices, "total_num_frames": total}, float(sample_fps)


def _load_frame(value: Any, policy: FetchPolicy, size: Optional[tuple[int, int]]) -> np.ndarray:
    with resolve_source(value, "image", policy) as source:
        img = open_image(source, policy)
        rgb = np.asarray(decode_rgb(img, source.name))
    return rgb if size is None else _resize(rgb, size[1], size[0])


def _fetch_frames(
    options: VideoOptions, frames: Any, factor: int, policy: FetchPolicy
) -> tuple[np.ndarray, dict, float]:
    n_out = _padded_count(len(frames))
    first = _load_frame(frames[0], policy, None)
    try:
        size = video_frame_size(options, n_out, first.shape[0], first.shape[1], factor, policy)
    except AspectRatioError as exc:
        raise AspectRatioError(f"video frames {describe(frames[0])}: {exc}") from None
    out = np.empty((n_out, size[0], size[1], 3), dtype=np.uint8)
    out[0] = _resize(first, size[1], size[0])
    rest = list(frames[1:])
    if rest:
        workers = min(MAX_NUM_WORKERS_FETCH_VIDEO, len(rest))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qwen-vl-frames") as pool:
            for i, arr in enumerate(pool.map(lambda v: _load_frame(v, policy, size), rest), start=1):
                out[i] = arr
    out[len(frames) :] = out[len(frames) - 1]
    metadata, sample_fps = _frame_list_metadata(options, len(frames), n_out)
    return out, metadata, sample_fps


def _padded_count(n: int) -> int:
    """Frames out for ``n`` frames given (a list or a decoded array): padded to whole temporal patches."""
    if n == 0:
        raise InvalidOptionError("a video given as a list of frames (or a decoded array) needs at least one frame")
    return max(FRAME_FACTOR, ceil_by_factor(n, FRAME_FACTOR))


def _array_shape(value: Any) -> tuple[int, int, int]:
    """(T, H, W) of a decoded video (TxCxHxW or TxHxWxC numpy array or torch tensor, 1 or 3 channels, uint8),
    checked from its shape and dtype alone: nothing is copied or converted."""
    if not type(value).__module__.startswith("torch"):
        value = np.asarray(value)
    shape = tuple(int(n) for n in value.shape)
    if len(shape) == 4 and shape[1] in (1, 3) and shape[-1] not in (1, 3):  # channels first
        shape = (shape[0], shape[2], shape[3], shape[1])
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise InvalidOptionError(f"a decoded video must be TxCxHxW or TxHxWxC with 1 or 3 channels, got {shape}")
    dtype = str(value.dtype).replace("torch.", "")
    if dtype != "uint8":
        raise InvalidOptionError(
            f"a decoded video has dtype {dtype}; convert it to uint8 0..255 first, "
            "e.g. (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    return shape[0], shape[1], shape[2]


def _array_frames(value: Any) -> list:
    """A decoded video (T,C,H,W or T,H,W,C numpy array or torch tensor) as a list of HWC frames."""
    _array_shape(value)
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if value.ndim == 4 and value.shape[1] in (1, 3) and value.shape[-1] not in (1, 3):
            value = value.permute(0, 2, 3, 1)
        value = value.numpy()
    arr = np.asarray(value)
    if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    return [array_to_pil(frame, "decoded video frame") for frame in arr]


# --- fetch_video ---------------------------------------------------------------------------------------------


def _checked_element(ele: Any) -> VideoOptions:
    """The checked options of a video element, which must hold a source."""
    options = video_options(ele)
    _require_source(ele)
    return options


def _require_source(ele: dict) -> None:
    if "video" not in ele:
        raise InvalidOptionError(f"a video element needs a 'video' key holding the source; got keys {sorted(ele)}")


def _check_encoded(source: Source) -> None:
    if source.obj is not None:
        raise InvalidOptionError(f"cannot decode {source.name} as a video; give a file, URL, bytes or frames")


@contextlib.contextmanager
def _probed(value: Any, policy: FetchPolicy) -> Iterator[tuple[Source, VideoInfo]]:
    """A video value resolved under ``policy`` (an encoded file, URL or bytes) and probed, while it is open."""
    with resolve_source(value, "video", policy) as source:
        _check_encoded(source)
        yield source, probe_video(source)


@contextlib.contextmanager
def _planned(value: Any, options: VideoOptions, policy: FetchPolicy) -> Iterator[tuple[Source, VideoInfo, FramePlan]]:
    """:func:`_probed`, with the frame plan of ``options``."""
    with _probed(value, policy) as (source, info):
        yield source, info, plan_frames(info, options, policy, source.name)


def _array_options(options: VideoOptions) -> VideoOptions:
    """A decoded array's options: its frames are taken at ``sample_fps``, else ``fps``, else FPS."""
    return replace(options, sample_fps=options.sample_fps or options.fps or FPS)


def _is_array(value: Any) -> bool:
    return hasattr(value, "__array_interface__") or type(value).__module__.startswith(("torch", "numpy"))


class DecodedVideo(NamedTuple):
    frames: np.ndarray  # (T, H, W, 3) uint8
    metadata: dict
    sample_fps: float
    info: Optional[VideoInfo]  # the probe, for files (None for frame lists and arrays)


def decode_video(
    ele: dict[str, Any],
    image_patch_size: int = 14,
    *,
    backend: Optional[str] = None,
    policy: Optional[FetchPolicy] = None,
    resize: bool = True,
    on_frame: Optional[Callable[[int, int], None]] = None,
    allocate: Allocate = _numpy_frames,
) -> DecodedVideo:
    """The numpy core of :func:`fetch_video`, used by it and by the command line."""
    options = _checked_element(ele)  # a bad option fails here, before any download or decode
    return _decode(
        ele["video"],
        options,
        image_patch_size,
        backend=backend,
        policy=policy,
        resize=resize,
        on_frame=on_frame,
        allocate=allocate,
    )


def _decode(
    value: Any,
    options: VideoOptions,
    image_patch_size: int,
    *,
    backend: Optional[str],
    policy: Optional[FetchPolicy],
    resize: bool = True,
    on_frame: Optional[Callable[[int, int], None]] = None,
    allocate: Allocate = _numpy_frames,
    audio_out: Optional[list] = None,
) -> DecodedVideo:
    """:func:`decode_video` for an element's source and its checked options; with ``audio_out``, the audio of
    the window the frames cover is appended to it, read from the same resolved source (:mod:`.audio`)."""
    factor = patch_factor(image_patch_size, policy)
    policy = get_fetch_policy(policy)
    if audio_out is not None:
        _refuse_frames_for_sound(value)
    if isinstance(value, (list, tuple)):
        return DecodedVideo(*_fetch_frames(options, value, factor, policy), None)
    if _is_array(value):
        return DecodedVideo(*_fetch_frames(_array_options(options), _array_frames(value), factor, policy), None)
    name = get_video_reader_backend(check_backend(backend, "backend") or options.video_reader)
    with _planned(value, options, policy) as (source, info, plan):
        display_w, display_h = info.display_size
        try:
            size = (
                video_frame_size(options, plan.nframes, display_h, display_w, factor, policy)
                if resize
                else (display_h, display_w)
            )
        except AspectRatioError as exc:
            raise AspectRatioError(f"video {source.name}: {exc}") from None
        module = _backend_for(name, info, source)
        frames = _read_frames(module, source, info, plan, size, on_frame, allocate)
        if audio_out is not None:
            audio_out.append(_window_audio(source, info, plan))
    metadata = {
        "fps": info.fps,
        "frames_indices": list(plan.indices),
        "total_num_frames": _metadata_total(options, info, plan),
        "video_backend": module.NAME,
    }
    return DecodedVideo(frames, metadata, plan.sample_fps, info)


def _metadata_total(options: VideoOptions, info: VideoInfo, plan: FramePlan) -> int:
    """``total_num_frames`` of the metadata: the frames of the window the frames were sampled from. transformers 5
    derives the sampling rate from it (``VideoMetadata.sampled_fps = len(frames_indices) / total_num_frames *
    fps``, which the Qwen2.5-VL processor turns into ``second_per_grid_ts``), so a ``video_start`` /
    ``video_end`` window reports its own frames, not the file's (0.0.14 reports the file's: 240 for a 4 s window
    of an 8 s clip, halving the rate). A whole video reports all its frames, as 0.0.14 does."""
    if options.video_start is None and options.video_end is None:
        return info.num_frames
    return plan.end_frame - plan.start_frame + 1


class VideoFacts(NamedTuple):
    """What :func:`fetch_video` would return for an element, known without decoding its frames."""

    tokens: int
    frames: int  # T of the output
    resized_height: int
    resized_width: int
    width: int  # the source frames' displayed size
    height: int
    duration: float  # seconds of the source (a frame list's or array's: its frames over its sample rate)
    frames_indices: list  # the metadata fetch_video returns: the processor's timestamps come from these
    fps: float


def describe_video(
    ele: dict[str, Any], image_patch_size: int = 14, *, policy: Optional[FetchPolicy] = None
) -> VideoFacts:
    """Tokens, frame count, sizes and frame indices of ``ele``'s output, from the first frame's header (frame
    lists), the shape (decoded arrays) or the container probe (files): no sampled frame is decoded or resized,
    and no array is converted."""
    options = _checked_element(ele)
    factor = patch_factor(image_patch_size, policy)
    policy = get_fetch_policy(policy)
    value = ele["video"]
    if isinstance(value, (list, tuple)) or _is_array(value):
        if isinstance(value, (list, tuple)):
            n_given, frames_options = len(value), options
            nframes = _padded_count(n_given)
            with resolve_source(value[0], "image", policy) as source:
                width, height = oriented_size(open_image(source, policy))
            for n, frame in enumerate(value[1:], 1):  # the others exist (stat), though only the first is read
                local = "://" not in frame[:12] or frame[:5].lower() == "file:" if isinstance(frame, str) else False
                if local and not frame.startswith("data:"):
                    try:
                        resolve_source(frame, "image", policy).close()
                    except QwenVLError as exc:
                        raise type(exc)(f"frame {n} of the video's {n_given} frames: {exc}") from None
        else:
            n_given, height, width = _array_shape(value)
            frames_options = _array_options(options)
            nframes = _padded_count(n_given)
        metadata, sample_fps = _frame_list_metadata(frames_options, n_given, nframes)
        indices, fps, duration = metadata["frames_indices"], metadata["fps"], n_given / sample_fps
    else:
        with _planned(value, options, policy) as (_, info, plan):
            nframes, (width, height) = plan.nframes, info.display_size
            indices, fps, duration = list(plan.indices), info.fps, info.duration
    try:
        rh, rw = video_frame_size(options, nframes, height, width, factor, policy)
    except AspectRatioError as exc:
        raise AspectRatioError(f"video {describe(value)}: {exc}") from None
    tokens = visual_tokens(rh, rw, factor, nframes, FRAME_FACTOR)
    return VideoFacts(tokens, nframes, rh, rw, width, height, duration, indices, fps)


def probe_element(
    ele: dict[str, Any], *, policy: Optional[FetchPolicy] = None, span: bool = False
) -> tuple[VideoInfo, Optional[PacketSpan]]:
    """The container facts of a video element's file, URL or bytes: the probe :func:`describe_video` reads
    (the header, packet headers where it states no frame count, and one frame), and with ``span`` the packet
    scan a decoder indexing the whole file makes (every packet header read once, nothing decoded)."""
    _checked_element(ele)
    with _probed(ele["video"], get_fetch_policy(policy)) as (source, info):
        return info, packet_span(source) if span else None


def video_token_count(
    ele: dict[str, Any], image_patch_size: int = 14, *, policy: Optional[FetchPolicy] = None
) -> tuple[int, int, int, int]:
    """(tokens, frames, resized_height, resized_width) of what :func:`fetch_video` returns for ``ele``."""
    facts = describe_video(ele, image_patch_size, policy=policy)
    return facts.tokens, facts.frames, facts.resized_height, facts.resized_width


def qwen3_timestamps(frames_indices: list, fps: float, temporal_patch_size: int = 2) -> list[float]:
    """The time of each temporal group as the Qwen3-VL processor computes it: index / fps, padded to whole
    groups with the last index, averaged over the first and last frame of each group."""
    idx = list(frames_indices)
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def fetch_video(
    ele: dict[str, Any],
    image_patch_size: int = 14,
    return_video_sample_fps: bool = False,
    return_video_metadata: bool = False,
    *,
    backend: Optional[str] = None,
    dtype: Any = None,
    policy: Optional[FetchPolicy] = None,
) -> Any:
    """Sample, decode and resize one video element, as qwen-vl-utils 0.0.14 does.

    Returns a (T, 3, H, W) torch tensor (float32 0..255 by default; ``dtype="uint8"`` or the element's
    ``dtype`` key for 4x less memory), optionally with the metadata dict (``fps``, ``frames_indices``,
    ``total_num_frames``, ``video_backend``) and the sample fps, in 0.0.14's nesting.
    """
    return _fetch_video(
        ele,
        image_patch_size,
        return_video_sample_fps,
        return_video_metadata,
        backend=backend,
        dtype=dtype,
        policy=policy,
    )


def _window_audio(source: Source, info: VideoInfo, plan: FramePlan) -> np.ndarray:
    from .audio import video_audio

    return video_audio(source, info.start_time, info.fps, plan.start_frame, plan.end_frame)


def fetch_video_audio(ele: dict[str, Any], *, policy: Optional[FetchPolicy] = None) -> np.ndarray:
    """The sound of the window a video element's frames cover (16 kHz mono float32, on the container's
    timeline), without decoding its frames: the probe and the frame plan only."""
    options = _checked_element(ele)
    _refuse_frames_for_sound(ele["video"])
    with _planned(ele["video"], options, get_fetch_policy(policy)) as (source, info, plan):
        return _window_audio(source, info, plan)


def _refuse_frames_for_sound(value: Any) -> None:
    if isinstance(value, (list, tuple)) or _is_array(value):
        raise InvalidOptionError(
            f"video {describe(value)} is given as frames, which carry no sound: use_audio_in_video needs a video "
            "file, URL or bytes (or give its audio as an audio element)"
        )


def _fetch_video(
    ele: dict[str, Any],
    image_patch_size: int = 14,
    return_video_sample_fps: bool = False,
    return_video_metadata: bool = False,
    *,
    backend: Optional[str] = None,
    dtype: Any = None,
    policy: Optional[FetchPolicy] = None,
    audio_out: Optional[list] = None,
) -> Any:
    """:func:`fetch_video`; with ``audio_out``, the audio of the frames' window is appended to it (from the same
    resolved source: one download, one probe)."""
    options = video_options(ele)  # a bad option fails here, before any download or decode
    dtype = check_dtype(dtype) or options.dtype
    torch = _require_torch()
    _require_source(ele)
    torch_dtype = _torch_dtype(torch, dtype)
    tensors: list = []

    def allocate(t: int, h: int, w: int) -> np.ndarray:  # decode straight into the returned tensor
        tensors.append(torch.empty((t, 3, h, w), dtype=torch_dtype))
        return tensors[0].numpy()

    frames, metadata, sample_fps, _ = _decode(
        ele["video"],
        options,
        image_patch_size,
        backend=backend,
        policy=policy,
        allocate=allocate,
        audio_out=audio_out,
    )
    video = tensors[0] if tensors else _to_tensor(frames, torch_dtype)
    del frames
    result: Any = (video, metadata) if return_video_metadata else video
    if return_video_sample_fps:
        return result, sample_fps
    return result


def _reader(backend: str) -> Any:
    def read(ele: dict[str, Any]) -> tuple[Any, dict, float]:
        """0.0.14's ``_read_video_<backend>(ele)``: full-resolution uint8 TCHW frames, metadata, sample_fps."""
        frames, metadata, sample_fps, _ = decode_video(ele, backend=backend, resize=False)
        return _to_tensor(frames, "uint8"), metadata, sample_fps

    read.__name__ = f"_read_video_{backend}"
    return read


#: name -> ``reader(ele) -> (uint8 TCHW tensor at source resolution, metadata, sample_fps)``, as in 0.0.14
VIDEO_READER_BACKENDS = {name: _reader(name) for name in _backends.BACKENDS}
