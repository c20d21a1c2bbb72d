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
import dataclasses
import io
import os
import re
import shutil
import stat
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Optional, Union

from .. import _cancel
from .._errors import (
    DecodeError,
    InvalidOptionError,
    NetworkError,
    SourceError,
    SourceNotAllowedError,
    SourceNotFoundError,
    SourceTooLargeError,
    describe,
)
from ._cache import cache_for
from ._http import ConnectionBroken, Transfer, bounded_call, check_scheme, request
from ._policy import FetchPolicy
from ._ranges import RangedFile
from ._stores import is_store_protocol, open_object

__all__ = ["Source", "local_special_file", "refuse_text_mode", "remote_host", "resolve_source", "sniff_media"]

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
    #: run at close (a remote file's prefetch threads and cache)
    closers: list = field(default_factory=list)
    #: the shared state behind ``opener`` when the source is read by range (to prefetch what a plan needs)
    ranged: Any = None

    def open(self, local: bool = False) -> Union[str, BinaryIO]:
        """What a decoder opens: a local path, or a new seekable binary file object. ``local=True`` is for a
        decoder that reads its input whole: a file read by range is first copied to a temporary file."""
        if local and self.path is None and self.opener is not None:
            self._copy_to_tempfile()
        if self.path is not None:
            return self.path
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.opener is not None:
            return self.opener()
        raise InvalidOptionError(f"{self.name} is a decoded object, not an encoded file")

    def _copy_to_tempfile(self) -> None:
        fd, path = tempfile.mkstemp(suffix=".media", dir=library_tmpdir())
        try:
            with os.fdopen(fd, "wb") as out, contextlib.closing(self.opener()) as f:
                shutil.copyfileobj(f, out, 1 << 20)
        except BaseException:
            os.unlink(path)
            raise
        self.path, self.is_temporary = path, True

    def will_need(self, ranges: list) -> None:
        """Byte ranges ``(start, end)`` a decoder is about to read, in order: a file read by range fetches them
        ahead, merged and in the background (a local file needs nothing)."""
        if self.ranged is not None and ranges:
            self.ranged.prefetch(ranges)

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
        while self.closers:
            self.closers.pop()()

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


#: ISO base media "ftyp" brands of still images (HEIF/HEIC: iPhone photos; AVIF) and their image sequences
HEIF_BRANDS = (
    *(b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"mif2", b"msf1"),
    *(b"avif", b"avis"),
)


def sniff_media(head: bytes) -> Optional[str]:
    """'image', 'video' or None, from the first bytes (never from a file name)."""
    if head[:4] == b"RIFF" and len(head) >= 12:
        return {b"WEBP": "image", b"AVI ": "video"}.get(head[8:12])
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "image" if brand in HEIF_BRANDS else "video"
    if head[4:8] in (b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "video"
    if head.startswith(_VIDEO_MAGIC) or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47):
        return "video"
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    return None


#: more video containers FFmpeg reads, beyond those sniff_media names (they say nothing of image vs video)
_MORE_VIDEO_MAGIC = (
    b"YUV4MPEG2",  # y4m
    b"DKIF",  # ivf (VP8/VP9/AV1)
    b"\x06\x0e\x2b\x34",  # mxf
    b".RMF",  # realmedia
    b"nut/multimedia",
    b"\x00\x00\x00\x01",  # H.264/HEVC Annex B elementary streams
    b"\x00\x00\x01",
    b"#EXTM3U",  # an HLS playlist
)


#: audio-only formats FFmpeg reads (an audio element's body may start like these; containers that also carry
#: video, such as MP4/M4A, Ogg, Matroska/WebM, ASF/WMA and MPEG-TS, are known as video)
_AUDIO_MAGIC = (
    b"ID3",  # MP3 (or AAC) with an ID3v2 tag
    b"fLaC",
    b"RF64",  # WAV over 4 GiB
    b"BW64",
    b"caff",
    b"#!AMR",
    b"wvpk",  # WavPack
    b"MAC ",  # Monkey's Audio
    b"TTA1",
    b"DSD ",
    b"FRM8",  # DSDIFF
    b".snd",  # Sun/NeXT AU
    b"MPCK",  # Musepack
    b"\x0bw",  # AC-3 / E-AC-3 sync word
    b"\x7f\xfe\x80\x01",  # DTS
)


