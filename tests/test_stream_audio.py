"""``stream_video(..., audio=True)`` (issue 26): each chunk carries the sound of its window, from the same pass over
the source, on the same timeline as ``use_audio_in_video`` (``fetch_video_audio``): tested on generated videos
whose sound encodes time (a tone stepping every 100 ms), from files (MP4, MPEG-TS, Matroska; windows; tracks
that start late, end early or stop), ranged HTTP and a live pipe; the chunks' sound goes through transformers'
Whisper feature extractor to the Omni processors' token count."""

from __future__ import annotations

import os
import subprocess
import threading
from typing import Optional

import numpy as np
import pytest

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils.sources._resolve import library_tmpdir
from qwen_vl_utils.video import fetch_video_audio
from test_audio import SR, lag, snr_db, stepped, write_video

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream-audio")
    mp4 = write_video(folder / "v.mp4", seconds=6.0, fps=25)
    out = {"mp4": mp4, "late": write_video(folder / "late.mp4", seconds=6.0, audio_at=1.0, audio_to=5.0)}
    for ext in ("ts", "mkv"):
        out[ext] = folder / f"v.{ext}"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(mp4), "-c", "copy", str(out[ext])], check=True)
    # an MPEG-TS whose sound stops after 2 s with nothing in its header to say so
    out["short"] = folder / "short.ts"
    cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(mp4), "-c:v", "copy", "-c:a", "aac", "-af", "atrim=0:2"]
    subprocess.run([*cmd, str(out["short"])], check=True)
    silent = folder / "silent.mp4"
    cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(mp4), "-an", "-c", "copy", str(silent)]
    subprocess.run(cmd, check=True)
    out["silent"] = silent
    return out


def _stream(ele, chunk_seconds=1.0, **kw):
    chunks = list(q.stream_video({"fps": 2.0, **ele}, chunk_seconds=chunk_seconds, audio=True, **kw))
    for c in chunks:  # every chunk: exactly its window's samples, counted from the first chunk's start
        assert c.audio.dtype == np.float32 and c.audio.ndim == 1
        assert len(c.audio) == round(c.end * SR) - round(c.start * SR), (c.index, c.start, c.end)
    return chunks, np.concatenate([c.audio for c in chunks])


def _piped(argv: list, ele: Optional[dict] = None) -> tuple:
    """:func:`_stream` over what ``argv`` writes to its standard output: a live pipe."""
    feed = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        return _stream({"video": feed.stdout, **(ele or {})})
    finally:
        feed.stdout.close()
        feed.wait()


def _aligned(sound, start, silent=(), seconds=6.0, least_db=25.0):
    """``sound`` from ``start`` s is the tone of its container time: no lag, and close to it."""
    ref = stepped(seconds)[round(start * SR) : round(start * SR) + len(sound)]
    for a, b in silent:
        ref[max(0, round((a - start) * SR)) : max(0, round((b - start) * SR))] = 0
    assert len(ref) == len(sound)
    assert lag(sound, ref, most=200) == 0
    assert snr_db(sound, ref) > least_db


def test_a_files_chunks_carry_the_sound_of_their_windows(clips):
    """Chunks tile the track: together, bit for bit, the sound ``use_audio_in_video`` gives the whole clip."""
    chunks, sound = _stream({"video": str(clips["mp4"])})
    assert [(c.start, c.end) for c in chunks] == [(float(i), float(i + 1)) for i in range(6)]
    assert np.array_equal(sound, fetch_video_audio({"video": str(clips["mp4"]), "fps": 2.0}))
    _aligned(sound, 0.0)


@pytest.mark.parametrize("kind", ["ts", "mkv"])
def test_containers_without_a_frame_count_give_the_same_sound(clips, kind):
    _, sound = _stream({"video": str(clips[kind])})
    _, ref = _stream({"video": str(clips["mp4"])})
    assert len(sound) == len(ref) and snr_db(sound, ref) > 60  # the same AAC packets, remuxed


def test_a_window_gets_its_sound_from_its_start_to_its_end(clips):
    """``video_start`` seeks (the sound with the frames), and the sound past the window's last frame is read on
    its own, not by demuxing the rest of the file."""
    chunks, sound = _stream({"video": str(clips["mp4"]), "video_start": 2.0, "video_end": 4.5})
    assert chunks[0].start == 2.0 and chunks[-1].end == pytest.approx(4.04)  # the last frame shown ends at 4.04 s
    _aligned(sound, 2.0)


