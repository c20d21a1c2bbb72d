"""The one place that turns an element's ``image`` / ``video`` value into something a decoder can open.

Every source kind goes through :func:`resolve_source`: local path, ``file://`` URI, ``http(s)://`` URL,
``data:`` URI, raw bytes, binary file-like objects, and already-decoded objects (PIL images, numpy arrays,
torch tensors), which are passed through untouched. The fetch policy is enforced here and nowhere else.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import io
import ipaddress
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Optional, Union

from ._errors import (
    DecodeError,
    FetchTimeoutError,
    InvalidOptionError,
    NetworkError,
    SourceError,
    SourceNotAllowedError,
    SourceNotFoundError,
    SourceTooLargeError,
    describe,
)
from ._policy import FetchPolicy

__all__ = ["Source", "resolve_source", "sniff_media"]

_CHUNK = 1 << 16


@dataclass
class Source:
    """A resolved source: exactly one of ``path``, ``data``, ``opener`` or ``obj`` is set.

    Decoders never look at the fields: they call :meth:`open`, which gives a path or a new binary file
    object (``opener`` makes remote files seekable by ranged reads, each call an independent reader)."""

    name: str
    path: Optional[str] = None
    data: Optional[bytes] = None
    obj: Any = None
    opener: Optional[Callable[[], BinaryIO]] = None
    is_temporary: bool = False

    def open(self) -> Union[str, BinaryIO]:
        """What a decoder opens: a local path, or a new seekable binary file object."""
        if self.path is not None:
            return self.path
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.opener is not None:
            return self.opener()
        raise InvalidOptionError(f"{self.name} is a decoded object, not an encoded file")

    def head(self, n: int = 64) -> bytes:
        if self.data is not None:
            return bytes(self.data[:n])
        if self.path is not None:
            with open(self.path, "rb") as f:
                return f.read(n)
        if self.opener is not None:
            with contextlib.closing(self.opener()) as f:
                return f.read(n)
        return b""

    def close(self) -> None:
        if self.is_temporary and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.is_temporary = False

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- what the bytes are -------------------------------------------------------------------------------

_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"\x00\x00\x01\x00",  # ico
    b"\xff\x0a",  # jpeg xl codestream
    b"P1",
    b"P2",
    b"P3",
    b"P4",
    b"P5",
    b"P6",
)
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"0&\xb2u")


def sniff_media(head: bytes) -> Optional[str]:
    """'image', 'video' or None, from the first bytes (never from a file name)."""
    if head[:4] == b"RIFF" and len(head) >= 12:
        return {b"WEBP": "image", b"AVI ": "video"}.get(head[8:12])
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "image" if brand in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1") else "video"
    if head[4:8] in (b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "video"
    if head.startswith(_VIDEO_MAGIC) or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47):
        return "video"
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    return None


# --- the library's own temporary directory -------------------------------------------------------------

_tmp_lock = threading.Lock()
_tmp_dir: Optional[str] = None


def library_tmpdir() -> str:
    """A directory this process owns for downloads; removed at exit. Nothing is written anywhere else."""
    global _tmp_dir
    with _tmp_lock:
        if _tmp_dir is None or not os.path.isdir(_tmp_dir):
            _tmp_dir = tempfile.mkdtemp(prefix=f"qwen-vl-utils-{os.getpid()}-")
            atexit.register(shutil.rmtree, _tmp_dir, True)
        return _tmp_dir


# --- resolution -----------------------------------------------------------------------------------------


def _is_decoded_object(value: Any) -> bool:
    mod = type(value).__module__
    return mod.startswith(("PIL.", "numpy", "torch")) or hasattr(value, "__array_interface__")


def resolve_source(value: Any, media: str, policy: FetchPolicy) -> Source:
    """Resolve one element value. ``media`` is 'image' or 'video' and selects the byte limit."""
    name = describe(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        _check_bytes(len(data), media, policy, name)
        if not data:
            raise DecodeError(f"{media} source {name} is empty")
        return Source(name=name, data=data)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return _resolve_string(value, media, policy)
    if hasattr(value, "read") and not _is_decoded_object(value):
        return Source(name=name, data=_read_filelike(value, media, policy, name))
    if _is_decoded_object(value):
        return Source(name=name, obj=value)
    raise InvalidOptionError(
        f"cannot use {name} as an {media} source: give a path, file:// or http(s):// URL, data: URI, bytes, "
        "a binary file object, a PIL image, a numpy array or a torch tensor"
    )


def _resolve_string(value: str, media: str, policy: FetchPolicy) -> Source:
    name = describe(value)
    stripped = value.strip()
    scheme = stripped.split(":", 1)[0].lower() if ":" in stripped[:12] else ""
    if scheme in ("http", "https"):
        _check_scheme(scheme, policy, name)
        return _fetch_http(stripped, media, policy)
    if scheme == "data":
        _check_scheme(scheme, policy, name)
        data = _decode_data_uri(stripped, name)
        _check_bytes(len(data), media, policy, name)
        return Source(name=name, data=data)
    if scheme == "file":
        _check_scheme(scheme, policy, name)
        parsed = urllib.parse.urlparse(stripped)
        if parsed.netloc not in ("", "localhost"):
            # file://relative/path is what 0.0.14 users write: keep it working as a relative path
            path = urllib.parse.unquote(parsed.netloc + parsed.path)
        else:
            path = urllib.parse.unquote(parsed.path)
        return _local(path, media, policy, name)
    if len(scheme) > 1 and scheme.isalpha() and not os.path.exists(value):  # "a:b.png" may be a file name
        raise SourceNotAllowedError(
            f"{media} source {name}: the URL scheme {scheme!r} is not supported; use http(s)://, file://, data: "
            "or a local path"
        )
    return _local(value, media, policy, name)


def _check_scheme(scheme: str, policy: FetchPolicy, name: str) -> None:
    if scheme not in policy.allowed_schemes:
        raise SourceNotAllowedError(
            f"{name}: the fetch policy does not allow {scheme}: sources (allowed: {', '.join(policy.allowed_schemes)})"
        )


def _check_bytes(n: int, media: str, policy: FetchPolicy, name: str) -> None:
    limit = policy.max_image_bytes if media == "image" else policy.max_video_bytes
    if n > limit:
        raise SourceTooLargeError(
            f"{media} source {name} is {n} bytes, over the limit of {limit} "
            f"(raise FetchPolicy.max_{media}_bytes or QWENVL_MAX_{media.upper()}_BYTES)"
        )


def _local(path: str, media: str, policy: FetchPolicy, name: str) -> Source:
    if "\x00" in path:
        raise InvalidOptionError(f"{media} source {name}: a path cannot contain a NUL character")
    if not policy.allow_local:
        raise SourceNotAllowedError(f"{media} source {name}: local files are not allowed by the fetch policy")
    if policy.media_root is not None:
        root = os.path.realpath(policy.media_root)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise SourceNotAllowedError(f"{media} source {name} is outside the allowed media root {root}")
        path = full
    if not os.path.exists(path):
        raise SourceNotFoundError(f"{media} source {name}: no such file")
    if os.path.isdir(path):
        raise SourceError(f"{media} source {name} is a directory, not a file")
    _check_bytes(os.path.getsize(path), media, policy, name)
    return Source(name=name, path=path)


def _read_filelike(f: Any, media: str, policy: FetchPolicy, name: str) -> bytes:
    limit = policy.max_image_bytes if media == "image" else policy.max_video_bytes
    try:
        data = f.read(limit + 1)
    except OSError as exc:
        raise SourceError(f"{media} source {name} could not be read: {exc}") from exc
    if isinstance(data, str):
        raise InvalidOptionError(f"{media} source {name} is a text-mode file; open it in binary mode ('rb')")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidOptionError(f"{media} source {name}: read() returned {type(data).__name__}, not bytes")
    _check_bytes(len(data), media, policy, name)
    if not data:
        raise DecodeError(f"{media} source {name} is empty")
    return bytes(data)


def _decode_data_uri(uri: str, name: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise DecodeError(f"malformed data: URI {name}: no ',' separates the header from the data")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError(f"malformed data: URI {name}: the base64 payload is invalid ({exc})") from exc
    return urllib.parse.unquote_to_bytes(payload)


# --- http(s) ---------------------------------------------------------------------------------------------


def _host_matches(host: str, patterns: tuple) -> bool:
    return any(host == p or (p.startswith(".") and (host.endswith(p) or host == p[1:])) for p in patterns)


def _check_url(url: str, policy: FetchPolicy, name: str) -> urllib.parse.SplitResult:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise InvalidOptionError(f"malformed URL {name}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise SourceNotAllowedError(f"{name}: redirect or URL to a {scheme or 'missing'}: scheme is not allowed")
    _check_scheme(scheme, policy, name)
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidOptionError(f"malformed URL {name}: no host")
    if _host_matches(host, policy.denied_hosts):
        raise SourceNotAllowedError(f"{name}: the host {host} is denied by the fetch policy")
    if policy.allowed_hosts is not None and not _host_matches(host, policy.allowed_hosts):
        raise SourceNotAllowedError(f"{name}: the host {host} is not in the fetch policy's allowed hosts")
    if policy.block_private_networks:
        try:
            infos = socket.getaddrinfo(host, parts.port or (443 if scheme == "https" else 80), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NetworkError(f"{name}: cannot resolve {host}: {exc}") from exc
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%")[0])
            if not addr.is_global or addr.is_multicast:
                raise SourceNotAllowedError(
                    f"{name}: {host} resolves to the non-public address {addr}, refused by the fetch policy "
                    "(block_private_networks)"
                )
    return parts


def _fetch_http(url: str, media: str, policy: FetchPolicy) -> Source:
    import requests

    name = describe(url)
    limit = policy.max_image_bytes if media == "image" else policy.max_video_bytes
    start = time.monotonic()
    deadline = start + policy.deadline

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchTimeoutError(
                f"{media} source {name}: download took longer than the {policy.deadline:g} s deadline"
            )
        return left

    session = requests.Session()
    session.trust_env = True
    try:
        current = url
        for _hop in range(policy.max_redirects + 1):
            _check_url(current, policy, name)
            timeout = (min(policy.connect_timeout, remaining()), min(policy.read_timeout, remaining()))
            try:
                resp = session.get(current, stream=True, allow_redirects=False, timeout=timeout)
            except requests.exceptions.Timeout as exc:
                raise FetchTimeoutError(f"{media} source {name}: timed out connecting or waiting ({exc})") from exc
            except requests.exceptions.RequestException as exc:
                raise NetworkError(f"{media} source {name}: request failed: {exc}") from exc
            if resp.is_redirect:
                location = resp.headers.get("location", "")
                resp.close()
                current = urllib.parse.urljoin(current, location)
                continue
            break
        else:
            raise NetworkError(f"{media} source {name}: more than {policy.max_redirects} redirects")
        with resp:
            if resp.status_code >= 400:
                raise NetworkError(
                    f"{media} source {name}: HTTP {resp.status_code} {resp.reason or ''}".rstrip()
                    + (" (check the URL)" if resp.status_code < 500 else " (server error; retry later)")
                )
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise SourceTooLargeError(
                    f"{media} source {name} declares {declared} bytes, over the limit of {limit} "
                    f"(raise FetchPolicy.max_{media}_bytes)"
                )
            return _stream_body(resp, media, limit, name, remaining, policy)
    finally:
        session.close()


def _stream_body(resp: Any, media: str, limit: int, name: str, remaining: Any, policy: FetchPolicy) -> Source:
    """Read the body chunk by chunk, aborting as soon as a limit is crossed. Videos go to a temporary file."""
    raw = resp.raw
    raw.decode_content = True
    sock = _socket_of(raw)
    out = None
    chunks: list = []
    total = 0
    path = None
    try:
        if media == "video":
            fd, path = tempfile.mkstemp(suffix=".media", dir=library_tmpdir())
            out = os.fdopen(fd, "wb")
        while True:
            if sock is not None:
                try:
                    sock.settimeout(max(0.01, min(policy.read_timeout, remaining())))
                except OSError:  # the body is complete and the connection already released
                    sock = None
            try:
                chunk = raw.read1(_CHUNK) if hasattr(raw, "read1") else raw.read(_CHUNK)
            except MemoryError:
                raise
            except Exception as exc:  # urllib3 wraps socket errors in its own exception types
                if isinstance(exc, (socket.timeout, TimeoutError)) or "Timeout" in type(exc).__name__:
                    remaining()  # the deadline's message if that is what ran out
                    raise FetchTimeoutError(f"{media} source {name}: no data for {policy.read_timeout:g} s") from exc
                raise NetworkError(f"{media} source {name}: the download broke off: {exc}") from exc
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise SourceTooLargeError(
                    f"{media} source {name} is over the limit of {limit} bytes; download aborted "
                    f"(raise FetchPolicy.max_{media}_bytes)"
                )
            if out is not None:
                out.write(chunk)
            else:
                chunks.append(chunk)
            remaining()
        if total == 0:
            raise DecodeError(f"{media} source {name}: the server sent an empty body")
        if out is not None:
            out.close()
            out = None
            source = Source(name=name, path=path, is_temporary=True)
            path = None
            return source
        return Source(name=name, data=b"".join(chunks))
    finally:
        if out is not None:
            out.close()
        if path is not None:
            os.unlink(path)


def _socket_of(raw: Any) -> Optional[socket.socket]:
    """The socket under a urllib3 response, to bound every recv by the remaining deadline."""
    for attr in ("_connection", "connection"):
        conn = getattr(raw, attr, None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            return sock
    fp = getattr(raw, "_fp", None)
    inner = getattr(getattr(fp, "fp", None), "raw", None)
    return getattr(inner, "_sock", None)
