"""A real HTTP/1.1 file server on 127.0.0.1 for the remote-media tests and the remote benchmark.

Each file is served with or without range support and can misbehave on purpose: a rate limit, a connection
reset after some bytes, a Content-Length that lies, 503s before it answers, a delay per request. The server
counts the bytes it sends, the requests and the connections it accepts.
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class File:
    data: bytes
    ranges: bool = True
    rate: Optional[float] = None  # bytes per second (shared by all connections to this file)
    reset_after: Optional[int] = None  # drop the connection once this many body bytes went out (once)
    lie_length: int = 0  # added to the Content-Length (and the Content-Range total) it declares
    unknown_total: bool = False  # answer ranges with "Content-Range: bytes a-b/*" (the length left unsaid)
    unavailable: int = 0  # this many 503s before it answers
    delay: float = 0.0  # seconds before each response
    slow_after: int = 0  # the first this many requests are answered without the delay
    content_type: str = "application/octet-stream"
    etag: Optional[str] = None  # sent, and honoured in If-None-Match (304)
    last_modified: Optional[str] = None  # sent, and honoured in If-Modified-Since when equal (304)
    replaced_by: Optional[tuple] = None  # (data, etag, last_modified): the file once replace_after requests came
    replace_after: int = 1
    if_range: bool = False  # honour If-Range: a range whose validator no longer matches gets the whole body
    headers: dict = field(default_factory=dict)  # sent with every answer (Cache-Control, ...)
    sent: int = 0
    requests: list = field(default_factory=list)  # the Range header of each request (None: none)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _budget_t: float = 0.0


class FileServer:
    """``add(path, data, **behaviour) -> url``; ``files[path]`` has the counters."""

    def __init__(self) -> None:
        self.files: dict = {}
        self.connections = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def do_GET(self) -> None:
                server._serve(self)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client hanging up (or a reset on purpose) is not worth a traceback

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, path: str, data: bytes, **behaviour: object) -> str:
        self.files[path] = File(data, **behaviour)
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- serving ----------------------------------------------------------------------------------------------

    def _serve(self, req: http.server.BaseHTTPRequestHandler) -> None:
        f = self.files.get(req.path.split("?")[0])
        if f is None:
            req.send_response(404)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        rng = req.headers.get("Range")
        with f._lock:
            f.requests.append(rng)
            unavailable = f.unavailable > 0
            f.unavailable -= unavailable
            if f.replaced_by is not None and len(f.requests) > f.replace_after:  # the file changes on disk
                (f.data, f.etag, f.last_modified), f.replaced_by = f.replaced_by, None
        if f.delay and len(f.requests) > f.slow_after:
            time.sleep(f.delay)
        if unavailable:
            req.send_response(503)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        if (f.etag and req.headers.get("If-None-Match") == f.etag) or (
            f.last_modified and req.headers.get("If-Modified-Since") == f.last_modified
        ):
            with f._lock:
                f.requests[-1] = "304"
            req.send_response(304)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        size = len(f.data)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        validator = req.headers.get("If-Range")
        if f.if_range and validator is not None and validator not in (f.etag, f.last_modified):
            m = None  # RFC 9110: the representation changed, so the whole of the new one
        if f.ranges and m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size:
                req.send_response(416)
                req.send_header("Content-Range", f"bytes */{size}")
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
            body = f.data[start : end + 1]
            req.send_response(206)
            total = "*" if f.unknown_total else str(size + f.lie_length)
            req.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        else:
            body = f.data
            req.send_response(200)
        if f.ranges:
            req.send_header("Accept-Ranges", "bytes")
        if f.etag:
            req.send_header("ETag", f.etag)
        if f.last_modified:
            req.send_header("Last-Modified", f.last_modified)
        req.send_header("Content-Type", f.content_type)
        for key, value in f.headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body) + f.lie_length))
        req.end_headers()
        self._send_body(req, f, body)

    def _send_body(self, req: http.server.BaseHTTPRequestHandler, f: File, body: bytes) -> None:
        chunk = 16384
        try:
            for i in range(0, len(body), chunk):
                piece = body[i : i + chunk]
                with f._lock:
                    if f.reset_after is not None and f.sent + len(piece) > f.reset_after:
                        f.reset_after = None
                        req.close_connection = True
                        _reset(req.connection)
                        return
                    f.sent += len(piece)
                if f.rate:
                    _throttle(f, len(piece))
                req.wfile.write(piece)
            req.wfile.flush()
            if f.lie_length:  # promised more than it had: hang up
                req.close_connection = True
        except OSError:
            req.close_connection = True


def _throttle(f: File, n: int) -> None:
    """A token bucket shared by every connection to this file."""
    with f._lock:
        now = time.monotonic()
        f._budget_t = max(f._budget_t, now) + n / f.rate
        wait = f._budget_t - now
    if wait > 0:
        time.sleep(wait)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing server or a middlebox does."""
    import struct

    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class ForwardProxy:
    """A plain HTTP forward proxy on 127.0.0.1 (``GET http://host:port/path``), passing requests and answers
    through unchanged, Content-Encoding included."""

    def __init__(self) -> None:
        import http.client

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                target = re.fullmatch(r"http://([^/]+)(/.*)?", self.path)
                conn = http.client.HTTPConnection(target.group(1), timeout=30)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")
                }
                conn.request("GET", target.group(2) or "/", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                conn.close()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
