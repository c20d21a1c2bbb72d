"""An optional on-disk cache of remote media fetched whole (images, and videos that came in one piece).

Off by default; on with ``FetchPolicy(media_cache=DIR)`` or ``QWENVL_MEDIA_CACHE=DIR``. Entries are keyed by
URL and stored only when the server gave a validator (ETag or Last-Modified); every reuse is revalidated with a
conditional request (a 304 costs no body). The cache is bounded by ``media_cache_max_bytes`` (least recently
used entries are evicted first) and ``media_cache_max_age`` (older entries are dropped, however valid).

Safe across threads and processes sharing the directory: a body is written to a temporary file and renamed
into place under a name that includes its SHA-256, then the entry's small JSON record is renamed into place,
so a reader sees the old entry or the new one, never a partial file. The record holds the body's SHA-256,
checked on every read: a damaged body is deleted and fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from ._policy import FetchPolicy

__all__ = ["Entry", "MediaCache", "cache_for"]

_VERSION = 1


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


class MediaCache:
    def __init__(self, root: str, max_bytes: int, max_age: float) -> None:
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self.max_age = max_age
        os.makedirs(self.root, exist_ok=True)

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:40]

    def _record(self, key: str) -> str:
        return os.path.join(self.root, key + ".json")

    # -- reading ----------------------------------------------------------------------------------------------

    def lookup(self, url: str) -> Optional[Entry]:
        """The entry for ``url`` if there is one, not older than the maximum age; None otherwise."""
        key = self.key(url)
        try:
            with open(self._record(key), encoding="utf-8") as f:
                rec = json.load(f)
            entry = Entry(
                key=key,
                url=rec["url"],
                data_path=os.path.join(self.root, rec["data"]),
                sha256=rec["sha256"],
                size=int(rec["size"]),
                etag=rec.get("etag"),
                last_modified=rec.get("last_modified"),
                stored_at=float(rec["stored_at"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if entry.url != url or rec.get("version") != _VERSION or "/" in rec["data"] or "\\" in rec["data"]:
            return None
        if time.time() - entry.stored_at > self.max_age:
            self.remove(entry)
            return None
        return entry

    def read(self, entry: Entry) -> Optional[bytes]:
        """The entry's body, checked against its SHA-256; None (and the entry removed) if damaged or gone."""
        try:
            with open(entry.data_path, "rb") as f:
                data = f.read(entry.size + 1)
        except OSError:
            self.remove(entry)
            return None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            self.remove(entry)
            return None
        self.touch(entry)
        return data

    def copy_to(self, entry: Entry, path: str) -> bool:
        """Copy the entry's body to ``path``, checking its SHA-256 on the way; False if damaged or gone."""
        digest = hashlib.sha256()
        n = 0
        try:
            with open(entry.data_path, "rb") as src, open(path, "wb") as dst:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    n += len(chunk)
                    dst.write(chunk)
        except OSError:
            self.remove(entry)
            return False
        if n != entry.size or digest.hexdigest() != entry.sha256:
            self.remove(entry)
            return False
        self.touch(entry)
        return True

    def touch(self, entry: Entry) -> None:
        """Mark the entry used now (least-recently-used order is the records' modification times)."""
        with contextlib.suppress(OSError):
            os.utime(self._record(entry.key))

    def remove(self, entry: Entry) -> None:
        for path in (self._record(entry.key), entry.data_path):
            with contextlib.suppress(OSError):
                os.unlink(path)

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
        if not (etag or last_modified):
            return
        key = self.key(url)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".part", dir=self.root)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                if body is not None:
                    out.write(body)
                    digest.update(body)
                    size = len(body)
                else:
                    with open(body_path, "rb") as src:
                        while True:
                            chunk = src.read(1 << 20)
                            if not chunk:
                                break
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
            if size > self.max_bytes:
                os.unlink(tmp)
                return
            sha = digest.hexdigest()
            data_name = f"{key}.{sha[:16]}.data"
            os.replace(tmp, os.path.join(self.root, data_name))
            record = {
                "version": _VERSION,
                "url": url,
                "data": data_name,
                "sha256": sha,
                "size": size,
                "etag": etag,
                "last_modified": last_modified,
                "stored_at": time.time(),
            }
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".part", dir=self.root)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(record, out)
            os.replace(tmp, self._record(key))
        except OSError:  # a full or read-only disk must not fail the fetch that wanted to cache
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        self.evict()

    def evict(self) -> None:
        """Drop expired entries, stray bodies and, least recently used first, entries past the size cap."""
        now = time.time()
        records, datas, total = [], {}, 0
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if name.endswith(".json"):
                records.append((st.st_mtime, name[:-5]))
            elif name.endswith(".data"):
                datas[name] = st.st_size
            elif name.endswith(".part") and now - st.st_mtime > 3600:  # a writer that died long ago
                with contextlib.suppress(OSError):
                    os.unlink(path)
        live: dict = {}
        for mtime, key in records:
            entry = self._entry_by_key(key)
            if entry is None or now - entry.stored_at > self.max_age:
                if entry is not None:
                    self.remove(entry)
                continue
            live[key] = (mtime, entry)
        used = {os.path.basename(e.data_path) for _, e in live.values()}
        for name in datas:
            if name not in used and now - _mtime(os.path.join(self.root, name)) > 60:  # superseded versions
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.root, name))
        total = sum(datas.get(os.path.basename(e.data_path), 0) for _, e in live.values())
        for _mtime_used, entry in sorted(live.values(), key=lambda item: item[0]):
            if total <= self.max_bytes:
                break
            self.remove(entry)
            total -= entry.size

    def _entry_by_key(self, key: str) -> Optional[Entry]:
        try:
            with open(self._record(key), encoding="utf-8") as f:
                url = json.load(f)["url"]
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                os.unlink(self._record(key))
            return None
        if self.key(url) != key:
            return None
        entry = self.lookup(url)
        return entry

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root, exist_ok=True)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def cache_for(policy: FetchPolicy) -> Optional[MediaCache]:
    if not policy.media_cache:
        return None
    return MediaCache(policy.media_cache, policy.media_cache_max_bytes, policy.media_cache_max_age)
