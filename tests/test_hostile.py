"""Hostile input, network faults and the fetch policy, against servers these tests start on 127.0.0.1."""

import base64
import dataclasses
import io
import os
import pathlib
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import qwen_vl_utils as q
from qwen_vl_utils import (
    DecodeError,
    FetchPolicy,
    FetchTimeoutError,
    InvalidOptionError,
    NetworkError,
    QwenVLError,
    SourceNotAllowedError,
    SourceNotFoundError,
    SourceTooLargeError,
    fetch_image,
    fetch_video,
)
from qwen_vl_utils._util import usable_cpus
from qwen_vl_utils.sources import _http, _policy
from qwen_vl_utils.sources import _resolve as _sources

from concurrency import InFlight, track_decodes
from conftest import time_bound
from media import gradient, image_bytes, make_video

PNG = image_bytes(gradient(64, 48), "PNG")
FAST = FetchPolicy(connect_timeout=2, read_timeout=0.5, deadline=5)


# --- server behaviours ---------------------------------------------------------------------------------------


def _status(code):
    def handler(req):
        req.send_response(code)
        req.send_header("Content-Length", "0")
        req.end_headers()

    return handler


def _redirect(location):
    def handler(req):
        req.send_response(302)
        req.send_header("Location", location)
        req.send_header("Content-Length", "0")
        req.end_headers()

    return handler


def _stall(seconds, after_headers=False):
    def handler(req):
        if after_headers:
            req.send_response(200)
            req.send_header("Content-Length", "100000")
            req.end_headers()
            req.wfile.write(b"\x89PNG")
            req.wfile.flush()
        time.sleep(seconds)

    return handler


def _trickle(total=1000, every=0.05, data=b"x" * 1000):
    def handler(req):
        req.send_response(200)
        req.send_header("Content-Length", str(total))
        req.end_headers()
        try:
            for i in range(total):
                req.wfile.write(data[i % len(data) : i % len(data) + 1])
                req.wfile.flush()
                time.sleep(every)
        except OSError:
            pass

    return handler


class _Endless:
    """Streams 64 KiB chunks (at most 256 MiB) that start like a PNG (or ``head``), with or without a
    Content-Length; counts what it sent."""

    def __init__(self, declare=None, head=PNG[:64]):
        self.sent = 0
        self.declare = declare
        self.head = head

    def __call__(self, req):
        req.send_response(200)
        if self.declare is not None:
            req.send_header("Content-Length", str(self.declare))
        req.end_headers()
        chunk = b"\0" * 65536
        try:
            for i in range(4096):
                req.wfile.write(self.head + chunk[len(self.head) :] if i == 0 else chunk)
                self.sent += len(chunk)
        except OSError:
            pass


# --- network faults --------------------------------------------------------------------------------------------


def test_http_errors_name_the_url(server):
    server.add("/500", _status(500))
    with pytest.raises(NetworkError, match=r"HTTP 404.*check the URL") as info:
        fetch_image({"image": server.url("/nope.png")})
    assert "/nope.png" in str(info.value)
    with pytest.raises(NetworkError, match="HTTP 500"):
        fetch_video({"video": server.url("/500")})


@pytest.mark.parametrize("media", ["image", "video"])
def test_http_500_names_the_url_and_says_what_to_do(server, media):
    url = server.add(f"/broken-{media}", _status(500))
    with pytest.raises(NetworkError) as info:
        (fetch_image if media == "image" else fetch_video)({media: url})
    message = str(info.value)
    assert url in message and "HTTP 500" in message, message
    assert "server error" in message and "retry" in message, message


def test_connection_refused():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(NetworkError, match="request failed"):
        fetch_image({"image": f"http://127.0.0.1:{port}/x.png"})


@pytest.mark.parametrize("after_headers", [False, True])
def test_stalled_server_times_out(server, after_headers):
    url = server.add(f"/stall{after_headers}", _stall(20, after_headers))
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError):
        fetch_image({"image": url}, policy=FAST)
    assert time.monotonic() - start < 0.5 + 2.0