def test_a_track_that_starts_late_and_ends_early_is_padded_with_silence(clips):
    _, sound = _stream({"video": str(clips["late"])})
    assert np.abs(sound[: int(0.9 * SR)]).max() < 0.05 and np.abs(sound[int(5.1 * SR) :]).max() < 0.05
    _aligned(sound, 0.0, silent=[(0, 1), (5, 6)])
    assert np.array_equal(sound, fetch_video_audio({"video": str(clips["late"]), "fps": 2.0}))


def test_a_track_that_stops_without_notice_does_not_hold_the_chunks_back(clips):
    """MPEG-TS sound ending at 2 s of 6: the chunks after it wait AUDIO_LAG seconds of video for it, then the
    rest of the track is read on its own (nothing there: silence)."""
    chunks, sound = _stream({"video": str(clips["short"])})
    assert len(chunks) == 6 and np.abs(sound[int(2.1 * SR) :]).max() == 0
    _aligned(sound[: int(1.9 * SR)], 0.0, seconds=1.9)  # (its last AAC frame ends at 1.92 s)


def test_sound_over_http_by_range_requests(clips):
    server = FileServer()
    try:
        url = server.add("/v.mp4", clips["mp4"].read_bytes())
        _, sound = _stream({"video": url, "video_end": 3.0})
    finally:
        server.close()
    _, ref = _stream({"video": str(clips["mp4"]), "video_end": 3.0})
    assert np.array_equal(sound, ref)


def test_a_live_pipe_carries_its_sound_on_the_frames_timeline(clips):
    """MPEG-TS through a pipe starts at its own clock (1.4 s): the sound is placed by its timestamps against
    the first frame's, as the frames are."""
    chunks, sound = _piped(["ffmpeg", "-v", "error", "-i", str(clips["mp4"]), "-c", "copy", "-f", "mpegts", "pipe:1"])
    assert chunks[0].source_time > 1.0  # (the MPEG-TS clock)
    _aligned(sound, 0.0)


def test_a_live_source_whose_sound_stops_gets_silence_after_a_wait(clips, caplog):

    chunks, sound = _piped(["cat", str(clips["short"])])
    assert len(chunks) == 6 and np.abs(sound[int(2.1 * SR) :]).max() == 0
    # (the muxer wrote the last audio packet, 1.86-1.92 s, only at the file's end: on a live source it came too
    # late for its chunk; a muxer holding one packet back at a pause is not a file muxed late: not logged)
    assert "muxed late" not in caplog.text, caplog.text
    _aligned(sound[: int(1.8 * SR)], 0.0, seconds=1.8)


def test_without_audio_chunks_carry_none(clips):
    chunk = next(iter(q.stream_video({"video": str(clips["mp4"])})))
    assert chunk.audio is None


def test_a_video_without_sound_and_a_bad_flag_are_typed_errors(clips):
    with pytest.raises(q.InvalidOptionError, match="audio='yes' must be True or False"):
        q.stream_video({"video": str(clips["mp4"])}, audio="yes")
    with pytest.raises(q.DecodeError, match=r"has no audio stream .*audio=False"):
        list(q.stream_video({"video": str(clips["silent"])}, audio=True))
    cmd = ["ffmpeg", "-v", "error", "-i", str(clips["silent"]), "-c", "copy", "-f", "mpegts", "pipe:1"]
    feed = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    try:
        with pytest.raises(q.DecodeError, match="no audio stream"):
            list(q.stream_video({"video": feed.stdout}, audio=True))
    finally:
        feed.stdout.close()
        feed.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_closing_a_stream_with_sound_early_releases_everything(clips):
    def resources():
        threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("qwen-vl-stream"))
        return threads, len(os.listdir("/proc/self/fd")), sorted(os.listdir(library_tmpdir()))

    before = resources()
    for value in (str(clips["mp4"]), str(clips["short"])):
        stream = q.stream_video({"video": value, "fps": 2.0}, audio=True)
        for chunk in stream:
            if chunk.index == 3:  # (past the point where the short one's sound is read on its own)
                break
        stream.close()
    assert resources() == before


