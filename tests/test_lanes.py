"""Serving (issue 23, items 10, 12 and 14): lanes that keep one slow host or one network-bound decode from
starving everyone else, a queue that fails fast when full, image decodes under the policy's limit, and a
cancelled decode that stops within a packet or a block of compressed bytes. Servers are real, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils import _cancel, _slots, image
from qwen_vl_utils._util import usable_cpus
from qwen_vl_utils.backends import _pyav
from qwen_vl_utils.sources import _resolve
from test_aio import _settles, at_rest
from test_endpoint import SilentServer
from test_remote import textured_video

from concurrency import InFlight
from media import gradient, image_bytes, make_video


@pytest.fixture(autouse=True)
def _default_policy():
    q.set_fetch_policy(None)
    yield
    q.set_fetch_policy(None)


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def files():
    server = FileServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def local_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("lanes") / "local.png"
    gradient(64, 48).save(path)
    return path


async def _until(check, within: float = 20.0) -> None:
    limit = time.monotonic() + within
    while not check():
        assert time.monotonic() < limit, "the condition never came"
        await asyncio.sleep(0.02)


async def _drop(tasks: list) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- lanes: one slow host, one slow read --------------------------------------------------------------------


def test_local_inline_and_other_hosts_do_not_wait_behind_a_host_that_never_answers(silent, files, local_png):
    """32 requests wait on a host that accepts and never answers. Before, they took all 16 download slots: a
    0.03 s local image waited 20 s. Now local and inline sources take no download slot, and the silent host
    holds only its per-host share (4), so another host is served too."""
    q.set_fetch_policy(image_deadline=300, read_timeout=300, connect_timeout=300)
    inline = "data:image/png;base64," + base64.b64encode(image_bytes(gradient(40, 30), "PNG")).decode()
    other = files.add("/other.png", image_bytes(gradient(50, 40), "PNG"))

    async def main():
        stuck = [
            asyncio.ensure_future(q.afetch_image({"image": f"http://127.0.0.1:{silent.port}/{i}.png"}))
            for i in range(32)
        ]
        try:
            await _until(lambda: silent.accepted >= 4 and q.aio.stats()["lanes"]["hosts"]["waiting"] >= 28)
            got = [
                await asyncio.wait_for(q.afetch_image({"image": value}), 20)
                for value in (str(local_png), inline, other)
            ]
            snapshot = q.aio.stats()
            assert not any(t.done() for t in stuck)
            return got, snapshot
        finally:
            await _drop(stuck)

    got, snapshot = asyncio.run(main())
    assert [im.size for im in got] == [q.fetch_image({"image": v}).size for v in (str(local_png), inline, other)]
    assert silent.accepted == 4, silent.accepted  # the per-host limit, not the whole download lane
    hosts = snapshot["lanes"]["hosts"]
    assert (hosts["active"], hosts["in_use"], hosts["waiting"]) == (1, 4, 28), hosts
    assert hosts["busiest"][0] == {"host": f"http://localhost:{silent.port}", "in_use": 4, "waiting": 28}
    assert snapshot["downloads"] == 4 and snapshot["waiting"] == 28
    assert _settles(lambda: at_rest(q.aio.stats()), within=10), q.aio.stats()


def test_no_spelling_of_one_host_opens_a_lane_of_its_own(silent):
    """The lane was keyed on the text of the host: one silent server reached as 127.1, 2130706433, 0x7f000001,
    localhost, a trailing dot... took all 16 download slots (found attacking from outside)."""
    q.set_fetch_policy(image_deadline=300, read_timeout=300, connect_timeout=300)
    spellings = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "localhost", "LOCALHOST."]
    spellings.append("[::ffff:7f00:1]")
    urls = [f"http://{h}:{silent.port}/{i}.png" for h in spellings for i in range(3)]

    async def main():
        stuck = [asyncio.ensure_future(q.afetch_image({"image": u})) for u in urls]
        try:
            await _until(lambda: silent.accepted >= 4 and q.aio.stats()["lanes"]["hosts"]["waiting"] >= len(urls) - 4)
            await asyncio.sleep(0.3)  # any further connection would have come by now
            return q.aio.stats()
        finally:
            await _drop(stuck)

    snapshot = asyncio.run(main())
    assert silent.accepted == 4, silent.accepted
    hosts = snapshot["lanes"]["hosts"]
    assert (hosts["active"], hosts["in_use"], hosts["waiting"]) == (1, 4, len(urls) - 4), hosts
    assert _settles(lambda: at_rest(q.aio.stats()), within=10), q.aio.stats()


def test_lane_keys_name_each_server_once():
    key = _resolve.remote_host
    assert key("http://example.com/a") == key("http://EXAMPLE.com.:80/b") == "http://example.com:80"
    assert key("https://example.com/a") == key("https://example.com:443/") != key("http://example.com/")
    assert key("http://10.0.0.1:81/") == key("http://0x0a.1:81/") == key("http://[::ffff:10.0.0.1]:81/")
    assert key("http://10.0.0.1:81/") != key("http://10.0.0.2:81/") != key("http://10.0.0.2:82/")
    assert key("http://user:secret@example.com/x") == "http://example.com:80"  # no credentials in the key


def test_a_lent_decode_slot_is_lent_by_the_work_thread_alone_and_never_leaks():
    """Two decoder threads of one call could enter the network wait together: both saw the slot held, one
    lent it, both took one back: a decode slot leaked for good. And a parallel decoder lent the call's slot
    while its siblings went on decoding under it. Only the work's own thread lends it now."""
    slots = _slots.Slots("decodes", lambda: 2)
    slots.acquire_blocking()
    token = _cancel.Token()
    token.lease = _slots.Lease(slots)
    token.lease.owner = threading.get_ident()  # this thread runs the work (aio's worker sets it so)

    def sibling(seen):
        with _cancel.scope(token), _cancel.network():  # a parallel decoder of the same call, waiting on a range
            seen.append(slots.in_use)

    seen = []
    thread = threading.Thread(target=sibling, args=(seen,))
    thread.start()
    thread.join(10)
    assert seen == [1]  # not lent: the call's other threads still decode under it
    with _cancel.scope(token), _cancel.network():
        assert slots.in_use == 0  # the work's own thread waits: lent
        with _cancel.network():
            assert slots.in_use == 0  # nested: lent once
        thread = threading.Thread(target=sibling, args=(seen,))
        thread.start()
        thread.join(10)
    assert seen == [1, 0] and slots.in_use == 1  # taken back once
    token.lease.close()
    assert slots.in_use == 0 and slots.idle