@pytest.mark.parametrize("media", ["image", "video"])
def test_trickling_server_hits_the_deadline(server, media):
    """Images have their own, shorter deadline; each kind is held to its own."""
    url = server.add(f"/trickle-{media}", _trickle(data=PNG))
    policy = FetchPolicy(read_timeout=5, deadline=60.0, image_deadline=60.0).replace(
        **{"image_deadline" if media == "image" else "deadline": 1.0}
    )
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError, match="deadline"):
        (fetch_image if media == "image" else fetch_video)({media: url}, policy=policy)
    assert time.monotonic() - start < 1.0 + 1.5


def test_image_deadline_default_is_shorter():
    policy = FetchPolicy()
    assert policy.image_deadline < policy.deadline


@pytest.mark.parametrize("declare", [None, 256 * 65536])
def test_body_over_the_limit_is_aborted_early(server, declare, monkeypatch):
    endless = _Endless(declare)
    url = server.add(f"/endless{declare}", endless)
    policy = FetchPolicy(max_image_bytes=1 << 20, max_video_bytes=2 << 20)
    received = []
    real_add = _http.Transfer.add

    def counting(self, n):  # what the client took in when it stopped: the limit, plus at most one read
        try:
            real_add(self, n)
        finally:
            received.append(self.received)

    monkeypatch.setattr(_http.Transfer, "add", counting)
    for media, limit in (("image", 1 << 20), ("video", 2 << 20)):
        received.clear()
        with pytest.raises(SourceTooLargeError, match="limit"):
            (fetch_image if media == "image" else fetch_video)({media: url}, policy=policy)
        took = max(received, default=0)  # with a declared length the headers alone refuse it: nothing read
        assert (took == 0) if declare else (limit < took <= limit + (64 << 10)), took
        time.sleep(0.2)
        # aborted while streaming: the server got no further than the limit plus socket buffers
        assert endless.sent < limit + (16 << 20), endless.sent
        endless.sent = 0
    assert not os.listdir(_sources.library_tmpdir()), "the partial download was removed"


@pytest.mark.parametrize("media", ["image", "video"])
def test_declared_length_over_the_limit_is_refused_before_the_body(server, media):
    """A Content-Length over the limit is refused from the headers: the server gets no further than what the
    socket buffers take (under 16 MiB), far below the 64 MiB that reading up to the limit would pull."""
    endless = _Endless(declare=4096 * 65536)  # 256 MiB
    url = server.add(f"/declared-{media}", endless)
    limit = 64 << 20
    policy = FetchPolicy(max_image_bytes=limit, max_video_bytes=limit)
    with pytest.raises(SourceTooLargeError, match=f"declares {4096 * 65536} bytes") as info:
        (fetch_image if media == "image" else fetch_video)({media: url}, policy=policy)
    assert url in str(info.value)
    time.sleep(0.3)
    assert endless.sent < 16 << 20, endless.sent
    assert not os.listdir(_sources.library_tmpdir()), "nothing was written"


@pytest.mark.parametrize("media", ["image", "video"])
def test_a_body_that_is_not_media_is_refused_after_its_first_bytes(server, media):
    """An HTML error page served with 200, or any unknown bytes, is a DecodeError once the first bytes are in,
    long before the rest of a large body has been sent."""
    endless = _Endless(head=b"<!DOCTYPE html><html><body>Sorry, not found</body></html>")
    url = server.add(f"/html-{media}", endless)
    with pytest.raises(DecodeError, match="does not start like any image or video format"):
        (fetch_image if media == "image" else fetch_video)({media: url})
    time.sleep(0.2)
    assert endless.sent < 16 << 20, endless.sent  # of 256 MiB: the socket buffers at most


def test_redirects(server):
    target = server.add_bytes("/final.png", PNG, "image/png")
    server.add("/r2", _redirect("/final.png"))
    first = server.add("/r1", _redirect(server.url("/r2")))
    assert fetch_image({"image": first}).size == fetch_image({"image": target}).size
    server.add("/loop", _redirect("/loop"))
    with pytest.raises(NetworkError, match="more than 5 redirects"):
        fetch_image({"image": server.url("/loop")})
    server.add("/to-file", _redirect("file:///etc/passwd"))
    with pytest.raises(SourceNotAllowedError, match="file"):
        fetch_image({"image": server.url("/to-file")})
    server.add("/to-localhost", _redirect(server.url("/final.png").replace("127.0.0.1", "localhost")))
    with pytest.raises(SourceNotAllowedError, match="localhost.*denied"):
        fetch_image({"image": server.url("/to-localhost")}, policy=FetchPolicy(denied_hosts=("localhost",)))
    with pytest.raises(NetworkError, match="redirects"):
        fetch_image({"image": first}, policy=FetchPolicy(max_redirects=1))


