"""The sound of a stream's chunks (``stream_video(..., audio=True)``): decoded from the demuxer that gives the
frames, in the same pass, placed on the stream's timeline (:class:`~qwen_vl_utils.audio.AudioTrack`), and each
chunk's window cut out of it.

A chunk is complete when its last frame is decoded, but its sound may lie a little further on in the container
(interleaving): the chunk waits until the sound has reached its end. A file whose sound lags its frames by more
than :data:`AUDIO_LAG` seconds (badly interleaved, or a track that ended early with nothing to say so), and the
sound after a ``video_end`` window's last frame, are read by a demuxer of their own over the same source, from
where the shared one stopped: one seek, no re-reading of what was taken. A live source cannot be read twice:
there, sound that lags by more than that is silence (the source's sound stopped).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator, Optional

from .._errors import DecodeError
from ..audio import SAMPLE_RATE, AudioTrack, audio_stream, frame_time, seek_audio, time_base, timed
from ..container._probe import decode_or_conceal, open_container

#: seconds of video a complete chunk waits for its sound before the sound is read another way (a file) or taken
#: as silence (a live source)
AUDIO_LAG = 3.0
#: seconds of a live source's sound, come in a row after its chunks were given, before that is logged (less is
#: what a muxer holds back when the sound pauses)
LATE_WARNING = 0.5
logger = logging.getLogger("qwen_vl_utils")

#: what to do about a video without sound, in its error
_MISSING = "stream it with audio=False, or give a video with sound"


class StreamAudio:
    """A stream's sound on its timeline: ``origin`` the stream time of window sample 0 (the first chunk's start),
    ``offset`` the source time of stream time 0 (a file's first frame; a live source's, once known). Fed on the
    thread that demuxes (a file's may be a thread of its own), taken on the producer's."""

    def __init__(self, origin: float, offset: Optional[float], live: bool, sr: int = SAMPLE_RATE) -> None:
        self.origin, self.offset, self.live, self.sr = origin, offset, live, sr
        self.track = AudioTrack(origin, sr, gaps=live, live=live)
        self.lock = threading.Lock()
        self.index: Optional[int] = None  # the audio stream's index in the shared demuxer
        self.cc: Any = None
        self.tb = 0.0
        self.waiting: list = []  # (source time, frame) before the offset is known (live)
        self.own: Optional[_OwnReader] = None  # a file's sound read by a demuxer of its own
        self.name = "the source"
        self.taken = 0  # the window sample up to which chunks have taken their sound
        self.late = 0  # live: samples of sound that came after their chunks had been given (silence)
        self.warned = False

    def attach(self, container: Any, name: str) -> Any:
        """The container's audio stream, decoded from now on (a new pass over a file: taken up where the last
        one stopped)."""
        stream = audio_stream(container, name, _MISSING)
        self.name = name
        with self.lock:
            self.close_own()
            self.index, self.cc, self.tb = stream.index, stream.codec_context, time_base(stream)
            self.track.gaps = self.live or timed(container)
            self.track.expect(stream)
            self.track.resume()
        return stream

    def split(self, packets: Iterator[Any]) -> Iterator[Any]:
        """The shared demuxer's packets: the sound's decoded here, the others passed on. Its end ends the
        sound."""
        for packet in packets:
            if packet.stream_index != self.index:
                yield packet
                continue
            if self.own is not None:  # (a file whose sound is read on its own now)
                continue
            for frame in decode_or_conceal(self.cc, packet if packet.size else None):
                self._frame(frame, frame_time(frame, self.tb))
        self.end()

    def _frame(self, frame: Any, begins: Optional[float]) -> None:
        """A frame from the shared demuxer; dropped if the sound is read on its own now (a file's demuxer thread may
        have been decoding it when the reader of its own took over)."""
        with self.lock:
            if self.own is None:
                self._add(frame, begins)

    def _add(self, frame: Any, begins: Optional[float]) -> None:
        if self.offset is None:
            self.waiting.append((begins, frame))
            return
        if begins is not None and self.live and not self.warned:
            self._late(round((begins - self.offset - self.origin) * self.sr), frame)
        self.track.add(frame, None if begins is None else begins - self.offset)

    def _late(self, at: int, frame: Any) -> None:
        """Sound that came for window samples chunks have already taken (as silence): logged once when more than
        :data:`LATE_WARNING` of it has come in a row (not the packets a muxer holds back when the sound pauses:
        MPEG-TS keeps them until the next sound, which then comes on time)."""
        ends = at + frame.samples * self.sr // max(1, frame.sample_rate)
        late = max(0, min(ends, self.taken) - max(at, 0))  # (sound before the window is never needed)
        if not late:
            if ends > self.taken:  # (on time: a run of late sound has ended)
                self.late = 0
            return
        self.late += late
        if self.late > LATE_WARNING * self.sr:
            self.warned = True
            logger.warning(
                "the sound of %s came more than %.0f s of video after its pictures (muxed late, or sent late): the "
                "chunks it belonged to had silence. Read the file by path or from a server with range requests "
                "to get its sound.",
                self.name,
                AUDIO_LAG,
            )

    def drain(self) -> None:
        """A live source whose sound lags: what the resampler holds comes out now. (Not the decoder's: an audio
        decoder gives each packet's samples at once, and draining it would cost the overlap with the packets
        after, should the sound come back.)"""
        with self.lock:
            if not self.track.done:
                self.track.drain()

    def set_offset(self, offset: Optional[float]) -> None:
        """A live source's time of stream time 0, as its clock has it now (it moves at a discontinuity)."""
        if offset is None:
            return
        with self.lock:
            self.offset = offset
            waiting, self.waiting = self.waiting, []
            for begins, frame in waiting:
                self._add(frame, begins)

    def end(self) -> None:
        """The source has ended (its demuxer may not have said so: a stream stopped at its end packet). A sound
        read on its own goes on to where the chunks need it."""
        with self.lock:
            if self.own is None:
                self.track.finish()

    def window(self, start: float, end: float) -> tuple:
        """The window samples of stream times ``[start, end)``: consecutive chunks tile the sound exactly."""
        return round((start - self.origin) * self.sr), round((end - self.origin) * self.sr)

    def ready(self, last: int) -> bool:
        """Has the sound reached window sample ``last`` (or ended)?"""
        with self.lock:
            if self.track.end < last and not self.track.done:
                self.track.push()
            return self.track.end >= last or self.track.done

    def take(self, first: int, last: int, upto: Optional[int] = None) -> Any:
        """Window samples ``[first, last)``, silence from ``upto`` on."""
        with self.lock:
            self.taken = max(self.taken, last)
            out = self.track.take(first, last)
        if upto is not None and upto < last:
            out[max(0, upto - first) :] = 0.0
        return out

    def read_own(self, source: Any, last: int) -> None:
        """A file: read its sound with a demuxer of its own up to window sample ``last`` (the shared one is
        behind, or has stopped)."""
        with self.lock:
            if self.own is None:
                self.own = _OwnReader(source, self)
                self.track.resume()
            own = self.own
        own.read_until(last)

    def close_own(self) -> None:
        if self.own is not None:
            self.own.close()
            self.own = None


