"""A public endpoint (issue 23): servers and stores that stall, fail fast or lie, met with a typed error within
the deadline, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils import FetchPolicy, FetchTimeoutError, NetworkError, SourceNotAllowedError
from qwen_vl_utils.sources import _http, _ranges, _resolve, _stores
from qwen_vl_utils.sources._ranges import BLOCK, RangedFile

from conftest import TORCHCODEC, time_bound
from media import gradient, image_bytes, make_video

# --- waiting on work that failed with a timeout -------------------------------------------------------------


def test_a_reader_waiting_on_a_fetch_that_timed_out_gets_its_error():
    """Since Python 3.11 ``concurrent.futures.TimeoutError`` is the builtin ``TimeoutError``, the base of
    FetchTimeoutError: a reader waiting for a prefetch that failed with one took the error for "not done yet"
    and spun for ever, with the prefetch thread."""
    started, release = threading.Event(), threading.Event()

    def fetch(start: int, end: int) -> bytes:
        started.set()
        release.wait(10)
        raise FetchTimeoutError("video source stalling.mp4: no byte for 0.5 s (FetchPolicy.read_timeout)")

    remote = RangedFile("stalling.mp4", 4 * BLOCK, fetch)
    try:
        remote.prefetch([(2 * BLOCK, 3 * BLOCK)])
        assert started.wait(10), "the prefetch never started"
        threading.Timer(0.2, release.set).start()
        with time_bound(10), pytest.raises(FetchTimeoutError, match="no byte for 0.5 s"):
            remote.block(2)  # in flight on the prefetch thread: this reader waits for it
    finally:
        release.set()
        remote.close()


def test_a_store_call_that_times_out_at_once_fails_at_once():
    """The same confusion made a blocking store call that raised TimeoutError at once wait out the whole
    read_timeout before failing."""

    def times_out() -> None:
        raise TimeoutError("read timed out")

    transfer = _http.Transfer(FetchPolicy(read_timeout=60, deadline=300), "video", "s3://bucket/clip.mp4")
    with time_bound(10), pytest.raises(FetchTimeoutError, match="the store timed out"):
        _stores._call(transfer, times_out)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("endpoint") / "v.mp4", frames=240, width=320, height=240).read_bytes()


@pytest.mark.parametrize("answered", [1, 2])
def test_a_server_that_stalls_mid_file_gives_a_timeout_not_a_hang(video, monkeypatch, answered):
    """A CDN that answers the first ranges, then stalls longer than read_timeout: whichever request meets the
    stall (the reader's or a prefetch another reader waits on), the call ends with a typed error."""
    monkeypatch.setattr(_resolve, "FIRST_BYTES", 16 << 10)
    monkeypatch.setattr(_ranges, "BLOCK", 16 << 10)
    server = FileServer()
    try:
        url = server.add("/stall.mp4", video, delay=30, slow_after=answered)
        policy = FetchPolicy(read_timeout=0.5, connect_timeout=2, deadline=60)
        with time_bound(30), pytest.raises((FetchTimeoutError, NetworkError)):
            q.fetch_video({"video": url, "nframes": 8}, policy=policy)
    finally:
        server.close()


# --- hosts in every spelling -------------------------------------------------------------------------------------

LOOPBACK_SPELLINGS = ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0", "[::]", "[::ffff:127.0.0.1]", "LOCALHOST."]


def _fetch(url: str, policy: FetchPolicy, api: str):
    if api == "async":
        return asyncio.run(q.afetch_image({"image": url}, policy=policy))
    return q.fetch_image({"image": url}, policy=policy)


@pytest.fixture(scope="module")
def png_server():
    server = FileServer()
    server.add("/x.png", image_bytes(gradient(64, 48), "PNG"), content_type="image/png")
    yield server
    server.close()


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("host", [*LOOPBACK_SPELLINGS, "loc\u00aalhost"])
def test_a_deny_list_holds_for_every_spelling_of_its_hosts(png_server, host, api):
    """A resolver reads all of these as 127.0.0.1 (or this machine); IDNA maps the look-alike to localhost."""
    policy = FetchPolicy(denied_hosts=("127.0.0.1", "localhost"))
    before = len(png_server.files["/x.png"].requests)
    with pytest.raises(SourceNotAllowedError, match="denied by the fetch policy"):
        _fetch(f"http://{host}:{png_server.port}/x.png", policy, api)
    assert len(png_server.files["/x.png"].requests) == before, "refused before any request"


@pytest.mark.parametrize("api", ["sync", "async"])
def test_cidr_ranges_in_both_lists(png_server, api):
    url = png_server.url("/x.png")
    with pytest.raises(SourceNotAllowedError, match="denied"):
        _fetch(url, FetchPolicy(denied_hosts=("10.0.0.0/8", "127.0.0.0/8")), api)
    with pytest.raises(SourceNotAllowedError, match="not in the fetch policy's allowed hosts"):
        _fetch(url, FetchPolicy(allowed_hosts=("10.0.0.0/8", ".example.com")), api)
    assert _fetch(url, FetchPolicy(allowed_hosts=("127.0.0.0/8",)), api).size == (56, 56)
    # an allowed range admits every spelling of its addresses
    spelled = f"http://0x7f.0.0.1:{png_server.port}/x.png"
    assert _fetch(spelled, FetchPolicy(allowed_hosts=("127.0.0.0/8",)), api).size == (56, 56)


def test_a_name_that_resolves_into_a_denied_range_is_refused(png_server):
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except socket.gaierror:
        pytest.skip(f"{name} does not resolve here")
    if not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        pytest.skip(f"{name} resolves to {addresses}, not to loopback")
    with pytest.raises(SourceNotAllowedError, match="denied by the fetch policy"):
        q.fetch_image(
            {"image": f"http://{name}:{png_server.port}/x.png"}, policy=FetchPolicy(denied_hosts=("127.0.0.0/8",))
        )


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "a..b", "x" * 64 + ".com"])
def test_a_host_pattern_that_is_none_is_refused_when_the_policy_is_made(bad):
    with pytest.raises(q.InvalidOptionError, match="denied_hosts"):
        FetchPolicy(denied_hosts=(bad,))


