"""Remote media over HTTP: ranged reads, connection pinning (DNS rebinding), retries, limits, fallbacks.

Every server here is a real HTTP/1.1 server on 127.0.0.1 (tests/httpfiles.py); nothing leaves the machine.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time

import numpy as np
import pytest

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils import (
    DecodeError,
    FetchPolicy,
    FetchTimeoutError,
    NetworkError,
    SourceNotAllowedError,
    SourceTooLargeError,
)
from qwen_vl_utils.sources import _http
from qwen_vl_utils.sources import _ranges as _remote
from qwen_vl_utils.sources import _resolve as _sources

from media import gradient, image_bytes, make_video

torch = pytest.importorskip("torch")

PNG = image_bytes(gradient(64, 48), "PNG")
BLOCK_PRIVATE = FetchPolicy(block_private_networks=True)


@pytest.fixture(scope="module")
def files():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Test media are small: shrink the first request and the blocks so that ranged reads really happen."""
    monkeypatch.setattr(_sources, "FIRST_BYTES", 32 << 10)
    monkeypatch.setattr(_remote, "BLOCK", 16 << 10)
    monkeypatch.setattr(_remote, "MERGE_GAP", 16 << 10)


def textured_video(path, frames=240, gop=24, faststart=False, codec="libx264", container=None):
    """H.264 with B-frames whose frames carry noise, so that packets have realistic sizes (kilobytes, not the
    few bytes of a flat test pattern) and a sparse read is visibly a fraction of the file."""
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=container, options=options) as out:
        stream = out.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = (
            {"bf": "3", "g": str(gop), "preset": "veryfast", "crf": "30"}
            if codec == "libx264"
            else {"deadline": "realtime", "cpu-used": "8", "g": str(gop)}
        )
        for i in range(frames):
            frame = np.roll(base, i * 3, axis=1)
            frame[: 20 + i % 200, :40] = (i * 5) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    return {
        "mp4": textured_video(d / "end.mp4"),  # moov at the end
        "faststart": textured_video(d / "fast.mp4", faststart=True),
        "mkv": textured_video(d / "v.mkv", frames=120, container="matroska"),
        "webm": textured_video(d / "v.webm", frames=120, codec="libvpx-vp9", container="webm"),
    }


def _same(url, path, backend="pyav", **ele):
    got, meta = q.fetch_video({"video": url, **ele}, return_video_metadata=True, backend=backend)
    ref, ref_meta = q.fetch_video({"video": str(path), **ele}, return_video_metadata=True, backend=backend)
    assert meta["frames_indices"] == ref_meta["frames_indices"]
    assert torch.equal(got, ref)
    return meta


# --- ranged reads ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mp4", "faststart", "mkv", "webm"])
def test_ranged_reads_give_the_frames_of_the_local_file(files, videos, kind):
    data = videos[kind].read_bytes()
    url = files.add(f"/r.{kind}", data)
    _same(url, videos[kind], nframes=6)
    f = files.files[f"/r.{kind}"]
    assert all(r and r.startswith("bytes=") for r in f.requests), "every request asked for a range"
    assert len(f.requests) > 1, "the file was read by range, not in one piece"


@pytest.mark.parametrize("backend", ["torchcodec", "decord"])
def test_ranged_reads_on_other_backends(files, videos, backend):
    pytest.importorskip("torchcodec.decoders" if backend == "torchcodec" else backend)
    url = files.add(f"/b-{backend}.mp4", videos["mp4"].read_bytes())
    meta = _same(url, videos["mp4"], backend=backend, nframes=6)
    assert meta["video_backend"] == backend


@pytest.mark.parametrize("kind", ["mp4", "faststart"])
def test_sparse_sampling_moves_a_fraction_of_the_file(files, videos, kind):
    data = videos[kind].read_bytes()
    url = files.add(f"/sparse.{kind}", data)
    meta = _same(url, videos[kind], nframes=4)
    sent = files.files[f"/sparse.{kind}"].sent
    # at most: the GOPs holding the targets (keyframe to keyframe, by the container's own index), the moov box,
    # the first request, and a block of slack around each range
    import av

    with av.open(str(videos[kind])) as c:  # (the entries are read while the container is open)
        entries = [(e.pos, e.is_keyframe) for e in c.streams.video[0].index_entries]
    key_at = [i for i, (_, key) in enumerate(entries) if key]  # decode order: a GOP's samples follow its key
    ends = [entries[k][0] for k in key_at[1:]] + [len(data)]
    gops = {max(n for n, k in enumerate(key_at) if k <= t) for t in meta["frames_indices"]}
    moov = len(data) - data.rfind(b"moov") + 8 if data.rfind(b"moov") > data.rfind(b"mdat") else 0
    spans = sum(ends[g] - entries[key_at[g]][0] for g in gops)
    bound = spans + moov + _sources.FIRST_BYTES + 2 * _remote.BLOCK * len(gops)
    assert sent <= bound and sent < 0.6 * len(data), (sent, bound, len(data))