class _OwnReader:
    """A file's sound, from where the track stopped, by a container of its own (sought there once)."""

    def __init__(self, source: Any, audio: StreamAudio) -> None:
        self.audio, self.name = audio, source.name
        self.container = open_container(source)
        try:
            stream = audio_stream(self.container, source.name, _MISSING)
            tb = time_base(stream)
            track = audio.track
            resume = track.fed if track.fed is not None else track.t0
            seek_audio(self.container, stream, resume + audio.offset)
        except BaseException:
            self.container.close()
            raise
        cc = stream.codec_context
        self.frames = (
            (frame, frame_time(frame, tb))
            for packet in self.container.demux(stream)
            for frame in decode_or_conceal(cc, packet if packet.size else None)
        )

    def read_until(self, last: int) -> None:
        audio, track = self.audio, self.audio.track
        need = audio.origin + last / audio.sr  # the stream time of window sample ``last``
        try:
            while True:
                with audio.lock:
                    if track.end >= last or track.done:
                        return
                    if track.fed is not None and track.fed >= need:
                        track.push()
                        if track.end >= last:
                            return
                        need = track.fed + 0.05  # the resampler's delay: a little more
                item = next(self.frames, None)
                with audio.lock:
                    if item is None:
                        track.finish()
                        return
                    frame, begins = item
                    track.add(frame, None if begins is None else begins - audio.offset)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"the sound of {self.name} could not be decoded ({type(exc).__name__}: {exc})") from exc

    def close(self) -> None:
        self.container.close()
