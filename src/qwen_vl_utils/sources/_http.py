"""HTTP(S) for every remote source: one pooled client that connects only to addresses the policy checked.

For each hop of a request the URL is checked against the fetch policy (scheme, allowed and denied hosts), its
host is resolved once, every address is checked (``block_private_networks``), and the connection goes to that
checked address, with the original host name in the ``Host`` header and as the TLS server name and certificate
host. A resolver that answers differently on a second lookup (DNS rebinding) therefore cannot steer a
connection anywhere the policy did not see. Redirects are followed by hand, each hop checked the same way.

One :class:`Transfer` carries a source's budget across all its requests (ranged reads included): the total
deadline, the bytes actually transferred against the byte limit, and cancellation. Connections are pooled per
process (safe across threads, and dropped in a child after ``fork``); idempotent reads are retried on
connection resets and on 502/503/504 with a short, bounded backoff (``FetchPolicy.retries``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Optional

from .. import _cancel
from .._cancel import Cancelled
from .._errors import (
    DecodeError,
    FetchTimeoutError,
    InvalidOptionError,
    NetworkError,
    QwenVLError,
    SourceNotAllowedError,
    SourceTooLargeError,
)
from ._hosts import address_matches, embedded_ipv4, host_matches, literal_address
from ._policy import FetchPolicy

__all__ = ["Response", "Transfer", "check_scheme", "request"]

#: statuses worth another try: the server or a gateway in front of it is briefly unavailable
RETRY_STATUSES = frozenset({502, 503, 504})
_USER_AGENT = "qwen-vl-utils"


class ConnectionBroken(NetworkError):
    """The body broke off mid-transfer (a reset, a closed connection): a ranged read may resume."""


class Transfer:
    """The network budget of one source, shared by every request made for it.

    ``deadline`` bounds the time spent waiting on the network (connecting, sending, receiving), not the time
    spent decoding between ranged reads; ``limit`` bounds the bytes actually received."""

    def __init__(self, policy: FetchPolicy, media: str, name: str) -> None:
        self.policy = policy
        self.media = media
        self.name = name
        self.deadline = policy.image_deadline if media == "image" else policy.deadline
        self.limit = policy.max_image_bytes if media == "image" else policy.max_video_bytes
        self.received = 0
        self.requests = 0
        self.aborted = False
        self.addresses: dict = {}  # host -> the addresses checked for it: one lookup per host and transfer
        self._waited = 0.0
        self._since: Optional[float] = None
        self._lock = threading.Lock()
        self._live: set = set()

    def live(self) -> None:
        """A live body (a stream without an end): no total deadline and no byte limit; each wait for bytes is
        still bounded by the read timeout, and a close cancels it."""
        with self._lock:
            self.deadline = math.inf
            self.limit = math.inf

    # -- time ---------------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Network time starts counting (nested calls are fine)."""
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()

    def end(self) -> None:
        with self._lock:
            if self._since is not None:
                self._waited += time.monotonic() - self._since
                self._since = None

    def remaining(self) -> float:
        """Seconds left of the deadline; FetchTimeoutError once it has passed, Cancelled once cancelled."""
        self.check_cancelled()
        with self._lock:
            used = self._waited + (time.monotonic() - self._since if self._since is not None else 0.0)
        left = self.deadline - used
        if left <= 0:
            raise FetchTimeoutError(
                f"{self.media} source {self.name}: the download took longer than the {self.deadline:g} s deadline "
                f"(FetchPolicy.{'image_deadline' if self.media == 'image' else 'deadline'})"
            )
        return left

    # -- bytes and cancellation -----------------------------------------------------------------------------

    def add(self, n: int) -> None:
        with self._lock:
            self.received += n
            over = self.received > self.limit
        if over:
            raise SourceTooLargeError(
                f"{self.media} source {self.name}: over the limit of {self.limit} bytes transferred; download aborted "
                f"(raise FetchPolicy.max_{self.media}_bytes or QWENVL_MAX_{self.media.upper()}_BYTES)"
            )

    def check_cancelled(self) -> None:
        """Cancelled if the work on this thread was (the token is the thread's: a remote file's reads belong to
        whichever call is decoding it)."""
        token = _cancel.current()
        if self.aborted or (token is not None and token.cancelled):
            raise Cancelled(f"{self.media} source {self.name}: cancelled")

    def track(self, resp: Any) -> None:
        with self._lock:
            self._live.add(resp)
        token = _cancel.current()
        if token is not None:
            token.register(self)

    def untrack(self, resp: Any) -> None:
        with self._lock:
            self._live.discard(resp)

    def abort(self) -> None:
        """Unblock every read in flight (from another thread): their sockets are shut down, and no request or
        resumed range starts on this transfer again."""
        with self._lock:
            self.aborted = True
            live = list(self._live)
        for resp in live:
            _shutdown(resp)

    def _expire(self) -> None:
        """The deadline passed while a request waited (a server trickling its headers): unblock it."""
        with self._lock:
            live = list(self._live)
        for resp in live:
            _shutdown(resp)

    def deadline_watch(self) -> threading.Timer:
        """A started timer that unblocks the connection in flight when the deadline passes: every stage of a
        request (connect, TLS, headers) counts against it, not only each read's timeout."""
        timer = threading.Timer(max(0.0, self.remaining()) + 0.01, self._expire)
        timer.daemon = True
        timer.start()
        return timer


