"""The optional media cache: revalidation, expiry, eviction, damaged entries and concurrent writers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils import FetchPolicy
from qwen_vl_utils._errors import describe
from qwen_vl_utils.sources import _resolve as _sources
from qwen_vl_utils.sources._cache import LOW_WATER, MediaCache

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


class _OnRequest(list):
    """A file's request log that runs ``hook(n)`` as the server takes its n-th request, before it answers."""

    def __init__(self, items: list, hook) -> None:
        super().__init__(items)
        self.hook = hook

    def append(self, item: object) -> None:
        self.hook(len(self))
        super().append(item)


def _on_request(f, hook) -> None:
    f.requests = _OnRequest(f.requests, hook)


def _cache_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "qwen_vl_utils" and "media cache" in r.getMessage()]


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


def test_a_damaged_entry_is_fetched_again(files, tmp_path, caplog):
    url = files.add("/dmg.png", PNGS[2], etag='"d"')
    policy = _cached(tmp_path)
    good = q.fetch_image({"image": url}, policy=policy)
    (data,) = (tmp_path / "cache").glob("*.data")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="qwen_vl_utils"):
        again = q.fetch_image({"image": url}, policy=policy)
    assert np.array_equal(np.asarray(good), np.asarray(again))
    assert files.files["/dmg.png"].requests == [None, "304", None], "304, damage found, fetched again"
    (warning,) = _cache_warnings(caplog)
    assert "damaged" in warning and url in warning
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


# -- a cache never fails a fetch ---------------------------------------------------------------------------


def test_a_cache_directory_that_cannot_be_made_means_no_cache(files, tmp_path, caplog):
    url = files.add("/nodir.png", PNGS[0], etag='"n"')
    (tmp_path / "file").write_bytes(b"not a directory")
    root = tmp_path / "file" / "cache"
    plain = q.fetch_image({"image": url})
    with caplog.at_level(logging.WARNING, logger="qwen_vl_utils"):
        got = q.fetch_image({"image": url}, policy=FetchPolicy(media_cache=str(root)))
    assert np.array_equal(np.asarray(got), np.asarray(plain))
    (warning,) = _cache_warnings(caplog)
    assert str(root) in warning and "without the cache" in warning


@pytest.mark.parametrize("media", ["image", "video"])
def test_a_cache_directory_removed_during_a_fetch_means_no_cache_for_it(files, tmp_path, caplog, media):
    """The directory vanishes (a temp cleaner, an unmounted volume) between the lookup and the store: the fetch
    works, warns once, leaves no temporary file; the next fetch makes the directory again and stores."""
    if media == "video":
        pytest.importorskip("torch")
        body = make_video(tmp_path / "v.mp4", frames=24).read_bytes()
        url = files.add("/gone.mp4", body, ranges=False, etag='"g"')  # fetched whole into a temporary file
    else:
        url = files.add("/gone.png", PNGS[1], etag='"g"')
    f = files.files[url[url.rindex("/") :]]
    root = tmp_path / "cache"
    _on_request(f, lambda n: n == 0 and shutil.rmtree(root))
    fetch = q.fetch_video if media == "video" else q.fetch_image
    element = {media: url, "nframes": 4} if media == "video" else {media: url}
    policy = FetchPolicy(media_cache=str(root))
    with caplog.at_level(logging.WARNING, logger="qwen_vl_utils"):
        first = fetch(dict(element), policy=policy)
    (warning,) = _cache_warnings(caplog)
    assert str(root) in warning
    assert not os.listdir(_sources.library_tmpdir()), "the download's temporary file was removed"
    fetch(dict(element), policy=policy)
    again = fetch(dict(element), policy=policy)
    assert f.requests[1:] == [f.requests[1], "304"], "the second fetch stored it again, the third reused it"
    assert (first == again).all() if media == "video" else np.array_equal(np.asarray(first), np.asarray(again))


# -- credentials ---------------------------------------------------------------------------------------------


