"""The sample table of an MP4/MOV video track from its ``moov`` box alone: no packet is read.

FFmpeg's mov demuxer already holds every sample's position, size, decode time and key flag after opening
(PyAV's ``stream.index_entries``); what it does not expose is each sample's composition offset (``ctts``),
which places the sample on the presentation timeline. This module reads that one box, so that the decoders'
presentation-order index is built from the header: for a remote file the index then costs the ``moov`` box,
not a pass over every packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Optional

__all__ = ["SampleTable", "sample_table"]

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}
MAX_MOOV = 256 << 20  # a moov box larger than this is not read (a hostile header)


@dataclass(frozen=True)
class SampleTable:
    """Per sample, in decode order: presentation timestamp (stream time base), byte position, size, key flag
    and the demuxer's discard flag (edit-list pre-roll)."""

    pts: list
    pos: list
    size: list
    key: list
    discard: list


def _boxes(data: bytes, start: int, end: int) -> list:
    """(type, payload start, payload end) of the boxes in data[start:end]."""
    out = []
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                break
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            break
        out.append((kind, pos + header, pos + size))
        pos += size
    return out


def _find_moov(f: BinaryIO, file_size: int) -> Optional[bytes]:
    """The payload of the top-level moov box, read with a few small reads; None for fragmented files."""
    pos = 0
    while pos + 8 <= file_size:
        f.seek(pos)
        head = f.read(16)
        if len(head) < 8:
            return None
        size, kind = struct.unpack_from(">I4s", head)
        header = 8
        if size == 1:
            if len(head) < 16:
                return None
            size, header = struct.unpack_from(">Q", head, 8)[0], 16
        elif size == 0:
            size = file_size - pos
        if size < header:
            return None
        if kind == b"moof":  # fragmented: samples live in fragments, not in moov
            return None
        if kind == b"moov":
            if size > MAX_MOOV:
                return None
            f.seek(pos + header)
            data = f.read(size - header)
            return data if len(data) == size - header else None
        pos += size
    return None


def _track(moov: bytes, track_id: int) -> Optional[tuple]:
    """The stbl payload range of the track with this id; None for a fragmented file (an mvex box)."""
    top = _boxes(moov, 0, len(moov))
    if any(kind == b"mvex" for kind, _, _ in top):
        return None
    for kind, a, b in top:
        if kind != b"trak":
            continue
        children = {k: (x, y) for k, x, y in _boxes(moov, a, b)}
        tkhd = children.get(b"tkhd")
        if tkhd is None:
            continue
        version = moov[tkhd[0]]
        tid = struct.unpack_from(">I", moov, tkhd[0] + (20 if version == 1 else 12))[0]
        if tid != track_id:
            continue
        stbl = _path(moov, children.get(b"mdia"), (b"minf", b"stbl"))
        return stbl
    return None


def _path(data: bytes, box: Optional[tuple], names: tuple) -> Optional[tuple]:
    for name in names:
        if box is None:
            return None
        box = next(((x, y) for k, x, y in _boxes(data, box[0], box[1]) if k == name), None)
    return box


def _composition_offsets(moov: bytes, stbl: tuple, count: int) -> Optional[list]:
    """Each sample's signed composition offset (0 without a ctts box); None if the box is inconsistent."""
    ctts = next(((x, y) for k, x, y in _boxes(moov, stbl[0], stbl[1]) if k == b"ctts"), None)
    if ctts is None:
        return [0] * count
    a, b = ctts
    if b - a < 8:
        return None
    entries = struct.unpack_from(">I", moov, a + 4)[0]
    if a + 8 + entries * 8 > b:
        return None
    runs = list(struct.iter_unpack(">Ii", moov[a + 8 : a + 8 + entries * 8]))
    if sum(n for n, _ in runs) != count:  # checked before expanding: a hostile count cannot allocate
        return None
    offsets: list = []
    for n, value in runs:
        offsets.extend([value] * n)
    return offsets


def _sample_count(moov: bytes, stbl: tuple) -> Optional[int]:
    stsz = next(((x, y) for k, x, y in _boxes(moov, stbl[0], stbl[1]) if k in (b"stsz", b"stz2")), None)
    if stsz is None or stsz[1] - stsz[0] < 12:
        return None
    return struct.unpack_from(">I", moov, stsz[0] + 8)[0]


def sample_table(container: Any, stream: Any, f: BinaryIO, file_size: int) -> Optional[SampleTable]:
    """The track's sample table, or None when it cannot be had from the header alone (not MP4/MOV, fragmented,
    several edits that repeat samples, or anything inconsistent): then the caller reads the packets."""
    if "mp4" not in container.format.name and "mov" not in container.format.name:
        return None
    entries = getattr(stream, "index_entries", None)  # PyAV >= 17
    if entries is None:
        return None
    n = len(entries)
    if n == 0:
        return None
    try:
        moov = _find_moov(f, file_size)
        if moov is None:
            return None
        stbl = _track(moov, int(stream.id))
        if stbl is None or _sample_count(moov, stbl) != n:
            return None  # FFmpeg rebuilt the index (several edits): not one entry per sample
        offsets = _composition_offsets(moov, stbl, n)
    except (struct.error, IndexError, ValueError, OSError):
        return None
    if offsets is None:
        return None
    shift = max(0, -min(offsets))  # FFmpeg shifts decode times down when offsets are negative (ctts v1)
    pts, pos, size, key, discard = [], [], [], [], []
    for e, off in zip(entries, offsets):
        pts.append(e.timestamp + shift + off)
        pos.append(e.pos)
        size.append(e.size)
        key.append(bool(e.is_keyframe))
        discard.append(bool(e.is_discard))
    return SampleTable(pts, pos, size, key, discard)
