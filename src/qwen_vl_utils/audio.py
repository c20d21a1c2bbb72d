"""Audio for Qwen-Omni: 16 kHz mono float32, decoded and resampled by PyAV, placed on the container's timeline.

The flow for an audio element::

    resolve_source (the fetch policy, as for images and videos) -> the audio stream's window -> decode (PyAV)
    -> resample to 16 kHz keeping the channels (swresample) -> the mean of the channels

and for the audio of a video (``use_audio_in_video``): the video's own resolved source and probe, and the window
its frames cover (``video.plan_frames``; :mod:`.video` calls :func:`video_audio`), on the container's timeline:
sample 0 is the time of the window's first frame, silence where the track starts late or ends early, so that
audio and frames line up. A window well into the track is sought to (half a second before it: the decoder's
pre-roll) where the container's seek lands exactly, and read from the start elsewhere. The Omni
processors' audio token counts (:func:`audio_token_count`) follow from the sample count alone, so they are known
from a header's duration without decoding.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from . import _cancel
from ._errors import DecodeError, InvalidOptionError, SourceTooLargeError, describe
from ._options import check_number
from .container._probe import decode_or_conceal, is_picture, open_container
from .sources._policy import FetchPolicy, get_fetch_policy
from .sources._resolve import Source, resolve_source

__all__ = ["SAMPLE_RATE", "audio_token_count", "decode_audio", "fetch_audio"]

#: the rate every Omni feature extractor takes
SAMPLE_RATE = 16000
#: seconds into the track past which a window is sought to, not read up to
_SEEK_AFTER = 1.0
#: seconds decoded before a window that was sought to, and left out: the decoder's pre-roll (MP3's bit reservoir
#: reaches up to nine frames back, Opus needs 80 ms, AAC a frame), so the window's first samples are right
_PREROLL = 0.5
#: containers whose demuxer lands on the audio's true time after a seek (FFmpeg's names); in others (ASF/WMA, raw
#: AC-3, AVI, ...) the time after a seek is an estimate from the bit rate, and a window is read from the start
_EXACT_SEEK = frozenset(
    ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "ogg", "flac", "mp3", "aac", "mpegts", "wav", "aiff", "caf")
)
#: containers whose header states the sound's duration (elsewhere FFmpeg estimates it from the bit rate: an MP3
#: without a table of contents that starts with silence can be estimated at five times its length)
_STATED = frozenset(("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "flac", "wav", "aiff", "caf", "ogg", "w64"))
#: containers whose audio timestamps are exact (a hole in them is lost sound)
_TIMED = frozenset(("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts"))
#: ... of which these seek exactly in PCM only (WAV's IMA-ADPCM lands seconds off, stamped with the time asked)
_PCM_SEEK = frozenset(("wav", "aiff", "caf"))
#: frames decoded from the start before a seek (:class:`_Head`)
_HEAD = 6
#: decoders whose frames all have one length in a stream (Opus: as encoders write it), besides those that say so
_FRAMED = frozenset(("aac", "mp3", "mp3float", "mp2", "mp2float", "ac3", "eac3", "opus", "libopus"))
#: the models whose audio token count :func:`audio_token_count` knows
OMNI_MODELS = ("qwen2.5-omni", "qwen3-omni")


def audio_source(ele: dict) -> Any:
    """The value an audio element holds (``audio`` wins over ``audio_url``, as in qwen-omni-utils)."""
    if not isinstance(ele, dict):
        raise InvalidOptionError(f"an audio element must be a dict, got {describe(ele)}")
    value = ele.get("audio", ele.get("audio_url"))
    if value is None:
        raise InvalidOptionError(
            f"an audio element needs an 'audio' or 'audio_url' key holding the source; got keys {sorted(ele)}"
        )
    if isinstance(value, dict) and "url" in value:  # {"audio_url": {"url": ...}}, as OpenAI-style messages write
        value = value["url"]
    return value


def audio_window(ele: dict) -> tuple[float, Optional[float]]:
    """``(audio_start, audio_end)`` in seconds, checked (``audio_end`` None: to the end)."""
    start = check_number(ele.get("audio_start"), "audio_start") or 0.0
    end = check_number(ele.get("audio_end"), "audio_end")
    if end is not None and end <= start:
        raise InvalidOptionError(f"audio_start ({start}) must be before audio_end ({end})")
    return float(start), None if end is None else float(end)


def fetch_audio(ele: dict, sr: int = SAMPLE_RATE, *, policy: Optional[FetchPolicy] = None) -> np.ndarray:
    """One audio element as a 1-D float32 array at ``sr`` (16 kHz), mono (the mean of the channels), within
    [-1, 1], cut to ``audio_start`` / ``audio_end`` (seconds from the start of the audio).

    Sources: a path, ``file://``, ``http(s)://``, an object store URL, ``data:`` (base64 of any format PyAV reads),
    bytes, a binary file object, or a 1-D array of samples already at ``sr`` (a float array is taken as it is, an
    integer one scaled to [-1, 1]); under the fetch policy, as images and videos are.
    """
    value = audio_source(ele)
    start, end = audio_window(ele)
    if end is not None and round(end * sr) - round(start * sr) < 1:
        raise InvalidOptionError(
            f"the audio window from {start} s to {end} s is shorter than one sample at {sr} Hz; give a longer one"
        )
    if _is_samples(value):
        out = _samples(value, start, end, sr)
        name = "the audio array"
    else:
        policy = get_fetch_policy(policy)
        with resolve_source(value, "audio", policy) as source:
            out = decode_audio(source, start, end, sr=sr, max_seconds=policy.max_audio_seconds)
            name = source.name
    if not len(out):  # (the Omni processors' feature extractors fail on it)
        raise DecodeError(f"{name} holds no sound (no sample decodes from it); give audio with sound in it")
    return out


def _is_samples(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (
        hasattr(value, "__array__") and not isinstance(value, (str, bytes, bytearray, memoryview, Source))
    )


def _samples(value: Any, start: float, end: Optional[float], sr: int) -> np.ndarray:
    samples = np.asarray(value)
    if samples.ndim != 1:
        raise InvalidOptionError(
            f"an audio array must be 1-D mono samples at {sr} Hz, got shape {samples.shape}; downmix it first "
            "(e.g. samples.mean(axis=0) for a channels-first array)"
        )
    if np.issubdtype(samples.dtype, np.unsignedinteger):  # unsigned PCM: silence is the middle value
        half = float(np.iinfo(samples.dtype).max // 2 + 1)
        samples = (samples.astype(np.float64) - half) / half
    elif np.issubdtype(samples.dtype, np.integer):
        samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max + 1)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise InvalidOptionError(f"an audio array must hold numbers, got dtype {samples.dtype}")
    elif not np.isfinite(samples).all():
        raise InvalidOptionError(
            f"an audio array must hold finite samples; this one has NaN or infinity at index "
            f"{int(np.argmin(np.isfinite(samples)))} (replace them, e.g. np.nan_to_num(samples))"
        )
    first = int(sr * start)
    last = None if end is None else int(sr * end)
    if start > 0 and first >= len(samples):
        raise InvalidOptionError(
            f"audio_start ({start} s) is at or after the end of the {len(samples)} samples ({len(samples) / sr:.3f} "
            f"s at {sr} Hz) of the audio array; give a window within it"
        )
    return np.ascontiguousarray(samples[first:last], dtype=np.float32)


def decode_audio(
    source: Source,
    start: float = 0.0,
    end: Optional[float] = None,
    *,
    sr: int = SAMPLE_RATE,
    origin: Optional[float] = None,
    pad: bool = False,
    missing: str = "give a file with sound",
    max_seconds: Optional[float] = None,
) -> np.ndarray:
    """The first audio stream of ``source`` from ``start`` to ``end`` seconds after ``origin`` (a time on the
    container's timeline; None: the audio stream's first sample), resampled to ``sr``, mono.

    With ``pad``, the result is exactly ``round((end - start) * sr)`` samples and sample 0 is the time ``origin +
    start``: silence where the track begins later or ends sooner (audio beside video frames). Without it, the
    samples the stream has within the window (an audio file). ``missing`` ends the message of a file without
    an audio stream (what to do). Sound longer than ``max_seconds`` is a SourceTooLargeError, from the header
    where it states the duration, else once decoded that far."""
    import av

    try:
        container = open_container(source)
    except DecodeError as exc:
        cause = str(exc.__cause__ or exc)
        raise DecodeError(f"{source.name} is not a readable audio or video file ({cause})") from None
    try:
        stream = audio_stream(container, source.name, missing)
        tb = time_base(stream)
        _only(container, stream)
        begin = stream.start_time * tb if stream.start_time is not None else 0.0
        head = (
            _Head(container, stream, tb)
            if _seeks(container, stream, (begin if origin is None else origin) + start)
            else None
        )
        if origin is None:  # an audio file: its time 0 is its first sample's (WMA stamps it 92 ms in), or the
            origin = begin  # stream's start where that is later (Opus's pre-skip), as for the whole track
            if start > 0 or end is not None:
                sample = head.first if head else _first_sample_time(source, stream.index, tb, origin)
                origin = max(origin, origin if sample is None else sample)
        t0 = origin + start
        t1 = None if end is None else origin + end
        ends = _check_length(source.name, stream, container, t0, t1, max_seconds)
        if head is not None:
            head.seek(t0)
        track = AudioTrack(t0, sr, gaps=timed(container))
        track.expect(stream)
        if ends is not None:  # (a margin for what the header leaves out: an encoder's padding)
            track.reserve(round(((ends if t1 is None else min(ends, t1)) - t0 + 0.5) * sr))
        limit = None if max_seconds is None else (max_seconds, source.name)
        _decode_window(container, stream, tb, track, t1, limit, None if head is None else head.place)
    except av.FFmpegError as exc:
        raise DecodeError(f"{source.name}: its audio could not be decoded ({type(exc).__name__}: {exc})") from exc
    finally:
        container.close()
    track.finish()
    if max_seconds is not None and track.end - track.begins > max_seconds * sr and not pad:
        raise _too_long(source.name, (track.end - track.begins) / sr, max_seconds)
    if pad:
        return track.take(0, round((t1 - t0) * sr) if t1 is not None else track.end)
    if track.first is None and start > 0:
        ends = track.clock if track.clock is not None else ends
        length = f", {ends - origin:.3f} s long" if ends is not None else ""
        raise InvalidOptionError(
            f"audio_start ({start} s) is at or after the end of the audio of {source.name}{length}; give a "
            "window within it"
        )
    hole = track.gaps and start > 0 and track.begins > 1  # (a window that starts in a hole: its silence is kept;
    # 1: the cut's rounding to an 8 kHz source sample)
    first = 0 if hole else max(0, track.begins)  # the samples the stream has within the window
    since = t0 if hole else max(t0, track.first or t0)
    last = track.end if t1 is None else min(track.end, first + round((t1 - since) * sr))
    return track.take(first, last)


def audio_stream(container: Any, name: str, missing: str) -> Any:
    """The container's first audio stream; DecodeError naming the streams it has if none (``missing``: what to
    do)."""
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise DecodeError(f"{name} has no audio stream (it has: {', '.join(kinds)}); {missing}")
    return choose_audio(container)


def choose_audio(container: Any) -> Any:
    """The audio stream FFmpeg's command line picks, as qwen-omni-utils gets it: the default one (a track that is
    enabled), then the one with the most channels, then the first (the container has one at least)."""
    import av

    default = av.stream.Disposition.default
    return max(
        container.streams.audio, key=lambda s: (bool(s.disposition & default), s.codec_context.channels or 0, -s.index)
    )


def time_base(stream: Any) -> float:
    """An audio stream's time base in seconds (1 / its rate where the container states none)."""
    return float(stream.time_base) if stream.time_base else 1.0 / (stream.rate or SAMPLE_RATE)