def looks_like_audio(head: bytes) -> bool:
    """Do these first bytes start an audio-only format FFmpeg reads (WAV, AIFF, MP3, ADTS AAC, FLAC, ...)?"""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return True
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return True
    if head.startswith(_AUDIO_MAGIC):
        return True
    # an MPEG audio frame (MP1/2/3: sync, a layer) or an ADTS header (AAC: sync, layer 0), from the first byte
    return len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


def looks_like_media(head: bytes, media: str = "video") -> bool:
    """Could these first bytes start an image or video (or, for ``media`` "audio", a sound file) the library
    reads? False only when no format's signature matches: Pillow's own plugin checks for images, known
    container signatures for video and audio."""
    if sniff_media(head) is not None or head.startswith(_MORE_VIDEO_MAGIC):
        return True
    if media == "audio" and looks_like_audio(head):
        return True
    if len(head) > 192 and head[4] == 0x47 and head[196:197] in (b"G", b""):  # m2ts: 192-byte TS packets
        return True
    from PIL import Image

    Image.init()
    for _fmt, (_factory, accept) in list(Image.OPEN.items()):
        try:
            if accept is not None and accept(head):
                return True
        except Exception:  # a plugin's check that chokes on short input
            continue
    return False


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
    """Resolve one element value. ``media`` is "image", "video" or "audio" (read as a video is) and selects the
    byte limit. An already resolved :class:`Source` passes through as a borrowed view: closing it leaves the
    original open."""
    if isinstance(value, Source):
        return dataclasses.replace(value, is_temporary=False, closers=[])
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
    decoded = (
        "a 1-D numpy array of 16 kHz samples" if media == "audio" else "a PIL image, a numpy array or a torch tensor"
    )
    raise InvalidOptionError(
        f"cannot use {name} as an {media} source: give a path, file:// or http(s):// URL, data: URI, bytes, "
        f"a binary file object or {decoded}"
    )


def _resolve_string(value: str, media: str, policy: FetchPolicy) -> Source:
    name = describe(value)
    stripped = value.strip()
    scheme = stripped.split(":", 1)[0].lower() if ":" in stripped[:12] else ""
    if scheme in ("http", "https"):
        check_scheme(scheme, policy, name)
        with _cancel.network():
            return _fetch_http(stripped, media, policy)
    if scheme == "data":
        check_scheme(scheme, policy, name)
        data = _decode_data_uri(stripped, name)
        _check_bytes(len(data), media, policy, name)
        return Source(name=name, data=data)
    if scheme == "file":
        check_scheme(scheme, policy, name)
        parsed = urllib.parse.urlparse(stripped)
        if parsed.netloc not in ("", "localhost"):
            # file://relative/path is what 0.0.14 users write: keep it working as a relative path
            path = urllib.parse.unquote(parsed.netloc + parsed.path)
        else:
            path = urllib.parse.unquote(parsed.path)
        return _local(path, media, policy, name)
    url = _URL.match(stripped)
    if url and not os.path.exists(value):  # "a:b.png" may be a file name
        scheme = url.group(1).lower()
        if is_store_protocol(scheme):
            if scheme not in policy.allowed_schemes:
                raise SourceNotAllowedError(
                    f"{media} source {name}: the URL scheme {scheme!r} is not allowed by the fetch policy (allowed: "
                    f"{', '.join(policy.allowed_schemes)}); to read object stores, install the 'remote' extra and "
                    f"add {scheme!r} to FetchPolicy.allowed_schemes or QWENVL_ALLOWED_SCHEMES"
                )
            with _cancel.network():
                return _fetch_store(stripped, scheme, media, policy)
        raise SourceNotAllowedError(
            f"{media} source {name}: the URL scheme {scheme!r} is not supported; use http(s)://, file://, data:, "
            "an object store (s3://, gs://, hf://, ...) or a local path"
        )
    return _local(value, media, policy, name)