def test_every_hop_is_checked(server, monkeypatch):
    server.add_bytes("/f.png", PNG, "image/png")
    server.add("/h2", _redirect("/f.png"))
    server.add("/h1", _redirect("/h2"))
    seen = []
    real = _http.check_url
    monkeypatch.setattr(_http, "check_url", lambda url, *a: seen.append(url) or real(url, *a))
    fetch_image({"image": server.url("/h1")})
    assert [u.rsplit("/", 1)[1] for u in seen] == ["h1", "h2", "f.png"]


def test_private_addresses_refused_after_dns(server):
    url = server.add_bytes("/p.png", PNG, "image/png")
    policy = FetchPolicy(block_private_networks=True)
    with pytest.raises(SourceNotAllowedError, match="non-public address 127.0.0.1"):
        fetch_image({"image": url}, policy=policy)
    with pytest.raises(SourceNotAllowedError, match="non-public"):  # a name that resolves to loopback
        fetch_image({"image": url.replace("127.0.0.1", "localhost")}, policy=policy)


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64,!!!!",
        "data:image/png;base64",
        "data:image/png;base64,iVBORw0KGgo=",
        "data:;base64," + base64.b64encode(b"hello").decode(),
        "data:image/png;base64," + base64.b64encode(PNG[:40]).decode(),
    ],
)
def test_malformed_data_uris(uri):
    with pytest.raises(DecodeError):
        fetch_image({"image": uri})


# --- the fetch policy ----------------------------------------------------------------------------------------


def test_local_files_can_be_turned_off(tmp_path, server, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    off = FetchPolicy(allow_local=False)
    for value in (str(path), path.as_uri()):
        with pytest.raises(SourceNotAllowedError, match="local files"):
            fetch_image({"image": value}, policy=off)
    assert fetch_image({"image": server.add_bytes("/ok.png", PNG)}, policy=off).size
    monkeypatch.setenv("QWENVL_ALLOW_LOCAL", "0")
    with pytest.raises(SourceNotAllowedError):
        fetch_image({"image": str(path)})
    monkeypatch.delenv("QWENVL_ALLOW_LOCAL")
    q.set_fetch_policy(allow_local=False)
    try:
        with pytest.raises(SourceNotAllowedError):
            q.process_vision_info([{"role": "user", "content": [{"image": str(path)}]}])
        assert fetch_image({"image": str(path)}, policy=FetchPolicy()).size  # a call's policy wins
    finally:
        q.set_fetch_policy(None)
    assert fetch_image({"image": str(path)}).size


def test_media_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "in.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    policy = FetchPolicy(media_root=str(root))
    assert fetch_image({"image": "sub/in.png"}, policy=policy).size
    assert fetch_image({"image": str(root / "sub" / "in.png")}, policy=policy).size
    for escape in ("../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"), "link.png"):
        with pytest.raises(SourceNotAllowedError, match="outside the allowed media root"):
            fetch_image({"image": escape}, policy=policy)


def test_schemes_hosts_and_sizes(server, tmp_path):
    url = server.add_bytes("/s.png", PNG, "image/png")
    with pytest.raises(SourceNotAllowedError, match="does not allow http"):
        fetch_image({"image": url}, policy=FetchPolicy(allowed_schemes=("https", "file")))
    with pytest.raises(SourceNotAllowedError, match="not in the fetch policy's allowed hosts"):
        fetch_image({"image": url}, policy=FetchPolicy(allowed_hosts=(".example.com",)))
    assert fetch_image({"image": url}, policy=FetchPolicy(allowed_hosts=("127.0.0.1",))).size
    small = FetchPolicy(max_image_bytes=100)
    path = tmp_path / "s.png"
    path.write_bytes(PNG)
    for value in (PNG, str(path), url, io.BytesIO(PNG), "data:image/png;base64," + base64.b64encode(PNG).decode()):
        with pytest.raises(SourceTooLargeError, match="limit of 100"):
            fetch_image({"image": value}, policy=small)
    with pytest.raises(SourceNotAllowedError, match="scheme 'ftp'"):
        fetch_image({"image": "ftp://example.com/a.png"})


