"""Object stores (``s3://``, ``gs://``, ``hf://`` and every other fsspec protocol) as image and video sources.

Optional: needs the ``remote`` extra (fsspec and its S3, GCS and Hugging Face filesystems). Credentials and
endpoints come from each filesystem's own standard configuration (environment variables, config files), never
from the library. A protocol must be in the fetch policy's ``allowed_schemes``: none is by default.

Objects are read exactly like HTTP sources: images whole, videos by range behind a seekable file object
(:class:`~._ranges.RangedFile`), under one :class:`~._http.Transfer` (bytes received against the byte limit,
network time against the deadline, cancellation between reads).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Any, Callable, Optional

from .._errors import (
    FetchTimeoutError,
    InvalidOptionError,
    NetworkError,
    QwenVLError,
    SourceError,
    SourceNotAllowedError,
    SourceNotFoundError,
)
from ._http import Transfer, bounded_call, check_host, resolve

__all__ = ["is_store_protocol", "open_object"]

#: the protocols the remote extra brings; any other protocol fsspec knows works too when its package is there
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}
_HINT = "pip install 'qwen-vl-utils[remote]'"
PIECE = 4 << 20  # bytes per store call


def is_store_protocol(scheme: str) -> bool:
    """Could fsspec read this protocol (known to it, whether or not its package is installed)?"""
    if scheme in _PACKAGES:
        return True
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return False
    return scheme in known_implementations or scheme in registry


def _check_host(fs_class: Any, url: str, scheme: str, transfer: Transfer) -> None:
    """A protocol whose URL carries a network host (ftp://, sftp://, smb://, webhdfs://: its filesystem reads
    ``host`` from the URL) goes through the fetch policy as HTTP does: allowed and denied hosts, and with
    ``block_private_networks`` the addresses the host resolves to. Buckets and repositories (s3://, gs://,
    hf://) name no host: their endpoints come from their own configuration."""
    try:
        kwargs = fs_class._get_kwargs_from_urls(url)
    except Exception as exc:  # a filesystem's own URL parser, on a URL it cannot read
        raise InvalidOptionError(f"malformed {scheme}:// URL {transfer.name}: {exc}") from exc
    host = kwargs.get("host") if isinstance(kwargs, dict) else None
    if not host:
        return
    port = kwargs.get("port")
    check_host(str(host), transfer.policy, transfer.name)
    resolve(str(host), int(port) if isinstance(port, int) else 0, transfer.policy, transfer.name, transfer)


def _filesystem(url: str, scheme: str, transfer: Transfer) -> tuple:
    """The filesystem and path of ``url``; a filesystem that connects when it is made (ftp, sftp) does so under
    the transfer's clock, its failures typed like every store call's."""
    name = transfer.name
    try:
        import fsspec
    except ImportError as exc:
        raise InvalidOptionError(f"{name}: {scheme}:// sources need fsspec: {_HINT}") from exc
    try:
        fs_class = fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package = _PACKAGES.get(scheme, "the filesystem package for this protocol")
        raise InvalidOptionError(f"{name}: {scheme}:// sources need {package}: {_HINT}") from exc
    except ValueError as exc:
        raise InvalidOptionError(f"{name}: no filesystem for {scheme}:// ({exc})") from exc
    _check_host(fs_class, url, scheme, transfer)

    def make() -> tuple:
        try:
            return fsspec.core.url_to_fs(url)
        except (ValueError, TypeError) as exc:
            raise InvalidOptionError(f"malformed {scheme}:// URL {name}: {exc}") from exc

    return _call(transfer, make)


def _call(transfer: Transfer, what: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One store call under the transfer's clock, its failures as the library's typed errors."""
    transfer.remaining()
    transfer.begin()
    try:
        why = f"the store did not answer within {transfer.policy.read_timeout:g} s (FetchPolicy.read_timeout)"
        return bounded_call(transfer, transfer.policy.read_timeout, why, what, *args, **kwargs)
    except QwenVLError:
        raise
    except FileNotFoundError as exc:
        raise SourceNotFoundError(
            f"{transfer.media} source {transfer.name}: no such object or bucket ({exc}); check the URL"
        ) from exc
    except PermissionError as exc:
        raise SourceNotAllowedError(
            f"{transfer.media} source {transfer.name}: the store denied access ({exc}); check the credentials in "
            "its standard configuration (environment variables, config files)"
        ) from exc
    except TimeoutError as exc:
        raise FetchTimeoutError(f"{transfer.media} source {transfer.name}: the store timed out ({exc})") from exc
    except Exception as exc:  # whatever the filesystem raises: network, protocol, service errors
        raise NetworkError(
            f"{transfer.media} source {transfer.name}: reading from the store failed ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        transfer.end()
        transfer.remaining()  # the deadline's error if this call used the rest of it


def _pinned_reader(fs: Any, path: str, etag: Optional[str], transfer: Transfer) -> Callable[..., bytes]:
    """Ranged reads of the version the object had when it was looked up (ETag ``etag``): s3fs's file object
    sends every range with ``If-Match: <ETag>``, so a range of an object replaced meanwhile fails (412) instead
    of splicing two versions, and that failure is a typed error saying the object changed. Opened on the first
    read (a cached copy needs none)."""
    lock = threading.Lock()
    opened: list = []

    def changed(why: str) -> NetworkError:
        return NetworkError(
            f"{transfer.media} source {transfer.name} changed while it was read ({why}): its parts cannot be put "
            "together; fetch it again"
        )

    def handle() -> Any:
        with lock:
            if not opened:
                f = fs.open(path, "rb", cache_type="none")  # (read-only: it holds no connection)
                now = f.details.get("ETag")
                if etag is not None and now != etag:
                    raise changed(f"its ETag went from {etag} to {now}")
                opened.append(f if f.read_kw.get("IfMatch") else None)
            return opened[0]

    def read(start: int, end: int) -> bytes:
        f = handle()
        if f is None:  # no ETag to pin: plain ranged reads
            return fs.cat_file(path, start=start, end=end)
        try:
            return f._fetch_range(start, end)
        except OSError as exc:
            if type(exc).__name__ != "FileExpired":
                raise
            raise changed(f"its ETag is no longer {etag}") from exc

    return read


def open_object(url: str, scheme: str, transfer: Transfer) -> tuple:
    """``(size, fetch, validator)`` for an object: its size, ``fetch(start, end) -> bytes`` by ranged reads, and
    its ETag (or modification time) to validate a cached copy with, when the store gives one."""
    package = _PACKAGES.get(scheme)
    if package is not None and importlib.util.find_spec(package) is None:
        raise InvalidOptionError(f"{transfer.name}: {scheme}:// sources need {package}: {_HINT}")
    fs, path = _filesystem(url, scheme, transfer)
    info = _call(transfer, fs.info, path)
    if info.get("type") == "directory":
        raise SourceError(f"{transfer.media} source {transfer.name} is a directory, not an object")
    size = int(info.get("size") or 0)
    etag = info.get("ETag") or info.get("etag")
    if scheme in ("s3", "s3a") and hasattr(fs, "version_aware"):  # s3fs
        read = _pinned_reader(fs, path, None if etag is None else str(etag), transfer)
    else:
        read = functools.partial(fs.cat_file, path)

    def fetch(start: int, end: int) -> bytes:
        """In pieces of at most PIECE bytes, so that the deadline, the byte limit and a cancellation are checked
        between them (a single store call cannot be interrupted)."""
        parts = []
        for lo in range(start, end, PIECE):
            data = _call(transfer, read, start=lo, end=min(end, lo + PIECE))
            transfer.add(len(data))
            parts.append(data)
        return b"".join(parts)

    validator = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return size, fetch, None if validator is None else str(validator)
