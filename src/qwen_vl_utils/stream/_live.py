"""Sources for :func:`~qwen_vl_utils.stream.stream_video`: seekable files, and live byte streams read once.

:func:`open_input` turns an element's ``video`` value into a :class:`StreamInput`: either a resolved
:class:`~qwen_vl_utils.sources._resolve.Source` (anything seekable: paths, URLs read by range, object stores,
bytes, seekable file objects), which is probed and then decoded in one pass, or a non-seekable *reader* that
FFmpeg demuxes as the bytes arrive:

- :class:`PipeReader`: a binary file object or pipe (MPEG-TS, fragmented MP4, Matroska, ...);
- :class:`BodyReader`: the body of an HTTP response from a server without range support;
- :class:`HlsReader`: an HLS playlist, polled while a live encoder writes it, its segments fetched in order;
- :class:`UdpReader`: MPEG-TS datagrams on ``udp://HOST:PORT`` (only when the fetch policy allows ``udp``).

Every reader raises the library's typed errors naming the source: :class:`FetchTimeoutError` when no byte
arrives for the policy's ``read_timeout``, and stops at once (``Cancelled``) when its token is cancelled, which
is how closing a stream unblocks the thread that demuxes it. HTTP goes through ``sources._http.request`` only
(the fetch policy checks every hop); FFmpeg never sees a URL.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import io
import ipaddress
import logging
import os
import queue
import select
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional

from .._cancel import Cancelled, Token
from .._errors import (
    DecodeError,
    FetchTimeoutError,
    InvalidOptionError,
    NetworkError,
    QwenVLError,
    SourceError,
    describe,
)
from ..sources._http import Transfer, check_host, check_scheme, request
from ..sources._policy import FetchPolicy
from ..sources._resolve import (
    FIRST_BYTES,
    Source,
    _range_fetcher,
    _range_total,
    _ranged_source,
    _read_all,
    _refuse_unknown,
    _Version,
    local_special_file,
    refuse_text_mode,
    resolve_source,
)

__all__ = ["BodyReader", "HlsReader", "PipeReader", "StreamInput", "UdpReader", "open_input"]

logger = logging.getLogger("qwen_vl_utils")

#: how often a blocked read looks at its token (seconds): closing a stream takes at most about this long
TICK = 0.1
#: bytes kept of a live stream's start, to explain a container FFmpeg cannot demux without seeking
HEAD_BYTES = 1 << 16
#: at most this many bytes of a playlist (a hostile server could send an endless "playlist")
MAX_PLAYLIST_BYTES = 16 << 20
#: datagrams received but not yet demuxed, at most (a consumer slower than the feed loses the oldest)
UDP_BUFFER_BYTES = 64 << 20


@dataclass
class StreamInput:
    """What a stream decodes: a seekable ``source`` (probed, then read in one pass) or a live ``reader``."""

    name: str
    source: Optional[Source] = None
    reader: Any = None
    #: FFmpeg's container name when the bytes cannot be probed reliably (UDP carries MPEG-TS)
    format: Optional[str] = None
    #: a file this input opened itself (a named pipe given by path), closed with it
    owned: Any = None

    @property
    def live(self) -> bool:
        return self.reader is not None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.source is not None:
            self.source.close()
        if self.owned is not None:
            self.owned.close()


def _scheme(value: str) -> str:
    stripped = value.strip()
    return stripped.split(":", 1)[0].lower() if "://" in stripped[:12] else ""


def check_source(value: Any, policy: FetchPolicy) -> None:
    """What can be refused before anything is opened: a URL scheme the policy does not allow, a bad udp:// URL."""
    if isinstance(value, str):
        scheme = _scheme(value)
        if scheme == "udp":
            parse_udp(value.strip(), policy)
        elif scheme in ("http", "https"):
            check_scheme(scheme, policy, describe(value))
        elif scheme in FFMPEG_PROTOCOLS:
            _check_protocol_url(value.strip(), scheme, policy)