@pytest.fixture
def stub_dns(monkeypatch):
    """A resolver that answers 127.0.0.1 for the test's own names and refuses every other name, so that a host
    the policy wrongly admits still reaches only the test server; no proxy from the environment."""
    names = set()
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        host = (host.decode() if isinstance(host, bytes) else host).rstrip(".").lower()
        if host in names or host in ("127.0.0.1", "localhost"):
            return real("127.0.0.1", port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"stub resolver: {host} is not a test name")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return names


HOST_CASES = [  # (pattern, host, matches)
    (".example.com", "example.com", True),
    (".example.com", "a.example.com", True),
    (".example.com", "a.b.example.com", True),
    (".example.com", "A.Example.COM", True),
    (".example.com", "a.example.com.", True),  # the fully qualified form
    (".example.com", "evilexample.com", False),
    (".example.com", "example.com.evil.net", False),
    (".example.com", "example.co", False),
    (".example.com", "xample.com", False),
    ("example.com", "example.com", True),
    ("example.com", "a.example.com", False),  # without the dot: that host only
    ("example.com", "evilexample.com", False),
]


@pytest.mark.parametrize(("pattern", "host", "matches"), HOST_CASES, ids=[f"{p}~{h}" for p, h, _ in HOST_CASES])
def test_host_patterns_positive_and_negative(server, stub_dns, pattern, host, matches):
    server.add_bytes("/hosts.png", PNG, "image/png")
    stub_dns.add(host.lower().rstrip("."))
    url = f"http://{host}:{server.httpd.server_address[1]}/hosts.png"
    allowed = FetchPolicy(allowed_hosts=(pattern,))
    denied = FetchPolicy(denied_hosts=(pattern,))
    if matches:
        assert fetch_image({"image": url}, policy=allowed).size
        with pytest.raises(SourceNotAllowedError, match="denied by the fetch policy"):
            fetch_image({"image": url}, policy=denied)
    else:
        with pytest.raises(SourceNotAllowedError, match="not in the fetch policy's allowed hosts"):
            fetch_image({"image": url}, policy=allowed)
        assert fetch_image({"image": url}, policy=denied).size


# every QWENVL_* variable: (field, the text set, the value the field must get); each differs from the default
ENV_CASES = {
    "QWENVL_ALLOWED_SCHEMES": ("allowed_schemes", " HTTPS, file ", ("https", "file")),
    "QWENVL_ALLOW_LOCAL": ("allow_local", "0", False),
    "QWENVL_MEDIA_ROOT": ("media_root", "/srv/media", "/srv/media"),
    "QWENVL_ALLOWED_HOSTS": ("allowed_hosts", ".Example.com,cdn.net", (".example.com", "cdn.net")),
    "QWENVL_DENIED_HOSTS": ("denied_hosts", "evil.com", ("evil.com",)),
    "QWENVL_BLOCK_PRIVATE_NETWORKS": ("block_private_networks", "yes", True),
    "QWENVL_MAX_REDIRECTS": ("max_redirects", "2", 2),
    "QWENVL_CONNECT_TIMEOUT": ("connect_timeout", "1.5", 1.5),
    "QWENVL_READ_TIMEOUT": ("read_timeout", "2.5", 2.5),
    "QWENVL_DEADLINE": ("deadline", "61", 61.0),
    "QWENVL_IMAGE_DEADLINE": ("image_deadline", "7", 7.0),
    "QWENVL_RETRIES": ("retries", "0", 0),
    "QWENVL_MEDIA_CACHE": ("media_cache", "/var/cache/qwen-media", "/var/cache/qwen-media"),
    "QWENVL_MEDIA_CACHE_MAX_BYTES": ("media_cache_max_bytes", "5e8", 500_000_000),
    "QWENVL_MEDIA_CACHE_MAX_AGE": ("media_cache_max_age", "3600", 3600.0),
    "QWENVL_MEDIA_CACHE_KEY_WITHOUT_CREDENTIALS": ("media_cache_key_without_credentials", "1", True),
    "QWENVL_MAX_CONCURRENT_DOWNLOADS": ("max_concurrent_downloads", "3", 3),
    "QWENVL_MAX_CONCURRENT_DECODES": ("max_concurrent_decodes", "2", 2),
    "QWENVL_MAX_CONCURRENT_PER_HOST": ("max_concurrent_per_host", "none", None),
    "QWENVL_MAX_QUEUED": ("max_queued", "16", 16),
    "QWENVL_MAX_IMAGE_BYTES": ("max_image_bytes", "1e6", 1_000_000),
    "QWENVL_MAX_VIDEO_BYTES": ("max_video_bytes", "2048", 2048),
    "QWENVL_MAX_IMAGE_PIXELS": ("max_image_pixels", "1e7", 10_000_000),
    "QWENVL_MAX_OUTPUT_PIXELS": ("max_output_pixels", "2e7", 20_000_000),
    "QWENVL_PATCH_SIZES": ("patch_sizes", "14, 16, 32", (14, 16, 32)),
    "QWENVL_MAX_VIDEO_SECONDS": ("max_video_seconds", "90.5", 90.5),
    "QWENVL_MAX_VIDEO_FRAMES": ("max_video_frames", "1000", 1000),
    "QWENVL_MAX_AUDIO_SECONDS": ("max_audio_seconds", "none", None),
}


