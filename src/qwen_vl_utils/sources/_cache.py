"""An optional on-disk cache of remote media fetched whole (images, and videos that came in one piece).

Off by default; on with ``FetchPolicy(media_cache=DIR)`` or ``QWENVL_MEDIA_CACHE=DIR``. Entries are keyed by
URL and stored only when the server gave a validator (ETag or Last-Modified); every reuse is revalidated with a
conditional request (a 304 costs no body). The cache is bounded by ``media_cache_max_bytes`` (least recently
used entries are evicted first) and ``media_cache_max_age`` (older entries are dropped, however valid).

Safe across threads and processes sharing the directory: a body is written to a temporary file and renamed
into place under a name that includes its SHA-256, then the entry's small JSON record is renamed into place,
so a reader sees the old entry or the new one, never a partial file. The record holds the body's SHA-256,
checked on every read: a damaged body is deleted and fetched again. Records keep the URL without its password
(the key, a hash of the whole URL, still tells different credentials apart).

Eviction does not read the records: a scan lists the directory once (sizes from the bodies, last use from the
records' modification times, age from the bodies'). A store does not scan: every store appends its size to a
small journal (``usage.log``) shared by all processes, and each process adds what is new there to the total
its last scan found; it scans when that total passes the cap (and then evicts down to ``LOW_WATER`` of it), when
its last scan is ``SCAN_INTERVAL`` old, or when the journal was started afresh by another process.

The cache never fails a fetch: an ``OSError`` of its own (a directory that cannot be created, read or written)
logs one warning naming the directory and the fetch goes on without the cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional

from .._errors import describe, redact_url
from ._policy import FetchPolicy

__all__ = ["Entry", "MediaCache", "cache_for"]

logger = logging.getLogger("qwen_vl_utils")

_VERSION = 1
#: the directory is scanned at least this often while processes store (expired entries, other leftovers)
SCAN_INTERVAL = 300.0
#: past the size cap, least recently used entries go until the cache is down to this fraction of the cap
LOW_WATER = 0.9
#: bodies without a record, or superseded, younger than this may belong to a writer at work: left alone
_GRACE = 60.0
#: temporary files older than this belong to a writer that died
_STALE_PART = 3600.0
_JOURNAL = "usage.log"
_SUMMARY = "usage.state"  # what the last scan (of any process) found: a new process starts from it
_LINE = 16  # one journal line: a store's size in bytes, 15 digits and a newline
_JOURNAL_MAX = _LINE * 65536  # a longer journal is started afresh at the next scan
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    key: str
    url: str
    data_path: str
    sha256: str
    size: int
    etag: Optional[str]
    last_modified: Optional[str]
    stored_at: float

    def conditional_headers(self) -> dict:
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass
class _Usage:
    """What this process knows of one cache directory's size."""

    total: int = 0  # bytes the last scan left, plus every store journaled since
    scanned: float = float("-inf")  # time.monotonic() of the last scan
    journal: tuple = ()  # (st_dev, st_ino) of the journal read
    pos: int = 0  # how far it was read

    @classmethod
    def load(cls, path: str) -> _Usage:
        """What the last scan of any process left, if it is recent; else a usage that asks for a scan."""
        try:
            with _open(path) as f:
                state = json.load(f)
            age = time.time() - float(state["at"])
            if 0 <= age < SCAN_INTERVAL:
                journal = (int(state["dev"]), int(state["ino"]))
                return cls(int(state["total"]), time.monotonic() - age, journal, int(state["pos"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return cls()

    def dump(self) -> bytes:
        at = time.time() - (time.monotonic() - self.scanned)
        dev, ino = self.journal
        return json.dumps({"total": self.total, "dev": dev, "ino": ino, "pos": self.pos, "at": at}).encode()

    def catch_up(self, path: str) -> bool:
        """Add the stores journaled since the last look; False when the journal is not the one last read."""
        with _open(path) as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self.journal or st.st_size < self.pos:
                return False
            f.seek(self.pos)
            new = f.read((st.st_size - self.pos) // _LINE * _LINE)
        new = new[: len(new) // _LINE * _LINE]
        try:
            self.total += sum(int(new[i : i + _LINE]) for i in range(0, len(new), _LINE))
        except ValueError:  # not a journal this version wrote: scan
            return False
        self.pos += len(new)
        return True


_usage: dict = {}  # cache root -> _Usage
_usage_lock = threading.RLock()


def _fresh_lock_after_fork() -> None:
    global _usage_lock
    _usage_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_after_fork)


#: how every cache file is opened: a planted symlink is not followed, a planted FIFO does not block the open
_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _open(path: str, mode: str = "rb", flags: int = os.O_RDONLY) -> BinaryIO:
    """A cache file, opened without following a symlink or waiting on a FIFO; only a regular file will do."""
    fd = os.open(path, flags | _SAFE, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (planted in the cache directory?)", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def _check_owner(root: str) -> None:
    """A cache directory someone else owns, or may write to, could redirect writes through planted links or serve
    planted content: refused (OSError), like an unusable directory."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "not a directory (a symlink?)", root)
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(errno.EPERM, f"owned by uid {st.st_uid}, not by this user (uid {os.getuid()})", root)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(errno.EPERM, f"writable by others (mode {stat.filemode(st.st_mode)})", root)


def _warn(root: str, doing: str, exc: OSError) -> None:
    logger.warning("media cache %s: %s failed (%s); going on without the cache", root, doing, exc)


class MediaCache:
    """One call's view of a cache directory. After an ``OSError`` of its own it warns once and does nothing
    more (lookups miss, stores are skipped): a cache never fails a fetch."""

    def __init__(self, root: str, max_bytes: int, max_age: float, key_without_credentials: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.key_without_credentials = key_without_credentials
        self.failed = False
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        _check_owner(self.root)

    def key(self, url: str) -> str:
        """The entry's name: a digest of the URL, or, when the operator asked for it
        (``FetchPolicy.media_cache_key_without_credentials``), of the URL without its credentials, so that a
        presigned URL signed again finds the entry (which is still revalidated with the origin before reuse)."""
        if self.key_without_credentials:
            url = redact_url(url)
        return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:40]

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _record(self, key: str) -> str:
        return self._path(key + ".json")

    def _fail(self, doing: str, exc: OSError) -> None:
        if not self.failed:
            _warn(self.root, doing, exc)
        self.failed = True

    # -- reading ----------------------------------------------------------------------------------------------

    def lookup(self, url: str) -> Optional[Entry]:
        """The entry for ``url`` if there is one, not older than the maximum age; None otherwise."""
        if self.failed:
            return None
        key = self.key(url)
        rec = self._load(key)
        if rec is None:
            return None
        try:
            entry = Entry(
                key=key,
                url=rec["url"],
                data_path=self._path(rec["data"]),
                sha256=rec["sha256"],
                size=int(rec["size"]),
                etag=rec.get("etag"),
                last_modified=rec.get("last_modified"),
                stored_at=float(rec["stored_at"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):  # not a record this version wrote
            return None
        if entry.url != redact_url(url) or rec.get("version") != _VERSION or "/" in rec["data"] or "\\" in rec["data"]:
            return None
        if time.time() - entry.stored_at > self.max_age:
            self.remove(entry)
            return None
        return entry

    def _load(self, key: str) -> Optional[dict]:
        try:
            with _open(self._record(key)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fail("reading a record", exc)
        except ValueError:
            pass
        return None

    def read(self, entry: Entry) -> Optional[bytes]:
        """The entry's body, checked against its SHA-256; None (and the entry removed) if damaged or gone."""
        out = io.BytesIO()
        return out.getvalue() if self._copy(entry, out) else None

    def copy_to(self, entry: Entry, path: str) -> bool:
        """Copy the entry's body to ``path``, checking its SHA-256 on the way; False if damaged or gone."""
        try:
            with open(path, "wb") as out:
                return self._copy(entry, out)
        except OSError as exc:
            self._fail(f"copying an entry to {path}", exc)
            return False

    def _copy(self, entry: Entry, out: BinaryIO) -> bool:
        digest, n, writing = hashlib.sha256(), 0, False
        try:
            with _open(entry.data_path) as src:
                while n <= entry.size:
                    chunk = src.read(min(_CHUNK, entry.size + 1 - n))
                    if not chunk:
                        break
                    digest.update(chunk)
                    n += len(chunk)
                    writing = True
                    out.write(chunk)
                    writing = False
        except FileNotFoundError:  # evicted or superseded by another process meanwhile
            self.remove(entry)
            return False
        except OSError as exc:
            if not writing:  # an unreadable body: of no use to anyone
                self.remove(entry)
            self._fail("copying an entry out" if writing else "reading an entry", exc)
            return False
        if n != entry.size or digest.hexdigest() != entry.sha256:
            logger.warning(
                "media cache %s: the entry for %s is damaged (%d bytes, SHA-256 %s, expected %d bytes, %s); "
                "fetching it again",
                self.root,
                describe(entry.url),
                n,
                digest.hexdigest()[:16],
                entry.size,
                entry.sha256[:16],
            )
            self.remove(entry)
            return False
        self.touch(entry)
        return True

    def touch(self, entry: Entry) -> None:
        """Mark the entry used now (least-recently-used order is the records' modification times)."""
        with contextlib.suppress(OSError):  # a read-only cache is still a cache
            os.utime(self._record(entry.key))

    def remove(self, entry: Entry) -> None:
        self._unlink(entry.key + ".json", os.path.basename(entry.data_path))

    def _unlink(self, *names: str) -> None:
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(self._path(name))

    # -- writing ----------------------------------------------------------------------------------------------

    def store(
        self,
        url: str,
        body_path: Optional[str],
        body: Optional[bytes],
        etag: Optional[str],
        last_modified: Optional[str],
    ) -> None:
        """Keep a body (bytes, or a file to copy) for ``url``. Without a validator nothing is kept."""
        if self.failed or not (etag or last_modified):
            return
        key = self.key(url)
        try:
            written = self._write(key, lambda out: _write_body(out, body_path, body), self._data_name(key))
            if written is None:  # over the cap by itself
                return
            size, sha = written
            record = {
                "version": _VERSION,
                "url": redact_url(url),
                "data": f"{key}.{sha[:16]}.data",
                "sha256": sha,
                "size": size,
                "etag": etag,
                "last_modified": last_modified,
                "stored_at": time.time(),
            }
            self._write(key, lambda out: out.write(json.dumps(record).encode()), lambda _: key + ".json")
            self._account(size)
        except OSError as exc:  # a full, read-only or vanished directory must not fail the fetch
            self._fail("storing an entry", exc)

    def _data_name(self, key: str) -> Callable:
        return lambda written: f"{key}.{written[1][:16]}.data" if written[0] <= self.max_bytes else None

    def _write(self, key: str, write: Callable, name: Callable) -> object:
        """``write(out)`` into a temporary file, renamed to ``name(result)`` (None: dropped); the result or None."""
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".part", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as out:
                result = write(out)
            final = name(result)
            if final is None:
                return None
            os.replace(tmp, self._path(final))
            tmp = None
            return result
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    # -- size -------------------------------------------------------------------------------------------------

    def _account(self, size: int) -> None:
        """Journal a store; scan when the running total passes the cap or the last scan is old."""
        path = self._path(_JOURNAL)
        with _open(path, "ab", os.O_WRONLY | os.O_APPEND | os.O_CREAT) as f:
            f.write(b"%015d\n" % size)  # one small O_APPEND write: never interleaved with another's
        with _usage_lock:
            usage = _usage.get(self.root) or _Usage.load(self._path(_SUMMARY))
            _usage[self.root] = usage
            current = usage.catch_up(path)
            if not current or usage.total > self.max_bytes or time.monotonic() - usage.scanned > SCAN_INTERVAL:
                self.evict()

    def evict(self) -> None:
        """Scan the directory: drop expired entries, leftovers of writers and, least recently used first, entries
        past the size cap (down to ``LOW_WATER`` of it). The running total restarts from what is left, here and in
        processes that start after this one."""
        with _usage_lock:
            journal, pos = self._journal_mark()  # before the listing: stores after it are added on top
            usage = _usage[self.root] = _Usage(self._scan(), time.monotonic(), journal, pos)
            self._write("usage", lambda out: out.write(usage.dump()), lambda _: _SUMMARY)

    def _journal_mark(self) -> tuple:
        """The journal's identity and length (a long journal is started afresh first)."""
        path = self._path(_JOURNAL)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            _open(path, "ab", os.O_WRONLY | os.O_CREAT).close()
            st = os.stat(path)
        if st.st_size > _JOURNAL_MAX:  # other processes see a new file and scan
            fd, tmp = tempfile.mkstemp(prefix=".usage.", suffix=".part", dir=self.root)
            os.close(fd)
            os.replace(tmp, path)
            st = os.stat(path)
        return (st.st_dev, st.st_ino), st.st_size

    def _scan(self) -> int:
        """One listing of the directory, no record read (but for a key with several bodies); the bytes left."""
        now = time.time()
        records, bodies = {}, {}  # key -> last use; key -> [(name, size, mtime)]
        with os.scandir(self.root) as items:
            for item in items:
                try:
                    st = item.stat()
                except OSError:
                    continue
                name = item.name
                if name.endswith(".json"):
                    records[name[:-5]] = st.st_mtime
                elif name.endswith(".data"):
                    bodies.setdefault(name.split(".", 1)[0], []).append((name, st.st_size, st.st_mtime))
                elif name.endswith(".part") and now - st.st_mtime > _STALE_PART:
                    self._unlink(name)
        live, kept = [], 0  # (last use, key, body, size); bytes of bodies left alone
        for key, files in bodies.items():
            current = self._current_body(key, files) if key in records else None
            for name, size, mtime in files:
                if name == current and now - mtime > self.max_age:  # a body's mtime is when it was stored
                    self._unlink(key + ".json", name)
                elif name == current:
                    live.append((records[key], key, name, size))
                elif now - mtime > _GRACE:  # superseded, or a writer's that died before its record
                    self._unlink(name)
                else:
                    kept += size
        for key, used in records.items():
            if key not in bodies and now - used > _GRACE:  # its body is gone
                self._unlink(key + ".json")
        return self._evict_lru(live, kept)

    def _current_body(self, key: str, files: list) -> Optional[str]:
        """The body a key's record names: the only one there, or the one its record says."""
        if len(files) == 1:
            return files[0][0]
        rec = self._load(key)
        return rec.get("data") if isinstance(rec, dict) else None

    def _evict_lru(self, live: list, kept: int) -> int:
        """Least recently used first, entries past the cap go (down to ``LOW_WATER`` of it); the bytes left."""
        total = kept + sum(size for *_, size in live)
        if total <= self.max_bytes:
            return total
        for _used, key, name, size in sorted(live):
            if total <= self.max_bytes * LOW_WATER:
                break
            self._unlink(key + ".json", name)
            total -= size
        return total

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        with _usage_lock:
            _usage.pop(self.root, None)


def _write_body(out: BinaryIO, body_path: Optional[str], body: Optional[bytes]) -> tuple:
    """Copy the body (bytes, or a file) to ``out``: its size and SHA-256."""
    digest = hashlib.sha256()
    if body is not None:
        out.write(body)
        digest.update(body)
        return len(body), digest.hexdigest()
    size = 0
    with open(body_path, "rb") as src:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def cache_for(policy: FetchPolicy) -> Optional[MediaCache]:
    """The policy's cache for one call; None without one, or when its directory cannot be made (one warning)."""
    if not policy.media_cache:
        return None
    try:
        return MediaCache(
            policy.media_cache,
            policy.media_cache_max_bytes,
            policy.media_cache_max_age,
            policy.media_cache_key_without_credentials,
        )
    except OSError as exc:
        _warn(os.path.abspath(policy.media_cache), "opening the directory", exc)
        return None