def remote_host(value: Any) -> Optional[str]:
    """``scheme://host:port`` of an element value read over the network (an http(s) or object-store URL), the key
    of its per-host limit; None for what is local or inline (paths, ``file:``, ``data:``, bytes, objects). The
    host in its one form, as the host lists match it (:func:`._hosts.parse_host`: every spelling of an address,
    a trailing dot, IDNA, case), the port explicit; every spelling of this machine (127.0.0.0/8, ``::1``,
    ``0.0.0.0``, ``localhost``) is one host, so no spelling of one server opens a lane of its own."""
    if isinstance(value, Source) or not isinstance(value, str):
        return None
    stripped = value.strip()
    url = _URL.match(stripped)
    if url is None:
        return None
    scheme = url.group(1).lower()
    if scheme not in ("http", "https") and (not is_store_protocol(scheme) or os.path.exists(value)):
        return None
    rest = stripped[url.end() :]
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1].lower()
    return f"{scheme}://{_lane_host(scheme, netloc)}"


#: the ports a scheme's URLs mean when they name none
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _lane_host(scheme: str, netloc: str) -> str:
    from ._hosts import embedded_ipv4, parse_host

    try:
        parts = urllib.parse.urlsplit(f"//{netloc}")
        host, port = parts.hostname or "", parts.port
    except ValueError:  # malformed (the fetch refuses it with a typed error): as written
        return netloc
    port = port if port is not None else _DEFAULT_PORTS.get(scheme)
    try:
        name, address = parse_host(host)
    except ValueError:
        return netloc
    if address is not None and getattr(address, "version", 4) == 6 and embedded_ipv4(address) is not None:
        address = embedded_ipv4(address)
        name = str(address)
    local = name == "localhost" or name.endswith(".localhost")
    if local or (address is not None and (address.is_loopback or address.is_unspecified)):
        name = "localhost"
    if ":" in name:
        name = f"[{name}]"
    return name if port is None else f"{name}:{port}"


#: ``scheme://``, as object-store URLs are written
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _check_bytes(n: int, media: str, policy: FetchPolicy, name: str) -> None:
    limit = policy.max_image_bytes if media == "image" else policy.max_video_bytes
    if n > limit:
        raise SourceTooLargeError(
            f"{media} source {name} is {n} bytes, over the limit of {limit} "
            f"(raise FetchPolicy.max_{media}_bytes or QWENVL_MAX_{media.upper()}_BYTES)"
        )


def _local(path: str, media: str, policy: FetchPolicy, name: str) -> Source:
    path, info = _checked_local(path, media, policy, name)
    if not stat.S_ISREG(info.st_mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise SourceError(
            f"{media} source {name} is {kind}, not a regular file: it has no size to check and opening it may wait "
            "for ever; read it yourself and pass the bytes or an open binary file object"
        )
    _check_bytes(info.st_size, media, policy, name)
    return Source(name=name, path=path)


def local_special_file(value: str, policy: FetchPolicy) -> Optional[str]:
    """The checked path of a local path or ``file:`` URI that names a FIFO, a character device or a socket
    (``/dev/stdin``, a named pipe): something read once as it comes, never probed or reopened. None for anything
    else (a regular file, a URL); a path the policy refuses raises as for any source."""
    stripped = value.strip()
    scheme = stripped.split(":", 1)[0].lower() if ":" in stripped[:12] else ""
    if scheme == "file":
        parsed = urllib.parse.urlparse(stripped)
        path = urllib.parse.unquote(
            parsed.netloc + parsed.path if parsed.netloc not in ("", "localhost") else parsed.path
        )
    elif (_URL.match(stripped) or scheme == "data") and not os.path.exists(value):
        return None  # a URL or a data: URI (which the path check took for a too long file name)
    else:
        path = value
    name = describe(value)
    path, info = _checked_local(path, "video", policy, name)
    return None if stat.S_ISREG(info.st_mode) else path


def path_within(root: str, path: str) -> Optional[str]:
    """``path`` (joined to ``root`` when relative) with its links followed, if it lies inside ``root`` (its links
    followed too); None when it leads out (``../``, an absolute path elsewhere, a symlink out)."""
    root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, path))
    return full if os.path.commonpath([root, full]) == root else None


