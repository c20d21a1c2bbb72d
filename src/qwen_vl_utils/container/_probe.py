"""Probe a video once (with PyAV, which is always installed): the facts the frame plan is computed from.

Every backend is planned from this same probe, so ``frames_indices`` cannot differ between backends.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator, NamedTuple, Optional

from .._errors import DecodeError, QwenVLError
from ..sources._resolve import Source, sniff_media

__all__ = ["PacketSpan", "VideoInfo", "open_container", "packet_span", "probe_video"]


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    num_frames: int
    duration: float
    width: int  # as coded, before rotation
    height: int
    rotation: int  # degrees counter-clockwise to turn the coded frame upright: 0, 90, 180 or 270
    codec: str
    container: str
    has_audio: bool
    has_b_frames: bool = False  # frames are reordered between decoding and display
    hidden_frames: int = 0  # frames an edit list hides (a cut's pre-roll): decoded as references, never shown
    size_changes: bool = False  # the coded size changes mid-stream (an adaptive stream switching renditions)
    length_in_header: bool = True  # the header states a frame count or a duration (live, piped muxers: neither)
    # the timestamp of the first frame a decoder shows, where frames before it are never shown (a file that
    # starts inside a GOP: the packets before its first keyframe cannot be decoded); None where all are shown
    first_pts: Optional[int] = None
    leading_frames: int = 0  # packets before the first frame shown: counted in no frame index
    # the demuxer found the file damaged (MPEG-TS continuity errors): frames were counted by decoding it through,
    # as a player shows them (a decoder drops or reorders frames around damage); read it in that same order
    damaged: bool = False
    exact_count: bool = True  # num_frames is exact; False: estimated from the duration (a probe without counting)
    header_frames: int = 0  # the frame count the header states (0: none, as in WebM, Matroska, MPEG-TS)
    stream_duration: Optional[float] = None  # seconds, the video stream's own duration field where it has one
    rate_in_header: bool = True  # the stream states an average frame rate (Ogg's Theora does not: fps is guessed)
    start_time: float = 0.0  # seconds on the container's timeline at which the first frame shown is shown

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as a person sees the video, rotation applied."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def open_container(source: Source) -> Any:
    import av

    try:
        return av.open(source.open(), mode="r", metadata_errors="ignore")
    except av.FFmpegError as exc:  # its ENOMEM too (a MemoryError): a corrupt header asking for absurd sizes
        raise _undecodable(source, exc) from exc
    except (MemoryError, QwenVLError):  # a typed error from reading the source (network, limits) stays as it is
        raise
    except Exception as exc:  # FFmpeg errors, and whatever PyAV raises on hostile headers
        raise _undecodable(source, exc) from exc


def _undecodable(source: Source, exc: BaseException, what: str = "is not a decodable video") -> DecodeError:
    kind = sniff_media(source.head())
    hint = " It looks like an image: use {'type': 'image', 'image': ...}." if kind == "image" else ""
    return DecodeError(f"{source.name} {what} ({type(exc).__name__}: {exc}).{hint}")


def _rate(stream: Any) -> Optional[Fraction]:
    for attr in ("average_rate", "guessed_rate", "base_rate"):
        rate = getattr(stream, attr, None)
        if rate and rate > 0:
            return Fraction(rate)
    return None


def seek_start(container: Any) -> None:
    """Back to the container's first packet. A demuxer that cannot seek by time (a raw H.264 or HEVC
    elementary stream: FFmpeg answers EPERM) is sent back to byte 0 instead."""
    import av

    try:
        container.seek(0)
    except av.FFmpegError:
        container.seek(0, unsupported_byte_offset=True)


def decode_or_conceal(cc: Any, packet: Any) -> list:
    """The frames ``packet`` gives; none when the decoder rejects it as invalid data (a damaged slice in the
    middle of a file or a live feed): FFmpeg's own player conceals it and decodes on, and so does the library,
    instead of failing the whole video."""
    import av

    try:
        return cc.decode(packet)
    except av.error.InvalidDataError:
        return []


def decoded_frames(container: Any, stream: Any) -> Iterator[Any]:
    """``container.decode(stream)``, a damaged packet concealed (:func:`decode_or_conceal`), the decoder
    flushed at the end; a cancelled caller stops at the next packet."""
    from .. import _cancel

    token = _cancel.current()
    cc = stream.codec_context
    for packet in container.demux(stream):
        _cancel.check(token)
        yield from decode_or_conceal(cc, packet if packet.size else None)


def probe_video(source: Source, count: bool = True) -> VideoInfo:
    """Read the container header (and, where it has no frame count, its packet headers) and one frame.

    Frames are numbered as a player shows them: where a file starts inside a GOP (an MPEG-TS cut from a
    broadcast, a recording joined mid-stream), the frames before the first one the decoder shows are not counted
    and ``first_pts`` says where the shown frames begin. With ``count`` False, a container without a frame count
    in its header (MPEG-TS, Matroska, WebM, raw streams) is not read through: ``num_frames`` is estimated from
    the duration (``exact_count`` False), for a reader that numbers frames as they come (:mod:`stream`)."""
    import av

    head = source.head(16)
    if sniff_media(head) == "image" and not head.startswith(b"GIF8"):  # an animated GIF is a video; a PNG is not
        raise DecodeError(
            f"{source.name} is a still image, not a video: use {{'type': 'image', 'image': ...}}, "
            "or give a list of frames as the video"
        )
    container = open_container(source)
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise DecodeError(
                f"{source.name} has no video stream (it has: {', '.join(kinds) or 'no streams'}); "
                "give a file with video, or use an image element for a still picture"
            )
        stream = container.streams.video[0]
        refuse_picture(stream, source.name)
        has_audio = bool(container.streams.audio)
        rate = _rate(stream)
        tb = stream.time_base
        duration = float(stream.duration * tb) if stream.duration and tb else 0.0
        stream_duration = duration or None
        if not duration and container.duration:
            duration = container.duration / 1_000_000
        num_frames = header_frames = int(stream.frames or 0)
        length_in_header = num_frames > 0 or bool(container.duration)
        exact_count, damaged = True, False
        size_changes, shown_pts, first_pts = False, None, None
        try:
            if num_frames > 0:
                num_frames, hidden = _edited_count(container, stream, num_frames)
            elif count or rate is None:  # no rate: the count gives it
                shown_pts, hidden, size_changes, damaged = _count_packets(container, stream)
                num_frames = len(shown_pts)
                seek_start(container)
                if damaged:
                    num_frames, shown_pts = _count_decoded(container, stream), None
                    seek_start(container)
            else:
                hidden, exact_count = 0, False
            first = next(decoded_frames(container, stream), None)
        except av.FFmpegError as exc:  # its ENOMEM too (a MemoryError): corrupt sizes, not this machine's memory
            raise _undecodable(source, exc, "could not be decoded") from exc
        except (MemoryError, QwenVLError):
            raise
        except Exception as exc:
            raise _undecodable(source, exc, "could not be decoded") from exc
        leading = 0
        if first is not None and shown_pts:
            leading, first_pts = _leading(shown_pts, first.pts)
            num_frames -= leading
        if not exact_count:
            # an estimate (unknown: 1); the reader counts the frames as they come
            num_frames = max(1, round(duration * float(rate))) if rate is not None and duration else 1
            first_pts = first.pts if first is not None else None
        if first is None or num_frames <= 0:
            raise DecodeError(f"{source.name} has a video stream but no decodable frames (truncated or empty?)")
        if rate is None:
            if not duration:
                raise DecodeError(f"{source.name}: the video has neither a frame rate nor a duration")
            rate = Fraction(num_frames) / Fraction(duration)
        fps = float(rate)
        if not duration:
            duration = num_frames / fps
        rotation = round(getattr(first, "rotation", 0) or 0) % 360
        if rotation % 90:
            rotation = 0  # a non-right-angle display matrix: leave the frame as coded
        return VideoInfo(
            fps=fps,
            num_frames=num_frames,
            duration=duration,
            width=int(first.width or stream.codec_context.width),
            height=int(first.height or stream.codec_context.height),
            rotation=rotation,
            codec=stream.codec_context.name,
            container=container.format.name,
            has_audio=has_audio,
            has_b_frames=bool(stream.codec_context.has_b_frames),
            hidden_frames=hidden,
            size_changes=size_changes,
            length_in_header=length_in_header,
            first_pts=first_pts,
            leading_frames=leading,
            damaged=damaged,
            exact_count=exact_count,
            header_frames=header_frames,
            stream_duration=stream_duration,
            rate_in_header=bool(stream.average_rate),
            start_time=float(first.time) if first.time is not None else 0.0,
        )
    finally:
        container.close()


#: keyframes after the first that :func:`recovery_point_keyframes` reads, and packets it reads at most
RECOVERY_KEYFRAMES, RECOVERY_PACKETS = 3, 3000


def recovery_point_keyframes(source: Source) -> bool:
    """Are the keyframes after the first mere recovery points (:mod:`._nal`: x264's intra refresh)? Judged by the
    next :data:`RECOVERY_KEYFRAMES` keyframe packets, read from the start without decoding (container indexes
    do not list them all: MPEG-TS has none, Matroska's cues few): True when each of them is a picture that a
    recovery point SEI says recovers only frames later."""
    from ._nal import recovery_point_check

    container = open_container(source)
    try:
        stream = container.streams.video[0]
        check = recovery_point_check(stream.codec_context)  # False for every packet of codecs it does not check
        keys = (p for p in itertools.islice(container.demux(stream), RECOVERY_PACKETS) if p.size and p.is_keyframe)
        verdicts = [check(p) for p in itertools.islice(keys, 1 + RECOVERY_KEYFRAMES)][1:]
        return bool(verdicts) and all(verdicts)
    except QwenVLError:
        raise
    except Exception:  # packets that cannot be read: the backend will say so itself
        return False
    finally:
        container.close()


def _edited_count(container: Any, stream: Any, frames: int) -> tuple[int, int]:
    """(frames shown, frames hidden) of a track whose header counts ``frames`` samples.

    Of FFmpeg's demuxers only mov applies edit lists: in the index it builds from the header it marks the
    samples an edit hides (``is_discard``: the pre-roll that a stream-copy cut keeps from the keyframe before
    the cut), drops the samples no edit shows and repeats those shown twice; its decoder then drops the hidden
    frames. Whether an edit hides anything is told by the index's two ends, its length and the edited duration,
    so that an ordinary file costs no visit of every entry."""
    if "mov" not in container.format.name:
        return frames, 0
    entries = getattr(stream, "index_entries", None)
    if entries is None:  # PyAV < 17 does not expose the index: count the hidden packets instead (one demux)
        hidden = sum(1 for p in container.demux(stream) if p.size and p.is_discard)
        seek_start(container)
        return frames - hidden, hidden
    n = len(entries)
    if n == 0:
        return frames, 0
    rate, tb = stream.average_rate, stream.time_base
    shortened = bool(stream.duration and rate and tb) and float(stream.duration * tb * rate) < frames - 1
    if not (entries[0].is_discard or entries[n - 1].is_discard or n != frames or shortened):
        return frames, 0
    hidden = sum(1 for e in entries if e.is_discard)
    return n - hidden, hidden


def _leading(shown: list, first_shown: Optional[int]) -> tuple[int, Optional[int]]:
    """(frames no player shows at the start, the timestamp of the first one shown or None) of a file whose
    packets are ``shown`` as (timestamp, keyframe) in decode order, given the timestamp of the first frame its
    decoder put out. Those before it in display order are never shown (a file cut inside a GOP: the decoder
    waits for a keyframe, or for an intra refresh's recovery; an open GOP's leading pictures). Without
    timestamps (a raw H.264 stream), the packets before the first keyframe."""
    if first_shown is not None and all(p is not None for p, _ in shown):
        leading = sum(1 for p, _ in shown if p < first_shown)
        return leading, first_shown if leading else None
    return next((i for i, (_, key) in enumerate(shown) if key), 0), None


def _count_packets(container: Any, stream: Any) -> tuple[list, int, bool, bool]:
    """((timestamp, keyframe) of each frame shown, frames hidden, whether the coded size changes, whether the
    demuxer found damage) from the packet headers, for containers whose header has no frame count (MPEG-TS,
    Matroska, raw streams)."""
    watch = _SizeWatch.create(stream)
    shown: list = []
    hidden = 0
    damaged = False
    for packet in container.demux(stream):
        if not packet.size:
            continue
        damaged = damaged or packet.is_corrupt
        if packet.is_discard:
            hidden += 1
            continue
        shown.append((packet.pts, packet.is_keyframe))
        if watch is not None and packet.is_keyframe:
            watch.check(packet)
    return shown, hidden, watch is not None and watch.changed, damaged


class PacketSpan(NamedTuple):
    """The video stream's packets as a demuxer lists them (no decoding): how many (discarded ones aside), and the
    time from the first one's timestamp to the end of the last (its timestamp plus its duration), in seconds."""

    packets: int
    begin: float
    end: float
    all_packets: int = 0  # the discarded ones (an edit list's pre-roll) too, as decord's index counts them


def packet_span(source: Source) -> PacketSpan:
    """Demux the whole video stream once, reading only packet headers: what a decoder that scans the file to
    index it (torchcodec's exact mode) counts and times."""
    container = open_container(source)
    try:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        count, every, begin, end = 0, 0, None, None
        for packet in container.demux(stream):
            if not packet.size:
                continue
            every += 1
            if packet.is_discard:
                continue
            count += 1
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                continue
            begin = ts if begin is None else min(begin, ts)
            end = ts + (packet.duration or 0) if end is None else max(end, ts + (packet.duration or 0))
    except Exception as exc:  # FFmpeg errors on a damaged file
        raise _undecodable(source, exc, "could not be read through") from exc
    finally:
        container.close()
    return PacketSpan(count, (begin or 0) * tb, (end or 0) * tb, every)


def _count_decoded(container: Any, stream: Any) -> int:
    """The frames a decoder puts out for the whole stream: around damage it drops frames (7 of 277 packets for
    40 lost MPEG-TS packets, measured) and may show some out of order, which no packet header tells."""
    stream.codec_context.thread_type = "AUTO"
    return sum(1 for _ in decoded_frames(container, stream))


#: codecs that repeat their parameter sets on keyframes in-band, where FFmpeg's extract_extradata filter finds
#: them: a new coded size comes with new parameter sets
_IN_BAND_HEADERS = frozenset({"h264", "hevc", "vvc", "av1", "mpeg1video", "mpeg2video", "mpeg4", "vc1"})


class _SizeWatch:
    """Notices a mid-stream change of the coded size (an adaptive live stream switching renditions) from the
    parameter sets on the keyframes, without decoding: only a keyframe whose parameter sets differ from every
    set seen so far is decoded, alone, to read its size."""

    def __init__(self, stream: Any) -> None:
        import av.bitstream

        self.codec = stream.codec_context.name
        self.size = (stream.codec_context.width, stream.codec_context.height)
        self.filter: Any = av.bitstream.BitStreamFilterContext("extract_extradata", stream)
        self.same_size: set = set()  # parameter sets known to keep the size (the first ones by definition)
        self.changed = False

    @classmethod
    def create(cls, stream: Any) -> Optional[_SizeWatch]:
        if stream.codec_context.name not in _IN_BAND_HEADERS:
            return None
        try:
            return cls(stream)
        except Exception:  # a filter that cannot take this stream's parameters: no cheap way to tell
            return None

    def check(self, packet: Any) -> None:
        """Look at a keyframe packet (which the filter consumes: count it first)."""
        if self.changed or self.filter is None:
            return
        try:
            filtered = self.filter.filter(packet)
        except Exception:  # not in-band parameter sets (length-prefixed, as MP4 and Matroska store H.264)
            self.filter = None
            return
        for out in filtered:
            if not out.has_sidedata("new_extradata"):
                continue
            headers = bytes(out.get_sidedata("new_extradata"))
            if headers in self.same_size:
                continue
            if self.same_size and self._size_of(out) != self.size:
                self.changed = True
                return
            self.same_size.add(headers)

    def _size_of(self, packet: Any) -> Optional[tuple[int, int]]:
        import av

        decoder = av.CodecContext.create(self.codec, "r")
        try:
            frames = [*decoder.decode(packet), *decoder.decode(None)]
        except Exception:  # undecodable alone: say it changed, and let the backend that copes decode it
            return None
        return (frames[0].width, frames[0].height) if frames else None


def is_picture(stream: Any) -> bool:
    """A "video" stream that is a still attached to the sound (an MP3's or M4A's cover art)."""
    import av

    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def refuse_picture(stream: Any, name: str) -> None:
    """DecodeError if the "video" stream ``stream`` of ``name`` is sound's cover art, not a video."""
    if is_picture(stream):
        raise DecodeError(
            f"{name} is sound with a cover picture, not a video; give it as audio ({{'type': 'audio', 'audio': "
            "...}), or the picture as an image"
        )