def open_input(value: Any, policy: FetchPolicy, token: Token) -> StreamInput:
    """Resolve one element value for streaming. Network and pipe reads observe ``token``."""
    name = describe(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        scheme = _scheme(value)
        if scheme == "udp":
            return StreamInput(name, reader=UdpReader(value.strip(), policy, token), format="mpegts")
        if scheme in FFMPEG_PROTOCOLS:
            _check_protocol_url(value.strip(), scheme, policy)
            return StreamInput(name, reader=ProtocolReader(value.strip(), scheme, policy))
        if scheme in ("http", "https"):
            check_scheme(scheme, policy, name)
            return _open_http(value.strip(), policy, token)
        special = local_special_file(value, policy)
        if special is not None:  # a named pipe, /dev/stdin: read once as the bytes come, like "-"
            f = _open_special(special, name, policy, token)
            return StreamInput(name, reader=PipeReader(f, name, policy.read_timeout, token), owned=f)
        source = resolve_source(value, "video", policy)
        if _is_playlist(source.head(64)):
            source.close()
            raise InvalidOptionError(
                f"video source {name} is an HLS playlist on disk: serve its folder over HTTP and give the "
                "playlist's http(s) URL (HLS is followed over HTTP, under the fetch policy)"
            )
        return StreamInput(name, source=source)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return StreamInput(name, source=resolve_source(value, "video", policy))
    if hasattr(value, "read") and not isinstance(value, (list, tuple)):
        refuse_text_mode(value, "video", name)
        if isinstance(getattr(value, "name", None), int):  # a pipe or descriptor: say which
            name = f"<{type(value).__name__} on file descriptor {value.name}>"
        if _seekable(value):
            return StreamInput(name, source=Source(name=name, opener=_Views(value).open))
        return StreamInput(name, reader=PipeReader(value, name, policy.read_timeout, token))
    raise InvalidOptionError(
        f"stream_video needs an encoded video: a path, file:// or http(s):// URL, data: URI, bytes, a binary file "
        f"object or pipe, an HLS playlist URL or udp://HOST:PORT; got {name}. For a list of frames or a decoded "
        "array, use fetch_video"
    )


def _open_special(path: str, name: str, policy: FetchPolicy, token: Token) -> Any:
    """Open a named pipe or device for reading. Opening a FIFO waits for a writer: that wait is bounded by
    ``connect_timeout`` (a source that has not started yet) and by the stream's close, on a helper thread that
    is then released by opening the FIFO for writing for a moment (no thread stays blocked)."""
    got: dict = {}
    done = threading.Event()

    def opener() -> None:
        try:
            got["file"] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with the stream's input
        except BaseException as exc:
            got["error"] = exc
        finally:
            done.set()

    threading.Thread(target=opener, name="qwen-vl-stream-open", daemon=True).start()
    until = time.monotonic() + policy.connect_timeout
    while not done.wait(TICK):
        if token.cancelled or time.monotonic() >= until:
            with contextlib.suppress(OSError):  # be the writer for a moment: the blocked open returns
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            done.wait(5)
            if "file" in got:
                got["file"].close()
            if token.cancelled:
                raise Cancelled(f"video source {name}: the stream was closed")
            raise FetchTimeoutError(
                f"video source {name}: nothing opened the named pipe for writing within {policy.connect_timeout:g} s "
                "(FetchPolicy.connect_timeout); start the writer first, or raise the timeout"
            )
    if "error" in got:
        raise SourceError(f"video source {name} could not be opened: {got['error']}") from got["error"]
    return got["file"]


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable()) and hasattr(f, "seek")
    except Exception:  # a closed file, an object whose seekable() is not implemented
        return False