def test_taking_a_lent_slot_back_is_never_refused_and_comes_first():
    """A decode that lent its slot while it waited on a ranged read was refused with OverloadedError when it
    wanted the slot back and the queue was full: work already running failed under load."""
    slots = _slots.Slots("decodes", lambda: 1, max_waiting=lambda: 1)
    slots.acquire_blocking()
    lease = _slots.Lease(slots)
    lease.owner = threading.get_ident()
    assert lease.lend() and slots.in_use == 0
    slots.acquire_blocking()  # another decode takes the slot meanwhile
    order = []
    newcomer = threading.Thread(target=lambda: (slots.acquire_blocking(), order.append("new"), slots.release()))
    newcomer.start()
    while slots.waiting < 1:
        time.sleep(0.001)
    with pytest.raises(q.OverloadedError):  # the queue is full for new work
        slots.acquire_blocking()
    back = threading.Thread(target=lambda: (lease.resume(), order.append("resumed")))
    back.start()
    while slots.waiting < 2:
        time.sleep(0.001)
    slots.release()  # the other decode ends: the resumed one goes first
    back.join(10)
    assert order == ["resumed"]
    lease.close()
    newcomer.join(10)
    assert order == ["resumed", "new"] and slots.idle


def test_a_full_queue_fails_fast_with_a_typed_overloaded_error(silent):
    q.set_fetch_policy(max_concurrent_per_host=1, max_queued=3, image_deadline=300, read_timeout=300)
    url = f"http://127.0.0.1:{silent.port}/x.png"

    async def main():
        tasks = [asyncio.ensure_future(q.afetch_image({"image": url})) for _ in range(8)]
        try:
            await _until(lambda: sum(t.done() for t in tasks) >= 4)
            await asyncio.sleep(0.2)
            return [t.exception() for t in tasks if t.done()], q.aio.stats()
        finally:
            await _drop(tasks)

    refused, snapshot = asyncio.run(main())
    assert len(refused) == 4 and all(isinstance(e, q.OverloadedError) for e in refused), refused
    assert f"downloads from http://localhost:{silent.port}" in str(refused[0])
    assert "retry later" in str(refused[0]) and "max_queued" in str(refused[0])
    assert snapshot["lanes"]["hosts"]["waiting"] == 3 and snapshot["lanes"]["hosts"]["in_use"] == 1
    assert _settles(lambda: at_rest(q.aio.stats()), within=10), q.aio.stats()


def test_queue_waits_per_lane_are_reported():
    async def main():
        return await asyncio.gather(*[q.afetch_image({"image": gradient(64 + i, 48)}) for i in range(12)])

    q.set_fetch_policy(max_concurrent_decodes=1)
    before = q.aio.stats()["lanes"]["decodes"]["granted"]
    assert len(asyncio.run(main())) == 12
    decodes = q.aio.stats()["lanes"]["decodes"]
    assert decodes["granted"] - before == 12 and decodes["capacity"] == 1
    assert decodes["wait_max_s"] > 0 and decodes["wait_p99_s"] > 0  # eleven of them queued behind one slot
    assert decodes["wait_p50_s"] <= decodes["wait_p99_s"] <= decodes["wait_max_s"]