def test_records_keep_no_password_and_credentials_do_not_share_entries(files, tmp_path):
    plain = files.add("/cred.png", PNGS[0], etag='"c"')
    alice, bob = (plain.replace("http://", f"http://{who}@") for who in ("alice:s3cret-a", "alice:s3cret-b"))
    policy = _cached(tmp_path)
    q.fetch_image({"image": alice}, policy=policy)
    q.fetch_image({"image": alice}, policy=policy)
    q.fetch_image({"image": bob}, policy=policy)
    assert files.files["/cred.png"].requests == [None, "304", None], "another password: not the same entry"
    root = tmp_path / "cache"
    urls = sorted(json.loads(p.read_text())["url"] for p in root.glob("*.json"))
    assert urls == [plain.replace("http://", "http://alice:***@")] * 2
    assert not [p for p in root.iterdir() if b"s3cret" in p.read_bytes()], "no file in the cache holds a password"


def test_describe_and_error_messages_hide_passwords(files):
    assert describe("https://user:secret@host:8443/a.png?x=1") == "https://user:***@host:8443/a.png?x=1"
    assert describe("https://user:p@ss:w@host/a.png") == "https://user:***@host/a.png", "the last @ ends it"
    long = describe("https://user:secret@example.com/" + "a" * 200 + ".png")
    assert "secret" not in long and long.startswith("https://user:***@example.com/")
    for unchanged in ("https://host/a@b:c.png", "/data/user:secret@x.png"):
        assert describe(unchanged) == unchanged
    assert describe("https://token@host/a.png") == "https://***@host/a.png", "a user name alone is often a token"
    missing = files.url("/no-such.png").replace("http://", "http://user:secret@")
    with pytest.raises(q.NetworkError) as info:
        q.fetch_image({"image": missing})
    assert "secret" not in str(info.value) and "user:***@" in str(info.value)


# -- eviction -------------------------------------------------------------------------------------------------

OTHER_PROCESS_STORES = """
import sys, time
from qwen_vl_utils.sources._cache import LOW_WATER, MediaCache
cache = MediaCache(sys.argv[1], int(sys.argv[2]), 3600)
for i in range(int(sys.argv[3])):
    cache.store(f"http://other/{i}", None, bytes([i]) * 1000, '"o"', None)
    time.sleep(0.02)
"""


def test_eviction_counts_the_entries_of_other_processes(tmp_path):
    """Stores by another process since this one's last scan count towards the cap at this process's next store,
    and least recently used entries go first, down to LOW_WATER of the cap. A new process starts from the last
    scan's total instead of scanning again (a scan removes a dead writer's temporary file: it stays)."""
    root, cap = tmp_path / "shared", 5500  # five bodies of 1000 bytes fit
    here = MediaCache(str(root), cap, 3600)
    here.store("http://here/0", None, b"h" * 1000, '"h"', None)  # this process scans once: 1000 bytes
    dead = root / ".dead-writer.part"
    dead.write_bytes(b"x")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    time.sleep(0.02)
    subprocess.run([sys.executable, "-c", OTHER_PROCESS_STORES, str(root), str(cap), "4"], check=True, timeout=60)
    assert dead.exists(), "the other process did not scan: it started from this one's scan"
    time.sleep(0.02)
    here.store("http://here/1", None, b"i" * 1000, '"h"', None)  # 6000 bytes with the other process's four
    assert not dead.exists(), "past the cap: scanned"
    urls = ["http://here/0", "http://here/1"] + [f"http://other/{i}" for i in range(4)]
    left = {url for url in urls if here.lookup(url) is not None}
    assert left == {"http://other/1", "http://other/2", "http://other/3", "http://here/1"}
    assert sum(p.stat().st_size for p in root.glob("*.data")) <= cap * LOW_WATER