def _shutdown(resp: Any) -> None:
    sock = getattr(resp, "sock", None)  # a connection still waiting for its response's headers
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return
    try:
        resp.shutdown()
    except Exception:  # already closed, or an urllib3 without shutdown(): close the socket instead
        sock = _socket_of(resp)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --- the policy on URLs and addresses ---------------------------------------------------------------------------


def check_scheme(scheme: str, policy: FetchPolicy, name: str) -> None:
    if scheme not in policy.allowed_schemes:
        raise SourceNotAllowedError(
            f"{name}: the fetch policy does not allow {scheme}: sources (allowed: {', '.join(policy.allowed_schemes)}"
            f"; add it with FetchPolicy(allowed_schemes=...) or QWENVL_ALLOWED_SCHEMES)"
        )


def check_host(host: str, policy: FetchPolicy, name: str) -> None:
    """The host (any spelling of it: see ``_hosts``) against the policy's denied and allowed hosts."""
    try:
        denied = host_matches(host, policy.denied_hosts)
        allowed = policy.allowed_hosts is None or host_matches(host, policy.allowed_hosts)
    except ValueError as exc:
        raise InvalidOptionError(f"malformed URL {name}: {exc}") from None
    if denied:
        raise SourceNotAllowedError(f"{name}: the host {host} is denied by the fetch policy")
    if not allowed:
        raise SourceNotAllowedError(f"{name}: the host {host} is not in the fetch policy's allowed hosts")


def check_url(url: str, policy: FetchPolicy, name: str) -> urllib.parse.SplitResult:
    """The URL's parts, once its scheme and host pass the policy (addresses are checked when connecting)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise InvalidOptionError(f"malformed URL {name}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise SourceNotAllowedError(f"{name}: redirect or URL to a {scheme or 'missing'}: scheme is not allowed")
    check_scheme(scheme, policy, name)
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidOptionError(f"malformed URL {name}: no host")
    check_host(host, policy, name)
    return parts


def _is_public(addr: ipaddress._BaseAddress) -> bool:
    """Global unicast, and so is any IPv4 address it embeds (a NAT64 or 6to4 address can reach 127.0.0.1)."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        if inner is not None:
            return _is_public(inner)
        if addr.is_site_local:
            return False
    return addr.is_global and not addr.is_multicast


_offload_lock = threading.Lock()
_offload: dict = {}