def test_a_huge_file_of_which_little_is_read_is_within_the_byte_limit(files, videos):
    """max_video_bytes counts bytes transferred, not the file's size."""
    data = videos["mp4"].read_bytes()
    url = files.add("/limit-ok.mp4", data)
    policy = FetchPolicy(max_video_bytes=int(len(data) * 0.7))
    q.fetch_video({"video": url, "nframes": 4}, policy=policy)
    tight = FetchPolicy(max_video_bytes=40 << 10)
    with pytest.raises(SourceTooLargeError, match="bytes transferred"):
        q.fetch_video({"video": url, "nframes": 8}, policy=tight)


def test_a_server_without_ranges_falls_back_to_the_whole_download(files, videos):
    data = videos["mp4"].read_bytes()
    url = files.add("/noranges.mp4", data, ranges=False)
    _same(url, videos["mp4"], nframes=6)
    f = files.files["/noranges.mp4"]
    assert len(f.requests) == 1 and f.sent == len(data), "one request, the whole body, no second try"
    assert not os.listdir(_sources.library_tmpdir()), "the temporary download was removed"
    tight = FetchPolicy(max_video_bytes=len(data) // 2)
    with pytest.raises(SourceTooLargeError):
        q.fetch_video({"video": url}, policy=tight)


def test_a_reset_in_the_middle_of_a_range_is_resumed(files, videos):
    data = videos["mp4"].read_bytes()
    url = files.add("/reset.mp4", data, reset_after=len(data) // 3)
    _same(url, videos["mp4"], nframes=8)
    f = files.files["/reset.mp4"]
    assert f.reset_after is None, "the server did reset a connection"
    with pytest.raises(NetworkError, match="broke off"):
        files.files["/reset.mp4"].reset_after = 50 << 10
        q.fetch_video({"video": url, "nframes": 8}, policy=FetchPolicy(retries=0))


def test_a_reset_in_the_first_response_of_a_ranged_read_is_resumed(files, videos):
    """A reset while the first bytes came in was not resumed (only later ranges were): found attacking it."""
    data = videos["mp4"].read_bytes()
    assert len(data) > 300_000
    url = files.add("/reset-first.mp4", data, reset_after=_sources.FIRST_BYTES // 2)
    _same(url, videos["mp4"], nframes=8)
    f = files.files["/reset-first.mp4"]
    assert f.reset_after is None, "the server did reset a connection"
    first_end = f.requests[0].rpartition("-")[2]
    resumed = f.requests[1].partition("=")[2].split("-")
    assert 0 < int(resumed[0]) <= _sources.FIRST_BYTES // 2 and resumed[1] == first_end, f.requests


def test_503_is_retried_with_a_bounded_backoff(files):
    url = files.add("/busy.png", PNG, unavailable=2)
    start = time.monotonic()
    assert q.fetch_image({"image": url}).size
    assert time.monotonic() - start < 2.0
    files.files["/busy.png"].unavailable = 3
    with pytest.raises(NetworkError, match="HTTP 503"):
        q.fetch_image({"image": url})  # retries=2: the third 503 is the answer
    files.files["/busy.png"].unavailable = 1
    with pytest.raises(NetworkError, match="HTTP 503"):
        q.fetch_image({"image": url}, policy=FetchPolicy(retries=0))


def test_a_server_that_lies_about_the_length(files, videos):
    data = videos["mp4"].read_bytes()
    # promises more than it sends, then hangs up: a typed error, not a hang or a silently short file
    url = files.add("/lie.png", PNG, ranges=False, lie_length=1000)
    with pytest.raises((NetworkError, FetchTimeoutError)):
        q.fetch_image({"image": url}, policy=FetchPolicy(read_timeout=2))
    url = files.add("/lie.mp4", data, lie_length=5000)
    with pytest.raises((NetworkError, DecodeError, FetchTimeoutError)):
        q.fetch_video({"video": url, "nframes": 8}, policy=FetchPolicy(read_timeout=2))


def test_deadline_during_ranged_reads(files, videos):
    """Each request waits 0.3 s for its answer: the second one crosses a 0.5 s deadline."""
    url = files.add("/slow.mp4", videos["mp4"].read_bytes(), delay=0.3)
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError, match="deadline"):
        q.fetch_video({"video": url, "nframes": 8}, policy=FetchPolicy(deadline=0.5))
    assert time.monotonic() - start < 0.5 + 2.0
    q.fetch_video({"video": url, "nframes": 8}, policy=FetchPolicy(deadline=30))  # fine with time to spare


def test_connections_are_reused(files, videos, monkeypatch):
    monkeypatch.setattr(_http, "_pools", {})  # no connection left over from other tests
    url = files.add("/pool.mp4", videos["mp4"].read_bytes())
    before = files.connections
    for _ in range(3):
        q.fetch_video({"video": url, "nframes": 8})
    requests = len(files.files["/pool.mp4"].requests)
    new = files.connections - before  # at most one per decoder and prefetch thread at once, reused after
    assert requests >= 6 and new <= _remote.PREFETCH_CONNECTIONS + 2 and new < requests / 3, (requests, new)


def _child_fetch(url, out):
    try:
        out.put(tuple(q.fetch_video({"video": url, "nframes": 4}).shape))
    except BaseException as exc:
        out.put(repr(exc))


def test_pools_are_not_shared_with_a_forked_child(files, videos):
    url = files.add("/fork.mp4", videos["mp4"].read_bytes())
    shape = tuple(q.fetch_video({"video": url, "nframes": 4}).shape)  # the parent's pool has a connection
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_child_fetch, args=(url, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [shape, shape]
    assert tuple(q.fetch_video({"video": url, "nframes": 4}).shape) == shape  # and the parent still works


def test_redirects_then_ranges_go_to_the_final_url(files, videos, server):
    data = videos["mp4"].read_bytes()
    final = files.add("/final.mp4", data)

    def redirect(req):
        req.send_response(302)
        req.send_header("Location", final)
        req.send_header("Content-Length", "0")
        req.end_headers()

    start = server.add("/go.mp4", redirect)
    _same(start, videos["mp4"], nframes=6)
    assert len(files.files["/final.mp4"].requests) > 1


def test_no_leaks_after_ranged_reads(files, videos):
    url = files.add("/leak.mp4", videos["mp4"].read_bytes())
    for _ in range(3):
        q.fetch_video({"video": url, "nframes": 8})
    fds, threads = len(os.listdir("/proc/self/fd")), _library_threads()
    for _ in range(30):
        q.fetch_video({"video": url, "nframes": 8})
    time.sleep(0.2)
    assert len(os.listdir("/proc/self/fd")) <= fds + 2 * 8  # the pool keeps up to 8 connections open
    assert _library_threads() <= threads
    assert not os.listdir(_sources.library_tmpdir())


def _library_threads() -> int:
    """Threads that are not the test server's (it keeps a thread per open keep-alive connection)."""
    return sum("process_request_thread" not in t.name for t in threading.enumerate())


# --- every connection goes to the checked address (DNS rebinding) -------------------------------------------------


class Rebinding:
    """A resolver whose answers change between calls, and a guard that records every connection attempt and
    refuses any that is not to loopback, so that nothing leaves the machine."""

    def __init__(self, monkeypatch, answers):
        self.answers = list(answers)
        self.lookups = []
        self.connects = []
        real_getaddrinfo = socket.getaddrinfo
        real_connect = socket.socket.connect

        def getaddrinfo(host, port, *args, **kwargs):
            if host.endswith(".test"):
                addr = self.answers[min(len(self.lookups), len(self.answers) - 1)]
                self.lookups.append((host, addr))
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, int(port or 80)))]
            return real_getaddrinfo(host, port, *args, **kwargs)

        def connect(sock, address):
            self.connects.append(address)
            if isinstance(address, tuple) and not address[0].startswith("127."):
                raise ConnectionRefusedError(f"the test refuses connections off the machine ({address[0]})")
            return real_connect(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", connect)


def test_dns_rebinding_cannot_reach_loopback(files, monkeypatch):
    """The resolver answers a public address, then 127.0.0.1: the library connects to the address it checked
    (refused here by the guard), never to the one a second lookup would give."""
    url = files.add("/secret.png", PNG)
    before = len(files.files["/secret.png"].requests)
    rebind = Rebinding(monkeypatch, ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(NetworkError):
        q.fetch_image(
            {"image": url.replace("127.0.0.1", "media.test")}, policy=FetchPolicy(block_private_networks=True)
        )
    assert rebind.connects and all(a[0] == "93.184.216.34" for a in rebind.connects), rebind.connects
    assert len(files.files["/secret.png"].requests) == before, "the loopback server got nothing"
    # the other order: the first answer is loopback and is refused before any connection
    rebind = Rebinding(monkeypatch, ["127.0.0.1", "93.184.216.34"])
    with pytest.raises(SourceNotAllowedError, match="non-public address 127.0.0.1"):
        q.fetch_image(
            {"image": url.replace("127.0.0.1", "media.test")}, policy=FetchPolicy(block_private_networks=True)
        )
    assert not rebind.connects


def test_redirect_hops_are_pinned_too(files, server, monkeypatch):
    target = files.add("/hop.png", PNG)

    def redirect(req):
        req.send_response(302)
        req.send_header("Location", target.replace("127.0.0.1", "inner.test"))
        req.send_header("Content-Length", "0")
        req.end_headers()

    first = server.add("/hop", redirect)
    rebind = Rebinding(monkeypatch, ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(NetworkError):  # the hop's host was checked as public, then connected to as such
        q.fetch_image({"image": first}, policy=FetchPolicy(block_private_networks=False))
    assert rebind.connects[-1][0] == "93.184.216.34", rebind.connects


def test_ranged_and_pooled_connections_keep_the_checked_address(files, videos, monkeypatch):
    """Without the private-address block (loopback is reachable): the first answer is the real server, later
    answers point elsewhere; every ranged request still goes to the first."""
    data = videos["mp4"].read_bytes()
    url = files.add("/pinned.mp4", data).replace("127.0.0.1", "cdn.test")
    rebind = Rebinding(monkeypatch, ["127.0.0.1", "127.0.0.2"])
    video = q.fetch_video({"video": url, "nframes": 8})
    assert video.shape[0] == 8
    assert len(files.files["/pinned.mp4"].requests) > 1
    assert {a[0] for a in rebind.connects} == {"127.0.0.1"}, rebind.connects
    assert len(rebind.lookups) == 1, "one lookup per host and source"


def _tls_server(cert, seen):
    import http.server
    import ssl

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen["host"] = self.headers.get("Host")
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass

    httpd = Server(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    ctx.sni_callback = lambda sock, name, c: seen.__setitem__("sni", name)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_https_connects_to_the_checked_address_with_the_original_name(tmp_path, monkeypatch):
    """TLS to the pinned address still sends the host's name (SNI) and verifies the certificate for it."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setattr(_http, "_ssl_context", None)
    Rebinding(monkeypatch, ["127.0.0.1"])
    seen: dict = {}
    good = _tls_server(ca.issue_cert("media.test"), seen)
    stranger = _tls_server(trustme.CA().issue_cert("media.test"), {})  # a CA the client does not trust
    wrong_name = _tls_server(ca.issue_cert("other.test"), {})
    try:
        port = good.server_address[1]
        img = q.fetch_image({"image": f"https://media.test:{port}/x.png"})
        assert img.size == q.fetch_image({"image": PNG}).size
        assert seen == {"host": f"media.test:{port}", "sni": "media.test"}
        for bad in (stranger, wrong_name):
            with pytest.raises(NetworkError, match="(?i)certificate"):
                q.fetch_image({"image": f"https://media.test:{bad.server_address[1]}/x.png"})
    finally:
        for httpd in (good, stranger, wrong_name):
            httpd.shutdown()
            httpd.server_close()
        monkeypatch.setattr(_http, "_ssl_context", None)


def test_images_are_fetched_whole(files):
    url = files.add("/img.png", PNG)
    assert q.fetch_image({"image": url}).size == q.fetch_image({"image": PNG}).size
    assert files.files["/img.png"].requests == [None], "one request, no range for an image"


def test_small_remote_videos_come_in_the_first_request(files, monkeypatch):
    monkeypatch.setattr(_sources, "FIRST_BYTES", 1 << 20)
    small = make_video_bytes()
    url = files.add("/small.mp4", small)
    q.fetch_video({"video": url, "nframes": 4})
    assert len(files.files["/small.mp4"].requests) == 1


def make_video_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return make_video(__import__("pathlib").Path(d) / "s.mp4", frames=12).read_bytes()


def test_ranged_frames_equal_pixelwise_under_concurrency(files, videos):
    """Eight threads reading the same remote file at once (shared pools, separate transfers)."""
    url = files.add("/conc.mp4", videos["mp4"].read_bytes())
    ref = q.fetch_video({"video": str(videos["mp4"]), "nframes": 8})
    results, errors = [], []

    def work():
        try:
            results.append(q.fetch_video({"video": url, "nframes": 8}))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(torch.equal(r, ref) for r in results) and len(results) == 8
    assert np.isfinite(ref.numpy()).all()


def test_a_composition_offset_table_that_claims_too_many_samples_allocates_nothing(tmp_path):
    """A 40 KB MP4 whose ctts box claims 2^28 samples in one entry: the table is refused before it is expanded
    (the packets are read instead)."""
    import resource
    import struct

    from qwen_vl_utils.container import _mp4

    good = textured_video(tmp_path / "b.mp4", frames=48)
    data = bytearray(good.read_bytes())
    at = data.find(b"ctts")
    struct.pack_into(">I", data, at + 12, 1 << 28)
    bomb = tmp_path / "bomb.mp4"
    bomb.write_bytes(bytes(data))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import av

    with av.open(str(bomb)) as c, open(bomb, "rb") as f:
        assert _mp4.sample_table(c, c.streams.video[0], f, bomb.stat().st_size) is None
    try:  # FFmpeg reads the damaged box its own way: any valid output or a typed error, never a blow-up
        assert q.fetch_video({"video": str(bomb), "nframes": 4}, backend="pyav").shape[0] == 4
    except q.QwenVLError:
        pass
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KB: no 2 GB list


# --- review findings: each a behaviour that once went wrong ----------------------------------------------------


def test_a_range_of_unknown_total_length_is_not_taken_for_the_whole_file(files, videos):
    """``Content-Range: bytes 0-32767/*`` is legal: the first range must not become the whole video."""
    url = files.add("/unknown-total.mkv", videos["mkv"].read_bytes(), unknown_total=True)
    _same(url, videos["mkv"], nframes=8)


@pytest.mark.parametrize("ranges", [True, False])
def test_a_reset_in_the_middle_of_a_whole_download_is_retried(files, ranges):
    """Images (and videos from servers without ranges) come whole: a reset mid-body resumes from where it
    stopped when the server takes ranges, else starts again."""
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    big = image_bytes(Image.fromarray(noise), "PNG")  # 360 KB: the reset comes mid-body
    url = files.add(f"/reset-{ranges}.png", big, ranges=ranges, reset_after=len(big) // 2)
    assert q.fetch_image({"image": url}).size == q.fetch_image({"image": big}).size
    first, second = files.files[f"/reset-{ranges}.png"].requests
    assert first is None and (second.startswith("bytes=") if ranges else second is None)


def test_a_redirect_body_cannot_outlast_the_deadline(server):
    """A 302 whose body trickles: the body is not read, so the image deadline still bounds the call."""

    def trickling_redirect(req):
        req.send_response(302)
        req.send_header("Location", "/elsewhere.png")
        req.send_header("Content-Length", "1000")
        req.end_headers()
        try:
            for _ in range(1000):
                req.wfile.write(b"x")
                req.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    url = server.add("/trickle-redirect", trickling_redirect)
    start = time.monotonic()
    with pytest.raises((NetworkError, FetchTimeoutError)):
        q.fetch_image({"image": url}, policy=FetchPolicy(image_deadline=1.0))
    assert time.monotonic() - start < 1.0 + 2.0


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "::127.0.0.1", "fec0::1", "::ffff:10.0.0.1"],
)
def test_ipv6_addresses_that_reach_private_ipv4_are_refused(address, monkeypatch):
    """NAT64, 6to4, IPv4-compatible and mapped addresses embed an IPv4 one; site-local is private."""
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):
        if host == "aaaa.test":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port or 80), 0, 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with pytest.raises(SourceNotAllowedError, match="non-public"):
        q.fetch_image({"image": "http://aaaa.test/a.png"}, policy=BLOCK_PRIVATE)


def test_a_slow_resolver_is_bounded_by_the_connect_timeout_and_can_be_cancelled(monkeypatch):
    real = socket.getaddrinfo

    def slow(host, port, *args, **kwargs):
        if host == "slow.test":
            time.sleep(3)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError, match="resolving slow.test"):
        q.fetch_image({"image": "http://slow.test/a.png"}, policy=FetchPolicy(connect_timeout=0.5))
    assert time.monotonic() - start < 0.5 + 1.0
