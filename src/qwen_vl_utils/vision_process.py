"""The public API under qwen-vl-utils 0.0.14's module path: ``from qwen_vl_utils.vision_process import ...``."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Optional, Union

from PIL import Image

from ._errors import InvalidOptionError, describe
from ._options import ImageOptions, image_options, patch_factor
from ._util import usable_cpus
from .image import (
    IMAGE_MAX_TOKEN_NUM,
    IMAGE_MIN_TOKEN_NUM,
    MAX_RATIO,
    SPATIAL_MERGE_SIZE,
    ceil_by_factor,
    fetch_image,
    floor_by_factor,
    image_token_count,
    load_image,
    resolve_image,
    round_by_factor,
    smart_resize,
)
from .sources._policy import FetchPolicy, get_fetch_policy
from .sources._resolve import Source
from .video import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    MAX_NUM_WORKERS_FETCH_VIDEO,
    MODEL_SEQ_LEN,
    VIDEO_MAX_TOKEN_NUM,
    VIDEO_MIN_TOKEN_NUM,
    VIDEO_READER_BACKENDS,
    fetch_video,
    get_video_reader_backend,
    smart_nframes,
    video_token_count,
)

__all__ = [
    "FPS",
    "FPS_MAX_FRAMES",
    "FPS_MIN_FRAMES",
    "FRAME_FACTOR",
    "IMAGE_MAX_TOKEN_NUM",
    "IMAGE_MIN_TOKEN_NUM",
    "MAX_NUM_WORKERS_FETCH_IMAGE",
    "MAX_NUM_WORKERS_FETCH_VIDEO",
    "MAX_RATIO",
    "MODEL_SEQ_LEN",
    "SPATIAL_MERGE_SIZE",
    "VIDEO_MAX_TOKEN_NUM",
    "VIDEO_MIN_TOKEN_NUM",
    "VIDEO_READER_BACKENDS",
    "ceil_by_factor",
    "count_visual_tokens",
    "extract_vision_info",
    "fetch_image",
    "fetch_video",
    "floor_by_factor",
    "get_video_reader_backend",
    "process_vision_info",
    "round_by_factor",
    "smart_nframes",
    "smart_resize",
]

#: threads that fetch the images of one process_vision_info call concurrently
MAX_NUM_WORKERS_FETCH_IMAGE = 8

_VISION_TYPES = ("image", "image_url", "video")


def _is_vision(ele: Any) -> bool:
    return isinstance(ele, dict) and (
        "image" in ele or "image_url" in ele or "video" in ele or ele.get("type", "text") in _VISION_TYPES
    )


def extract_vision_info(
    conversations: Union[list[dict[str, Any]], list[list[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    """Every image and video element of one conversation or a batch of them, in order."""
    return extract_elements(conversations, _is_vision)


def extract_elements(conversations: Any, wanted: Callable[[Any], bool]) -> list[dict[str, Any]]:
    """The content elements ``wanted`` picks, of one conversation or a batch of them, in document order."""
    if isinstance(conversations, dict):
        conversations = [conversations]
    if not isinstance(conversations, (list, tuple)):
        raise InvalidOptionError(
            f"conversations must be a list of messages or of conversations, got {describe(conversations)}"
        )
    if not conversations:
        return []
    if isinstance(conversations[0], dict):
        conversations = [conversations]
    infos = []
    for conversation in conversations:
        if not isinstance(conversation, (list, tuple)):  # [1, 2], [None]: neither messages nor conversations
            raise InvalidOptionError(
                f"conversations must be a list of messages or of conversations, got an item {describe(conversation)}"
            )
        for message in conversation:
            if not isinstance(message, dict):
                raise InvalidOptionError(
                    f"a message must be a dict with 'role' and 'content', got {describe(message)}"
                )
            content = message.get("content")
            if isinstance(content, list):
                infos.extend(ele for ele in content if wanted(ele))
    return infos


def _kind(ele: dict) -> str:
    if "image" in ele or "image_url" in ele:
        return "image"
    if "video" in ele:
        return "video"
    raise InvalidOptionError(
        f"a {ele.get('type')!r} element needs an 'image', 'image_url' or 'video' key holding the source; "
        f"got keys {sorted(ele)}"
    )


def process_vision_info(
    conversations: Union[list[dict[str, Any]], list[list[dict[str, Any]]]],
    return_video_kwargs: bool = False,
    return_video_metadata: bool = False,
    image_patch_size: int = 14,
    *,
    policy: Optional[FetchPolicy] = None,
    backend: Optional[str] = None,
) -> tuple:
    """Fetch every image and video of one conversation or a batch, in order.

    Returns ``(images or None, videos or None)``, plus ``video_kwargs`` when ``return_video_kwargs``:
    ``{"do_sample_frames": False}``, with the per-video ``"fps"`` list when ``return_video_metadata`` is
    False (Qwen2.5-VL). With ``return_video_metadata`` each video is a ``(tensor, metadata)`` pair (Qwen3-VL).
    Images are downloaded concurrently and decoded one per core; videos one after another (each decoder is
    already multi-threaded).
    """
    image_eles, video_eles = split_elements(conversations)
    policy = get_fetch_policy(policy)
    patch_factor(image_patch_size, policy)  # checked where it enters, media or none (NaN, 14.5)
    images = _fetch_images(image_eles, image_patch_size, policy)
    videos = [
        fetch_video(
            ele,
            image_patch_size=image_patch_size,
            return_video_sample_fps=True,
            return_video_metadata=return_video_metadata,
            backend=backend,
            policy=policy,
        )
        for ele in video_eles
    ]
    return assemble(images, videos, return_video_kwargs, return_video_metadata)


def split_elements(conversations: Any) -> tuple[list[dict], list[dict]]:
    """The image elements and the video elements of one conversation or a batch, each in order."""
    infos = extract_vision_info(conversations)
    kinds = [_kind(ele) for ele in infos]
    return (
        [ele for ele, kind in zip(infos, kinds) if kind == "image"],
        [ele for ele, kind in zip(infos, kinds) if kind == "video"],
    )


def assemble(images: list, videos: list, return_video_kwargs: bool, return_video_metadata: bool) -> tuple:
    """process_vision_info's result from the fetched images and the ``(video, sample_fps)`` pairs."""
    video_kwargs: dict[str, Any] = {"do_sample_frames": False}
    if not return_video_metadata:
        video_kwargs["fps"] = [fps for _, fps in videos]
    result = (images or None, [video for video, _ in videos] or None)
    return (*result, video_kwargs) if return_video_kwargs else result


