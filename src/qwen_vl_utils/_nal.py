"""Which keyframes a fresh decoder can start at: H.264 and HEVC keyframes checked in the bitstream.

Containers flag as keyframes packets that are only recovery points: x264's intra refresh writes no IDR after
the first frame, and marks the frame that starts each refresh wave as a keyframe (an MP4 sync sample), as do
open-GOP I-frames. A decoder started there either drops frames until it thinks the picture has recovered or
returns frames that differ from a decode from the start (measured on an intra-refresh file: wrong pixels 18
to 40 frames past the keyframe, with FFmpeg calling them recovered). Only an IDR (H.264) or an IRAP picture
(HEVC: IDR, BLA, CRA; the leading pictures a CRA may have are the caller's to rule out) makes every later frame
independent of what came before it.
"""

from __future__ import annotations

from typing import Any, Callable

#: bytes of a packet searched for its first picture's NAL unit (parameter sets and SEI come before it)
_HEAD = 1 << 16


def fresh_start_check(cc: Any) -> Callable[[Any], bool]:
    """For a stream's codec context: a test of whether a keyframe packet starts a picture that a fresh decoder
    decodes exactly as one that started at the beginning. True for every packet of codecs not checked here."""
    name = cc.name
    if name not in ("h264", "hevc"):
        return lambda packet: True
    extradata = cc.extradata or b""
    length = 0  # the size of the NAL length prefix in MP4/MKV (avcC/hvcC); 0: Annex B start codes
    if len(extradata) > 21 and extradata[0] == 1 and name == "hevc":
        length = (extradata[21] & 3) + 1
    elif len(extradata) > 4 and extradata[0] == 1 and name == "h264":
        length = (extradata[4] & 3) + 1
    first_picture = _h264_first_picture if name == "h264" else _hevc_first_picture

    def check(packet: Any) -> bool:
        data = bytes(memoryview(packet)[:_HEAD])
        for header in _length_prefixed(data, length) if length else _annex_b(data):
            verdict = first_picture(header)
            if verdict is not None:
                return verdict
        return False  # no picture found in the head of the packet: do not start there

    return check


def _h264_first_picture(header: int):
    kind = header & 0x1F
    if kind == 5:
        return True
    return False if 1 <= kind <= 4 else None  # a slice of a non-IDR picture; else not a picture yet


def _hevc_first_picture(header: int):
    kind = (header >> 1) & 0x3F
    if kind < 32:  # a VCL NAL unit: the picture itself
        return 16 <= kind <= 21
    return None


def _length_prefixed(data: bytes, length: int):
    """The first byte of each NAL unit in length-prefixed data (as far as ``data`` reaches)."""
    i = 0
    while i + length < len(data):
        size = int.from_bytes(data[i : i + length], "big")
        yield data[i + length]
        if size <= 0:
            return
        i += length + size


def _annex_b(data: bytes):
    """The first byte of each NAL unit after a start code (00 00 01, or 00 00 00 01)."""
    i = data.find(b"\x00\x00\x01")
    while i >= 0 and i + 3 < len(data):
        yield data[i + 3]
        i = data.find(b"\x00\x00\x01", i + 3)