def bounded_call(transfer: Transfer, limit: float, on_timeout: str, func: Any, *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` on a helper thread, waited for in slices under the transfer's deadline and
    cancellation and at most ``limit`` seconds (then FetchTimeoutError with ``on_timeout``). For calls that
    cannot be interrupted (name resolution, an object store's read): the caller stops waiting at once, the call
    itself finishes on one of a few helper threads."""
    from concurrent.futures import ThreadPoolExecutor

    with _offload_lock:
        if _offload.get("pid") != os.getpid():
            _offload.update(pid=os.getpid(), pool=ThreadPoolExecutor(8, thread_name_prefix="qwen-vl-blocking"))
        pool = _offload["pool"]
    future = pool.submit(func, *args, **kwargs)
    until = time.monotonic() + min(limit, transfer.remaining())

    def between() -> None:
        transfer.remaining()  # the deadline, or a cancellation
        if time.monotonic() >= until:
            raise FetchTimeoutError(f"{transfer.media} source {transfer.name}: {on_timeout}")

    return _cancel.result(future, between)


def _lookup(host: str, port: int, transfer: Optional[Transfer]) -> list:
    """getaddrinfo under the transfer's connect timeout, deadline and cancellation."""
    if transfer is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    timeout = transfer.policy.connect_timeout
    why = f"resolving {host} took longer than {timeout:g} s (FetchPolicy.connect_timeout)"
    return bounded_call(transfer, timeout, why, socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)


def resolve(host: str, port: int, policy: FetchPolicy, name: str, transfer: Optional[Transfer] = None) -> list[str]:
    """The addresses to connect to for ``host``, resolved once; with ``block_private_networks`` every one of
    them must be public."""
    literal = literal_address(host)  # every spelling a resolver takes (0x7f.1, 2130706433, [::ffff:...])
    if literal is not None:
        addrs = [str(literal)]
    else:
        try:
            infos = _lookup(host, port, transfer)
        except (socket.gaierror, UnicodeError) as exc:
            raise NetworkError(f"{name}: cannot resolve {host}: {exc}") from exc
        addrs = list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
    for a in addrs:
        if address_matches(ipaddress.ip_address(a), policy.denied_hosts):
            raise SourceNotAllowedError(f"{name}: {host} resolves to {a}, denied by the fetch policy (denied_hosts)")
    if policy.block_private_networks:
        for a in addrs:
            if not _is_public(ipaddress.ip_address(a)):
                raise SourceNotAllowedError(
                    f"{name}: {host} resolves to the non-public address {a}, refused by the fetch policy "
                    "(block_private_networks)"
                )
    if not addrs:
        raise NetworkError(f"{name}: {host} resolves to no address")
    return addrs


# --- connection pools -------------------------------------------------------------------------------------------

_pools_lock = threading.Lock()
_pools: dict = {}
_pools_pid = os.getpid()
_ssl_context: Optional[ssl.SSLContext] = None


def _reset_pools() -> None:
    """In a forked child the parent's sockets must not be shared: start with no pools."""
    global _pools, _pools_pid, _pools_lock
    _pools_lock = threading.Lock()
    _pools = {}
    _pools_pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pools)


def _tls() -> ssl.SSLContext:
    """Certificates from SSL_CERT_FILE / REQUESTS_CA_BUNDLE when set, else certifi's bundle (as requests does),
    else the system's."""
    global _ssl_context
    if _ssl_context is None:
        cafile = os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
        if not cafile:
            try:
                import certifi

                cafile = certifi.where()
            except ImportError:
                cafile = None
        ctx = ssl.create_default_context(cafile=cafile)
        _ssl_context = ctx
    return _ssl_context


# --- connections that a cancelled caller can interrupt ------------------------------------------------------------

_active = threading.local()  # the transfer whose request this thread is sending, and its connection


def _connect(address: tuple, timeout: Any, source_address: Any, options: Any) -> socket.socket:
    """Connect in short slices, so that a cancelled transfer stops waiting at once (a blocking connect to a
    host that never answers would hold the thread for the whole connect timeout)."""
    transfer = getattr(_active, "transfer", None)
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for level, name, value in options or ():
            sock.setsockopt(level, name, value)
        if source_address:
            sock.bind(source_address)
        limit = time.monotonic() + (timeout if isinstance(timeout, (int, float)) else 30.0)
        sock.settimeout(0.05)
        while True:
            try:
                sock.connect(address)
                break
            except (TimeoutError, BlockingIOError, InterruptedError):
                if transfer is not None:
                    transfer.check_cancelled()
                    transfer.remaining()  # the deadline
                if time.monotonic() >= limit:
                    raise TimeoutError(f"connecting to {host}:{port} timed out") from None
            except OSError as exc:
                if exc.errno in (errno.EALREADY, errno.EINPROGRESS):
                    select.select([], [sock], [], 0.05)
                    if transfer is not None:
                        transfer.check_cancelled()
                        transfer.remaining()  # the deadline
                    if time.monotonic() >= limit:
                        raise TimeoutError(f"connecting to {host}:{port} timed out") from None
                    continue
                if exc.errno == errno.EISCONN:
                    break
                raise
        sock.settimeout(timeout if isinstance(timeout, (int, float)) else None)
        return sock
    except BaseException:
        sock.close()
        raise


def _connection_class(https: bool) -> Any:
    """urllib3's connection class, connecting in cancellable slices and registering itself with the transfer
    whose request it sends, so that cancelling the transfer also interrupts the wait for response headers."""
    from urllib3.connection import HTTPConnection, HTTPSConnection

    base = HTTPSConnection if https else HTTPConnection

    class Connection(base):  # type: ignore[misc, valid-type]
        def _new_conn(self) -> socket.socket:
            try:
                return _connect((self._dns_host, self.port), self.timeout, self.source_address, self.socket_options)
            except TimeoutError as exc:
                from urllib3.exceptions import ConnectTimeoutError

                raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from exc
            except Cancelled:
                raise
            except OSError as exc:
                from urllib3.exceptions import NewConnectionError

                raise NewConnectionError(self, f"failed to establish a new connection: {exc}") from exc

        def request(self, *args: Any, **kwargs: Any) -> Any:
            transfer = getattr(_active, "transfer", None)
            if transfer is not None:
                _active.connection = self
                transfer.track(self)
            return super().request(*args, **kwargs)

    return Connection


_CONNECTIONS: dict = {}


def _pool(scheme: str, address: str, port: int, host: str) -> Any:
    import urllib3

    key = (scheme, address, port, host)
    with _pools_lock:
        if _pools_pid != os.getpid():
            _reset_pools()
        pool = _pools.get(key)
        if pool is None:
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    address,
                    port,
                    maxsize=8,
                    block=False,
                    retries=False,
                    server_hostname=host,
                    assert_hostname=host,
                    ssl_context=_tls(),
                    cert_reqs="CERT_REQUIRED",
                )
            else:
                pool = urllib3.HTTPConnectionPool(address, port, maxsize=8, block=False, retries=False)
            https = scheme == "https"
            if https not in _CONNECTIONS:
                _CONNECTIONS[https] = _connection_class(https)
            pool.ConnectionCls = _CONNECTIONS[https]
            if len(_pools) > 64:  # bounded: forget the oldest hosts
                for old in list(_pools)[:16]:
                    _pools.pop(old).close()
            _pools[key] = pool
        return pool


def _proxy_for(parts: urllib.parse.SplitResult, policy: FetchPolicy) -> Optional[str]:
    """The environment's proxy for this URL. Not used with ``block_private_networks``: the library must connect
    to the address it checked, which a proxy would resolve on its own."""
    if policy.block_private_networks:
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme.lower())
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def _proxy_pool(proxy: str) -> Any:
    import urllib3

    key = ("proxy", proxy)
    with _pools_lock:
        if _pools_pid != os.getpid():
            _reset_pools()
        if key not in _pools:
            _pools[key] = urllib3.ProxyManager(proxy, maxsize=8, block=False, retries=False, ssl_context=_tls())
        return _pools[key]


# --- requests ---------------------------------------------------------------------------------------------------


class Response:
    """An open response whose body is read chunk by chunk under the transfer's limits."""

    def __init__(self, raw: Any, url: str, transfer: Transfer) -> None:
        self.raw = raw
        self.url = url
        self.status = raw.status
        self.reason = raw.reason or ""
        self.headers = raw.headers
        self.transfer = transfer
        transfer.track(raw)
        encoding = (raw.headers.get("content-encoding") or "identity").strip().lower()
        if encoding != "identity" and raw.status == 206:
            self.close()
            raise DecodeError(
                f"{transfer.media} source {transfer.name}: the server sends ranges of a {encoding}-encoded body "
                "(asked for none): its parts cannot be decoded on their own; serve it without Content-Encoding"
            )

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name)

    @property
    def content_length(self) -> Optional[int]:
        value = self.headers.get("content-length")
        return int(value) if value and value.strip().isdigit() else None

    def read(self, n: int = 1 << 16) -> bytes:
        """Up to ``n`` bytes (b"" at the end), each wait bounded by the read timeout and the deadline."""
        import urllib3  # loaded already: this response is urllib3's

        t = self.transfer
        sock = _socket_of(self.raw)
        t.begin()
        try:
            wait = max(0.01, min(t.policy.read_timeout, t.remaining()))
            if sock is not None:
                with contextlib.suppress(OSError):  # the body is complete and the connection already released
                    sock.settimeout(wait)
            try:
                chunk = self.raw.read1(n) if hasattr(self.raw, "read1") else self.raw.read(n)
            except MemoryError:
                raise
            except urllib3.exceptions.DecodeError as exc:  # a Content-Encoding the body does not follow
                raise DecodeError(f"{t.media} source {t.name}: its encoded body does not decode ({exc})") from exc
            except Exception as exc:  # urllib3 wraps socket errors in its own exception types
                t.check_cancelled()
                if _is_timeout(exc):
                    t.remaining()  # the deadline's message if that is what ran out
                    raise FetchTimeoutError(
                        f"{t.media} source {t.name}: no data for {t.policy.read_timeout:g} s"
                    ) from exc
                raise ConnectionBroken(f"{t.media} source {t.name}: the download broke off: {exc}") from exc
        finally:
            t.end()
        t.add(len(chunk))
        return chunk

    def close(self) -> None:
        self.transfer.untrack(self.raw)
        with contextlib.suppress(Exception):
            self.raw.release_conn() if self.raw.isclosed() else self.raw.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (socket.timeout, TimeoutError)) or "Timeout" in type(exc).__name__


def _is_tls(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, (ssl.SSLError, ssl.CertificateError)) or type(exc).__name__ == "SSLError":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_reset(exc: BaseException) -> bool:
    """A dropped connection worth retrying (not a refusal, a timeout or a policy error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return True
        name = type(exc).__name__
        if name in ("ProtocolError", "RemoteDisconnected", "IncompleteRead"):
            return True
        exc = exc.__cause__ or exc.__context__ or (exc.args[1] if len(exc.args) > 1 else None)
        if not isinstance(exc, BaseException):
            return False
    return False


def _socket_of(raw: Any) -> Optional[socket.socket]:
    """The socket under an urllib3 response, to bound every recv by the remaining deadline."""
    conn = getattr(raw, "connection", None) or getattr(raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        return sock
    fp = getattr(raw, "_fp", None)
    inner = getattr(getattr(fp, "fp", None), "raw", None)
    return getattr(inner, "_sock", None)


def _send(parts: urllib.parse.SplitResult, transfer: Transfer, headers: dict) -> Any:
    """One request to one checked address; the raw urllib3 response."""
    import urllib3

    policy = transfer.policy
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if parts.port is None else f"[{host}]:{parts.port}"
    send_headers = {
        "Host": host_header,
        "User-Agent": _USER_AGENT,
        "Accept-Encoding": "identity",
        **headers,
    }
    if parts.username or parts.password:
        send_headers["Authorization"] = urllib3.util.make_headers(
            basic_auth=f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
        )["authorization"]
    left = transfer.remaining()
    timeout = urllib3.Timeout(connect=min(policy.connect_timeout, left), read=min(policy.read_timeout, left))
    proxy = _proxy_for(parts, policy)
    if proxy is not None:
        full = urllib.parse.urlunsplit((scheme, parts.netloc.rsplit("@", 1)[-1], parts.path or "/", parts.query, ""))
        return _proxy_pool(proxy).urlopen(
            "GET",
            full,
            headers=send_headers,
            redirect=False,
            timeout=timeout,
            preload_content=False,
            decode_content=True,
        )
    addresses = transfer.addresses.get((host, port))
    if addresses is None:
        addresses = transfer.addresses[(host, port)] = resolve(host, port, policy, transfer.name, transfer)
    error: Optional[BaseException] = None
    for address in addresses:
        pool = _pool(scheme, address, port, host)
        _active.transfer, _active.connection = transfer, None
        try:
            return pool.urlopen(
                "GET",
                path,
                headers=send_headers,
                redirect=False,
                assert_same_host=False,
                timeout=timeout,
                preload_content=False,
                decode_content=True,  # a server may gzip anyway: decoded alike, directly or through a proxy
            )
        except urllib3.exceptions.NewConnectionError as exc:  # refused: try the host's next address
            error = exc
        except urllib3.exceptions.ConnectTimeoutError as exc:
            error = exc
        finally:
            if _active.connection is not None:
                transfer.untrack(_active.connection)
            _active.transfer = _active.connection = None
    assert error is not None
    raise error


def _malformed_redirect(transfer: Transfer, exc: Exception) -> NetworkError:
    return NetworkError(f"{transfer.media} source {transfer.name}: the server redirects to a malformed URL ({exc})")


def request(url: str, transfer: Transfer, headers: Optional[dict] = None) -> Response:
    """GET ``url`` under the policy: every hop checked and connected to its checked address, redirects followed
    by hand, resets and 502/503/504 retried. Returns the final response, status < 400."""
    policy = transfer.policy
    name = transfer.name
    headers = dict(headers or {})
    current = url
    for hop in range(policy.max_redirects + 1):
        try:
            parts = check_url(current, policy, name)
        except QwenVLError:  # a host the policy refuses, a scheme not allowed: said as for the URL given
            raise
        except ValueError as exc:
            if not hop:
                raise InvalidOptionError(f"{transfer.media} source {name} is a malformed URL ({exc})") from None
            raise _malformed_redirect(transfer, exc) from None
        raw = _with_retries(parts, transfer, headers)
        if raw.status in (301, 302, 303, 307, 308):
            location = raw.headers.get("location", "")
            _drain(raw)
            if not location:
                raise NetworkError(f"{transfer.media} source {name}: HTTP {raw.status} without a Location header")
            try:
                current = urllib.parse.urljoin(current, location)
            except ValueError as exc:  # a malformed Location (an unclosed IPv6 bracket...): the server's fault
                raise _malformed_redirect(transfer, exc) from None
            continue
        resp = Response(raw, current, transfer)
        if resp.status >= 400:
            resp.close()
            error = NetworkError(
                f"{transfer.media} source {name}: HTTP {resp.status} {resp.reason}".rstrip()
                + (" (check the URL)" if resp.status < 500 else " (server error; retry later)")
            )
            error.status = resp.status  # type: ignore[attr-defined]
            raise error
        return resp
    raise NetworkError(f"{transfer.media} source {name}: more than {policy.max_redirects} redirects")


def _with_retries(parts: urllib.parse.SplitResult, transfer: Transfer, headers: dict) -> Any:
    policy = transfer.policy
    attempt = 0
    while True:
        transfer.begin()
        watch = transfer.deadline_watch()
        try:
            transfer.requests += 1
            raw = _send(parts, transfer, headers)
        except QwenVLError:
            raise
        except Exception as exc:
            transfer.check_cancelled()
            transfer.remaining()  # the deadline's error, when that is what unblocked the request
            if attempt < policy.retries and _is_reset(exc):
                attempt += 1
                _backoff(attempt, transfer)
                continue
            if _is_tls(exc):
                raise NetworkError(
                    f"{transfer.media} source {transfer.name}: the TLS certificate could not be verified for "
                    f"{parts.hostname} ({exc}); set SSL_CERT_FILE to a bundle that trusts its issuer if it is yours"
                ) from exc
            if _is_timeout(exc):
                transfer.remaining()
                raise FetchTimeoutError(
                    f"{transfer.media} source {transfer.name}: timed out connecting or waiting ({exc})"
                ) from exc
            raise NetworkError(f"{transfer.media} source {transfer.name}: request failed: {exc}") from exc
        finally:
            watch.cancel()
            transfer.end()
        if raw.status in RETRY_STATUSES and attempt < policy.retries:
            _drain(raw)
            attempt += 1
            _backoff(attempt, transfer)
            continue
        return raw


def _backoff(attempt: int, transfer: Transfer) -> None:
    """0.1 s, 0.2 s, 0.4 s, ... at most 1 s, never past the deadline."""
    pause = min(1.0, 0.1 * 2 ** (attempt - 1))
    transfer.begin()
    try:
        time.sleep(min(pause, max(0.0, transfer.remaining() - 0.05)))
    finally:
        transfer.end()


def _drain(raw: Any) -> None:
    """Give an empty body's connection back to the pool; drop any other (reading a body the caller does not
    want would run outside the transfer's clock, byte count and cancellation)."""
    try:
        if (raw.headers.get("content-length") or "").strip() == "0":
            raw.release_conn()
        else:
            raw.close()
    except Exception:
        raw.close()
