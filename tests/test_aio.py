"""The asyncio API: identical results, a loop that is never blocked, cancellation at every stage, backpressure,
and any event loop. Servers are real, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils import NetworkError, SourceNotFoundError, aio
from qwen_vl_utils.sources import _resolve as _sources
from test_remote import textured_video

from concurrency import InFlight
from media import frame_pattern, gradient, image_bytes, make_video

torch = pytest.importorskip("torch")

try:
    import uvloop
except ImportError:  # optional: the tests run on asyncio's own loop, and on uvloop where it is installed
    uvloop = None

LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param("uvloop", id="uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")),
]


def run(coro, loop_kind="asyncio"):
    if loop_kind == "uvloop":
        loop = uvloop.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def files():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory, files):
    d = tmp_path_factory.mktemp("aio")
    images = []
    for i, size in enumerate([(300, 200), (97, 500), (640, 480)]):
        images.append(d / f"i{i}.png")
        gradient(*size).save(images[-1])
    video = make_video(d / "a.mp4", frames=48)
    webm = make_video(d / "b.webm", frames=30, codec="libvpx-vp9", container="webm")
    remote = textured_video(d / "remote.mp4")
    url_image = files.add("/img.png", image_bytes(gradient(120, 90), "PNG"))
    url_video = files.add("/remote.mp4", remote.read_bytes())
    frames = [
        image_bytes(__import__("PIL.Image", fromlist=["x"]).fromarray(frame_pattern(i, 64, 48)), "PNG")
        for i in range(3)
    ]
    content = [
        {"type": "image", "image": str(images[0])},
        {"type": "image", "image": url_image, "max_pixels": 64 * 28 * 28},
        {"type": "video", "video": str(video), "nframes": 4},
        {"type": "image_url", "image_url": {"url": str(images[1])}},
        {"type": "video", "video": url_video, "fps": 1.0},
        {"type": "video", "video": str(webm)},
        {"type": "video", "video": frames, "sample_fps": 1.0},
        {"type": "image", "image": str(images[2])},
    ]
    return {"content": content, "video": video, "remote": remote, "url_video": url_video}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "getdata"):
        return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize(("metadata", "patch"), [(False, 14), (True, 16)])
def test_results_are_identical_to_the_synchronous_api(media, loop_kind, metadata, patch):
    conv = [{"role": "user", "content": media["content"]}]
    expected = q.process_vision_info(conv, True, metadata, patch)
    got = run(q.aprocess_vision_info(conv, True, metadata, patch), loop_kind)
    assert _same(got, expected)
    ele = media["content"][4]
    v_sync = q.fetch_video(ele, patch, True, True)
    v_async = run(q.afetch_video(ele, patch, True, True), loop_kind)
    assert _same(v_async, v_sync)
    img = media["content"][1]
    assert _same(run(q.afetch_image(img, patch), loop_kind), q.fetch_image(img, patch))
    for ele in (media["content"][0], media["content"][2], media["content"][4], media["content"][6]):
        assert run(q.acount_visual_tokens(ele, patch), loop_kind) == q.count_visual_tokens(ele, patch)


def test_errors_are_the_same_typed_errors(media, files, tmp_path):
    with pytest.raises(SourceNotFoundError):
        run(q.afetch_image({"image": str(tmp_path / "none.png")}))
    with pytest.raises(NetworkError, match="HTTP 404"):
        run(q.afetch_video({"video": files.url("/nope.mp4")}))
    with pytest.raises(q.InvalidOptionError):
        run(q.afetch_video({"video": str(media["video"]), "fps": 1, "nframes": 4}))
    conv = [{"role": "user", "content": [media["content"][0], {"image": str(tmp_path / "missing.png")}]}]
    with pytest.raises(SourceNotFoundError, match="missing.png"):
        run(q.aprocess_vision_info(conv))
    with pytest.raises(q.InvalidOptionError):
        run(q.aprocess_vision_info("not a conversation"))


# --- the event loop is never blocked --------------------------------------------------------------------------


class _LoopGC:
    """CPU time the interpreter's garbage collector spends on one thread. A full collection walks every object of
    the process (after collecting the whole suite, some 400,000 of them: 190 ms), on whichever thread happened to
    allocate when it was due: the interpreter's pause, not library code on the loop, so the heartbeat leaves it
    out (a CI run failed on a 225 ms gap that was such a collection)."""

    def __init__(self):
        self.thread = threading.get_ident()
        self.spent = 0.0  # CPU of collections on the loop thread
        self.paused = 0.0  # wall time of collections on any thread (they hold the GIL: the loop waits too)
        self._start = {}

    def __call__(self, phase, info):
        me = threading.get_ident()
        if phase == "start":
            self._start[me] = (time.perf_counter(), time.thread_time())
        elif me in self._start:
            wall, cpu = self._start.pop(me)
            self.paused += time.perf_counter() - wall
            if me == self.thread:
                self.spent += time.thread_time() - cpu

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


async def _with_heartbeat(coro, period=0.002):
    """Run ``coro`` beside a heartbeat task; the worst (wall, loop-thread CPU) time between two beats beyond the
    period. The CPU time is the loop thread's own (``time.thread_time``): the time it spent running callbacks,
    as opposed to waiting for a core or for the GIL while the decodes use both cores. Garbage collections are left
    out of both (see ``_LoopGC``)."""
    gaps = []
    stop = False

    async def beat(collector):
        last, last_cpu = time.perf_counter() - collector.paused, time.thread_time() - collector.spent
        while not stop:
            await asyncio.sleep(period)
            now, cpu = time.perf_counter() - collector.paused, time.thread_time() - collector.spent
            gaps.append((now - last - period, cpu - last_cpu))
            last, last_cpu = now, cpu

    with _LoopGC() as collector:
        hb = asyncio.ensure_future(beat(collector))
        await asyncio.sleep(0.01)
        try:
            result = await coro
        finally:
            stop = True
            await hb
    return result, max(g[0] for g in gaps), max(g[1] for g in gaps)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_the_loop_is_never_blocked_for_more_than_20_ms(media, files, loop_kind):
    """Four conversations at once (images, videos by path and by range over HTTP, a frame list) and one image
    behind a server that answers after a second: the loop thread never runs library code for more than 20 ms at
    a time, and never stops beating for as long as that network wait (which would mean I/O on the loop; the
    bound leaves room for a loaded machine's scheduling, which stalled a 0.2 s bound)."""
    slow = files.add("/slow-answer.png", image_bytes(gradient(80, 60), "PNG"), delay=1.0)
    conv = [{"role": "user", "content": [*media["content"], {"type": "image", "image": slow}]}]

    async def many():
        return await asyncio.gather(*[q.aprocess_vision_info(conv) for _ in range(4)])

    results, wall, cpu = run(_with_heartbeat(many()), loop_kind)
    assert len(results) == 4
    assert cpu < 0.020, f"the event loop ran library code for {cpu * 1000:.1f} ms at once"
    assert wall < 0.8, f"the event loop stalled for {wall * 1000:.1f} ms"


# --- cancellation -----------------------------------------------------------------------------------------------


def _library_threads() -> int:
    """Threads the library started for one call (its pool's persistent workers, "qwen-vl-aio_N", are not)."""
    persistent = ("qwen-vl-aio", "qwen-vl-blocking")  # the process's pools, not a call's threads
    return sum(t.name.startswith("qwen-vl") and not t.name.startswith(persistent) for t in threading.enumerate())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _cancel_when(coro, ready, timeout=10.0):
    """Start ``coro``, wait until ``ready()`` says its work reached the stage, cancel it; the time it took."""
    task = asyncio.ensure_future(coro)
    limit = time.monotonic() + timeout
    while not ready():
        assert not task.done(), f"finished before the stage was reached: {task}"
        assert time.monotonic() < limit, "the stage was never reached"
        await asyncio.sleep(0.01)
    start = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - start


def _assert_quiet(f):
    """After a cancel, the server sees no new request and (but for socket buffers) no more bytes."""
    sent, n = f.sent, len(f.requests)
    time.sleep(0.5)
    assert len(f.requests) == n and f.sent - sent < 64 << 10, (f.sent - sent, f.requests[n:])


def at_rest(stats: dict) -> bool:
    """Nothing in flight or waiting in any lane, and no host lane left behind."""
    lanes = stats["lanes"]
    busy = [lanes[k]["in_use"] + lanes[k]["waiting"] for k in ("downloads", "decodes")]
    return (stats["downloads"], stats["decodes"], stats["waiting"], *busy, lanes["hosts"]["active"]) == (0,) * 6


def _settles(check, within=1.0):
    limit = time.monotonic() + within
    while time.monotonic() < limit:
        if check():
            return True
        time.sleep(0.02)
    return check()


def _stalled_listener():
    """A socket whose accept queue is full: a new connection attempt hangs in connect."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(srv.getsockname())
        fillers.append(c)
    time.sleep(0.1)
    return srv, fillers


STAGES = ["connect", "headers", "download", "probe", "ranged-decode", "decode"]


@pytest.mark.parametrize("stage", STAGES)
def test_cancellation_at_each_stage_leaves_nothing_behind(files, media, tmp_path, stage, monkeypatch):
    fds, threads = _fds(), _library_threads()
    cleanup = []
    calls = InFlight()
    if stage == "connect":
        srv, fillers = _stalled_listener()
        cleanup += [srv.close, *[c.close for c in fillers]]
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/v.mp4"
        real = aio.resolve_source

        def tracked(*a, **k):
            with calls:
                return real(*a, **k)

        monkeypatch.setattr(aio, "resolve_source", tracked)
        coro, ready = q.afetch_video({"video": url}), lambda: calls.now > 0
    elif stage == "headers":
        url = files.add("/hang.mp4", b"\0" * 100, delay=30)
        f = files.files["/hang.mp4"]
        coro, ready = q.afetch_video({"video": url}), lambda: len(f.requests) > 0
    elif stage == "download":
        url = files.add("/trickle.mp4", media["remote"].read_bytes(), ranges=False, rate=20000)
        f = files.files["/trickle.mp4"]
        coro, ready = q.afetch_video({"video": url}), lambda: f.sent > 30000
    elif stage == "probe":  # the first range comes at once, the next ones (the moov at the end) hang
        url = files.add("/probe.mp4", media["remote"].read_bytes(), delay=30, slow_after=1)
        monkeypatch.setattr(_sources, "FIRST_BYTES", 32 << 10)
        f = files.files["/probe.mp4"]
        coro, ready = q.afetch_video({"video": url}), lambda: len(f.requests) > 1
    elif stage == "ranged-decode":  # decoding a file read by range, with prefetches in flight, on a slow link
        long = textured_video(tmp_path / "ranged.mp4", frames=960, gop=48)
        url = files.add("/ranged.mp4", long.read_bytes(), rate=300_000)
        monkeypatch.setattr(_sources, "FIRST_BYTES", 32 << 10)
        f = files.files["/ranged.mp4"]
        coro = q.afetch_video({"video": url, "nframes": 40}, backend="pyav")
        ready = lambda: len(f.requests) > 3 and f.sent > 200_000  # noqa: E731
        cleanup.append(lambda: _assert_quiet(f))
    else:
        long = textured_video(tmp_path / "long.mp4", frames=960, gop=240)
        real = aio.fetch_video

        def tracked(*a, **k):
            with calls:
                return real(*a, **k)

        monkeypatch.setattr(aio, "fetch_video", tracked)
        coro = q.afetch_video({"video": str(long), "nframes": 400}, backend="pyav")
        ready = lambda: calls.now > 0 and time.sleep(0.3) is None  # noqa: E731
    try:
        took = run(_cancel_when(coro, ready))
        assert took < 0.5, f"cancelling took {took:.2f} s"
        assert _settles(lambda: at_rest(q.aio.stats())), q.aio.stats()
        assert _settles(lambda: _library_threads() <= threads), [t.name for t in threading.enumerate()]
        assert _settles(lambda: _fds() <= fds + 8), "sockets or files left open"  # pooled keep-alives at most
        assert not os.listdir(_sources.library_tmpdir()), "temporary files left behind"
        # the process's other requests are unaffected
        assert run(q.afetch_video({"video": str(media["video"]), "nframes": 4})).shape[0] == 4
    finally:
        for close in cleanup:
            close()


def test_an_asyncio_timeout_cancels_the_work(files, media):
    url = files.add("/slowvid.mp4", media["remote"].read_bytes(), ranges=False, rate=20000)

    async def main():
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.afetch_video({"video": url}), timeout=0.5)
        return time.monotonic() - start

    assert run(main()) < 1.0
    sent = files.files["/slowvid.mp4"].sent
    time.sleep(0.5)
    assert files.files["/slowvid.mp4"].sent - sent < 64 << 10, "the download stopped"


# --- backpressure -----------------------------------------------------------------------------------------------


def test_limits_hold_across_concurrent_requests(media, files, monkeypatch):
    downloads, decodes = InFlight(), InFlight()
    remote = [files.add(f"/limits{i}.png", image_bytes(gradient(90 + i, 60), "PNG")) for i in range(3)]
    real_resolve, real_load, real_fetch = aio.resolve_image, aio.load_image, aio.fetch_video

    def slow(counter, func):
        def wrapped(*a, **k):
            with counter:
                time.sleep(0.05)
                return func(*a, **k)

        return wrapped

    monkeypatch.setattr(aio, "resolve_image", slow(downloads, real_resolve))
    monkeypatch.setattr(aio, "resolve_source", slow(downloads, aio.resolve_source))
    monkeypatch.setattr(aio, "load_image", slow(decodes, real_load))
    monkeypatch.setattr(aio, "fetch_video", slow(decodes, real_fetch))
    q.set_fetch_policy(max_concurrent_downloads=3, max_concurrent_decodes=2)
    try:
        conv = [{"role": "user", "content": [{"image": url} for url in remote]}]
        video = {"video": media["url_video"], "nframes": 4}

        async def many():
            jobs = [q.aprocess_vision_info(conv) for _ in range(6)] + [q.afetch_video(video) for _ in range(4)]
            return await asyncio.gather(*jobs)

        results = run(many())
    finally:
        q.set_fetch_policy(None)
    assert len(results) == 10
    assert downloads.peak == 3, downloads.peak  # reached, never passed
    assert decodes.peak == 2, decodes.peak
    assert at_rest(q.aio.stats())


def test_media_waiting_for_a_decode_count_against_the_download_limit(files, monkeypatch, tmp_path):
    """Downloads finish faster than decodes: the downloaded media waiting for a decode slot never outnumber the
    download limit (they would pile up in memory otherwise)."""
    outstanding, peak, lock = [0], [0], threading.Lock()
    real_resolve, real_load = aio.resolve_image, aio.load_image

    def resolve(*a, **k):
        source = real_resolve(*a, **k)
        with lock:
            outstanding[0] += 1
            peak[0] = max(peak[0], outstanding[0])
        return source

    def load(*a, **k):
        time.sleep(0.05)  # decoding is the bottleneck
        try:
            return real_load(*a, **k)
        finally:
            with lock:
                outstanding[0] -= 1

    monkeypatch.setattr(aio, "resolve_image", resolve)
    monkeypatch.setattr(aio, "load_image", load)
    q.set_fetch_policy(max_concurrent_downloads=3, max_concurrent_decodes=1)
    try:
        image = {"image": files.add("/waiting.png", image_bytes(gradient(120, 90), "PNG"))}

        async def many():
            return await asyncio.gather(*[q.afetch_image(image) for _ in range(16)])

        assert len(run(many())) == 16
    finally:
        q.set_fetch_policy(None)
    assert peak[0] <= 3 + 1, peak[0]  # the download limit, plus the one being decoded


def test_the_error_is_the_first_failing_elements_as_in_the_sync_api(files, tmp_path):
    """The first element fails late (its body is not an image), the second at once (no such file): both APIs
    raise the first element's error."""
    slow_bad = files.add("/slow-bad.png", b"<html>" + b"x" * 600, delay=0.5)
    conv = [{"role": "user", "content": [{"image": slow_bad}, {"image": str(tmp_path / "missing.png")}]}]
    with pytest.raises(q.QwenVLError) as sync_error:
        q.process_vision_info(conv)
    with pytest.raises(q.QwenVLError) as async_error:
        run(q.aprocess_vision_info(conv))
    assert type(async_error.value) is type(sync_error.value) is q.DecodeError


@pytest.mark.parametrize("bad", [{"min_pixels": -1}, {"resized_height": 56}, {"jpeg_draft": 1}])
def test_a_bad_option_after_a_missing_file_is_the_second_error_in_both_apis(tmp_path, bad):
    """Options are checked per element, before that element's download: the first failing element's error
    wins in both APIs, whether it fails on its source or on its options."""
    good = tmp_path / "good.png"
    gradient(64, 48).save(good)
    conv = [{"role": "user", "content": [{"image": str(tmp_path / "missing.png")}, {"image": str(good), **bad}]}]
    with pytest.raises(q.QwenVLError) as sync_error:
        q.process_vision_info(conv)
    with pytest.raises(q.QwenVLError) as async_error:
        run(q.aprocess_vision_info(conv))
    assert type(async_error.value) is type(sync_error.value) is q.SourceNotFoundError


def test_slots_are_first_come_first_served_across_loops():
    slots = aio.Slots("test", lambda: 1)
    order = []

    async def holder():
        await slots.acquire()
        await asyncio.sleep(0.2)
        slots.release()

    async def waiter(i, delay):
        await asyncio.sleep(delay)
        await slots.acquire()
        order.append(i)
        slots.release()

    async def main():
        await asyncio.gather(holder(), *[waiter(i, 0.02 + 0.01 * i) for i in range(5)])

    other = threading.Thread(target=lambda: asyncio.run(waiter(99, 0.065)))  # another loop, in the middle
    other.start()
    asyncio.run(main())
    other.join(5)
    assert order == [0, 1, 2, 3, 4, 99] or order == [0, 1, 2, 3, 99, 4], order
    assert order.index(99) >= 4 and slots.in_use == 0 and slots.waiting == 0


def test_a_cancelled_waiter_gives_its_turn_away():
    slots = aio.Slots("test", lambda: 1)

    async def main():
        await slots.acquire()
        waiting = asyncio.ensure_future(slots.acquire())
        after = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0.01)
        waiting.cancel()
        slots.release()
        await asyncio.wait_for(after, 1.0)  # the cancelled waiter's turn went to the next one
        slots.release()

    asyncio.run(main())
    assert slots.in_use == 0 and slots.waiting == 0