def seek_audio(container: Any, stream: Any, t0: float) -> None:
    """Send the demuxer to :data:`_PREROLL` before the audio at ``t0`` seconds on the container's timeline, if it
    is well into the track and the container seeks exactly (from the start otherwise, or where the demuxer
    cannot seek): the frames before ``t0`` are decoded and left out."""
    if _seeks(container, stream, t0):
        _seek(container, stream, t0)


def _seeks(container: Any, stream: Any, t0: float) -> bool:
    """Is the audio at ``t0`` well into the track, in a container that seeks exactly?"""
    return t0 - (stream.start_time or 0) * time_base(stream) > _SEEK_AFTER and _seeks_exactly(container, stream)


def _seek(container: Any, stream: Any, t0: float) -> None:
    import av

    tb = time_base(stream)
    try:
        container.seek(max(0, int((t0 - _PREROLL) / tb)), stream=stream, backward=True)
    except av.FFmpegError:
        container.seek(0, stream=stream)


class _Head:
    """The first frames of an audio stream, decoded before a seek: the time of its first sample, and the grid its
    samples are counted on. Where the container's times are coarser than a sample (Matroska's milliseconds),
    the first frame after the seek is put back on that grid, so that a window is the same samples as the whole
    track's; a codec whose frames vary in length (Vorbis, PCM, FLAC) has no grid, and is read from the start."""

    def __init__(self, container: Any, stream: Any, tb: float) -> None:
        self.container, self.stream, self.tb = container, stream, tb
        self.first: Optional[float] = None
        self.grid: Optional[tuple] = None  # (time after the first frame, frame length, rate, stamps' offset)
        self.coarse = tb * (stream.codec_context.sample_rate or SAMPLE_RATE) > 1.01
        self.placed = False
        frames: list = []
        cc = stream.codec_context
        for n, packet in enumerate(container.demux(stream)):
            frames += [f for f in decode_or_conceal(cc, packet if packet.size else None) if f.pts is not None]
            if len(frames) >= _HEAD or n >= 32:
                break
        if frames:
            self.first = frames[0].pts * tb
        sizes = {(f.samples, f.sample_rate) for f in frames[1:]}
        if len(frames) == _HEAD and len(sizes) == 1 and (cc.frame_size > 0 or cc.name in _FRAMED):
            ((size, rate),) = sizes
            after = self.first + frames[0].samples / frames[0].sample_rate  # (the first frame may be trimmed)
            # the stamps' offset from the samples counted (muxers shift by a pre-skip, or truncate): their median
            offset = float(np.median([f.pts * tb - after - k * size / rate for k, f in enumerate(frames[1:])]))
            self.grid = (after, size, rate, offset)

    def seek(self, t0: float) -> None:
        """To the window at ``t0``; from the start where a coarse container's codec has no grid."""
        if self.coarse and self.grid is None:
            self.container.seek(0, stream=self.stream)
            self.placed = True
        else:
            _seek(self.container, self.stream, t0)

    def place(self, frame: Any, begins: Optional[float]) -> Optional[float]:
        """The time of a frame decoded after the seek: the first on the grid, where its time is within the
        container's rounding of it."""
        if self.placed or begins is None:
            return begins
        self.placed = True
        if not self.coarse or self.grid is None:
            return begins
        after, size, rate, offset = self.grid
        stamped = begins - offset
        exact = after + round((stamped - after) * rate / size) * size / rate
        if frame.samples == size and frame.sample_rate == rate and abs(exact - stamped) <= self.tb + 1 / rate:
            return exact
        return begins


