"""Probe a video once (with PyAV, which is always installed): the facts the frame plan is computed from.

Every backend is planned from this same probe, so ``frames_indices`` cannot differ between backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

from ._errors import DecodeError
from ._sources import Source, sniff_media

__all__ = ["VideoInfo", "open_container", "probe_video"]


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

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as a person sees the video, rotation applied."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def open_container(source: Source) -> Any:
    import av

    try:
        return av.open(source.open(), mode="r", metadata_errors="ignore")
    except MemoryError:
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


def probe_video(source: Source) -> VideoInfo:
    """Read the container header (and, where it has no frame count, its packet headers) and one frame."""
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
        has_audio = bool(container.streams.audio)
        rate = _rate(stream)
        tb = stream.time_base
        duration = float(stream.duration * tb) if stream.duration and tb else 0.0
        if not duration and container.duration:
            duration = container.duration / 1_000_000
        num_frames = int(stream.frames or 0)
        try:
            if num_frames <= 0:
                num_frames = sum(1 for p in container.demux(stream) if p.size)
                container.seek(0)
            first = next(iter(container.decode(stream)), None)
        except MemoryError:
            raise
        except Exception as exc:
            raise _undecodable(source, exc, "could not be decoded") from exc
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
        )
    finally:
        container.close()