def test_a_decode_waiting_on_a_ranged_read_lends_its_decode_slot(files, local_png, tmp_path, monkeypatch):
    """One decode slot; a video read by range from a slow server is being decoded. Before, its network waits
    held the slot, and a local image waited for the whole video."""
    monkeypatch.setattr(_resolve, "FIRST_BYTES", 32 << 10)
    data = textured_video(tmp_path / "slow.mp4", frames=240).read_bytes()
    url = files.add("/slow-ranged.mp4", data, rate=60_000)
    q.set_fetch_policy(max_concurrent_decodes=1, deadline=300, read_timeout=300)

    async def main():
        video = asyncio.ensure_future(q.afetch_video({"video": url, "nframes": 16}, backend="pyav"))
        try:
            f = files.files["/slow-ranged.mp4"]
            await _until(lambda: len(f.requests) > 1)  # past the first bytes: ranged reads in the decode
            img = await asyncio.wait_for(q.afetch_image({"image": str(local_png)}), 20)
            assert not video.done()
            return img
        finally:
            await _drop([video])

    assert asyncio.run(main()).size == (56, 56)
    assert _settles(lambda: at_rest(q.aio.stats()), within=10), q.aio.stats()


def test_frames_fetched_by_url_do_not_hold_a_decode_slot(files, local_png):
    frames = [files.add(f"/frame{i}.png", image_bytes(gradient(64, 48), "PNG"), delay=4) for i in range(4)]
    q.set_fetch_policy(max_concurrent_decodes=1, image_deadline=300)

    async def main():
        video = asyncio.ensure_future(q.afetch_video({"video": frames, "sample_fps": 1.0}))
        try:
            await _until(lambda: len(files.files["/frame0.png"].requests) == 1)
            img = await asyncio.wait_for(q.afetch_image({"image": str(local_png)}), 3)
            assert not video.done()
            return img
        finally:
            await _drop([video])

    assert asyncio.run(main()).size == (56, 56)


@pytest.mark.parametrize("limit", [1, usable_cpus() + 2])
def test_max_concurrent_decodes_governs_image_decodes(local_png, monkeypatch, limit):
    """Image decodes were capped by a fixed semaphore of one per core, whatever the policy said."""
    decoding = InFlight()
    real = image.decode_rgb

    def slow(*a, **k):
        with decoding:
            time.sleep(0.2)
            return real(*a, **k)

    monkeypatch.setattr(image, "decode_rgb", slow)
    q.set_fetch_policy(max_concurrent_decodes=limit)
    threads = [threading.Thread(target=q.fetch_image, args=({"image": str(local_png)},)) for _ in range(2 * limit)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert decoding.peak == limit, decoding.peak


# --- cancellation within a decode ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_png():
    """6000x4000: about 0.35 s to decode here."""
    rng = np.random.default_rng(0)
    h, w = 4000, 6000
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    a = np.stack(np.broadcast_arrays((y + x) / 2, y + 0 * x, x + 0 * y), -1)
    a = (a + rng.integers(0, 16, (h, w, 1))).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(a).save(out, "PNG", compress_level=1)
    return out.getvalue()


def test_a_cancelled_image_stops_mid_decode(big_png, monkeypatch):
    """The decode of a cancelled 24-megapixel PNG ran to its end before (0.2-2 s of a slot); now the decoder
    is fed through a reader that stops it within one block of compressed bytes."""
    outcome, started = [], threading.Event()
    real = image.decode_rgb

    def watched(*a, **k):
        started.set()
        try:
            out = real(*a, **k)
        except BaseException as exc:
            outcome.append(type(exc))
            raise
        outcome.append("decoded")
        return out

    monkeypatch.setattr(image, "decode_rgb", watched)

    async def main():
        task = asyncio.ensure_future(q.afetch_image({"image": big_png, "max_pixels": 256 * 28 * 28}))
        await _until(started.is_set)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _settles(lambda: outcome, within=10) and outcome == [_cancel.Cancelled], outcome
    assert _settles(lambda: at_rest(q.aio.stats()), within=10), q.aio.stats()


def test_a_cancelled_video_decode_stops_at_the_next_packet(tmp_path, monkeypatch):
    """One GOP of 300 frames, targets at its two ends: before, a cancel was seen only when the next target
    came out, after the whole GOP was decoded."""
    path = make_video(tmp_path / "gop.mp4", frames=300, gop=300, width=320, height=240)
    token, after = _cancel.Token(), []
    real = _pyav._packets_from

    def packets(*a, **k):
        for n, packet in enumerate(real(*a, **k)):
            if n == 40:
                token.cancel()  # the caller goes away in the middle of the GOP
            if token.cancelled:
                after.append(packet)
            yield packet

    monkeypatch.setattr(_pyav, "_packets_from", packets)
    with _cancel.scope(token), pytest.raises(_cancel.Cancelled):
        q.fetch_video({"video": str(path), "nframes": 2}, backend="pyav")
    assert len(after) <= 2, len(after)