def _checked_local(path: str, media: str, policy: FetchPolicy, name: str) -> tuple:
    """(path, its stat) for a local path the policy allows and that is not a directory."""
    if "\x00" in path:
        raise InvalidOptionError(f"{media} source {name}: a path cannot contain a NUL character")
    try:
        os.fsencode(path)
    except UnicodeError:  # a lone surrogate ("\ud800", as JSON can carry): no file can have this name
        raise InvalidOptionError(
            f"{media} source {name}: the path is not valid text (a lone surrogate); give a real file name"
        ) from None
    if not policy.allow_local:
        raise SourceNotAllowedError(f"{media} source {name}: local files are not allowed by the fetch policy")
    if policy.media_root is not None:
        full = path_within(policy.media_root, path)
        if full is None:
            root = os.path.realpath(policy.media_root)
            raise SourceNotAllowedError(f"{media} source {name} is outside the allowed media root {root}")
        path = full
    info = _stat(path, media, policy, name)
    if stat.S_ISDIR(info.st_mode):
        raise SourceError(f"{media} source {name} is a directory, not a file")
    return path, info


#: what base64 text looks like (a long path made of these alone is more likely data than a file name)
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def _stat(path: str, media: str, policy: FetchPolicy, name: str) -> os.stat_result:
    """``os.stat`` under the read timeout: a path on a mount that never answers fails instead of hanging."""
    why = f"the file system did not answer within {policy.read_timeout:g} s (FetchPolicy.read_timeout)"
    try:
        return bounded_call(Transfer(policy, media, name), policy.read_timeout, why, os.stat, path)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceNotFoundError(f"{media} source {name}: no such file{_base64_hint(path, media)}") from None
    except OSError as exc:  # a name too long, a parent directory it may not search: not found, as before
        hint = _base64_hint(path, media)
        raise SourceNotFoundError(f"{media} source {name}: no such file ({exc.strerror}){hint}") from exc


def _base64_hint(path: str, media: str) -> str:
    """What to do about a path that looks like base64 data given without its ``data:`` prefix."""
    if len(path) > 255 and _BASE64.fullmatch(path[:4096]):
        return f"; base64 data needs its data: prefix (data:{media}/...;base64,...)"
    return ""


def refuse_text_mode(f: Any, media: str, name: str) -> None:
    """A text-mode file object decodes the media's bytes as text (a raw UnicodeDecodeError, or mangled bytes):
    refused before reading, with what to do."""
    if isinstance(f, io.TextIOBase) or (isinstance(getattr(f, "mode", None), str) and "b" not in f.mode):
        raise InvalidOptionError(f"{media} source {name} is a text-mode file object; open it in binary mode ('rb')")


def _read_filelike(f: Any, media: str, policy: FetchPolicy, name: str) -> bytes:
    limit = policy.max_image_bytes if media == "image" else policy.max_video_bytes
    refuse_text_mode(f, media, name)
    try:
        data = f.read(limit + 1)
    except UnicodeDecodeError as exc:  # a text wrapper of another kind
        raise InvalidOptionError(
            f"{media} source {name} is a text-mode file object; open it in binary mode ('rb')"
        ) from exc
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

#: the first request for a remote video asks for this many bytes: enough to sniff it, and the whole of a
#: small file, so that only larger files are read by range
FIRST_BYTES = 1 << 20
#: bytes that decide whether a body looks like media (an MPEG-TS needs two 188-byte packets)
_SNIFF_BYTES = 512