# --- several loops ----------------------------------------------------------------------------------------------


def test_several_loops_in_sequence_and_in_threads(media):
    conv = [{"role": "user", "content": media["content"][:4]}]
    expected = q.process_vision_info(conv)
    for _ in range(3):
        assert _same(asyncio.run(q.aprocess_vision_info(conv)), expected)
    results, errors = [], []

    def in_thread(kind):
        try:
            results.append(run(q.aprocess_vision_info(conv), kind))
        except BaseException as exc:
            errors.append(exc)

    kinds = ["asyncio", "asyncio", "uvloop" if uvloop else "asyncio"]
    threads = [threading.Thread(target=in_thread, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 3 and all(_same(r, expected) for r in results)


MEMORY = """
import asyncio, json, sys, resource
import qwen_vl_utils as q
q.set_fetch_policy(max_concurrent_decodes=2)
ele = {{"video": sys.argv[1], "nframes": 64, "max_pixels": 1280 * 720}}

async def one():
    video = await q.afetch_video(ele)
    return float(video[0, 0, 0, 0])  # the result is used and dropped, as a server does

async def main(n):
    await asyncio.gather(*[one() for _ in range(n)])

asyncio.run(main({n}))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_limit_not_by_the_requests(tmp_path):
    video = textured_video(tmp_path / "mem.mp4", frames=240)
    peaks = {}
    for n in (2, 32):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY.format(n=n), str(video)], capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr
        peaks[n] = float(out.stdout.strip().splitlines()[-1])
    assert peaks[32] < peaks[2] + 150, peaks  # 16x the requests, about the same memory
