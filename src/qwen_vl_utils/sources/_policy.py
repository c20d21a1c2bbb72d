"""What the library may fetch, and how much: one policy for every source kind.

A policy comes from (in increasing priority) the defaults below, ``QWENVL_*`` environment variables
(read at call time), :func:`set_fetch_policy` for the process, and a ``policy=`` argument per call.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

from .._errors import InvalidOptionError
from .._util import parse_flag
from ._hosts import check_pattern

__all__ = ["FetchPolicy", "get_fetch_policy", "set_fetch_policy"]

MiB = 1 << 20


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and permissions for resolving image and video sources.

    The defaults keep qwen-vl-utils 0.0.14's behaviour for ordinary use (local files, any http(s) host),
    while bounding what a single element can cost. A server that takes untrusted messages should use
    something like ``FetchPolicy(allow_local=False, block_private_networks=True)``.
    """

    allowed_schemes: tuple = ("http", "https", "file", "data")
    #: local paths and file:// URIs
    allow_local: bool = True
    #: when set, local paths must resolve (symlinks followed) inside this directory
    media_root: Optional[str] = None
    #: when set, only these host names (exact, or ".example.com" for a domain and its subdomains)
    allowed_hosts: Optional[tuple] = None
    denied_hosts: tuple = ()
    #: refuse private, loopback, link-local and reserved addresses, checked after DNS and on every redirect
    block_private_networks: bool = False
    max_redirects: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    #: total seconds of network time for one video (all its requests, ranged reads included), however slowly
    #: the bytes trickle in
    deadline: float = 300.0
    #: the same for one image: a server taking untrusted messages should not hold a worker on a trickling image
    image_deadline: float = 30.0
    #: further tries of an idempotent read after a connection reset or an HTTP 502/503/504 (short backoff)
    retries: int = 2
    #: the asyncio API's process-wide limits on downloads and on decodes in flight (None: 8 per usable core,
    #: at least 16; one per usable core). Read from the process policy, shared by every call.
    max_concurrent_downloads: Optional[int] = None
    max_concurrent_decodes: Optional[int] = None
    #: downloads in flight to one host (``scheme://host:port``), so that one slow host cannot take every
    #: download slot; None: no per-host limit
    max_concurrent_per_host: Optional[int] = 4
    #: requests that may wait for one lane (downloads, decodes, one host) before more are refused at once with
    #: OverloadedError (a server's 503); None: no bound
    max_queued: Optional[int] = 1024
    #: a directory that keeps remote media fetched whole, revalidated on reuse (None: no cache)
    media_cache: Optional[str] = None
    media_cache_max_bytes: int = 10 * 1024 * MiB
    #: key cache entries by the URL without its credentials (presigned signatures, tokens), so that a URL signed
    #: again reuses the entry after revalidation; off by default (only for origins whose credentials do not
    #: select the content)
    media_cache_key_without_credentials: bool = False
    #: seconds after which a cached entry is dropped, however valid
    media_cache_max_age: float = 7 * 24 * 3600.0
    max_image_bytes: int = 256 * MiB
    max_video_bytes: int = 4096 * MiB
    #: decompression-bomb limit, checked from the header before any decode (Pillow's own error threshold)
    max_image_pixels: int = 178_956_970
    #: the largest image or video frame a call may produce (min_pixels, resized_height/width and the patch size
    #: come from requests): twice the largest model budget (16384 tokens of 32x32 pixels, 16.8 megapixels)
    max_output_pixels: int = 1 << 25
    #: the image_patch_size values accepted (14: Qwen2.5-VL, 16: Qwen3-VL); None: any positive integer
    patch_sizes: Optional[tuple] = (14, 16)
    #: refuse videos longer than this many seconds / frames (None: no limit)
    max_video_seconds: Optional[float] = None
    max_video_frames: Optional[int] = None
    #: the longest sound an audio element may decode to, in seconds (3 h: 691 MB of 16 kHz float32), checked from
    #: the header and while decoding (a small file whose header claims a rate of 1 Hz is a decompression bomb);
    #: None: no limit
    max_audio_seconds: Optional[float] = 3 * 3600.0

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> FetchPolicy:
        return dataclasses.replace(self, **changes)