def _first_sample_time(source: Source, index: int, tb: float, default: float) -> float:
    """The time of the first sample the audio stream ``index`` decodes to, by a container of its own (the one
    that reads the window may seek straight past it); ``default`` if none comes within a few packets."""
    import av

    try:
        with open_container(source) as container:
            stream = container.streams[index]
            for n, packet in enumerate(container.demux(stream)):
                for frame in decode_or_conceal(stream.codec_context, packet if packet.size else None):
                    begins = frame_time(frame, tb)
                    return default if begins is None else begins
                if n >= 32:
                    break
    except (av.FFmpegError, DecodeError):
        pass
    return default


def _only(container: Any, stream: Any) -> None:
    """Tell the demuxer to skip the other streams' packets (a video's pictures are most of its bytes: MP4's
    demuxer then does not read them)."""
    import av

    for other in container.streams:
        if other.index != stream.index:
            other.discard = av.stream.Discard.all


def timed(container: Any) -> bool:
    """Does the container stamp its audio with exact times, so that a hole in them is a hole in the sound (a
    recording that lost packets) to be kept as silence? (MP4/MOV, Matroska/WebM, MPEG-TS: the containers that
    carry video; raw streams' times are counted or estimated from the bit rate.)"""
    return container.format.name in _TIMED