def _fetch_http(url: str, media: str, policy: FetchPolicy) -> Source:
    """Images are fetched whole into memory. Videos are read by range when the server supports it (a seekable
    file object; only what the decoder touches is transferred), else streamed whole to a temporary file.
    With a media cache, what was fetched whole is kept, and reused after a conditional request says so."""
    name = describe(url)
    transfer = Transfer(policy, media, name)
    cache = cache_for(policy)
    entry = cache.lookup(url) if cache is not None else None
    headers = {"Range": f"bytes=0-{FIRST_BYTES - 1}"} if media != "image" else {}
    resp = request(url, transfer, {**headers, **(entry.conditional_headers() if entry else {})})
    if resp.status == 304:
        resp.close()
        hit = _from_cache(cache, entry, media, policy, name) if entry is not None else None
        if hit is not None:
            return hit
        resp = request(url, transfer, headers)  # the entry was damaged: fetch it again, unconditionally
    if resp.status == 206 and _range_total(resp) is None:  # a range of unknown length: ask for the whole body
        resp.close()
        resp = request(url, transfer)
    version = _Version.of(resp)  # every later part of the body must come from this version of the file
    try:
        total = _range_total(resp) if media != "image" else None
        if total is None:  # the whole body: no range support, or an image
            declared = resp.content_length
            if declared is not None and declared > transfer.limit:
                raise SourceTooLargeError(
                    f"{media} source {name} declares {declared} bytes, over the limit of {transfer.limit} "
                    f"(raise FetchPolicy.max_{media}_bytes)"
                )
            takes_ranges = (resp.header("accept-ranges") or "").strip().lower() == "bytes"
            reopen = _reopener(resp.url, transfer, takes_ranges, version)
            source = _stream_body(resp, media, name, reopen, policy.retries)
        else:
            first, broken = _read_first(resp, min(total, FIRST_BYTES))
            if broken is not None and policy.retries < 1:
                raise broken
    finally:
        resp.close()
    if total is not None:
        fetch = _range_fetcher(resp.url, transfer, version)
        if broken is not None:  # the first response broke off: the rest of the first bytes by range
            first += fetch(len(first), min(total, FIRST_BYTES))
        source = _ranged_source(name, media, total, fetch, first, transfer.abort)
    if cache is not None and source.opener is None and version.storable:  # fetched whole: kept as the version read
        try:
            cache.store(url, source.path, source.data, version.etag, version.last_modified)  # warns, never raises
        except BaseException:
            source.close()  # a whole video's temporary download
            raise
    return source


def _from_cache(cache: Any, entry: Any, media: str, policy: FetchPolicy, name: str) -> Optional[Source]:
    """A source from a cache entry the server confirmed (None if the entry turned out damaged)."""
    _check_bytes(entry.size, media, policy, name)
    if media == "image" or entry.size <= FIRST_BYTES:
        data = cache.read(entry)
        return None if data is None else Source(name=name, data=data)
    fd, path = tempfile.mkstemp(suffix=".media", dir=library_tmpdir())
    os.close(fd)
    copied = False
    try:
        copied = cache.copy_to(entry, path)
    finally:
        if not copied:
            os.unlink(path)
    return Source(name=name, path=path, is_temporary=True) if copied else None


def _ranged_source(
    name: str, media: str, size: int, fetch: Callable[[int, int], bytes], first: bytes, abort: Any = None
) -> Source:
    """A source over a remote file whose first bytes are in: in memory if that is all of it, else read by range
    (``abort`` stops the reads in flight when the source is closed)."""
    _refuse_unknown(first, media, name)
    if size <= len(first):
        return Source(name=name, data=first)
    shared = RangedFile(name, size, fetch, first, on_close=abort)
    return Source(name=name, opener=shared.reader, closers=[shared.close], ranged=shared)


def _fetch_store(url: str, scheme: str, media: str, policy: FetchPolicy) -> Source:
    """An object store's object: images whole, videos by range (see _stores)."""
    name = describe(url)
    transfer = Transfer(policy, media, name)
    size, fetch, validator = open_object(url, scheme, transfer)
    if size <= 0:
        raise DecodeError(f"{media} source {name} is empty")
    if media == "image":  # read whole: refused before a byte of it moves
        _check_bytes(size, media, policy, name)
    cache = cache_for(policy)
    entry = cache.lookup(url) if cache is not None and validator else None
    if entry is not None and entry.etag == validator:  # the store's current version is the one kept
        hit = _from_cache(cache, entry, media, policy, name)
        if hit is not None:
            return hit
    first = fetch(0, size if media == "image" else min(size, FIRST_BYTES))
    source = _ranged_source(name, media, size, fetch, first)
    if cache is not None and source.data is not None:
        cache.store(url, None, source.data, validator, None)
    return source


def _range_total(resp: Any) -> Optional[int]:
    """The file's size from a 206's Content-Range, or None when the server sent something else."""
    if resp.status != 206:
        return None
    value = resp.header("content-range") or ""
    unit, _, spec = value.partition(" ")
    first, _, total = spec.partition("/")
    if unit.strip().lower() != "bytes" or not total.strip().isdigit() or not first.startswith("0-"):
        return None
    return int(total)


def _read_all(resp: Any, most: int) -> bytes:
    chunks: list = []
    _read_into(resp, most, chunks)
    return b"".join(chunks)