#: field -> (kind, smallest allowed value, None allowed)
_RANGES = {
    "max_redirects": (int, 0, False),
    "connect_timeout": (float, 0, False),
    "read_timeout": (float, 0, False),
    "deadline": (float, 0, False),
    "image_deadline": (float, 0, False),
    "retries": (int, 0, False),
    "max_concurrent_downloads": (int, 1, True),
    "max_concurrent_decodes": (int, 1, True),
    "max_concurrent_per_host": (int, 1, True),
    "max_queued": (int, 0, True),
    "media_cache_max_bytes": (int, 1, False),
    "media_cache_max_age": (float, 0, False),
    "max_image_bytes": (int, 1, False),
    "max_video_bytes": (int, 1, False),
    "max_image_pixels": (int, 1, False),
    "max_output_pixels": (int, 1, False),
    "max_video_seconds": (float, 0, True),
    "max_video_frames": (int, 1, True),
    "max_audio_seconds": (float, 0, True),
}


def _validate(policy: FetchPolicy) -> None:
    """Every field's type and range, at construction: a typo fails here, not as a silent 'off' later."""
    for name, (kind, low, optional) in _RANGES.items():
        value = getattr(policy, name)
        if value is None and optional:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int:
            ok = float(value).is_integer()
        if not ok or not math.isfinite(value) or value < low or (kind is float and value == low):
            what = "a whole number" if kind is int else "a number"
            bound = f">= {low}" if kind is int else f"> {low}"
            raise InvalidOptionError(
                f"FetchPolicy.{name}={value!r}: must be {what} {bound}" + (" or None" if optional else "")
            )
    for name in ("allow_local", "block_private_networks", "media_cache_key_without_credentials"):
        if not isinstance(getattr(policy, name), bool):
            raise InvalidOptionError(f"FetchPolicy.{name}={getattr(policy, name)!r}: must be True or False")
    for name in ("allowed_schemes", "allowed_hosts", "denied_hosts"):
        value = getattr(policy, name)
        if value is None and name == "allowed_hosts":
            continue
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise InvalidOptionError(f"FetchPolicy.{name}={value!r}: must be a tuple of strings")
        if name == "allowed_schemes":
            object.__setattr__(policy, name, tuple(v.strip().lower() for v in value))
            continue
        try:  # names (IDNA), .domains, addresses in any spelling, CIDR ranges: in one form
            object.__setattr__(policy, name, tuple(check_pattern(v) for v in value))
        except ValueError as exc:
            raise InvalidOptionError(
                f"FetchPolicy.{name}={value!r}: {exc}; give host names, .domains, addresses or CIDR ranges"
            ) from None
    sizes = policy.patch_sizes
    if sizes is not None:
        if isinstance(sizes, (str, bytes)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
        ):
            raise InvalidOptionError(
                f"FetchPolicy.patch_sizes={sizes!r}: must be a tuple of positive integers, or None"
            )
        object.__setattr__(policy, "patch_sizes", tuple(sizes))
    for name in ("media_root", "media_cache"):
        value = getattr(policy, name)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise InvalidOptionError(f"FetchPolicy.{name}={value!r}: must be a directory path or None")