def _seeks_exactly(container: Any, stream: Any) -> bool:
    name = container.format.name
    if name not in _EXACT_SEEK:
        return False
    if name == "matroska,webm":  # millisecond times (Vorbis laced: up to 3.5 ms off): a sound file is read through
        return any(not is_picture(v) for v in container.streams.video)
    return name not in _PCM_SEEK or stream.codec_context.name.startswith("pcm_")


def frame_time(frame: Any, tb: float) -> Optional[float]:
    """A decoded audio frame's time in seconds (None: it has no timestamp)."""
    return None if frame.pts is None else frame.pts * tb


#: the lowest sample rate taken as sound (8 kHz telephony is the lowest in use; a WAV header claiming 1 Hz turns a
#: small file into hours of samples)
_LOWEST_RATE = 1000


def _check_length(
    name: str, stream: Any, container: Any, t0: float, t1: Optional[float], max_seconds: Optional[float]
) -> Optional[float]:
    """Refuse, before decoding, a stream whose rate is not sound, or a window the header says is over the
    limit; returns the time the header says the sound ends (None: it does not say)."""
    rate = stream.rate or stream.codec_context.sample_rate
    if rate and rate < _LOWEST_RATE:
        raise DecodeError(
            f"{name} claims a sample rate of {rate} Hz, which is not sound (the lowest taken is "
            f"{_LOWEST_RATE} Hz); check the file's header"
        )
    if container.format.name not in _STATED:  # (MP3, ADTS, MPEG-TS: a bit-rate estimate; checked while decoding)
        return None
    seconds = _stream_seconds(stream)
    if seconds is not None:
        ends = (stream.start_time or 0) * time_base(stream) + seconds
    elif container.duration:
        ends = container.duration / 1_000_000
    else:
        return None
    seconds = (ends if t1 is None else min(ends, t1)) - t0
    if max_seconds is not None and seconds > max_seconds:
        raise _too_long(name, seconds, max_seconds)
    return ends