# --- local paths that are no files -------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("media", ["image", "video"])
def test_a_fifo_given_as_a_path_is_refused_not_waited_on(tmp_path, media, api):
    """Opening a FIFO waits for a writer that never comes: a typed error at once instead."""
    fifo = tmp_path / f"media.{'png' if media == 'image' else 'mp4'}"
    os.mkfifo(fifo)
    ele = {media: str(fifo)}
    calls = {
        ("image", "sync"): lambda: q.fetch_image(ele),
        ("image", "async"): lambda: asyncio.run(q.afetch_image(ele)),
        ("video", "sync"): lambda: q.fetch_video(ele),
        ("video", "async"): lambda: asyncio.run(q.afetch_video(ele)),
    }
    with time_bound(20), pytest.raises(q.SourceError, match="named pipe"):
        calls[media, api]()
    with time_bound(20), pytest.raises(q.SourceError, match="named pipe"):
        q.count_visual_tokens(ele)


def test_a_device_is_refused_too():
    with pytest.raises(q.SourceError, match="device or socket"):
        q.fetch_image({"image": "/dev/zero"})


# --- first use ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not TORCHCODEC, reason="torchcodec is not installed")
def test_a_backend_whose_decoder_lacks_torch_names_torch_not_itself():
    """`pip install 'qwen-vl-utils[torchcodec]'` brings torchcodec without torch (no extra pins torch): the hint
    must name torch, with a word on CPU and CUDA builds, not repeat the command that was just run."""
    code = (
        "import sys; sys.modules['torch'] = None  # torch not installed\n"
        "from qwen_vl_utils.backends import load_backend\n"
        "try:\n    load_backend('torchcodec')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = res.stdout
    assert out.startswith("InvalidOptionError"), res
    assert "needs torch" in out and "pip install torch" in out and "CPU" in out and "CUDA" in out, out
    assert "qwen-vl-utils[torchcodec]" not in out, out


# --- options from a request cannot force huge outputs ----------------------------------------------------------

TINY_PNG = image_bytes(gradient(64, 48), "PNG")


@pytest.mark.parametrize("api", ["sync", "async", "count"])
def test_request_options_cannot_force_a_huge_output(api, video):
    """min_pixels=1.5e8 made a 150-megapixel image of a 64x48 source: refused before decoding."""
    huge = {"min_pixels": 1.5e8, "max_pixels": 2e8}
    cases = [{"image": TINY_PNG, **huge}, {"video": [TINY_PNG, TINY_PNG], **huge}]
    for ele in cases:
        with time_bound(20), pytest.raises(q.SourceTooLargeError, match="max_output_pixels"):
            if api == "count":
                q.count_visual_tokens(ele)
            elif api == "async":
                asyncio.run(q.afetch_image(ele) if "image" in ele else q.afetch_video(ele))
            else:
                q.fetch_image(ele) if "image" in ele else q.fetch_video(ele)


@pytest.mark.parametrize("size", [3000, 10**6, 32, 8])
def test_only_the_models_patch_sizes_unless_the_policy_opens_them(size):
    """image_patch_size=3000 made 216 megapixels, 10**6 a bare MemoryError after 8 s."""
    two_images = [{"role": "user", "content": [{"image": TINY_PNG}] * 2}]
    for call in (
        lambda **k: q.fetch_image({"image": TINY_PNG}, size, **k),
        lambda **k: q.count_visual_tokens({"image": TINY_PNG}, size, **k),
        lambda **k: q.process_vision_info(two_images, image_patch_size=size),
        lambda **k: asyncio.run(q.afetch_image({"image": TINY_PNG}, size, **k)),
    ):
        with time_bound(20), pytest.raises(q.InvalidOptionError, match="patch_sizes"):
            call()
    opened = FetchPolicy(patch_sizes=None)
    if size <= 32:  # a model of its own: allowed when the policy says so
        assert q.fetch_image({"image": TINY_PNG}, size, policy=opened).width % (2 * size) == 0
    else:  # still bounded by the output cap
        with time_bound(20), pytest.raises(q.SourceTooLargeError, match="max_output_pixels"):
            q.fetch_image({"image": TINY_PNG}, size, policy=opened)


# --- a file that changes while it is read ------------------------------------------------------------------------


def _second_version(data: bytes) -> bytes:
    """The same container with other pixels: a re-encode of different content, cut or padded to the same size."""
    other = bytearray(data)
    for i in range(len(other) // 3, len(other) - 1024, 4096):  # bytes of the frame data, not the headers
        other[i] ^= 0xFF
    return bytes(other)


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize(
    ("validators", "grows", "if_range", "said"),
    [
        ({"etag": '"v1"'}, False, False, "ETag went from"),
        ({"last_modified": "Mon, 30 Nov 2026 10:00:00 GMT"}, False, False, "Last-Modified went from"),
        ({}, True, False, "size went from"),
        ({"etag": '"v1"'}, False, True, "ETag went from"),  # a server that answers If-Range whole
    ],
)
def test_a_video_that_changes_between_ranges_is_never_spliced(
    video, monkeypatch, api, validators, grows, if_range, said
):
    """Frames from two versions of a file came back as one video: the version of the first response is pinned
    (ETag, Last-Modified, the Content-Range total) and a later range from another is a typed error."""
    monkeypatch.setattr(_resolve, "FIRST_BYTES", 16 << 10)
    monkeypatch.setattr(_ranges, "BLOCK", 16 << 10)
    newer = _second_version(video) + (b"\0" * 4096 if grows else b"")
    modified = "Tue, 01 Dec 2026 10:00:00 GMT" if "last_modified" in validators else None
    replaced = (newer, '"v2"' if "etag" in validators else None, modified)
    server = FileServer()
    try:
        url = server.add("/changing.mp4", video, replaced_by=replaced, if_range=if_range, **validators)
        ele = {"video": url, "nframes": 8}
        with time_bound(60), pytest.raises(NetworkError, match=f"changed while it was read.*{said}"):
            q.fetch_video(ele) if api == "sync" else asyncio.run(q.afetch_video(ele))
    finally:
        server.close()


def test_an_image_whose_download_broke_and_that_changed_is_read_whole_again(tmp_path):
    """A body that breaks off resumes by range; when the file changed in between, the resumed range belongs to
    the new version: the image is read again whole, and cached under the version that was read."""
    noise = Image.fromarray(np.random.default_rng(7).integers(0, 256, (200, 300, 3), np.uint8))
    first = image_bytes(noise, "PNG")
    second = image_bytes(noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG")
    assert len(first) > 40_000 and first != second
    server = FileServer()
    try:
        url = server.add(
            "/photo.png", first, etag='"v1"', reset_after=len(first) // 2, replaced_by=(second, '"v2"', None)
        )
        cache = str(tmp_path / "cache")
        got = q.fetch_image({"image": url}, policy=FetchPolicy(media_cache=cache))
        assert np.array_equal(np.asarray(got), np.asarray(q.fetch_image({"image": second})))
        again = q.fetch_image({"image": url}, policy=FetchPolicy(media_cache=cache))  # revalidated: v2 is kept
        assert np.array_equal(np.asarray(again), np.asarray(got))
        assert server.files["/photo.png"].requests[-1] == "304", server.files["/photo.png"].requests
    finally:
        server.close()


# --- a cache directory others can write to -------------------------------------------------------------------------


def _cached_fetch(png_server, root, caplog):
    url = png_server.url("/x.png")
    with caplog.at_level("WARNING", logger="qwen_vl_utils"):
        got = q.fetch_image({"image": url}, policy=FetchPolicy(media_cache=str(root)))
    assert got.size == (56, 56)  # the fetch works, with or without the cache
    return url


@pytest.mark.parametrize("how", ["writable by others", "owned by someone else"])
def test_a_cache_directory_others_control_is_not_used(png_server, tmp_path, caplog, how):
    root = tmp_path / "shared-cache"
    root.mkdir()
    if how == "writable by others":
        root.chmod(0o777)
    else:
        os.chown(root, 12345, 12345) if os.getuid() == 0 else pytest.skip("needs root to give the folder away")
    _cached_fetch(png_server, root, caplog)
    assert list(root.iterdir()) == [], "nothing written into it"
    assert how.split()[0] in caplog.text and "going on without the cache" in caplog.text, caplog.text


def test_planted_links_and_fifos_in_the_cache_are_not_followed_or_waited_on(png_server, tmp_path, caplog):
    from qwen_vl_utils.sources._cache import MediaCache

    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    (root / "usage.log").symlink_to(victim)  # the journal every store appends to
    url = png_server.url("/x.png")
    os.mkfifo(root / f"{MediaCache(str(root), 1 << 20, 60).key(url)}.json")  # the record a lookup opens first
    with time_bound(20):
        _cached_fetch(png_server, root, caplog)
        _cached_fetch(png_server, root, caplog)
    assert victim.read_bytes() == b"precious\n", "a write went through the planted link"


# --- what the cache keeps, and what a URL shows ------------------------------------------------------------------


@pytest.mark.parametrize("directive", ["no-store", "private, max-age=60", "NO-STORE"])
def test_responses_marked_no_store_or_private_are_not_cached(tmp_path, directive):
    server = FileServer()
    try:
        url = server.add("/mine.png", TINY_PNG, etag='"e1"', headers={"Cache-Control": directive})
        policy = FetchPolicy(media_cache=str(tmp_path / "cache"))
        for _ in range(2):
            assert q.fetch_image({"image": url}, policy=policy).size == (56, 56)
        assert server.files["/mine.png"].requests == [None, None], "no conditional request: nothing was kept"
        assert not list((tmp_path / "cache").glob("*.json"))
    finally:
        server.close()


def test_credentials_in_urls_are_never_written_or_shown(tmp_path):
    """Presigned query credentials and username-only tokens stayed in cache records and error messages."""
    server = FileServer()
    try:
        server.add("/signed.png", TINY_PNG, etag='"e1"')
        port = server.port
        signed = (
            f"http://127.0.0.1:{port}/signed.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASECRETKEY"
            "%2F20261204&X-Amz-Signature=deadbeefsecret&sig=azuresecret"
        )
        token = f"http://ghp_TOKENSECRET@127.0.0.1:{port}/signed.png"
        cache = tmp_path / "cache"
        for url in (signed, token):
            q.fetch_image({"image": url}, policy=FetchPolicy(media_cache=str(cache)))
        written = b"".join(path.read_bytes() for path in cache.iterdir())
        missing = (
            f"http://ghp_TOKENSECRET@127.0.0.1:{port}/missing.png;jsessionid=x;token=matrixsecret?token=tokensecret"
        )
        with pytest.raises(q.NetworkError, match="404") as info:
            q.fetch_image({"image": missing + "#access_token=fragmentsecret&state=1"})
        secrets = ("AKIASECRETKEY", "deadbeefsecret", "azuresecret", "TOKENSECRET", "tokensecret")
        for secret in (*secrets, "matrixsecret", "fragmentsecret"):  # the last two: found attacking from outside
            assert secret.encode() not in written and secret not in str(info.value), secret
        assert b"X-Amz-Signature=***" in written and "***@127.0.0.1" in str(info.value)
    finally:
        server.close()


@pytest.mark.parametrize("opted_in", [False, True])
def test_presigned_urls_share_an_entry_only_when_the_operator_asks(tmp_path, opted_in):
    """The same object under two signatures: two downloads by default (the signature may select the content);
    with ``media_cache_key_without_credentials`` one entry, revalidated (304) with the origin under the new URL."""
    server = FileServer()
    try:
        server.add("/obj.png", TINY_PNG, etag='"e1"')
        f = server.files["/obj.png"]
        base = f"http://127.0.0.1:{server.port}/obj.png?X-Amz-Expires=60&X-Amz-Signature="
        policy = FetchPolicy(media_cache=str(tmp_path / "cache"), media_cache_key_without_credentials=opted_in)
        first = q.fetch_image({"image": base + "aaaa1111"}, policy=policy)
        again = q.fetch_image({"image": base + "bbbb2222"}, policy=policy)
        assert np.array_equal(np.asarray(first), np.asarray(again))
        records = [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".json"]
        assert len(records) == (1 if opted_in else 2), records
        assert f.sent == len(TINY_PNG) * (1 if opted_in else 2), f.sent  # the second answered 304 when shared
        assert len(f.requests) == 2
    finally:
        server.close()


# --- bodies a server encodes, and downloads the disk cannot hold -------------------------------------------------


@pytest.mark.parametrize("through", ["direct", "proxy"])
def test_a_gzip_body_decodes_the_same_directly_and_through_a_proxy(monkeypatch, through):
    """A server that gzips although identity was asked: decoded through a proxy, a DecodeError directly."""
    import gzip

    from httpfiles import ForwardProxy

    server, proxy = FileServer(), ForwardProxy()
    for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    if through == "proxy":
        monkeypatch.setenv("http_proxy", proxy.url)
    try:
        gz = {"ranges": False, "headers": {"Content-Encoding": "gzip"}}
        url = server.add("/gz.png", gzip.compress(TINY_PNG), **gz)
        got = q.fetch_image({"image": url})
        assert np.array_equal(np.asarray(got), np.asarray(q.fetch_image({"image": TINY_PNG})))
        broken = server.add(
            "/bad.png", b"\x1f\x8b" + b"not gzip" * 100, ranges=False, headers={"Content-Encoding": "gzip"}
        )
        with pytest.raises(q.DecodeError):
            q.fetch_image({"image": broken})
    finally:
        server.close()
        proxy.close()


def test_a_download_the_disk_cannot_hold_is_a_typed_error(video, tmp_path):
    """A full disk (here: a file size limit, EFBIG) while a video downloads raised a bare OSError."""
    server = FileServer()
    try:
        url = server.add("/big.mp4", video, ranges=False)  # streamed whole to a temporary file
        code = (
            "import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "import qwen_vl_utils as q\n"
            f"try:\n    q.fetch_video({{'video': {url!r}, 'nframes': 4}})\n"
            "except Exception as exc:\n    print(type(exc).__name__, '|', exc)\n"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert res.stdout.startswith("SourceError |") and "writing the download" in res.stdout, res
    finally:
        server.close()


# --- every stage of a request counts against the deadline -------------------------------------------------------


class TricklingHeaders:
    """A server on 127.0.0.1 that answers with one header byte every 0.2 s, for as long as it is let."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow.png"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(300):  # a minute of header, unless stopped
                    if self.stop.wait(0.2):
                        return
                    conn.sendall(b"x")
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("media", ["image", "video"])
def test_trickled_headers_are_bounded_by_the_deadline(api, media):
    """One header byte every 0.2 s never trips a 5 s read timeout: the 2 s deadline must end the call."""
    server = TricklingHeaders()
    try:
        policy = FetchPolicy(read_timeout=5, deadline=2, image_deadline=2)
        ele = {media: server.url}
        calls = {
            "image": lambda: q.fetch_image(ele, policy=policy),
            "video": lambda: q.fetch_video(ele, policy=policy),
        }
        async_calls = {"image": q.afetch_image, "video": q.afetch_video}
        with time_bound(20), pytest.raises(FetchTimeoutError, match="deadline"):
            calls[media]() if api == "sync" else asyncio.run(async_calls[media](ele, policy=policy))
    finally:
        server.close()


# --- object-store protocols that carry a host ----------------------------------------------------------------------


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts and then says nothing (or resets at once), counting connections."""

    def __init__(self, reset: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.reset, self.accepted, self.held = reset, 0, []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/x.png"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept: the port stops taking connections now
        self.sock.close()
        for conn in self.held:
            conn.close()


FTP = FetchPolicy(allowed_schemes=("ftp",), read_timeout=1, connect_timeout=1, deadline=3, image_deadline=3)


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize(
    "policy",
    [
        FTP.replace(denied_hosts=("127.0.0.1",)),
        FTP.replace(allowed_hosts=(".example.com",)),
        FTP.replace(block_private_networks=True),
    ],
    ids=["denied", "not-allowed", "private"],
)
def test_a_store_protocol_with_a_host_goes_through_the_host_checks(api, policy):
    server = SilentServer()
    try:
        ele = {"image": f"ftp://127.0.0.1:{server.port}/x.png"}
        with time_bound(20), pytest.raises(SourceNotAllowedError):
            q.fetch_image(ele, policy=policy) if api == "sync" else asyncio.run(q.afetch_image(ele, policy=policy))
        assert server.accepted == 0, "refused before connecting"
    finally:
        server.close()


@pytest.mark.parametrize("reset", [False, True], ids=["silent", "reset"])
def test_store_errors_are_typed_and_within_the_deadline(reset):
    """ftp:// to a server that never answers waited 30 s for a bare TimeoutError (the filesystem connected
    outside the bounded call); one that resets gave a bare ConnectionResetError."""
    pytest.importorskip("fsspec")
    server = SilentServer(reset=reset)
    try:
        with time_bound(20), pytest.raises(FetchTimeoutError if not reset else NetworkError):
            q.fetch_image({"image": f"ftp://127.0.0.1:{server.port}/x{int(reset)}.png"}, policy=FTP)
    finally:
        server.close()


# --- nothing printed when a ranged read ends early -------------------------------------------------------------

_QUIET_SCRIPT = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils.sources import _ranges, _resolve
_resolve.FIRST_BYTES = _ranges.BLOCK = 16 << 10
data = Path({video!r}).read_bytes()
server = FileServer()
stalls = server.add("/stalls.mp4", data, delay=30, slow_after=2)
slow = server.add("/slow.mp4", data, rate=40_000)
try:
    q.fetch_video({{"video": stalls, "nframes": 8}}, policy=q.FetchPolicy(read_timeout=0.5))
except q.FetchTimeoutError:
    print("timed out")
async def cancelled():
    try:
        await asyncio.wait_for(q.afetch_video({{"video": slow, "nframes": 8}}), 0.6)
    except asyncio.TimeoutError:
        print("cancelled")
asyncio.run(cancelled())
"""


def test_a_ranged_read_that_times_out_or_is_cancelled_prints_nothing(video, tmp_path):
    """Each later read FFmpeg made after the first failure was printed as 'PyAV library exception being
    dropped' with its traceback, 3 to 5 per request: a server's log filled with them."""
    path = tmp_path / "v.mp4"
    path.write_bytes(video)
    script = _QUIET_SCRIPT.format(tests=str(Path(__file__).parent), video=str(path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["timed", "out", "cancelled"], res
    assert "being dropped" not in res.stderr and "Traceback" not in res.stderr, res.stderr


# --- found attacking the endpoint from outside ------------------------------------------------------------------


class _Redirector:
    """A server on 127.0.0.1 that answers every GET with a redirect to ``location``."""

    def __init__(self, location: str) -> None:
        import http.server

        target = location

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/x.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("location", ["http://[::1/x.png", "//[/x", "http://[zz]/x"])
@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_malformed_redirect_is_a_typed_error(location, api):
    """A Location with an unclosed IPv6 bracket or a bracketed non-address raised a bare ValueError."""
    server = _Redirector(location)
    try:
        with pytest.raises(NetworkError, match="redirects to a malformed URL"):
            if api == "sync":
                q.fetch_image({"image": server.url})
            else:
                asyncio.run(q.afetch_image({"image": server.url}))
    finally:
        server.close()


@pytest.mark.parametrize("conversations", [[1, 2], [None], ["text"]])
def test_items_that_are_neither_messages_nor_conversations_are_typed_errors(conversations):
    """[1, 2] and [None] raised TypeError: 'int' object is not iterable."""
    with pytest.raises(q.InvalidOptionError, match="list of messages or of conversations"):
        q.process_vision_info(conversations)
    with pytest.raises(q.InvalidOptionError, match="list of messages or of conversations"):
        asyncio.run(q.aprocess_vision_info(conversations))


@pytest.mark.parametrize("patch", [float("nan"), float("inf"), 14.5])
def test_the_patch_size_is_checked_even_without_media(patch):
    """With no image or video in the conversation, any image_patch_size passed (and a server then failed on it)."""
    text_only = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(q.InvalidOptionError, match="image_patch_size"):
        q.process_vision_info(text_only, image_patch_size=patch)
    with pytest.raises(q.InvalidOptionError, match="image_patch_size"):
        asyncio.run(q.aprocess_vision_info(text_only, image_patch_size=patch))