@pytest.mark.parametrize("var", sorted(_policy._ENV))
def test_every_environment_variable_sets_its_field(monkeypatch, var):
    assert var in ENV_CASES, f"add a case for {var} to ENV_CASES"
    field, raw, expected = ENV_CASES[var]
    default = FetchPolicy()
    assert getattr(default, field) != expected, "the case must be visible against the default"
    for other in _policy._ENV:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(var, raw)
    policy = q.get_fetch_policy()
    assert getattr(policy, field) == expected
    changed = {f.name for f in dataclasses.fields(policy) if getattr(policy, f.name) != getattr(default, f.name)}
    assert changed == {field}, "one variable, one field"


def test_every_environment_variable_is_tested_and_documented():
    assert set(ENV_CASES) == set(_policy._ENV)
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert [var for var in _policy._ENV if f"`{var}`" not in readme] == [], "missing from the README"


def test_policy_precedence_call_process_environment_defaults(monkeypatch):
    """Defaults, then QWENVL_* (read at each call), then set_fetch_policy, then a call's policy=."""
    for var in _policy._ENV:
        monkeypatch.delenv(var, raising=False)

    png = image_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)), "PNG")

    def limit_of(**call):
        try:
            fetch_image({"image": png}, **call)
        except SourceTooLargeError as exc:
            return int(str(exc).split("limit of ")[1].split()[0])
        return None  # fetched: the limit in force is above the PNG's size

    assert len(png) > 3000
    assert limit_of() is None and q.get_fetch_policy().max_image_bytes == FetchPolicy().max_image_bytes
    monkeypatch.setenv("QWENVL_MAX_IMAGE_BYTES", "1000")  # environment over defaults
    assert limit_of() == 1000
    try:
        q.set_fetch_policy(max_image_bytes=2000)  # the process policy over the environment
        assert limit_of() == 2000
        monkeypatch.setenv("QWENVL_MAX_IMAGE_BYTES", "1500")  # the environment no longer counts
        assert limit_of() == 2000
        assert limit_of(policy=FetchPolicy(max_image_bytes=3000)) == 3000  # a call's policy over the process's
        assert limit_of(policy=FetchPolicy()) is None  # ... even when that is the defaults
        q.set_fetch_policy(FetchPolicy(max_image_bytes=2500))
        assert limit_of() == 2500
    finally:
        q.set_fetch_policy(None)
    assert limit_of() == 1500, "back to the environment"
    monkeypatch.delenv("QWENVL_MAX_IMAGE_BYTES")
    assert limit_of() is None, "back to the defaults"


