"""The optional media cache: revalidation, expiry, eviction, damaged entries and concurrent writers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils import FetchPolicy, _sources
from qwen_vl_utils._cache import MediaCache

from media import gradient, image_bytes, make_video

PNGS = [image_bytes(gradient(60 + 10 * i, 40 + 5 * i), "PNG") for i in range(4)]


@pytest.fixture(scope="module")
def files():
    s = FileServer()
    yield s
    s.close()


def _cached(tmp_path, **changes):
    return FetchPolicy(media_cache=str(tmp_path / "cache"), **changes)


def _entries(root) -> list:
    return sorted(p.name for p in Path(root).glob("*.json"))


def test_reuse_is_revalidated_and_costs_no_body(files, tmp_path):
    url = files.add("/c1.png", PNGS[0], etag='"v1"')
    policy = _cached(tmp_path)
    first = q.fetch_image({"image": url}, policy=policy)
    sent = files.files["/c1.png"].sent
    second = q.fetch_image({"image": url}, policy=policy)
    f = files.files["/c1.png"]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert f.requests == [None, "304"], "the second fetch asked with If-None-Match and got a 304"
    assert f.sent == sent, "no body the second time"
    # the server's copy changes: the next fetch gets the new one and the cache follows
    f.data, f.etag = PNGS[1], '"v2"'
    third = q.fetch_image({"image": url}, policy=policy)
    assert third.size == q.fetch_image({"image": PNGS[1]}).size != first.size
    assert files.files["/c1.png"].requests[-1] is None
    fourth = q.fetch_image({"image": url}, policy=policy)
    assert fourth.size == third.size and files.files["/c1.png"].requests[-1] == "304"


def test_last_modified_validates_too_and_no_validator_means_no_entry(files, tmp_path):
    policy = _cached(tmp_path)
    url = files.add("/lm.png", PNGS[0], last_modified="Wed, 21 Oct 2015 07:28:00 GMT")
    q.fetch_image({"image": url}, policy=policy)
    q.fetch_image({"image": url}, policy=policy)
    assert files.files["/lm.png"].requests == [None, "304"]
    bare = files.add("/bare.png", PNGS[0])
    q.fetch_image({"image": bare}, policy=policy)
    q.fetch_image({"image": bare}, policy=policy)
    assert files.files["/bare.png"].requests == [None, None], "nothing to validate with: nothing kept"
    assert len(_entries(tmp_path / "cache")) == 1


def test_entries_expire(files, tmp_path):
    url = files.add("/exp.png", PNGS[0], etag='"e"')
    policy = _cached(tmp_path, media_cache_max_age=0.5)
    q.fetch_image({"image": url}, policy=policy)
    time.sleep(0.7)
    q.fetch_image({"image": url}, policy=policy)
    assert files.files["/exp.png"].requests == [None, None], "an expired entry is not even revalidated"


def test_least_recently_used_entries_are_evicted_past_the_size_cap(files, tmp_path):
    urls = [files.add(f"/lru{i}.png", PNGS[i], etag=f'"{i}"') for i in range(3)]
    cap = len(PNGS[0]) + len(PNGS[1]) + len(PNGS[2]) - 1  # room for two of the three
    policy = _cached(tmp_path, media_cache_max_bytes=cap)
    q.fetch_image({"image": urls[0]}, policy=policy)
    q.fetch_image({"image": urls[1]}, policy=policy)
    time.sleep(0.05)
    q.fetch_image({"image": urls[0]}, policy=policy)  # 0 is now more recently used than 1
    time.sleep(0.05)
    q.fetch_image({"image": urls[2]}, policy=policy)  # over the cap: 1 goes
    cache = MediaCache(str(tmp_path / "cache"), cap, 3600)
    assert cache.lookup(urls[0]) is not None and cache.lookup(urls[2]) is not None
    assert cache.lookup(urls[1]) is None
    total = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.data"))
    assert total <= cap


def test_a_damaged_entry_is_fetched_again(files, tmp_path):
    url = files.add("/dmg.png", PNGS[2], etag='"d"')
    policy = _cached(tmp_path)
    good = q.fetch_image({"image": url}, policy=policy)
    (data,) = (tmp_path / "cache").glob("*.data")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    again = q.fetch_image({"image": url}, policy=policy)
    assert np.array_equal(np.asarray(good), np.asarray(again))
    assert files.files["/dmg.png"].requests == [None, "304", None], "304, damage found, fetched again"
    assert q.fetch_image({"image": url}, policy=policy).size and files.files["/dmg.png"].requests[-1] == "304"


def test_videos_fetched_whole_are_cached(files, tmp_path):
    torch = pytest.importorskip("torch")
    video = make_video(tmp_path / "v.mp4", frames=24)
    url = files.add("/v.mp4", video.read_bytes(), ranges=False, etag='"vid"')
    policy = _cached(tmp_path)
    a = q.fetch_video({"video": url, "nframes": 4}, policy=policy)
    b = q.fetch_video({"video": url, "nframes": 4}, policy=policy)
    first, second = files.files["/v.mp4"].requests  # a video's first request asks for a range: a 200 here
    assert torch.equal(a, b) and first.startswith("bytes=") and second == "304"
    assert not os.listdir(_sources.library_tmpdir()), "the temporary copy was removed"


def test_the_environment_variable_turns_it_on(files, tmp_path, monkeypatch):
    url = files.add("/env.png", PNGS[0], etag='"env"')
    monkeypatch.setenv("QWENVL_MEDIA_CACHE", str(tmp_path / "envcache"))
    q.fetch_image({"image": url})
    q.fetch_image({"image": url})
    assert files.files["/env.png"].requests == [None, "304"]
    assert len(_entries(tmp_path / "envcache")) == 1


WRITER = """
import sys, qwen_vl_utils as q
policy = q.FetchPolicy(media_cache=sys.argv[1])
for _ in range(int(sys.argv[3])):
    img = q.fetch_image({"image": sys.argv[2]}, policy=policy)
    assert img.size[0] > 0
print("ok")
"""


@pytest.mark.slow
def test_two_processes_writing_the_same_key(files, tmp_path):
    """The server changes the body's version on every request, so both processes keep writing the entry while
    reading it: neither ever sees a partial or mismatched file, and what is left is one valid entry."""
    url = files.add("/race.png", PNGS[0], etag='"r0"')
    f = files.files["/race.png"]
    counter = {"n": 0}
    original = f.requests

    class Versioning(list):  # every request flips the body and its ETag: each fetch is a fresh 200 to store
        def append(self, item):
            counter["n"] += 1
            f.data, f.etag = PNGS[counter["n"] % 2], f'"r{counter["n"]}"'
            super().append(item)

    f.requests = Versioning(original)
    root = tmp_path / "shared-cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), url, "25"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 and out.strip() == b"ok" for p, (out, _) in zip(procs, outs)), outs
    assert not list(root.glob("*.part")), "no partial file left"
    (record,) = root.glob("*.json")
    cache = MediaCache(str(root), 1 << 30, 3600)
    entry = cache.lookup(__import__("json").loads(record.read_text())["url"])
    assert entry is not None and cache.read(entry) in PNGS