_ENV = {
    "QWENVL_ALLOWED_SCHEMES": ("allowed_schemes", lambda v: tuple(s.strip().lower() for s in v.split(",") if s)),
    "QWENVL_ALLOW_LOCAL": ("allow_local", parse_flag),
    "QWENVL_MEDIA_ROOT": ("media_root", lambda v: v or None),
    "QWENVL_ALLOWED_HOSTS": ("allowed_hosts", lambda v: tuple(h.strip().lower() for h in v.split(",") if h)),
    "QWENVL_DENIED_HOSTS": ("denied_hosts", lambda v: tuple(h.strip().lower() for h in v.split(",") if h)),
    "QWENVL_BLOCK_PRIVATE_NETWORKS": (
        "block_private_networks",
        parse_flag,
    ),
    "QWENVL_MAX_REDIRECTS": ("max_redirects", int),
    "QWENVL_CONNECT_TIMEOUT": ("connect_timeout", float),
    "QWENVL_READ_TIMEOUT": ("read_timeout", float),
    "QWENVL_DEADLINE": ("deadline", float),
    "QWENVL_IMAGE_DEADLINE": ("image_deadline", float),
    "QWENVL_RETRIES": ("retries", int),
    "QWENVL_MAX_CONCURRENT_DOWNLOADS": ("max_concurrent_downloads", int),
    "QWENVL_MAX_CONCURRENT_DECODES": ("max_concurrent_decodes", int),
    "QWENVL_MAX_CONCURRENT_PER_HOST": (
        "max_concurrent_per_host",
        lambda v: None if v.strip().lower() == "none" else int(v),
    ),
    "QWENVL_MAX_QUEUED": ("max_queued", lambda v: None if v.strip().lower() == "none" else int(v)),
    "QWENVL_MEDIA_CACHE": ("media_cache", lambda v: v or None),
    "QWENVL_MEDIA_CACHE_MAX_BYTES": ("media_cache_max_bytes", lambda v: int(float(v))),
    "QWENVL_MEDIA_CACHE_MAX_AGE": ("media_cache_max_age", float),
    "QWENVL_MEDIA_CACHE_KEY_WITHOUT_CREDENTIALS": ("media_cache_key_without_credentials", parse_flag),
    "QWENVL_MAX_IMAGE_BYTES": ("max_image_bytes", lambda v: int(float(v))),
    "QWENVL_MAX_VIDEO_BYTES": ("max_video_bytes", lambda v: int(float(v))),
    "QWENVL_MAX_IMAGE_PIXELS": ("max_image_pixels", lambda v: int(float(v))),
    "QWENVL_MAX_OUTPUT_PIXELS": ("max_output_pixels", lambda v: int(float(v))),
    "QWENVL_PATCH_SIZES": (
        "patch_sizes",
        lambda v: None if v.strip().lower() == "any" else tuple(int(s) for s in v.split(",") if s.strip()),
    ),
    "QWENVL_MAX_VIDEO_SECONDS": ("max_video_seconds", float),
    "QWENVL_MAX_VIDEO_FRAMES": ("max_video_frames", lambda v: int(float(v))),
    "QWENVL_MAX_AUDIO_SECONDS": ("max_audio_seconds", lambda v: None if v.strip().lower() == "none" else float(v)),
}

_lock = threading.Lock()
_process_policy: Optional[FetchPolicy] = None


def _from_env(base: FetchPolicy) -> FetchPolicy:
    changes = {}
    for var, (name, parse) in _ENV.items():
        raw = os.environ.get(var)
        if raw is None:
            continue
        try:
            changes[name] = parse(raw)
        except ValueError as exc:
            raise InvalidOptionError(f"environment variable {var}={raw!r} is not valid: {exc}") from exc
    return base.replace(**changes) if changes else base


def set_fetch_policy(policy: Optional[FetchPolicy] = None, **changes: Any) -> FetchPolicy:
    """Set the process-wide policy (``None`` returns to defaults + environment); returns the new one."""
    global _process_policy
    with _lock:
        if policy is None and not changes:
            _process_policy = None
            return get_fetch_policy()
        base = policy if policy is not None else get_fetch_policy()
        _process_policy = base.replace(**changes) if changes else base
        return _process_policy


def get_fetch_policy(policy: Optional[FetchPolicy] = None) -> FetchPolicy:
    """The policy in force: the argument, else the process policy, else defaults + environment."""
    if policy is not None:
        if not isinstance(policy, FetchPolicy):
            raise InvalidOptionError(f"policy must be a qwen_vl_utils.FetchPolicy, got {type(policy).__name__}")
        return policy
    if _process_policy is not None:
        return _process_policy
    return _from_env(FetchPolicy())