def _read_into(resp: Any, most: int, chunks: list) -> None:
    """Up to ``most`` bytes of the body into ``chunks`` (what came stays there if the body breaks off)."""
    n = 0
    while n < most:
        chunk = resp.read(min(1 << 16, most - n))
        if not chunk:
            return
        chunks.append(chunk)
        n += len(chunk)


def _read_first(resp: Any, most: int) -> tuple[bytes, Optional[ConnectionBroken]]:
    """(the first ``most`` bytes of a body, or those that came before it broke off; how it broke off)."""
    chunks: list = []
    try:
        _read_into(resp, most, chunks)
    except ConnectionBroken as exc:
        return b"".join(chunks), exc
    return b"".join(chunks), None


@dataclass
class _Version:
    """Which version of a remote file the first response came from: its validators and, for a range, its size.
    Every later range (and a resumed body) must come from the same version: a file that changes between reads
    would otherwise be spliced, frames from two versions."""

    etag: Optional[str]
    last_modified: Optional[str]
    size: Optional[int]
    cache_control: str = ""

    @classmethod
    def of(cls, resp: Any) -> _Version:
        return cls(resp.header("etag"), resp.header("last-modified"), _range_total(resp), _cache_control(resp))

    @property
    def storable(self) -> bool:
        """May a shared cache keep it? Not when the server said ``no-store`` or ``private``."""
        return not {"no-store", "private"} & {d.split("=")[0].strip() for d in self.cache_control.split(",")}

    def if_range(self) -> dict:
        """An ``If-Range`` header: a server that honours it answers a changed file whole (200), not by range."""
        if self.etag and not self.etag.startswith("W/"):
            return {"If-Range": self.etag}
        return {"If-Range": self.last_modified} if self.last_modified else {}

    def changed(self, resp: Any) -> Optional[str]:
        """How ``resp`` shows another version of the file, or None."""
        etag, modified = resp.header("etag"), resp.header("last-modified")
        if self.etag and etag and etag != self.etag:
            return f"its ETag went from {self.etag} to {etag}"
        if self.last_modified and modified and modified != self.last_modified:
            return f"its Last-Modified went from {self.last_modified} to {modified}"
        total = (resp.header("content-range") or "").rpartition("/")[2].strip()
        if self.size is not None and resp.status == 206 and total.isdigit() and int(total) != self.size:
            return f"its size went from {self.size} to {total} bytes"
        return None

    def restarted(self, resp: Any) -> None:
        """The body is read again from the start: what is kept is this response's version."""
        self.etag, self.last_modified = resp.header("etag"), resp.header("last-modified")
        self.cache_control = _cache_control(resp)


def _cache_control(resp: Any) -> str:
    return (resp.header("cache-control") or "").lower()


def _changed_error(name: str, why: str) -> NetworkError:
    return NetworkError(
        f"video source {name} changed while it was read ({why}): its parts cannot be put together; fetch it again"
    )


def _range_fetcher(url: str, transfer: Transfer, version: _Version) -> Callable[[int, int], bytes]:
    """fetch(start, end) -> bytes [start, end) by range requests, each from the first response's version of the
    file (else a NetworkError that says it changed); a body that breaks off resumes where it stopped (up to
    ``FetchPolicy.retries`` times)."""

    def fetch(start: int, end: int) -> bytes:
        got = bytearray()
        resumes = 0
        while len(got) < end - start:
            lo = start + len(got)
            try:
                headers = {"Range": f"bytes={lo}-{end - 1}", **version.if_range()}
                with request(url, transfer, headers) as resp:
                    why = version.changed(resp)
                    if why is None and resp.status == 200 and version.if_range():
                        why = "the server answers If-Range with the whole body"
                    if why is not None:
                        raise _changed_error(transfer.name, why)
                    served = (resp.header("content-range") or "").partition(" ")[2].partition("-")[0]
                    if resp.status != 206 or served.strip() != str(lo):
                        raise NetworkError(
                            f"video source {transfer.name}: the server stopped honouring range requests "
                            f"(HTTP {resp.status} for bytes {lo}-{end - 1}); the file may have changed"
                        )
                    while len(got) < end - start:
                        chunk = resp.read(min(1 << 16, end - start - len(got)))
                        if not chunk:
                            break
                        got += chunk
            except ConnectionBroken:
                if resumes >= transfer.policy.retries:
                    raise
                resumes += 1
                continue
            if len(got) < end - start and resumes >= transfer.policy.retries:
                raise NetworkError(
                    f"video source {transfer.name}: the server sent fewer bytes than the range asked for "
                    f"({lo}-{end - 1}); the file may have changed while it was read"
                )
            resumes += len(got) < end - start
        return bytes(got)

    return fetch