def test_video_duration_and_frame_limits(tmp_path):
    path = make_video(tmp_path / "v.mp4", frames=48, fps=24)
    with pytest.raises(SourceTooLargeError, match="over the limit of 1 s"):
        fetch_video({"video": str(path)}, policy=FetchPolicy(max_video_seconds=1))
    with pytest.raises(SourceTooLargeError, match="48 frames to decode"):
        fetch_video({"video": str(path)}, policy=FetchPolicy(max_video_frames=40))
    # a window inside the limits is fine
    fetch_video({"video": str(path), "video_end": 0.9}, policy=FetchPolicy(max_video_seconds=1))


def test_invalid_environment_is_typed(monkeypatch):
    monkeypatch.setenv("QWENVL_READ_TIMEOUT", "soon")
    with pytest.raises(InvalidOptionError, match="QWENVL_READ_TIMEOUT"):
        fetch_image({"image": PNG})


@pytest.mark.parametrize("var", ["QWENVL_BLOCK_PRIVATE_NETWORKS", "QWENVL_ALLOW_LOCAL", "QWENVL_JPEG_DRAFT"])
def test_a_misspelt_boolean_is_an_error_not_off(monkeypatch, var):
    """``QWENVL_BLOCK_PRIVATE_NETWORKS=ture`` must not quietly turn the protection off."""
    jpeg = image_bytes(gradient(64, 48), "JPEG")  # the draft flag is read for JPEGs
    monkeypatch.setenv(var, "ture")
    with pytest.raises(InvalidOptionError, match=f"{var}.*not a boolean"):
        fetch_image({"image": jpeg})
    for spelling, value in (("ON", True), ("yes", True), ("0", False), ("off", False)):
        monkeypatch.setenv(var, spelling)
        fetch_image({"image": jpeg})
        if var != "QWENVL_JPEG_DRAFT":
            field = {"QWENVL_BLOCK_PRIVATE_NETWORKS": "block_private_networks"}.get(var, "allow_local")
            assert getattr(q.get_fetch_policy(), field) is value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_redirects", -1),
        ("retries", 1.5),
        ("connect_timeout", 0),
        ("deadline", float("nan")),
        ("image_deadline", -3),
        ("max_image_bytes", 0),
        ("max_video_frames", 0),
        ("max_concurrent_decodes", 0),
        ("media_cache_max_age", float("inf")),
        ("allow_local", "no"),
        ("block_private_networks", 1),
        ("allowed_schemes", "http"),
        ("denied_hosts", (1,)),
        ("media_cache", 3),
    ],
)
def test_policy_fields_are_checked_when_the_policy_is_made(field, value):
    with pytest.raises(InvalidOptionError, match=f"FetchPolicy.{field}"):
        FetchPolicy(**{field: value})
    with pytest.raises(InvalidOptionError, match=f"FetchPolicy.{field}"):
        FetchPolicy().replace(**{field: value})