def _stream_seconds(stream: Any) -> Optional[float]:
    """The stream's own duration in seconds as its header states it (Matroska states it only in a tag per track,
    which FFmpeg's and mkvmerge's muxers write); None if it does not (the container's may be a longer track's)."""
    if stream.duration:
        return stream.duration * time_base(stream)
    tag = (stream.metadata or {}).get("DURATION", "")
    try:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _too_long(name: str, seconds: float, max_seconds: float) -> SourceTooLargeError:
    return SourceTooLargeError(
        f"audio {name} is {seconds:.1f} s long, over the limit of {max_seconds:g} s (set audio_start/audio_end, "
        "or raise FetchPolicy.max_audio_seconds)"
    )


def _decode_window(
    container: Any,
    stream: Any,
    tb: float,
    track: AudioTrack,
    t1: Optional[float],
    limit: Optional[tuple] = None,
    place: Optional[Callable[[Any, Optional[float]], Optional[float]]] = None,
) -> None:
    """The frames of ``stream`` into ``track`` up to the first that begins at or after ``t1``; ``limit``:
    ``(seconds, name)`` past which the sound is too long; ``place``: a frame's time from its timestamp."""
    token = _cancel.current()
    cc = stream.codec_context
    most = None if limit is None else limit[0] * track.sr
    for n, packet in enumerate(container.demux(stream)):
        if not n & 31:  # (a cancelled caller stops within 32 packets: a fraction of a second of sound)
            _cancel.check(token)
        for frame in decode_or_conceal(cc, packet if packet.size else None):
            begins = frame_time(frame, tb)
            begins = track.add(frame, begins if place is None else place(frame, begins))
            if t1 is not None and begins >= t1:
                return
            if most is not None and track.end - track.begins > most:
                raise _too_long(limit[1], (track.end - track.begins) / track.sr, limit[0])


#: seconds by which a live source's audio frame may start before or after the end of the one before it and still
#: be taken as following it (timestamps in milliseconds round; a larger step is lost audio, or a repeat)
_JITTER = 0.005
#: seconds by which frames that follow one another by their stamps may drift from the samples counted (a parser's
#: stamps between two true ones) and still be taken as following the sound before
_DRIFT = 0.1
#: seconds within which a stamp is the last one plus a frame of the track's first rate (MPEG-TS's 90 kHz clock)
_STAMP_TICK = 0.0001
#: seconds a live source's audio may leap and still be a gap (silence); a larger leap, or one back by more than
#: half a second, is a discontinuity: the sound goes on where it was
_LEAP = 10.0