def _refuse_unknown(head: bytes, media: str, name: str) -> None:
    """A body that starts like no format the library reads is refused now, not after the rest."""
    if head and not looks_like_media(head, media):
        kinds = "audio or video" if media == "audio" else "image or video"
        raise DecodeError(
            f"{media} source {name} does not start like any {kinds} format (first bytes "
            f"{head[:12]!r}); check the URL (an HTML error page?)"
        )


def _stream_body(resp: Any, media: str, name: str, reopen: Optional[Callable] = None, retries: int = 0) -> Source:
    """Read the whole body chunk by chunk, aborting as soon as a limit is crossed. Videos go to a temporary file.
    A body that breaks off is resumed (``reopen(offset) -> (response, resumed)``: from where it stopped when the
    server takes ranges, else from the start), up to ``retries`` times."""
    out = None
    chunks: list = []
    total = 0
    path = None
    reopened = None
    broken = 0
    try:
        if media != "image":
            fd, path = tempfile.mkstemp(suffix=".media", dir=library_tmpdir())
            out = os.fdopen(fd, "wb")
        head = b""
        while True:
            try:
                chunk = resp.read(_CHUNK)
            except ConnectionBroken:
                if reopen is None or broken >= retries:
                    raise
                broken += 1
                if reopened is not None:
                    reopened.close()
                reopened, resumed = reopen(total)
                resp = reopened
                if not resumed:  # the server restarted the body: drop what came before
                    total, head, chunks = 0, b"", []
                    if out is not None:
                        out.seek(0)
                        out.truncate()
                continue
            if not chunk:
                break
            if len(head) < _SNIFF_BYTES:
                head += chunk[: _SNIFF_BYTES - len(head)]
                if len(head) >= _SNIFF_BYTES or (len(head) >= 32 and 0x47 not in head[:5]):  # not MPEG-TS
                    _refuse_unknown(head, media, name)
            total += len(chunk)
            if out is not None:
                _write_download(out, chunk, media, name)
            else:
                chunks.append(chunk)
        if total == 0:
            raise DecodeError(f"{media} source {name}: the server sent an empty body")
        _refuse_unknown(head, media, name)
        if out is not None:
            _write_download(out, None, media, name)  # the flush at close can fail on a full disk too
            out = None
            source = Source(name=name, path=path, is_temporary=True)
            path = None
            return source
        return Source(name=name, data=b"".join(chunks))
    finally:
        if reopened is not None:
            reopened.close()
        if out is not None:
            out.close()
        if path is not None:
            os.unlink(path)


def _write_download(out: BinaryIO, chunk: Optional[bytes], media: str, name: str) -> None:
    """Write a downloaded chunk (None: close the file); a full disk or a file size limit is a typed error."""
    try:
        if chunk is None:
            out.close()
        else:
            out.write(chunk)
    except OSError as exc:
        raise SourceError(
            f"{media} source {name}: writing the download to {library_tmpdir()} failed ({exc.strerror or exc}); "
            "free space there, or point TMPDIR at a larger disk"
        ) from exc


def _reopener(url: str, transfer: Transfer, ranges: bool, version: _Version) -> Callable[[int], tuple]:
    """reopen(offset) -> (response, resumed): the rest of the body from ``offset`` if the server takes ranges (a
    206 starting there, of the same version of the file), else the whole body again from the start (a file that
    changed since is read whole, never spliced onto the first part)."""

    def reopen(offset: int) -> tuple:
        if ranges and offset:
            resp = request(url, transfer, {"Range": f"bytes={offset}-", **version.if_range()})
            served = (resp.header("content-range") or "").partition(" ")[2].partition("-")[0]
            if resp.status == 206 and served.strip() == str(offset) and version.changed(resp) is None:
                return resp, True
            resp.close()
        resp = request(url, transfer)
        version.restarted(resp)
        return resp, False

    return reopen