# --- truncated, corrupt and random media ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"])
def test_truncated_and_corrupt_images(fmt):
    data = image_bytes(gradient(120, 90), fmt)
    rng = np.random.default_rng(1)
    corrupt = bytearray(data)
    for i in rng.integers(len(data) // 4, len(data), 40):
        corrupt[i] ^= 0xFF
    for bad in (data[: len(data) // 3], data[:20], bytes(corrupt)):
        try:
            out = fetch_image({"image": bad})
        except QwenVLError:
            continue
        assert out.mode == "RGB"  # some corruptions still decode: then a valid image comes back


# --- fuzzing ---------------------------------------------------------------------------------------------------

NO_NET = FetchPolicy(allowed_schemes=("file", "data"))
# hypothesis' own deadline is checked only once an example returns, and re-runs slow ones (flaky on a loaded
# machine): each example runs under conftest.time_bound instead, which also stops a hang
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
#: seconds one example may take, far above what they take (measured on 2 cores: resolver 0.1 ms, images 0.3 ms
#: and at most 5 ms, videos 0.6 ms and at most 1.8 s, the first one importing torch), so a loaded CI machine passes
IMAGE_BOUND, VIDEO_BOUND = 3.0, 10.0


def test_fuzz_time_bound_fails_a_hang(monkeypatch):
    """The bound really stops an example that hangs (here: every image decode sleeps for a minute)."""
    from qwen_vl_utils import image

    from conftest import ExampleTimeout

    monkeypatch.setattr(image, "_pil_open", lambda source: time.sleep(60))

    @settings(max_examples=3, deadline=None, database=None)
    @given(st.binary(min_size=1, max_size=10))
    def fuzz(value):
        with time_bound(0.3):
            try:
                fetch_image({"image": value})
            except QwenVLError:
                pass

    start = time.monotonic()
    with pytest.raises(ExampleTimeout):
        fuzz()
    assert time.monotonic() - start < 10


@FUZZ
@given(st.one_of(st.text(max_size=80), st.binary(max_size=200), st.from_regex(r"(data|file|http)s?:[ -~]{0,40}")))
def test_fuzz_resolver_and_image_opener(value):
    with time_bound(IMAGE_BOUND):
        try:
            fetch_image({"image": value}, policy=NO_NET)
        except QwenVLError:
            pass


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    images = [image_bytes(gradient(40, 30), f) for f in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")]
    videos = [
        make_video(d / "s.mp4", frames=6, width=64, height=48).read_bytes(),
        make_video(d / "s.webm", frames=6, width=64, height=48, codec="libvpx-vp9", container="webm").read_bytes(),
        make_video(d / "s.mkv", frames=6, width=64, height=48, container="matroska").read_bytes(),
    ]
    return images, videos


def _mutate(data: bytes, data_strategy) -> bytes:
    out = bytearray(data)
    for pos, val in data_strategy:
        out[pos % len(out)] = val
    return bytes(out)


MUTATIONS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=12)


@FUZZ
@given(which=st.integers(0, 5), mutations=MUTATIONS, cut=st.integers(8, 10**6))
def test_fuzz_mutated_images(seeds, which, mutations, cut):
    data = _mutate(seeds[0][which], mutations)[:cut]
    with time_bound(IMAGE_BOUND):
        try:
            assert fetch_image({"image": data}).mode == "RGB"
        except QwenVLError:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(which=st.integers(0, 2), mutations=MUTATIONS, cut=st.integers(16, 10**6))
def test_fuzz_mutated_videos(seeds, which, mutations, cut):
    pytest.importorskip("torch")
    data = _mutate(seeds[1][which], mutations)[:cut]
    with time_bound(VIDEO_BOUND):
        try:
            video = fetch_video({"video": data, "nframes": 2}, backend="pyav")
            assert video.shape[0] == 2
        except QwenVLError:
            pass
        try:
            assert q.count_visual_tokens({"video": data}) > 0
        except QwenVLError:
            pass


# --- concurrency -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    images = []
    for i, size in enumerate([(300, 200), (97, 500), (640, 480)]):
        images.append(d / f"i{i}.png")
        gradient(*size).save(images[-1])
    videos = [
        make_video(d / "a.mp4", frames=48),
        make_video(d / "b.webm", frames=30, codec="libvpx-vp9", container="webm"),
    ]
    return images, videos


def _conversations(images, videos):
    return [
        [{"role": "user", "content": [{"image": str(images[i % 3])}, {"video": str(videos[i % 2]), "nframes": 4}]}]
        for i in range(6)
    ]


@pytest.mark.parametrize("backend", ["pyav", "torchcodec", "decord"])
def test_eight_threads_match_sequential(mixed, backend):
    torch = pytest.importorskip("torch")
    if backend != "pyav":
        pytest.importorskip(backend)
    convs = _conversations(*mixed)
    expected = [q.process_vision_info(c, backend=backend) for c in convs]
    results = [None] * (8 * len(convs))
    errors = []

    def work(k):
        try:
            for j, c in enumerate(convs):
                results[k * len(convs) + j] = q.process_vision_info(c, backend=backend)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for n, (images, videos) in enumerate(results):
        exp_images, exp_videos = expected[n % len(convs)]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, exp_images))
        assert all(torch.equal(a, b) for a, b in zip(videos, exp_videos))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(mixed, method):
    torch = pytest.importorskip("torch")
    from workers import VideoDataset

    _, videos = mixed
    dataset = VideoDataset([str(v) for v in videos] * 2)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context=method, persistent_workers=False
    )
    got = list(loader)
    assert len(got) == 4
    for (video, meta), path in zip(got, dataset.paths):
        ref, ref_meta = q.fetch_video({"video": path, "nframes": 4}, return_video_metadata=True)
        assert torch.equal(video, ref) and meta["frames_indices"] == ref_meta["frames_indices"]