class AudioTrack:
    """Decoded audio frames placed on a timeline and resampled to mono at ``sr``: window sample ``k`` is the time
    ``t0 + k / sr``.

    The first frame reaching past ``t0`` is cut at the source sample of ``t0`` (as when a file is cut at its own
    rate, so that sample 0 is that time); frames before it are left out. Without ``gaps``, only the first frame's
    timestamp is read: the samples follow one another as the decoder gives them (raw AC-3 and ASF stamp frames
    with estimates that drift, Matroska rounds to the millisecond). With ``gaps`` (a live source; a container
    whose timestamps are exact), a frame that begins more than :data:`_JITTER` after the last one ended leaves
    silence up to its time, and one that begins before is cut to what is new, so that the sound stays on the
    timeline through lost or repeated packets (a step back by more than half a second, or, live, a leap of more
    than :data:`_LEAP` s, is a discontinuity: the sound goes on where it was). The resampled samples are held until
    :meth:`take` asks for them."""

    def __init__(self, t0: float, sr: int = SAMPLE_RATE, *, gaps: bool = False, live: bool = False) -> None:
        self.t0, self.sr, self.gaps = t0, sr, gaps
        self.leap = _LEAP if live else math.inf  # (a file's timeline has no discontinuities forward)
        self.block = _Block(sr)
        self.clock: Optional[float] = None  # where the frame after the last one taken begins (input time)
        self.stamped: Optional[float] = None  # where the last frame's stamp says it ends
        self.stamp: Optional[float] = None  # the last frame's stamp
        self.stale: Optional[float] = None  # the length of a frame at the first rate
        self.rate0: Optional[int] = None  # the stream's first rate (its header's; else its first frame's)
        self.fed: Optional[float] = None  # the time after the last sample fed to the resampler
        self.first: Optional[float] = None  # the time of the first sample
        self.begins: int = 0  # its window index (negative: cut before t0 by rounding)
        self.pos = 0  # the window index of the next sample out of the resampler
        self.parts: list = []  # (window index, samples), in order
        self.done = False
        self.resuming = False  # frames come again from before the last one taken: only what is new
        self.buf: Optional[np.ndarray] = None  # see reserve()
        self.buf_at: Optional[int] = None
        self.in_buf = False

    def expect(self, stream: Any) -> None:
        """The stream's first sample rate and frame length, as its header has them (kept where already known)."""
        cc = stream.codec_context
        self.rate0 = self.rate0 or cc.sample_rate or None
        if self.stale is None and cc.frame_size > 0 and cc.sample_rate:
            self.stale = cc.frame_size / cc.sample_rate

    @property
    def end(self) -> int:
        """The window index after the last sample out of the resampler."""
        return self.pos

    def add(self, frame: Any, begins: Optional[float]) -> float:
        """One decoded frame beginning at ``begins`` seconds (None: right after the last one); returns that
        time."""
        rate, n = frame.sample_rate, frame.samples
        clock, stamped, stamp = self.clock, self.stamped, self.stamp
        self.stamped = None if begins is None else begins + n / rate
        self.stamp = begins
        if self.rate0 is None:
            self.rate0 = rate
        if self.stale is None and rate == self.rate0:
            self.stale = n / rate
        if begins is None or (
            clock is not None and (not self.gaps or self._follows(begins, clock, stamped, stamp, rate))
        ):
            begins = clock if clock is not None else self.t0  # (rounded times: the count goes on)
        self.clock = begins + n / rate
        if self.clock <= self.t0 or self.done:
            return begins
        name = frame.format.name
        channels = _channels(frame, name, n)
        if self.fed is None:
            cut = max(0, round((self.t0 - begins) * rate))
            if cut >= len(channels[0]):  # (t0 within its last sample: rounds to the next frame)
                return begins
            begins += cut / rate
            channels = [c[cut:] for c in channels]
            self.first = begins
            self.pos = self.begins = round((begins - self.t0) * self.sr)
        elif self.gaps or self.resuming:
            step = begins - self.fed
            if -0.5 <= step < -_JITTER or (self.resuming and step < 0):  # a repeat: only what is new
                cut = round(-step * rate)
                if cut >= len(channels[0]):
                    return begins
                channels = [c[cut:] for c in channels]
                begins = self.fed
            elif _JITTER < step <= self.leap and not self.resuming:  # lost audio: silence up to this frame's time
                self._out(self.block.flush())
                self.pos = max(self.pos, round((begins - self.t0) * self.sr))
            else:
                begins = self.fed
            self.resuming = False
        self.fed = begins + len(channels[0]) / rate
        out = self.block.add(channels, name, rate)
        if out:
            self._out(out)
        return begins

    def _follows(
        self, begins: float, clock: float, stamped: Optional[float], stamp: Optional[float], rate: int
    ) -> bool:
        """Does a frame stamped ``begins`` follow the samples counted so far (up to ``clock``)? Yes within
        :data:`_JITTER` of the count; or within it of the last frame's stamp and :data:`_DRIFT` of the count
        (stamps that drift from the count); or, at a sample rate other than the track's first, where its stamp
        is the last one plus a frame of the first rate: MPEG-TS's parser stamps the frames between two true
        timestamps so (1.9 ms a frame off from 44.1 to 48 kHz, 23 ms from 44.1 to 22.05 kHz), a drift back to the
        next true stamp, not holes and repeats; the true stamps are held to the count as at the first rate."""
        step = abs(begins - clock)
        if step <= _JITTER:
            return True
        if rate != self.rate0 and stamp is not None and self.stale and abs(begins - stamp - self.stale) < _STAMP_TICK:
            return True
        return stamped is not None and abs(begins - stamped) <= _JITTER and step <= _DRIFT

    def resume(self) -> None:
        """The frames that follow come from a new reading of the source (sought back, or read again): those
        already taken are left out, and the sound goes on from the last sample fed."""
        self.resuming = self.fed is not None
        self.clock = None  # (the next frame's time is its own)

    def push(self) -> None:
        """Resample what is gathered now (a consumer waits for it), keeping the resampler's state."""
        self._out(self.block.resample())

    def drain(self) -> None:
        """Everything out of the resampler now (a new one takes what follows)."""
        self._out(self.block.flush())

    def finish(self) -> None:
        """The track has ended: everything out of the resampler."""
        if not self.done:
            self._out(self.block.flush())
            self.done = True

    def reserve(self, samples: int) -> None:
        """The window is about ``samples`` long (a header says so): the samples are written into one array of
        that size as they come, and taken from it without a copy."""
        self.buf, self.buf_at, self.in_buf = np.empty(max(0, samples), np.float32), None, True

    def _out(self, arrays: list) -> None:
        for samples in arrays:
            if len(samples):
                if self.in_buf:
                    samples = self._into_buf(samples)
                self.parts.append((self.pos, samples))
                self.pos += len(samples)

    def _into_buf(self, samples: np.ndarray) -> np.ndarray:
        if self.buf_at is None:
            self.buf_at = self.pos  # (the window index of the buffer's first sample)
        at = self.pos - self.buf_at
        if at + len(samples) > len(self.buf):  # longer than the header said: parts of their own from here
            self.in_buf = False
            return samples
        view = self.buf[at : at + len(samples)]
        view[:] = samples
        return view

    def _exactly(self, first: int, last: int) -> bool:
        """Do the parts held tile ``[first, last)`` exactly?"""
        at = first
        for start, samples in self.parts:
            if start != at:
                return False
            at += len(samples)
        return bool(self.parts) and at == last

    def take(self, first: int, last: int) -> np.ndarray:
        """Window samples ``[first, last)``, clipped to [-1, 1], silence where there are none; the samples
        before ``last`` are let go."""
        if self._exactly(first, last):  # all of it, in one piece (the common case)
            if self.in_buf and self.buf_at == first:  # already in one array: no copy, unless it wastes much
                out = self.buf[: last - first]
                out = out.copy() if len(out) < 0.9 * len(self.buf) else out
                self.buf, self.in_buf = None, False
            else:
                out = np.concatenate([p for _, p in self.parts]) if len(self.parts) > 1 else self.parts[0][1].copy()
            self.parts = []
            np.clip(out, -1.0, 1.0, out=out)
            return out
        out = np.zeros(max(0, last - first), np.float32)
        kept = []
        for at, samples in self.parts:
            lo, hi = max(first, at), min(last, at + len(samples))
            if lo < hi:
                out[lo - first : hi - first] = samples[lo - at : hi - at]
            if at + len(samples) > last:
                kept.append((last, samples[last - at :]) if at < last else (at, samples))
        self.parts = kept
        np.clip(out, -1.0, 1.0, out=out)
        return out


