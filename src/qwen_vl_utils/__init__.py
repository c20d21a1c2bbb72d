"""qwen-vl-utils: vision preprocessing for Qwen2.5-VL and Qwen3-VL, a drop-in for qwen-vl-utils 0.0.14.

``process_vision_info`` turns chat messages with images and videos into what the Qwen processors expect.
Importing this package loads no optional decoder and does not import torch.
"""

from ._errors import (
    AspectRatioError,
    DecodeError,
    FetchTimeoutError,
    InvalidOptionError,
    NetworkError,
    OverloadedError,
    QwenVLError,
    SourceError,
    SourceNotAllowedError,
    SourceNotFoundError,
    SourceTooLargeError,
)
from ._version import __version__
from .sources._policy import FetchPolicy, get_fetch_policy, set_fetch_policy
from .video import BackendFallbackWarning
from .vision_process import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    IMAGE_MAX_TOKEN_NUM,
    IMAGE_MIN_TOKEN_NUM,
    MAX_RATIO,
    MODEL_SEQ_LEN,
    SPATIAL_MERGE_SIZE,
    VIDEO_MAX_TOKEN_NUM,
    VIDEO_MIN_TOKEN_NUM,
    VIDEO_READER_BACKENDS,
    ceil_by_factor,
    count_visual_tokens,
    extract_vision_info,
    fetch_image,
    fetch_video,
    floor_by_factor,
    get_video_reader_backend,
    process_vision_info,
    round_by_factor,
    smart_nframes,
    smart_resize,
)

#: public names whose modules load on first use (asyncio, streaming): ``import qwen_vl_utils`` stays light
_LAZY = {
    "process_mm_info": "omni_process",
    "process_audio_info": "omni_process",
    "fetch_audio": "audio",
    "audio_token_count": "audio",
    "acount_visual_tokens": "aio",
    "afetch_image": "aio",
    "afetch_video": "aio",
    "aprocess_vision_info": "aio",
    "VideoChunk": "stream",
    "stream_video": "stream",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen_vl_utils' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "audio_token_count",
    "fetch_audio",
    "process_audio_info",
    "process_mm_info",
    "FPS",
    "FPS_MAX_FRAMES",
    "FPS_MIN_FRAMES",
    "FRAME_FACTOR",
    "IMAGE_MAX_TOKEN_NUM",
    "IMAGE_MIN_TOKEN_NUM",
    "MAX_RATIO",
    "MODEL_SEQ_LEN",
    "SPATIAL_MERGE_SIZE",
    "VIDEO_MAX_TOKEN_NUM",
    "VIDEO_MIN_TOKEN_NUM",
    "VIDEO_READER_BACKENDS",
    "AspectRatioError",
    "BackendFallbackWarning",
    "DecodeError",
    "FetchPolicy",
    "FetchTimeoutError",
    "InvalidOptionError",
    "NetworkError",
    "OverloadedError",
    "QwenVLError",
    "SourceError",
    "SourceNotAllowedError",
    "SourceNotFoundError",
    "SourceTooLargeError",
    "VideoChunk",
    "__version__",
    "acount_visual_tokens",
    "afetch_image",
    "afetch_video",
    "aprocess_vision_info",
    "ceil_by_factor",
    "count_visual_tokens",
    "extract_vision_info",
    "fetch_image",
    "fetch_video",
    "floor_by_factor",
    "get_fetch_policy",
    "get_video_reader_backend",
    "process_vision_info",
    "round_by_factor",
    "set_fetch_policy",
    "smart_nframes",
    "smart_resize",
    "stream_video",
]