def _fetch_images(eles: list[dict], image_patch_size: int, policy: FetchPolicy) -> list[Image.Image]:
    """``fetch_image`` for each element, in two stages: sources resolve (download) on up to
    ``MAX_NUM_WORKERS_FETCH_IMAGE`` threads, and each one is decoded as soon as it is ready on one thread per
    usable core. Decoding is CPU-bound: more threads than cores only spread 48 MB decodes over more malloc
    arenas, about twice the page faults and 15% slower on 2 cores, while downloads need the concurrency."""
    if len(eles) <= 1:
        return [fetch_image(ele, image_patch_size, policy=policy) for ele in eles]
    factor = patch_factor(image_patch_size, policy)
    decodes: list[Optional[Future]] = [None] * len(eles)

    def fetch(ele: dict) -> tuple[Source, ImageOptions]:
        options = image_options(ele)  # a bad option fails here, before this image's download
        return resolve_image(ele, policy), options

    def load(source: Source, options: ImageOptions) -> Image.Image:
        with source:
            return load_image(source, options, factor, policy)

    with ThreadPoolExecutor(min(usable_cpus(), len(eles)), thread_name_prefix="qwen-vl-decode") as cpu:

        def queue_decode(i: int, fetched: Future) -> None:
            if fetched.exception() is None:
                decodes[i] = cpu.submit(load, *fetched.result())

        with ThreadPoolExecutor(min(MAX_NUM_WORKERS_FETCH_IMAGE, len(eles)), thread_name_prefix="qwen-vl-fetch") as io:
            fetches = [io.submit(fetch, ele) for ele in eles]
            for i, fetched in enumerate(fetches):
                fetched.add_done_callback(partial(queue_decode, i))
        # every fetch has finished here, and every one that succeeded has its decode queued
        return [(decode or fetched).result() for fetched, decode in zip(fetches, decodes)]


def count_visual_tokens(
    ele: dict[str, Any], image_patch_size: int = 14, *, policy: Optional[FetchPolicy] = None
) -> int:
    """The number of visual tokens an element becomes, without decoding its pixels.

    Images: (H/f)*(W/f); videos: ceil(T/2)*(H/f)*(W/f), with f = image_patch_size * 2 and H, W, T the
    resized size and frame count that :func:`fetch_image` / :func:`fetch_video` would produce, for every
    source form they accept (decoded video arrays and tensors too). Read from image headers, the shape of an
    array, or the video's container probe (which decodes one frame to learn the rotation); no sampled frame
    is decoded and nothing is resized.
    """
    if not isinstance(ele, dict):
        raise InvalidOptionError(f"an element must be a dict, got {describe(ele)}")
    if _kind(ele) == "image":
        return image_token_count(ele, image_patch_size, policy=policy)[0]
    return video_token_count(ele, image_patch_size, policy=policy)[0]