#: PyAV sample formats -> (numpy type, scale to [-1, 1], offset)
_FORMATS = {
    "flt": ("<f4", 1.0, 0.0),
    "dbl": ("<f8", 1.0, 0.0),
    "s16": ("<i2", 1 / 32768, 0.0),
    "s32": ("<i4", 1 / 2147483648, 0.0),
    "s64": ("<i8", 1 / 9223372036854775808, 0.0),
    "u8": ("u1", 1 / 128, -128.0),
}


def _channels(frame: Any, name: str, n: int) -> list:
    """A decoded frame's ``n`` samples (its format ``name``), one array per channel, read from its planes (views:
    nothing converted yet; a planar frame has a plane per channel, and reading its layout's channel list would
    cost more than the rest)."""
    if name.endswith("p"):
        dtype = _FORMATS[name[:-1]][0]
        return [np.frombuffer(plane, dtype, n) for plane in frame.planes]
    channels = frame.layout.nb_channels or 1
    interleaved = np.frombuffer(frame.planes[0], _FORMATS[name][0], n * channels)
    return [interleaved[c::channels] for c in range(channels)]


#: seconds of source samples gathered before they are resampled (larger blocks were measured slower: each is a
#: fresh mapping of memory)
_BLOCK = 1


class _Block:
    """Decoded samples gathered into blocks of about a second, then averaged over the channels (as float) and
    resampled to ``sr`` by one swresample context, its state carried across blocks (a new one if the rate or the
    format changes mid-stream): per-frame work stays a few views."""

    def __init__(self, sr: int) -> None:
        self.sr = sr
        self.kind: Optional[tuple] = None  # (sample format, rate, channels)
        self.parts: list = []
        self.size = 0
        self.resampler: Any = None

    def add(self, channels: list, fmt: str, rate: int) -> list:
        out = []
        kind = (fmt, rate, len(channels))
        if kind != self.kind:
            out = self.flush()
            self.kind = kind
        self.parts.append(channels)
        self.size += len(channels[0])
        if self.size >= _BLOCK * rate:
            out += self.resample()
        return out

    def _mono(self) -> np.ndarray:
        fmt, _, count = self.kind
        _, scale, offset = _FORMATS[fmt.rstrip("p")]
        mono = np.concatenate([part[0] for part in self.parts], dtype=np.float32)  # (a new array: summed in place)
        for c in range(1, count):
            mono += np.concatenate([part[c] for part in self.parts], dtype=np.float32)
        if count > 1:
            mono /= count
        if offset or scale != 1.0:
            mono += offset
            mono *= scale
        elif not np.isfinite(mono.sum()):  # float PCM holding NaN or infinity: the resampler would spread it
            np.nan_to_num(mono, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        return mono

    def resample(self) -> list:
        import av

        if not self.parts:
            return []
        data = self._mono()
        self.parts, self.size = [], 0
        if self.resampler is None:
            self.resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sr)
        frame = av.AudioFrame.from_ndarray(data[None, :], format="flt", layout="mono")
        frame.sample_rate = self.kind[1]
        return [o.to_ndarray()[0] for o in self.resampler.resample(frame)]

    def flush(self) -> list:
        out = self.resample()
        if self.resampler is not None:
            out += [o.to_ndarray()[0] for o in self.resampler.resample(None)]
            self.resampler = None
        return out