def test_a_chunks_sound_is_what_the_omni_processor_counts(clips):
    """Chunks' samples through transformers' Whisper feature extractor and the Qwen2.5-Omni processor's own
    length function give the token count the library states for them."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_5_omni import processing_qwen2_5_omni as p25

    fe = transformers.WhisperFeatureExtractor(
        feature_size=128, sampling_rate=SR, hop_length=160, chunk_length=300, n_fft=400, return_attention_mask=True
    )
    for chunk in q.stream_video({"video": str(clips["mp4"]), "fps": 2.0, "video_end": 3.3}, 1.5, audio=True):
        mask = fe(chunk.audio, sampling_rate=SR, padding="max_length", return_attention_mask=True)["attention_mask"]
        frames = torch.tensor(int(np.asarray(mask).sum()))
        assert q.audio_token_count(len(chunk.audio)) == int(p25._get_feat_extract_output_lengths(frames)) > 0


def test_cli_stream_audio_reports_each_chunks_sound(clips):
    import json
    import sys

    cmd = [sys.executable, "-m", "qwen_vl_utils", "stream", str(clips["late"]), "--json", "--fps", "2", "--audio"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [line["audio_samples"] for line in lines] == [SR] * 6
    peaks = [line["audio_peak"] for line in lines]
    assert max(peaks[0], peaks[5]) < 0.05 < 0.1 < min(peaks[1:5])  # the track plays from 1 s to 5 s (AAC's tail)
    plain = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120)
    assert "audio_samples" not in plain.stdout


def test_no_sound_after_video_end(clips):
    """A last chunk whose window reaches past ``video_end`` (full of targets before it) has silence after it."""
    chunks, sound = _stream({"video": str(clips["mp4"]), "fps": 1.0, "video_end": 3.3}, chunk_seconds=2.0)
    assert [(c.start, c.end) for c in chunks] == [(0.0, 2.0), (2.0, 4.0)]
    assert np.abs(sound[round(3.3 * SR) :]).max() == 0
    _aligned(sound[: round(3.3 * SR)], 0.0, seconds=3.3)


def _audio_last(src, dst):
    """``src`` remuxed with every audio packet after every video packet (a muxer that wrote the sound last)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"max_interleave_delta": "1"}) as out:
        vin, ain = inp.streams.video[0], inp.streams.audio[0]
        vout, aout = out.add_stream_from_template(vin), out.add_stream_from_template(ain)
        packets = [p for p in inp.demux(vin, ain) if p.size]
        for stream, target in ((vin, vout), (ain, aout)):
            for packet in packets:
                if packet.stream is stream:
                    packet.stream = target
                    out.mux(packet)
    return dst


def test_sound_muxed_after_the_pictures(clips, tmp_path, caplog):
    """A file whose sound comes after all its pictures: by path its sound is read by a demuxer of its own (all
    there); through a pipe, which cannot be read twice, the chunks it came too late for have silence, and a
    warning names the source and says how to get the sound."""

    late = _audio_last(clips["mkv"], tmp_path / "late.mkv")
    _, sound = _stream({"video": str(late)})
    assert np.array_equal(sound, fetch_video_audio({"video": str(late), "fps": 2.0}))
    chunks, piped = _piped(["cat", str(late)])
    assert len(chunks) == 6 and np.abs(piped[: 2 * SR]).max() == 0
    warned = [r.getMessage() for r in caplog.records if "muxed late" in r.getMessage()]
    assert len(warned) == 1 and "range requests" in warned[0], caplog.text


def test_a_live_source_whose_sound_stopped_gives_each_chunk_3_s_behind(tmp_path):
    """A live source whose sound stopped (at 2 s) and whose pictures go on: each chunk waits 3 s of video for sound
    that could still come, then has silence. Fed 10.5 s and no more (the pipe stays open), the chunk of 6-7 s
    comes without the source ending."""
    src = write_video(tmp_path / "v.mp4", seconds=12.0)
    head = tmp_path / "head.ts"
    cmd = ["ffmpeg", "-v", "error", "-i", str(src), "-t", "10.5", "-c:v", "copy", "-c:a", "aac", "-af", "atrim=0:2"]
    subprocess.run([*cmd, "-f", "mpegts", str(head)], check=True)
    read, write = os.pipe()
    feeder = threading.Thread(target=os.write, args=(write, head.read_bytes()), daemon=True)
    feeder.start()  # (then the pipe stays open: no more data, no end)
    stream = q.stream_video({"video": os.fdopen(read, "rb", buffering=0), "fps": 2.0}, 1.0, audio=True)
    got: list = []
    came = threading.Event()

    def consume():
        for chunk in stream:
            got.append(chunk)
            if chunk.index == 6:
                came.set()

    reader = threading.Thread(target=consume)
    reader.start()
    came.wait(timeout=60)
    stream.close()
    reader.join()
    feeder.join()
    os.close(write)
    assert [c.index for c in got][:7] == list(range(7)), [c.index for c in got]
    sound = np.concatenate([c.audio for c in got[:7]])
    assert np.abs(sound[int(2.1 * SR) :]).max() == 0
    _aligned(sound[: int(1.8 * SR)], 0.0, seconds=1.8)