class _Views:
    """Independent readers over one seekable file object the caller gave: each keeps its own position, and
    puts the shared object there before every read (the probe and the decoder open it one after the other)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.origin = f.tell()
        self.lock = threading.Lock()

    def open(self) -> _View:
        return _View(self)


class _View:
    def __init__(self, views: _Views) -> None:
        self.views = views
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        with self.views.lock:
            self.views.f.seek(self.views.origin + self.pos)
            data = self.views.f.read(n)
        if isinstance(data, str):
            raise InvalidOptionError("the video file object is in text mode; open it in binary mode ('rb')")
        self.pos += len(data)
        return bytes(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == os.SEEK_END:
            with self.views.lock:
                end = self.views.f.seek(0, os.SEEK_END)
            offset += end - self.views.origin
        elif whence == os.SEEK_CUR:
            offset += self.pos
        self.pos = max(0, offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass  # the caller's object stays open: it is theirs


# --- the common part of live readers --------------------------------------------------------------------------


class _LiveReader:
    """A non-seekable binary reader (no ``seek`` attribute, so FFmpeg demuxes it as a stream)."""

    def __init__(self, name: str, read_timeout: float, token: Token) -> None:
        self.name = name
        self.read_timeout = read_timeout
        self.token = token
        self.bytes_read = 0
        self.head = b""
        self._closed = False
        self._failed = False
        self._ended = False

    def read(self, n: int = 1 << 16) -> bytes:
        if self._failed or self._ended:  # FFmpeg reads again after an error or the end: the end again, so
            return b""  # PyAV raises the first error and prints no "exception being dropped" traceback
        try:
            if self._closed or self.token.cancelled:
                raise Cancelled(f"video source {self.name}: the stream was closed")
            data = self._read(max(1, n))
        except BaseException:
            self._failed = True
            raise
        if not data:
            self._ended = True  # remembered: a source that ended is not waited on again
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
            refuse_unseekable_mp4(self.head, self.name)
        self.bytes_read += len(data)
        return data

    def _read(self, n: int) -> bytes:
        raise NotImplementedError

    #: a source that may not have started yet (a UDP listener opened before its encoder, an HLS playlist not
    #: yet written) waits this long for its first data: the policy's connect_timeout; None: read_timeout
    first_wait: Optional[float] = None
    started = False  # its first data came

    def limit(self) -> float:
        """How long the source may send nothing: ``first_wait`` until its first data, then the read timeout."""
        return self.read_timeout if self.started or self.first_wait is None else self.first_wait

    def stalled(self, since: float) -> FetchTimeoutError:
        if not self.started and self.first_wait is not None:
            return FetchTimeoutError(
                f"video source {self.name}: nothing came in {time.monotonic() - since:.1f} s since it was opened "
                f"(a source is waited for to start up to the connect timeout, {self.first_wait:g} s: "
                "FetchPolicy.connect_timeout or QWENVL_CONNECT_TIMEOUT); is its sender running?"
            )
        return FetchTimeoutError(
            f"video source {self.name}: no data for {time.monotonic() - since:.1f} s (the read timeout is "
            f"{self.read_timeout:g} s: FetchPolicy.read_timeout or QWENVL_READ_TIMEOUT); the stream stalled"
        )

    def close(self) -> None:
        self._closed = True


class PipeReader(_LiveReader):
    """A binary file object or pipe, read as bytes arrive. With a file descriptor, reads wait in ``select``
    (so closing the stream and the stall timeout work at once); without one, a helper thread does the blocking
    reads (closing then stops at that read's return)."""

    def __init__(self, f: Any, name: str, read_timeout: float, token: Token) -> None:
        super().__init__(name, read_timeout, token)
        f, self._rest = _unbuffered(f)
        self.f = f
        self.fd = _selectable_fd(f)
        self._pump: Optional[_Pump] = None if self.fd is not None else _Pump(f, name, token)

    def _read(self, n: int) -> bytes:
        if self._rest:
            data, self._rest = self._rest[:n], self._rest[n:]
            return data
        if self._pump is not None:
            data = self._pump.get(self)
        else:
            self._wait_readable()
            data = self._read_some(max(n, 1 << 16))
        data, self._rest = data[:n], data[n:]
        return data

    def _wait_readable(self) -> None:
        since = time.monotonic()
        while True:
            if self.token.cancelled or self._closed:
                raise Cancelled(f"video source {self.name}: the stream was closed")
            left = since + self.read_timeout - time.monotonic()
            if left <= 0:
                raise self.stalled(since)
            if select.select([self.fd], [], [], min(TICK, left))[0]:
                return

    def _read_some(self, n: int) -> bytes:
        try:  # read1: at most one system call, so a readable pipe never blocks here
            data = self.f.read1(n) if hasattr(self.f, "read1") else self.f.read(n)
        except OSError as exc:
            raise SourceError(f"video source {self.name} could not be read: {exc}") from exc
        return _as_bytes(data, self.name)

    def close(self) -> None:
        super().close()
        if self._pump is not None:
            self._pump.stop()


def _unbuffered(f: Any) -> tuple:
    """``(raw file, bytes already buffered)`` for a buffered reader over a pipe, file or socket (the stream is
    its only reader from now on), so that waiting in ``select`` sees every byte; other objects as they are."""
    raw = getattr(f, "raw", None)
    if not isinstance(f, io.BufferedReader) or not isinstance(raw, (io.FileIO, socket.SocketIO)):
        return f, b""
    try:
        fd = raw.fileno()
        blocking = os.get_blocking(fd)
    except (OSError, ValueError):
        return f, b""
    try:
        os.set_blocking(fd, False)
        pending = f.read1(1 << 20)  # what the buffer holds (and at most one read that cannot block)
    except BlockingIOError:
        pending = b""
    finally:
        with contextlib.suppress(OSError):
            os.set_blocking(fd, blocking)
    return raw, bytes(pending or b"")


def _selectable_fd(f: Any) -> Optional[int]:
    """A descriptor to wait on in ``select``, only where a readable descriptor means readable bytes: a raw file,
    pipe or socket. Anything with its own buffer (an HTTP response, a text wrapper) is read on a helper thread."""
    if not isinstance(f, (io.FileIO, socket.SocketIO)):
        return None
    try:
        fd = f.fileno()
        select.select([fd], [], [], 0)
    except Exception:  # no descriptor (io.BytesIO, a custom object), or one select cannot wait on
        return None
    return fd


def _as_bytes(data: Any, name: str) -> bytes:
    if isinstance(data, str):
        raise InvalidOptionError(f"video source {name} is a text-mode file; open it in binary mode ('rb')")
    if data is None:  # a non-blocking file with nothing to read yet
        return b""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidOptionError(f"video source {name}: read() returned {type(data).__name__}, not bytes")
    return bytes(data)


class _Pump:
    """Blocking reads of a file object without a descriptor, on a daemon thread, into a small queue."""

    def __init__(self, f: Any, name: str, token: Token) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.token = token
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(f, name), name="qwen-vl-stream-pump", daemon=True)
        self.thread.start()

    def _run(self, f: Any, name: str) -> None:
        while not self._stop.is_set():
            try:
                item: Any = _as_bytes(f.read(1 << 16), name)
            except BaseException as exc:  # handed to the reader, which raises it
                item = (
                    exc
                    if isinstance(exc, (Cancelled, InvalidOptionError))
                    else SourceError(f"video source {name} could not be read: {exc}")
                )
            while not self._stop.is_set():
                try:
                    self.queue.put(item, timeout=TICK)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def get(self, reader: _LiveReader) -> bytes:
        since = time.monotonic()
        while True:
            if self.token.cancelled:
                raise Cancelled(f"video source {reader.name}: the stream was closed")
            try:
                item = self.queue.get(timeout=TICK)
            except queue.Empty:
                if time.monotonic() - since >= reader.read_timeout:
                    raise reader.stalled(since) from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def stop(self) -> None:
        self._stop.set()