def video_audio(
    source: Source, start_time: float, fps: float, first: int, last: int, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """The audio of the window a video's frames cover: from its frame ``first`` to the end of its frame ``last``,
    on the container's timeline (the first frame shown is at ``start_time`` seconds), exactly ``(last + 1 -
    first) / fps * sr`` samples, silence where the track does not reach."""
    missing = "use_audio_in_video=True needs the video's sound: pass False for it"
    return decode_audio(source, first / fps, (last + 1) / fps, sr=sr, origin=start_time, pad=True, missing=missing)


def describe_audio(source: Source) -> Optional[dict]:
    """The facts of the audio stream :func:`choose_audio` picks, from the header (nothing decoded): codec, sample
    rate, channels and duration in seconds; None when the file has no audio stream. ``has_video`` says whether it
    has a video stream too (cover art is not one)."""
    try:
        container = open_container(source)
    except DecodeError:
        return None
    try:
        if not container.streams.audio:
            return None
        stream = choose_audio(container)
        duration = _stream_seconds(stream)
        if duration is None:
            duration = container.duration / 1_000_000 if container.duration else 0.0
        return {
            "codec": stream.codec_context.name,
            "sample_rate": stream.rate,
            "channels": stream.channels,
            "duration": round(float(duration), 4),
            "has_video": any(not is_picture(v) for v in container.streams.video),
        }
    finally:
        container.close()


def token_counts(seconds: float) -> dict:
    """The Omni processors' audio tokens for ``seconds`` of sound at 16 kHz."""
    samples = round(seconds * SAMPLE_RATE)
    return {model: audio_token_count(samples, model) for model in OMNI_MODELS}


# --- tokens ----------------------------------------------------------------------------------------------------------


def audio_token_count(samples: int, model: str = "qwen2.5-omni") -> int:
    """Audio tokens the Omni processor gives ``samples`` samples at 16 kHz.

    Qwen2.5-Omni: mel frames ``L = min(ceil(N / 160), 30000)`` (its processor pads to and truncates at 300 s),
    tokens ``((L - 1) // 2 + 1 - 2) // 2 + 1``, about 25 per second. Qwen3-Omni: ``L = N // 160`` (no cap in
    transformers 5), tokens ``13 * (L // 100)`` plus ``((f - 1) // 2 + 1 - 1) // 2 + 1`` with ``f = (L % 100 - 1)
    // 2 + 1`` for the rest, about 13 per second."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise InvalidOptionError(f"samples must be a whole number >= 0, got {samples!r}")
    if model == "qwen2.5-omni":
        frames = min(math.ceil(samples / 160), 30000)
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1 if frames else 0
    if model == "qwen3-omni":
        frames = samples // 160
        rest = frames % 100
        feat = (rest - 1) // 2 + 1
        return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // 100) * 13
    raise InvalidOptionError(f"model must be one of {', '.join(OMNI_MODELS)}, got {model!r}")