def test_a_scan_drops_expired_entries_and_leftovers(tmp_path):
    root = tmp_path / "c"
    cache = MediaCache(str(root), 1 << 30, 3600)
    cache.store("http://h/old", None, b"o" * 100, '"o"', None)
    cache.store("http://h/new", None, b"n" * 100, '"n"', None)
    orphan = root / ("0" * 40 + ".0123456789abcdef.data")  # a body whose writer died before its record
    orphan.write_bytes(b"x" * 10)
    stale = root / ".abc.part"  # a temporary file of a writer that died
    stale.write_bytes(b"x")
    young = root / ("1" * 40 + ".0123456789abcdef.data")  # a writer at work: its record comes next
    young.write_bytes(b"y" * 10)
    two_hours_ago = time.time() - 7200
    for path in (orphan, stale, Path(cache.lookup("http://h/old").data_path)):  # a body's mtime: when stored
        os.utime(path, (two_hours_ago, two_hours_ago))
    cache.evict()
    new = cache.lookup("http://h/new")
    assert sorted(p.name for p in root.iterdir() if p.suffix in (".json", ".data", ".part")) == sorted(
        [new.key + ".json", os.path.basename(new.data_path), young.name]
    )


# -- concurrency ----------------------------------------------------------------------------------------------

READER_WRITER = """
import logging, sys
import numpy as np
import qwen_vl_utils as q
damaged = []
class Count(logging.Handler):
    def emit(self, record):
        damaged.append(record.getMessage())
logging.getLogger("qwen_vl_utils").addHandler(Count())
root, url, n, *versions = sys.argv[1:]
versions = [np.asarray(q.fetch_image({"image": open(p, "rb").read()})) for p in versions]
policy = q.FetchPolicy(media_cache=root)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(n)):
    got = np.asarray(q.fetch_image({"image": url}, policy=policy))
    assert any(got.shape == v.shape and np.array_equal(got, v) for v in versions), "not one of the versions"
assert not damaged, damaged
print("ok")
"""


PROCESSES, FETCHES = 3, 80


@pytest.mark.slow
def test_processes_reading_and_replacing_the_same_entry(files, tmp_path):
    """The server flips between two versions every few requests, so processes sharing the cache both reuse the
    entry (304) and replace it (200) while the others read it: each fetch is exactly one of the versions, no
    read ever finds a partial or mismatched body (that would log a warning), and one valid entry is left."""
    rng = np.random.default_rng(0)  # noise: bodies of some 300 KB, long enough to write for a race to show
    versions = [
        image_bytes(Image.fromarray(rng.integers(0, 256, (240 + 30 * i, 320 + 40 * i, 3), np.uint8)), "PNG")
        for i in range(2)
    ]
    paths = []
    for i, data in enumerate(versions):
        paths.append(tmp_path / f"version{i}.png")
        paths[-1].write_bytes(data)
    url = files.add("/race.png", versions[0], etag='"r0"')
    f = files.files["/race.png"]

    def flip(n: int) -> None:
        v = n // 3 % 2
        f.data, f.etag = versions[v], f'"r{v}"'

    _on_request(f, flip)
    root = tmp_path / "shared-cache"
    argv = [sys.executable, "-c", READER_WRITER, str(root), url, str(FETCHES), *map(str, paths)]
    procs = [
        subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(PROCESSES)
    ]
    try:
        for p in procs:  # all ready before any starts: their fetches overlap
            assert p.stdout.readline().strip() == b"ready", p.stderr.read()
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 and out.strip() == b"ok" for p, (out, _) in zip(procs, outs)), outs
    codes = ["304" if r == "304" else "200" for r in f.requests]
    print("server answers:", codes.count("304"), "x 304,", codes.count("200"), "x 200")
    assert len(codes) == PROCESSES * FETCHES and codes.count("304") >= 20 and codes.count("200") >= 20, codes
    assert not list(root.glob("*.part")), "no partial file left"
    (record,) = root.glob("*.json")
    cache = MediaCache(str(root), 1 << 30, 3600)
    entry = cache.lookup(json.loads(record.read_text())["url"])
    assert entry is not None and cache.read(entry) in versions
