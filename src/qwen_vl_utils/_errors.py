"""The exceptions qwen-vl-utils raises for bad input.

Every error the library raises for user input is one of these, and each subclasses the builtin that
older code would have caught, so ``except OSError`` / ``except ValueError`` keep working::

    QwenVLError(Exception)
    ├── SourceError(OSError)                    the source cannot be read
    │   ├── SourceNotFoundError(FileNotFoundError)  no such file
    │   ├── SourceNotAllowedError(PermissionError)  refused by the fetch policy or a store's access control
    │   ├── NetworkError(ConnectionError)           HTTP status >= 400, refused connection, bad redirects
    │   ├── FetchTimeoutError(TimeoutError)         connect/read timeout or total deadline passed
    │   └── SourceTooLargeError                     over a byte, pixel, frame or duration limit
    ├── DecodeError(OSError)                    the bytes are not a decodable image or video
    └── InvalidOptionError(ValueError)          an element key or argument the library cannot honour
        └── AspectRatioError                    an image or video more elongated than MAX_RATIO

Backend exceptions are converted to these at one boundary (``video._read_frames``), chained with
``raise ... from exc`` so the original stays visible in the traceback.
"""

from __future__ import annotations

import re

__all__ = [
    "AspectRatioError",
    "DecodeError",
    "FetchTimeoutError",
    "InvalidOptionError",
    "NetworkError",
    "OverloadedError",
    "QwenVLError",
    "SourceError",
    "SourceNotAllowedError",
    "SourceNotFoundError",
    "SourceTooLargeError",
]


class QwenVLError(Exception):
    """Base class of every error qwen-vl-utils raises for user input."""


class SourceError(QwenVLError, OSError):
    """The image or video source could not be read."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """A local path or ``file://`` URI that does not exist."""


class SourceNotAllowedError(SourceError, PermissionError):
    """The fetch policy refuses this source (scheme, host, address or local path), or an object store denied
    access to it."""


class NetworkError(SourceError, ConnectionError):
    """An HTTP error status, a refused connection or a redirect problem."""


class FetchTimeoutError(SourceError, TimeoutError):
    """A connect or read timeout, or the total deadline of a download, passed."""


class SourceTooLargeError(SourceError):
    """A download, image or video over one of the configured size limits."""


class DecodeError(QwenVLError, OSError):
    """The bytes are not a decodable image or video."""


class InvalidOptionError(QwenVLError, ValueError):
    """An element key, argument or environment variable that cannot be honoured."""


class OverloadedError(QwenVLError):
    """Too many requests are already waiting for a download or decode slot (``FetchPolicy.max_queued``): retry
    later. A server maps it to 503."""


class AspectRatioError(InvalidOptionError):
    """The image or video is more elongated than ``MAX_RATIO`` allows."""


def describe(source: object, limit: int = 80) -> str:
    """A short, printable name for a source, for error messages: never a whole base64 string."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str):
        if source.startswith("data:"):
            head = source.split(",", 1)[0]
            return f"<{head[:60]},... ({len(source)} chars)>"
        source = redact_url(source)
        if len(source) > limit:
            keep = limit // 2 - 2
            return f"{source[:keep]}...{source[-keep:]}"
        return source
    if source is None or isinstance(source, (bool, int, float)):
        return repr(source)
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return describe(name, limit)
    kind = type(source)
    shape = getattr(source, "shape", None)
    if shape is None:  # (a PIL image's size is a pair; a numpy scalar's is the int 1 and its shape ())
        shape = getattr(source, "size", None)
    if kind.__module__ == "numpy" and shape == ():  # a numpy scalar: its value says more than its type
        return f"<{kind.__module__}.{kind.__qualname__} {source!r}>"
    try:
        dims = f" {tuple(shape)}" if shape else ""
    except TypeError:
        dims = ""
    return f"<{kind.__module__}.{kind.__qualname__}{dims}>"


#: a URL's scheme and authority (``user:password@host:port``)
_AUTHORITY = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
#: query parameters that carry credentials: presigned S3/GCS URLs, Azure SAS, bearer tokens and API keys
_SECRET_PARAMS = re.compile(
    r"([?&#;](?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)|signature|sig|"
    r"token|access_token|id_token|auth|api_?key|key|password|passwd|secret|client_secret|credential)=)([^&#;]*)",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """``url`` without its credentials: the password of ``user:password@`` as ``***``, a username-only token
    (``https://TOKEN@host/``) as ``***``, and the values of credential query parameters (``X-Amz-Signature``,
    ``X-Amz-Credential``, ``sig``, ``token``, ...) as ``***``, in the query, the fragment (``#access_token=``, as
    implicit OAuth flows put it) or matrix parameters (``;token=``). Anything else is unchanged."""
    url = _SECRET_PARAMS.sub(r"\1***", url)
    m = _AUTHORITY.match(url)
    userinfo, at, host = m.group(1).rpartition("@") if m else ("", "", "")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    redacted = f"{user}:***" if colon else "***"  # a user name alone is often the token itself
    return f"{url[: m.start(1)]}{redacted}@{host}{url[m.end(1) :]}"
