"""Which keyframes a fresh decoder can start at: H.264 and HEVC keyframes checked in the bitstream.

Containers flag as keyframes packets that are only recovery points: x264's intra refresh writes no IDR after
the first frame, and marks the frame that starts each refresh wave as a keyframe (an MP4 sync sample), as do
open-GOP I-frames. A decoder started there either drops frames until it thinks the picture has recovered or
returns frames that differ from a decode from the start (measured on an intra-refresh file: wrong pixels 18
to 40 frames past the keyframe, with FFmpeg calling them recovered). Only an IDR (H.264), an I-frame whose
recovery point SEI says it is exact at once (``recovery_frame_cnt`` 0: an H.264 open GOP, x264's ``open-gop``),
or an IRAP picture (HEVC: IDR, BLA, CRA) makes the frames shown from it on independent of what came before it
(the leading pictures of an open GOP, shown before it, are the caller's to rule out).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

#: the codecs whose keyframes are checked; every keyframe of another codec counts as a fresh start
CHECKED = frozenset({"h264", "hevc"})


def fresh_start_check(cc: Any) -> Callable[[Any], bool]:
    """For a stream's codec context: a test of whether a keyframe packet starts a picture that a fresh decoder
    decodes exactly as one that started at the beginning. True for every packet of codecs not checked here."""
    inspect = _inspector(cc)
    if inspect is None:
        return lambda packet: True
    return lambda packet: inspect(packet)[0]


def recovery_point_check(cc: Any) -> Callable[[Any], bool]:
    """A test of whether a keyframe packet is a picture that a recovery point SEI says recovers only frames later
    (x264's intra refresh). Narrower than ``not fresh``: a non-IDR I-frame flagged as a keyframe without any
    such SEI (x264 with one reference frame and scene cuts) is no fresh start here, but is not one either."""
    inspect = _inspector(cc)
    if inspect is None:
        return lambda packet: False

    def check(packet: Any) -> bool:
        fresh, frames = inspect(packet)
        return not fresh and bool(frames)

    return check


def _inspector(cc: Any) -> Optional[Callable[[Any], tuple]]:
    """For H.264 and HEVC: packet -> (fresh start?, the recovery_frame_cnt of its recovery point SEI or None)."""
    name = cc.name
    if name not in CHECKED:
        return None
    extradata = bytes(cc.extradata or b"")
    length = 0  # the size of the NAL length prefix in MP4/MKV (avcC/hvcC); 0: Annex B start codes
    # (FFmpeg's own tests: avcC starts with version 1; hvcC is anything but a start code, version 0 included)
    if name == "hevc" and len(extradata) > 22 and (extradata[0] or extradata[1] or extradata[2] > 1):
        length = (extradata[21] & 3) + 1
    elif name == "h264" and len(extradata) > 4 and extradata[0] == 1:
        length = (extradata[4] & 3) + 1
    first_picture = _h264_first_picture if name == "h264" else _hevc_first_picture

    def inspect(packet: Any) -> tuple:
        data = memoryview(packet) if length else bytes(packet)
        recovery: Optional[int] = None  # an open GOP's I-frame says 0; an intra refresh wave, its length
        for nal in _length_prefixed(data, length) if length else _annex_b(data):
            if name == "h264" and nal[0] & 0x1F == 6:
                found = _recovery_frame_count(nal)
                recovery = found if recovery is None else recovery
                continue
            verdict = first_picture(nal[0], recovery == 0)
            if verdict is not None:
                return verdict, recovery
        return False, recovery  # no picture found in the packet: do not start there

    return inspect


def _h264_first_picture(header: int, exact_recovery: bool) -> Optional[bool]:
    kind = header & 0x1F
    if kind == 5:
        return True
    if 1 <= kind <= 4:  # a slice of a non-IDR picture: only an I-frame an exact recovery point announces
        return exact_recovery
    return None  # not a picture yet


def _hevc_first_picture(header: int, exact_recovery: bool) -> Optional[bool]:
    kind = (header >> 1) & 0x3F
    if kind < 32:  # a VCL NAL unit: the picture itself (IDR, BLA or CRA: an IRAP picture)
        return 16 <= kind <= 21
    return None


def _recovery_frame_count(nal: Any) -> Optional[int]:
    """recovery_frame_cnt of the recovery point message (payload type 6) in an H.264 SEI NAL unit, if any."""
    rbsp = bytes(nal[1:]).replace(b"\x00\x00\x03", b"\x00\x00")  # emulation prevention bytes out
    i = 0
    while i < len(rbsp) and rbsp[i] != 0x80:  # 0x80: the trailing bits
        kind = size = 0
        while i < len(rbsp) and rbsp[i] == 0xFF:
            kind, i = kind + 255, i + 1
        if i >= len(rbsp):
            return None
        kind, i = kind + rbsp[i], i + 1
        while i < len(rbsp) and rbsp[i] == 0xFF:
            size, i = size + 255, i + 1
        if i >= len(rbsp):
            return None
        size, i = size + rbsp[i], i + 1
        if kind == 6:
            return _unsigned_exp_golomb(rbsp[i : i + size])
        i += size
    return None


def _unsigned_exp_golomb(data: bytes) -> Optional[int]:
    bits = "".join(f"{b:08b}" for b in data[:8])
    zeros = len(bits) - len(bits.lstrip("0"))
    if 2 * zeros + 1 > len(bits):
        return None
    return int(bits[zeros : 2 * zeros + 1], 2) - 1


def _length_prefixed(data: Any, length: int) -> Iterator[Any]:
    """Each NAL unit of length-prefixed data, as a view (none copied)."""
    i = 0
    while i + length < len(data):
        size = int.from_bytes(data[i : i + length], "big")
        if size <= 0:
            return
        yield data[i + length : i + length + size]
        i += length + size


def _annex_b(data: bytes) -> Iterator[bytes]:
    """Each NAL unit after a start code (00 00 01, or 00 00 00 01: the extra zero ends the unit before)."""
    i = data.find(b"\x00\x00\x01")
    while i >= 0 and i + 3 < len(data):
        end = data.find(b"\x00\x00\x01", i + 3)
        yield data[i + 3 : end if end >= 0 else len(data)]
        i = end