# --- HTTP ---------------------------------------------------------------------------------------------------------


def _open_http(url: str, policy: FetchPolicy, token: Token) -> StreamInput:
    """A video URL: read by range when the server supports it (a seekable source, like fetch_video's), else the
    body as it arrives; an HLS playlist is followed segment by segment."""
    name = describe(url)
    transfer = Transfer(policy, "video", name)
    resp = _first_response(url, transfer, token)
    try:
        total = _range_total(resp)
        head = _read_all(resp, FIRST_BYTES if total is not None else 512)
        if _is_playlist(head):
            if total is None:
                head += _read_all(resp, MAX_PLAYLIST_BYTES)
            first = _text(head, name) if total is None or total <= len(head) else None  # else fetched whole
            return StreamInput(name, reader=HlsReader(resp.url, policy, token, name, first=first))
        if total is not None:
            fetch = _range_fetcher(resp.url, transfer, _Version.of(resp))  # every range from this version
            return StreamInput(name, source=_ranged_source(name, "video", total, fetch, head))
        _refuse_unknown(head, "video", name)
        resp.transfer.live()  # a body read as it comes may be live: no total deadline (stalls: read timeout)
        reader, resp = BodyReader(resp, name, token, head), None
        return StreamInput(name, reader=reader)
    finally:
        if resp is not None:
            resp.close()


#: segments whose stream offsets an HLS reader remembers (the demuxer reads a few ahead of the decoder)
MARKS_KEPT = 64
#: seconds between asks for an HLS playlist that is not there yet
PLAYLIST_RETRY = 0.25


def _first_response(url: str, transfer: Transfer, token: Token) -> Any:
    """The first bytes of ``url``. A playlist URL (``.m3u8``) that is not there yet (404: the packager has not
    written it; a stream about to start) is asked for again until the policy's connect_timeout."""
    policy = transfer.policy
    waits = urllib.parse.urlsplit(url).path.lower().endswith((".m3u8", ".m3u"))
    start = time.monotonic()
    while True:
        try:
            return request(url, transfer, {"Range": f"bytes=0-{FIRST_BYTES - 1}"})
        except NetworkError as exc:
            waited = time.monotonic() - start
            missing = getattr(exc, "status", None) == 404
            if not waits or not missing or waited + PLAYLIST_RETRY > policy.connect_timeout:
                if waits and missing and waited > 0:
                    raise NetworkError(
                        f"{exc} (the playlist did not appear within the connect timeout, {policy.connect_timeout:g} "
                        "s: FetchPolicy.connect_timeout or QWENVL_CONNECT_TIMEOUT)"
                    ) from None
                raise
        if token.event.wait(PLAYLIST_RETRY):
            raise Cancelled(f"video source {transfer.name}: the stream was closed")
        transfer = Transfer(policy, "video", transfer.name)


def _is_playlist(head: bytes) -> bool:
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"#EXTM3U")


