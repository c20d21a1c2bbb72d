"""_nal's keyframe check on NAL units written here by hand: length-prefixed (avcC/hvcC, every length size) and
Annex B (3- and 4-byte start codes), parameter sets and SEI before the picture, recovery point SEI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qwen_vl_utils.container._nal import fresh_start_check, recovery_point_check

SPS, PPS, AUD = b"\x67\x64\x00\x1f\xac", b"\x68\xee\x3c\x80", b"\x09\xf0"
IDR, SLICE = b"\x65\x88\x84\x00\x21", b"\x41\x9a\x02\x04\x30"  # nal_unit_type 5, 1


def sei(payload_type: int, payload: bytes) -> bytes:
    """An H.264 SEI NAL unit holding one message (type and size coded as 0xFF runs), emulation prevention
    inserted."""

    def coded(n: int) -> bytes:
        return b"\xff" * (n // 255) + bytes([n % 255])

    rbsp = coded(payload_type) + coded(len(payload)) + payload + b"\x80"
    out, zeros = bytearray(), 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return b"\x06" + bytes(out)


def recovery_point(count: int) -> bytes:
    """recovery_frame_cnt ue(v), exact_match_flag 1, broken_link_flag 0, changing_slice_group_idc 00."""
    bits = f"{count + 1:b}"
    bits = "0" * (len(bits) - 1) + bits + "1000"
    bits += "1" + "0" * (-(len(bits) + 1) % 8)  # the payload's own trailing bits
    return sei(6, int(bits, 2).to_bytes(len(bits) // 8, "big"))


def avcc(length: int) -> bytes:
    return bytes([1, 0x64, 0, 0x1F, 0xFC | (length - 1), 0xE1]) + len(SPS).to_bytes(2, "big") + SPS


def prefixed(nals: list, length: int = 4) -> bytes:
    return b"".join(len(n).to_bytes(length, "big") + n for n in nals)


def annex_b(nals: list) -> bytes:
    return b"".join((b"\x00\x00\x00\x01" if i % 2 == 0 else b"\x00\x00\x01") + n for i, n in enumerate(nals))


def check(codec: str, extradata: bytes, packet: bytes) -> bool:
    return fresh_start_check(SimpleNamespace(name=codec, extradata=extradata))(packet)


@pytest.mark.parametrize("length", [1, 2, 4])
def test_h264_length_prefixed_every_length_size(length):
    head = [AUD, sei(5, b"x264 " * 10)]
    assert check("h264", avcc(length), prefixed([*head, IDR], length))
    assert not check("h264", avcc(length), prefixed([*head, SLICE], length))


def test_h264_annex_b_with_parameter_sets_in_band():
    assert check("h264", b"", annex_b([AUD, SPS, PPS, IDR]))
    assert not check("h264", b"", annex_b([AUD, SPS, PPS, SLICE]))
    assert not check("h264", b"", annex_b([AUD, SPS, PPS]))  # no picture: not a start


def test_an_sei_larger_than_64_kib_before_the_picture():
    big = sei(5, bytes(range(1, 256)) * 300)
    assert len(big) > 1 << 16
    assert check("h264", avcc(4), prefixed([big, IDR]))
    assert check("h264", b"", annex_b([big, IDR]))


@pytest.mark.parametrize(("count", "fresh"), [(0, True), (18, False), (300, False)])
def test_h264_recovery_point_sei(count, fresh):
    """An I-frame that a recovery point SEI says is exact at once (an open GOP) is a start; one recovering
    over later frames (intra refresh) is not."""
    assert check("h264", avcc(4), prefixed([recovery_point(count), SLICE])) is fresh
    assert check("h264", b"", annex_b([AUD, recovery_point(count), SLICE])) is fresh


def test_only_a_recovery_point_that_recovers_later_counts_as_one():
    """What makes decord and torchcodec hand a file to PyAV: a recovery point SEI with a count above 0 (intra
    refresh), not a non-IDR keyframe without one (x264 scene cuts with one reference frame), nor an IDR."""
    cc = SimpleNamespace(name="h264", extradata=avcc(4))
    assert recovery_point_check(cc)(prefixed([recovery_point(18), SLICE]))
    assert not recovery_point_check(cc)(prefixed([recovery_point(0), SLICE]))
    assert not recovery_point_check(cc)(prefixed([SLICE]))
    assert not recovery_point_check(cc)(prefixed([recovery_point(18), IDR]))
    assert not recovery_point_check(SimpleNamespace(name="vp9", extradata=b""))(b"\x00")


def hevc_nal(kind: int) -> bytes:
    return bytes([kind << 1, 1]) + b"\xaf\x12\x34"


def hvcc(version: int = 1) -> bytes:
    return bytes([version, 1, 0x60]) + bytes(18) + bytes([0xF0 | 3, 0])


@pytest.mark.parametrize(("kind", "fresh"), [(19, True), (20, True), (21, True), (16, True), (1, False), (0, False)])
@pytest.mark.parametrize("version", [1, 0])
def test_hevc_irap_pictures_length_prefixed(kind, fresh, version):
    """IDR, CRA, BLA start; trailing pictures do not; hvcC written with configurationVersion 0 by old muxers too."""
    packet = prefixed([hevc_nal(35), hevc_nal(32), hevc_nal(33), hevc_nal(34), hevc_nal(39), hevc_nal(kind)])
    assert check("hevc", hvcc(version), packet) is fresh


def test_hevc_annex_b():
    assert check("hevc", b"", annex_b([hevc_nal(35), hevc_nal(32), hevc_nal(33), hevc_nal(34), hevc_nal(19)]))
    assert not check("hevc", b"", annex_b([hevc_nal(35), hevc_nal(1)]))


def test_other_codecs_are_not_checked():
    assert check("vp9", b"", b"\x00") and check("av1", b"", b"")