# --- resources ------------------------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_500_calls_leak_nothing(tmp_path, server):
    pytest.importorskip("torch")
    path = make_video(tmp_path / "small.mp4", frames=8, width=64, height=48)
    data = path.read_bytes()
    url = server.add_bytes("/small.mp4", data, "video/mp4")
    bad = server.add_bytes("/bad.mp4", b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000), "video/mp4")
    sources = [str(path), data, url, path.as_uri()]
    for value in sources * 5:  # warm up caches, pools and the allocator
        fetch_video({"video": value})
    fds, threads, rss = _fds(), threading.active_count(), _rss_mb()
    for i in range(500):
        fetch_video({"video": sources[i % len(sources)]})
        if i % 50 == 0:
            with pytest.raises(DecodeError):
                fetch_video({"video": bad})
    time.sleep(0.2)
    assert _fds() <= fds + 2, "file descriptors leaked"
    assert threading.active_count() <= threads, "threads leaked"
    assert not os.listdir(_sources.library_tmpdir()), "temporary files left behind"
    assert _rss_mb() - rss < 100, f"memory grew by {_rss_mb() - rss:.0f} MB"


def test_nothing_written_outside_the_library_tmpdir(tmp_path, server):
    """In a fresh process with its own TMPDIR: downloads, successes and failures leave nothing behind."""
    import subprocess
    import sys

    video = make_video(tmp_path / "v.mp4", frames=8, width=64, height=48)
    url = server.add_bytes("/tmpv.mp4", video.read_bytes(), "video/mp4")
    bad = server.add_bytes("/tmpbad.mp4", os.urandom(5000), "video/mp4")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = f"""
import os, qwen_vl_utils as q
from qwen_vl_utils.sources import _resolve as _sources
q.fetch_video({{"video": {url!r}}})
try:
    q.fetch_video({{"video": {bad!r}}})
except q.DecodeError:
    pass
entries = os.listdir({str(tmp)!r})
assert len(entries) == 1 and entries[0].startswith("qwen-vl-utils-"), entries
assert os.listdir(_sources.library_tmpdir()) == []
print("ok")
"""
    env = {**os.environ, "TMPDIR": str(tmp)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    assert os.listdir(tmp) == [], "the library's directory is removed at exit"


def test_local_file_errors(tmp_path):
    with pytest.raises(SourceNotFoundError):
        fetch_video({"video": str(tmp_path / "none.mp4")})
    with pytest.raises(InvalidOptionError, match="NUL"):
        fetch_image({"image": "a\x00b.png"})
    with pytest.raises(q.SourceError, match="directory"):
        fetch_image({"image": str(tmp_path)})
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")


def test_image_downloads_overlap_while_decodes_stay_within_the_cores(server, monkeypatch):
    """process_vision_info: eight slow downloads in flight at once, but never more decodes than cores, and
    a failed download among them raises its own typed error."""

    gets, decodes = InFlight(), track_decodes(monkeypatch)

    def slow(req):
        with gets:
            time.sleep(0.3)
            req.send_response(200)
            req.send_header("Content-Length", str(len(PNG)))
            req.end_headers()
            req.wfile.write(PNG)

    urls = [server.add(f"/slow{i}.png", slow) for i in range(8)]
    content = [{"type": "image", "image": u} for u in urls]
    images, _ = q.process_vision_info([{"role": "user", "content": content}])
    assert [im.size for im in images] == [fetch_image({"image": urls[0]}).size] * 8
    assert gets.peak >= 4, gets.peak  # sequential downloads would never overlap
    assert decodes.peak <= usable_cpus(), decodes.peak
    content.insert(3, {"type": "image", "image": server.url("/missing.png")})
    with pytest.raises(NetworkError, match=r"missing\.png: HTTP 404"):
        q.process_vision_info([{"role": "user", "content": content}])