def _text(data: bytes, name: str) -> str:
    if len(data) >= MAX_PLAYLIST_BYTES:
        raise DecodeError(f"video source {name}: the HLS playlist is over {MAX_PLAYLIST_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"video source {name}: the HLS playlist is not UTF-8 text ({exc})") from exc


class BodyReader(_LiveReader):
    """The body of one HTTP response, under its transfer's limits (read timeout, deadline, bytes)."""

    def __init__(self, resp: Any, name: str, token: Token, first: bytes = b"") -> None:
        super().__init__(name, resp.transfer.policy.read_timeout, token)
        self.resp = resp
        self._first = first

    def _read(self, n: int) -> bytes:
        if self._first:
            data, self._first = self._first[:n], self._first[n:]
            return data
        return self.resp.read(n)

    def close(self) -> None:
        super().close()
        self.resp.transfer.abort()
        self.resp.close()


class _Part:
    """The bytes [start, start + length) of a response to a range request: a 206 from that offset, or a server
    ignoring the range (200, the whole file): skipped up to the offset, cut at the length."""

    def __init__(self, resp: Any, start: int, length: int) -> None:
        self.resp, self.transfer = resp, resp.transfer
        served = (resp.header("content-range") or "").partition(" ")[2].partition("-")[0].strip()
        if resp.status == 206 and served != str(start):
            resp.close()
            raise NetworkError(
                f"video source {self.transfer.name}: asked for bytes from {start}, the server sent them from "
                f"{served or '?'}"
            )
        self.skip = start if resp.status != 206 else 0
        self.left = length

    def read(self, n: int = 1 << 16) -> bytes:
        while self.skip:
            dropped = self.resp.read(min(self.skip, 1 << 16))
            if not dropped:
                return b""
            self.skip -= len(dropped)
        data = self.resp.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.resp.close()

    def __enter__(self) -> _Part:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Segment:
    sequence: int
    url: str
    byterange: Optional[tuple] = None  # (start, length)
    init: Optional[tuple] = None  # (url, byterange) of the EXT-X-MAP it needs
    duration: float = 0.0  # its EXTINF
    date: Optional[float] = None  # the wall-clock time of its first frame (EXT-X-PROGRAM-DATE-TIME), Unix seconds
    discontinuity: bool = False  # an EXT-X-DISCONTINUITY precedes it: its timestamps start a new timeline


@dataclass
class Playlist:
    segments: list
    target_duration: float = 2.0
    ended: bool = False
    variants: list = field(default_factory=list)  # (bandwidth, url) of a master playlist


def parse_playlist(text: str, base: str, name: str) -> Playlist:
    """An HLS media or master playlist (RFC 8216): the tags that decide what to fetch and when."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#EXTM3U"):
        raise DecodeError(f"video source {name}: not an HLS playlist (no #EXTM3U)")
    out = Playlist(segments=[])
    sequence, byterange, init, next_offset = 0, None, None, {}
    pending_variant: Optional[int] = None
    duration, date, discontinuity = 0.0, None, False  # of the next segment
    for line in lines[1:]:
        tag, _, value = line.partition(":")
        if tag == "#EXTINF":
            with contextlib.suppress(ValueError):
                duration = max(0.0, float(value.split(",")[0]))
        elif tag == "#EXT-X-PROGRAM-DATE-TIME":
            date = _program_date(value)
        elif tag == "#EXT-X-DISCONTINUITY":
            discontinuity = True
        elif tag == "#EXT-X-TARGETDURATION":
            out.target_duration = max(0.1, float(value or 2))
        elif tag == "#EXT-X-MEDIA-SEQUENCE":
            sequence = int(value)
        elif tag == "#EXT-X-ENDLIST":
            out.ended = True
        elif tag == "#EXT-X-KEY" and _attributes(value).get("METHOD", "NONE") != "NONE":
            raise DecodeError(f"video source {name}: encrypted HLS ({value.split(',')[0]}) is not supported")
        elif tag == "#EXT-X-MAP":
            attrs = _attributes(value)
            init = (urllib.parse.urljoin(base, attrs.get("URI", "")), _byterange(attrs.get("BYTERANGE"), {}, None))
        elif tag == "#EXT-X-BYTERANGE":
            byterange = value
        elif tag == "#EXT-X-STREAM-INF":
            pending_variant = int(_attributes(value).get("BANDWIDTH", "0") or 0)
        elif not line.startswith("#"):
            url = urllib.parse.urljoin(base, line)
            if pending_variant is not None:
                out.variants.append((pending_variant, url))
                pending_variant = None
                continue
            if date is None and out.segments and out.segments[-1].date is not None and not discontinuity:
                date = out.segments[-1].date + out.segments[-1].duration  # dated by the segments before it
            part = _byterange(byterange, next_offset, url)
            out.segments.append(Segment(sequence, url, part, init, duration, date, discontinuity))
            sequence, byterange = sequence + 1, None
            duration, date, discontinuity = 0.0, None, False
    return out


def _program_date(value: str) -> Optional[float]:
    """An EXT-X-PROGRAM-DATE-TIME (ISO 8601 with a zone: ``2026-12-05T07:00:00.000Z``) as Unix seconds; None
    for one that does not parse (the segment is then undated, not the stream refused)."""
    import datetime

    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    if len(text) >= 5 and text[-5] in "+-" and text[-4:].isdigit():  # +0100: as fromisoformat reads it
        text = f"{text[:-2]}:{text[-2:]}"
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def _attributes(value: str) -> dict:
    """``KEY=VALUE,KEY="quoted, value"`` -> dict."""
    attrs, key, buf, quoted = {}, None, "", False
    for ch in value + ",":
        if ch == '"':
            quoted = not quoted
        elif ch == "=" and key is None and not quoted:
            key, buf = buf.strip(), ""
        elif ch == "," and not quoted:
            if key is not None:
                attrs[key.upper()] = buf.strip()
            key, buf = None, ""
        else:
            buf += ch
    return attrs


def _byterange(value: Optional[str], next_offset: dict, url: Optional[str]) -> Optional[tuple]:
    """``n[@o]`` -> (o, n); without ``@o`` the range follows the previous one of the same URI."""
    if not value:
        return None
    length, _, offset = value.partition("@")
    start = int(offset) if offset else next_offset.get(url, 0)
    if url is not None:
        next_offset[url] = start + int(length)
    return (start, int(length))


class HlsReader(_LiveReader):
    """The segments of an HLS playlist as one byte stream (MPEG-TS, or fragmented MP4 after its EXT-X-MAP).

    The playlist is polled while no ``#EXT-X-ENDLIST`` ends it (every half target duration); segments are
    fetched in media-sequence order, each request under its own :class:`Transfer` (so that an endless stream
    is not cut by the per-download deadline or byte limit, which apply to each playlist and segment). Reading
    starts at the first segment the playlist lists. No new segment for ``read_timeout``: FetchTimeoutError."""

    def __init__(self, url: str, policy: FetchPolicy, token: Token, name: str, first: Optional[str] = None) -> None:
        super().__init__(name, policy.read_timeout, token)
        self.url = url
        self.policy = policy
        self.queue: collections.deque = collections.deque()
        self.next_sequence: Optional[int] = None
        self.ended = False
        self.target = 2.0
        self.init: Optional[tuple] = None
        self.resp: Any = None
        self.last_data = time.monotonic()
        self.last_poll = 0.0
        self.lock = threading.Lock()
        self.first_wait = policy.connect_timeout
        self.marks: list = []  # (offset in the byte stream where a segment's media starts, the segment)
        self._update(first if first is not None else self._fetch_playlist())

    def _transfer(self) -> Transfer:
        return Transfer(self.policy, "video", self.name)

    def _fetch_playlist(self) -> str:
        self.last_poll = time.monotonic()
        with request(self.url, self._transfer()) as resp:
            data = _read_all(resp, MAX_PLAYLIST_BYTES)
        return _text(data, self.name)

    def _update(self, text: str) -> None:
        playlist = parse_playlist(text, self.url, self.name)
        if playlist.variants and not playlist.segments:  # a master playlist: follow its best variant
            self.url = max(playlist.variants, key=lambda v: v[0])[1]
            playlist = parse_playlist(self._fetch_playlist(), self.url, self.name)
            if playlist.variants:
                raise DecodeError(f"video source {self.name}: an HLS master playlist points to another master")
        self.target = playlist.target_duration
        self.ended = playlist.ended
        for seg in playlist.segments:
            if self.next_sequence is None or seg.sequence >= self.next_sequence:
                self.queue.append(seg)
                self.next_sequence = seg.sequence + 1

    def _read(self, n: int) -> bytes:
        # the stall clock runs only while a read waits on the source: time between reads is the consumer's (a
        # producer blocked handing chunks to a slow model is not a stalled source)
        self.last_data = max(self.last_data, time.monotonic())
        while True:
            if self.token.cancelled or self._closed:
                raise Cancelled(f"video source {self.name}: the stream was closed")
            if self.resp is not None:
                data = self.resp.read(n)
                if data:
                    self.last_data = time.monotonic()
                    self.started = True
                    return data
                self._close_response()
            elif self.queue:
                seg = self.queue.popleft()
                init = self._open_segment(seg)
                self.marks.append((self.bytes_read + len(init), seg))
                del self.marks[: max(0, len(self.marks) - MARKS_KEPT)]
                if init:
                    return init
            elif self.ended:
                return b""
            else:
                self._wait_for_segments()

    def segment_at(self, pos: Optional[int]) -> Optional[Segment]:
        """The segment whose bytes hold stream position ``pos`` (a packet's); None if unknown."""
        if pos is None or pos < 0 or not self.marks:
            return None
        i = bisect.bisect_right([m[0] for m in self.marks], pos) - 1
        return self.marks[i][1] if i >= 0 else None

    def _open_segment(self, seg: Segment) -> bytes:
        """Start fetching ``seg``; returns its init section's bytes when the segment needs a new one."""
        init = b""
        if seg.init is not None and seg.init != self.init:
            with self._get(*seg.init) as resp:
                init = _read_all(resp, MAX_PLAYLIST_BYTES * 4)
            self.init = seg.init
        resp = self._get(seg.url, seg.byterange)
        with self.lock:
            self.resp = resp
        if self._closed:
            self._close_response()
        return init

    def _get(self, url: str, byterange: Optional[tuple]) -> Any:
        if byterange is None:
            return request(url, self._transfer())
        start, length = byterange
        return _Part(request(url, self._transfer(), {"Range": f"bytes={start}-{start + length - 1}"}), start, length)

    def _wait_for_segments(self) -> None:
        """Reload the playlist every half target duration until it lists a new segment; FetchTimeoutError when
        nothing new has come for the read timeout."""
        now = time.monotonic()
        if now - self.last_data >= self.limit():
            raise self.stalled(self.last_data)
        interval = min(max(0.1, self.target / 2), 5.0)
        wait = min(self.last_poll + interval, self.last_data + self.limit()) - now
        if wait > 0:
            self.token.event.wait(wait)
            return  # the loop looks at the token, the stall and the schedule again
        self._update(self._fetch_playlist())

    def _close_response(self) -> None:
        with self.lock:
            resp, self.resp = self.resp, None
        if resp is not None:
            resp.close()

    def close(self) -> None:
        super().close()
        with self.lock:
            resp = self.resp
        if resp is not None:
            resp.transfer.abort()
        self._close_response()


# --- UDP ----------------------------------------------------------------------------------------------------------


def parse_udp(url: str, policy: FetchPolicy) -> tuple:
    """(host to bind, port, multicast group or None) of ``udp://HOST:PORT``, checked against the policy."""
    name = describe(url)
    check_scheme("udp", policy, name)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidOptionError(f"malformed URL {name}: {exc}") from exc
    if port is None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidOptionError(
            f"udp source {name}: give udp://HOST:PORT (the local address to listen on, or a multicast group), "
            "with no path or options"
        )
    host = (parts.hostname or "").strip("@") or "0.0.0.0"
    if host not in ("0.0.0.0", "::"):
        check_host(host, policy, name)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    group = host if addr is not None and addr.is_multicast else None
    return host, port, group


class UdpReader(_LiveReader):
    """MPEG-TS datagrams sent to a local address. A receiver thread takes them off the socket at once (the
    kernel's buffer holds a fraction of a second of video) into a bounded buffer that the demuxer reads."""

    def __init__(self, url: str, policy: FetchPolicy, token: Token) -> None:
        host, port, group = parse_udp(url, policy)
        super().__init__(describe(url), policy.read_timeout, token)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            self.sock.bind(("" if group else host, port))
            if group:
                mreq = socket.inet_aton(group) + socket.inet_aton("0.0.0.0")
                self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            self.sock.settimeout(TICK)
        except OSError as exc:
            self.sock.close()
            raise SourceError(f"udp source {self.name}: cannot listen on {host}:{port} ({exc})") from exc
        self.buffer: collections.deque = collections.deque()
        self.buffered = 0
        self.dropped = 0
        self.cond = threading.Condition()
        self.last_data = time.monotonic()
        self.first_wait = policy.connect_timeout  # an encoder started after the listener: its first datagram
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._receive, name="qwen-vl-stream-udp", daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        try:
            while not self._closed and not self.token.cancelled:
                try:
                    data = self.sock.recv(1 << 16)
                except TimeoutError:
                    continue
                with self.cond:
                    self.buffer.append(data)
                    self.buffered += len(data)
                    while self.buffered > UDP_BUFFER_BYTES:
                        self.buffered -= len(self.buffer.popleft())
                        self.dropped += 1
                    self.last_data = time.monotonic()
                    self.started = True
                    self.cond.notify()
        except OSError as exc:
            if not self._closed:
                self.error = SourceError(f"udp source {self.name}: receiving failed ({exc})")
        with self.cond:
            self.cond.notify()

    def _read(self, n: int) -> bytes:
        with self.cond:
            while not self.buffer:
                if self.token.cancelled or self._closed:
                    raise Cancelled(f"video source {self.name}: the stream was closed")
                if self.error is not None:
                    raise self.error
                if time.monotonic() - self.last_data >= self.limit():
                    raise self.stalled(self.last_data)
                self.cond.wait(TICK)
            if self.dropped:
                logger.warning(
                    "udp source %s: %d datagrams dropped (the consumer is slower than the feed)",
                    self.name,
                    self.dropped,
                )
                self.dropped = 0
            data = self.buffer.popleft()
            if len(data) > n:
                self.buffer.appendleft(data[n:])
                data = data[:n]
            self.buffered -= len(data)
            return data

    def close(self) -> None:
        super().close()
        self.thread.join()
        self.sock.close()


# --- RTSP, RTMP, SRT: FFmpeg's own protocols ------------------------------------------------------------------------

#: live protocols that FFmpeg (PyAV's build) speaks itself; each is refused unless the policy's allowed_schemes
#: names it, as udp
FFMPEG_PROTOCOLS = ("rtsp", "rtsps", "rtmp", "rtmps", "srt")


def _check_protocol_url(url: str, scheme: str, policy: FetchPolicy) -> None:
    name = describe(url)
    check_scheme(scheme, policy, name)
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError as exc:
        raise InvalidOptionError(f"malformed URL {name}: {exc}") from exc
    if host:  # (an SRT listener, srt://:PORT?mode=listener, names none)
        check_host(host, policy, name)


class ProtocolReader:
    """A live source that FFmpeg connects to itself (RTSP over TCP, RTMP, SRT): opened by PyAV from its URL, with
    the policy's connect_timeout for the connection and the first data (the stream's header and first frames)
    and its read_timeout for each later read; no reconnection. A close from another thread takes effect at the
    next packet (a stalled source: when the read times out)."""

    #: microseconds FFmpeg analyses a live stream before its first frame (its default, 5 s, delays chunk 0)
    ANALYZE = 1_000_000

    def __init__(self, url: str, scheme: str, policy: FetchPolicy) -> None:
        self.url, self.scheme, self.policy = url, scheme, policy
        self.name = describe(url)
        self.bytes_read = 0  # (FFmpeg reads the bytes itself)
        self.started = False
        self.closed = False

    def open_container(self) -> Any:
        import av

        options = {"analyzeduration": str(self.ANALYZE)}
        if self.scheme.startswith("rtsp"):
            options["rtsp_transport"] = "tcp"  # interleaved in the one connection: no UDP ports, no lost packets
        timeouts = (self.policy.connect_timeout, self.policy.read_timeout)
        start = time.monotonic()
        try:
            return av.open(self.url, mode="r", options=options, timeout=timeouts, metadata_errors="ignore")
        except Exception as exc:
            # FFmpeg's RTSP client reports the interrupted wait as invalid data: the clock says what it was
            timed_out = time.monotonic() - start >= 0.95 * self.policy.connect_timeout
            raise self.error(exc, opening=True, timed_out=timed_out) from exc

    def seen(self) -> None:
        self.started = True

    def ends(self, exc: BaseException) -> bool:
        """Is ``exc`` from the demuxer the stream's end? RTMP's publisher closing its connection after the stream
        reads as an I/O error: an end once packets have come, as a player takes it."""
        return self.started and isinstance(exc, OSError) and getattr(exc, "errno", None) in (5, 32, 104)

    def error(self, exc: BaseException, opening: bool = False, timed_out: bool = False) -> Exception:
        """The typed error for what FFmpeg raised while opening or reading the stream."""
        import av

        if isinstance(exc, (QwenVLError, MemoryError)):
            return exc  # type: ignore[return-value]
        text = f"video source {self.name}"
        if isinstance(exc, av.error.ProtocolNotFoundError):
            return SourceError(
                f"{text}: the FFmpeg inside PyAV has no {self.scheme} protocol; relay the stream, e.g. `ffmpeg -i "
                f"{self.scheme}://... -c copy -f mpegts udp://127.0.0.1:5000`, and stream udp://127.0.0.1:5000"
            )
        if isinstance(exc, av.error.ExitError) or timed_out:  # PyAV's timeout interrupted FFmpeg
            if opening or not self.started:
                return FetchTimeoutError(
                    f"{text} did not start within the connect timeout ({self.policy.connect_timeout:g} s: "
                    "FetchPolicy.connect_timeout or QWENVL_CONNECT_TIMEOUT); is it running?"
                )
            return FetchTimeoutError(
                f"{text}: no data for {self.policy.read_timeout:g} s (the read timeout: FetchPolicy.read_timeout or "
                "QWENVL_READ_TIMEOUT); the stream stalled"
            )
        if isinstance(exc, ConnectionRefusedError):
            return NetworkError(f"{text}: connection refused (is the server running, on that port?)")
        if isinstance(exc, (OSError, av.FFmpegError)):
            return NetworkError(f"{text} could not be {'opened' if opening else 'read'} ({type(exc).__name__}: {exc})")
        return DecodeError(f"{text} is not a decodable video stream ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        self.closed = True


def refuse_unseekable_mp4(head: bytes, name: str) -> None:
    """An MP4 whose index (moov) follows its media data cannot be demuxed without seeking: say so as soon as
    the first bytes show it, before FFmpeg reads the whole file looking for the index."""
    if head[4:8] != b"ftyp":
        return
    pos = 0
    while pos + 8 <= len(head):
        size, kind = int.from_bytes(head[pos : pos + 4], "big"), head[pos + 4 : pos + 8]
        if kind in (b"moov", b"moof"):
            return
        if kind == b"mdat":
            raise DecodeError(
                f"video source {name} is an MP4 whose index (moov) comes after its media data, and the source "
                "cannot seek: serve it from a server with range support, move the index to the front (ffmpeg "
                "-movflags +faststart), or send fragmented MP4 or MPEG-TS"
            )
        if size == 1 and pos + 16 <= len(head):
            size = int.from_bytes(head[pos + 8 : pos + 16], "big")
        if size < 8:
            return
        pos += size