def test_sparse_sound_through_a_pipe_is_the_sound_by_path(tmp_path, caplog):
    """A live source whose sound comes in bursts (128 ms every 3 s, no packets between; MPEG-TS's muxer holds each
    burst's last packet until the next burst): every burst reaches its chunk, as read by path, and nothing is
    logged. (The sound was given up on at the first gap, and the bursts after came to chunks already given.)"""

    spans = [(at, at + 0.128) for at in (0.0, 3.0, 6.0, 9.0)]
    src = write_video(tmp_path / "v.mp4", seconds=12.0, spans=spans)
    ts = tmp_path / "v.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(src), "-c", "copy", str(ts)], check=True)
    _, by_path = _stream({"video": str(ts)})
    chunks, piped = _piped(["cat", str(ts)])
    assert len(chunks) == 12 and "muxed late" not in caplog.text
    for at, to in spans:
        first, last = round(at * SR), round(to * SR)
        assert np.abs(piped[first:last]).max() > 0.3, at
        assert snr_db(piped[first:last], by_path[first:last]) > 60, at
    assert np.array_equal(piped != 0, by_path != 0)


def test_sound_before_a_live_window_is_not_late(clips, caplog):
    """A live source with video_start: its sound before the window is not needed, so not late (it was logged as
    sound muxed late)."""

    chunks, sound = _piped(
        ["ffmpeg", "-v", "error", "-i", str(clips["mp4"]), "-c", "copy", "-f", "mpegts", "pipe:1"],
        {"video_start": 2.0},
    )
    assert chunks[0].start == 2.0 and "muxed late" not in caplog.text, caplog.text
    _aligned(sound, 2.0)


def test_what_a_muxer_holds_back_at_each_pause_is_not_logged(tmp_path, caplog):
    """Sound in 1 s bursts 5 s apart through a pipe: MPEG-TS's muxer holds each burst's last packets (0.2-0.3 s)
    until the next burst, more than 3 s later, so they are silence; that is not sound muxed late (they added up
    over the pauses to a warning), and the rest of each burst reaches its chunks."""

    spans = [(at, at + 1.0) for at in (0.0, 5.0, 10.0, 15.0)]
    src = write_video(tmp_path / "v.mp4", seconds=18.0, spans=spans)
    ts = tmp_path / "v.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(src), "-c", "copy", str(ts)], check=True)
    chunks, piped = _piped(["cat", str(ts)])
    assert len(chunks) == 18 and "muxed late" not in caplog.text, caplog.text
    for at, _ in spans:
        _aligned(piped[round((at + 0.1) * SR) : round((at + 0.6) * SR)], at + 0.1, seconds=18.0)


def test_a_frame_decoded_after_the_sound_is_read_on_its_own_is_left_out(clips):
    """A file's shared demuxer runs on a thread of its own: it may finish decoding one more audio frame after the
    chunks turned to a reader of its own (video_end, or sound lagging). That frame is left out, and the reader's
    frames go on from where the sound was: the sound stays the file's (the stray frame ended the reader's
    resuming, and its pre-roll half a second back was taken as new sound: seen as 0.45 s wrong in a last
    chunk, now and then, under load). Played here in that order on one thread."""
    from qwen_vl_utils.audio import frame_time, time_base
    from qwen_vl_utils.container._probe import open_container, probe_video
    from qwen_vl_utils.sources._policy import get_fetch_policy
    from qwen_vl_utils.sources._resolve import resolve_source
    from qwen_vl_utils.stream._audio import StreamAudio

    path = str(clips["mp4"])
    with resolve_source(path, "video", get_fetch_policy(None)) as source:
        audio = StreamAudio(0.0, probe_video(source, count=False).start_time, live=False)
        container = open_container(source)
        try:
            audio.attach(container, source.name)
            stream = container.streams.audio[0]
            frames = (f for p in container.demux(stream) for f in stream.codec_context.decode(p))
            for frame in frames:  # the shared demuxer's sound up to 2 s
                audio._frame(frame, frame_time(frame, time_base(stream)))
                if audio.track.fed is not None and audio.track.fed >= 2.0:
                    break
            stray = next(frames)
            audio.read_own(source, audio.track.end)  # the reader of its own takes over...
            audio._frame(stray, frame_time(stray, time_base(stream)))  # ...as the demuxer's thread adds one more
            audio.read_own(source, 4 * SR)
            sound = audio.take(0, 4 * SR)
        finally:
            audio.close_own()
            container.close()
    whole = fetch_video_audio({"video": path, "fps": 2.0})[: 4 * SR]
    assert lag(sound, whole) == 0 and snr_db(sound, whole) > 40
