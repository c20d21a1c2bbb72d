"""The qwen-omni-utils 0.0.9 face: ``process_mm_info`` and ``process_audio_info`` for Qwen2.5-Omni and Qwen3-Omni.

Same names, signatures, element keys and returns as qwen-omni-utils (migrating is changing the import); the images
and videos are :func:`process_vision_info`'s, the audio is :mod:`.audio`'s: 16 kHz mono float32 through PyAV, and
with ``use_audio_in_video`` each video's sound for exactly the window its frames cover, read from the video's own
source and probe, aligned on the container's timeline.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from ._errors import InvalidOptionError, describe
from ._options import patch_factor
from .audio import fetch_audio
from .sources._policy import FetchPolicy, get_fetch_policy
from .video import _fetch_video, fetch_video_audio
from .vision_process import _fetch_images, _is_vision, _kind, assemble, extract_elements

__all__ = ["process_audio_info", "process_mm_info"]

Conversations = Union[list[dict[str, Any]], list[list[dict[str, Any]]]]


_AUDIO_KEYS = {"audio", "audio_url"}
_VISION_KEYS = {"image", "image_url", "video", "video_url"}


def _is_audio(ele: Any) -> bool:
    return isinstance(ele, dict) and ("audio" in ele or "audio_url" in ele or ele.get("type") == "audio")


def _media(conversations: Conversations, use_audio_in_video: Any) -> list:
    """(kind, element) of every audio, image and video element, in document order across the batch."""
    numpy_bool = type(use_audio_in_video).__module__ == "numpy" and type(use_audio_in_video).__name__ in (
        "bool",
        "bool_",
    )
    if not isinstance(use_audio_in_video, bool) and not numpy_bool:
        raise InvalidOptionError(f"use_audio_in_video must be True or False, got {describe(use_audio_in_video)}")
    eles = extract_elements(conversations, lambda e: _is_audio(e) or _is_vision(e) or _is_video_url(e))
    for ele in eles:
        both = sorted(k for k in ele if k in _AUDIO_KEYS) + sorted(k for k in ele if k in _VISION_KEYS)
        if len(both) > 1 and set(both) & _AUDIO_KEYS and set(both) & _VISION_KEYS:
            raise InvalidOptionError(
                f"an element holds both sound and a picture ({', '.join(both)}): which one it is cannot be told; "
                "give each its own element"
            )
    eles = [{**e, "video": e["video_url"]} if _is_video_url(e) else e for e in eles]
    return [("audio" if _is_audio(ele) and not _is_vision(ele) else _kind(ele), ele) for ele in eles]


def _is_video_url(ele: Any) -> bool:
    """``{"type": "video", "video_url": ...}``: qwen-omni-utils reads its sound (not its frames); both are read."""
    return isinstance(ele, dict) and "video_url" in ele and "video" not in ele


def process_audio_info(
    conversations: Conversations, use_audio_in_video: bool, *, policy: Optional[FetchPolicy] = None
) -> Optional[list]:
    """Every audio of one conversation or a batch, in document order (with ``use_audio_in_video``, each video's
    sound at the video's place), as 1-D float32 arrays at 16 kHz; None when there is none."""
    policy = get_fetch_policy(policy)
    audios = [
        fetch_audio(ele, policy=policy) if kind == "audio" else fetch_video_audio(ele, policy=policy)
        for kind, ele in _media(conversations, use_audio_in_video)
        if kind == "audio" or (kind == "video" and use_audio_in_video)
    ]
    return audios or None


def process_mm_info(
    conversations: Conversations,
    use_audio_in_video: bool,
    return_video_kwargs: bool = False,
    return_video_metadata: bool = False,
    image_patch_size: int = 14,
    *,
    policy: Optional[FetchPolicy] = None,
    backend: Optional[str] = None,
) -> tuple:
    """``(audios, images, videos)``, plus ``video_kwargs`` with ``return_video_kwargs``, as qwen-omni-utils
    returns them: audios in document order across the batch (None when there are none), images and videos as
    :func:`process_vision_info` returns them. ``use_audio_in_video`` (required, as there): each video's sound
    joins the audios at the video's place, covering exactly the window its frames cover."""
    policy = get_fetch_policy(policy)
    patch_factor(image_patch_size, policy)
    audios, images, videos = _process(
        conversations, use_audio_in_video, return_video_metadata, image_patch_size, policy, backend
    )
    return (audios or None, *assemble(images, videos, return_video_kwargs, return_video_metadata))


def _process(
    conversations: Conversations,
    use_audio_in_video: bool,
    return_video_metadata: bool,
    image_patch_size: int,
    policy: FetchPolicy,
    backend: Optional[str],
) -> tuple:
    media = _media(conversations, use_audio_in_video)
    images = _fetch_images([e for k, e in media if k == "image"], image_patch_size, policy)
    audios: list = []
    fetched: list = []
    for kind, ele in media:
        if kind == "audio":
            audios.append(fetch_audio(ele, policy=policy))
        elif kind == "video":
            sound: Optional[list] = [] if use_audio_in_video else None
            video = _fetch_video(
                ele,
                image_patch_size,
                return_video_sample_fps=True,
                return_video_metadata=return_video_metadata,
                backend=backend,
                policy=policy,
                audio_out=sound,
            )
            fetched.append(video)
            if sound:
                audios.append(sound[0])
    return audios, images, fetched
