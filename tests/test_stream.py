"""stream_video: chunks of files equal what fetch_video's decoder gives for the same frames; live sources (pipes,
HLS, UDP, HTTP) produce chunks while they are still being written; closing releases everything; broken and
stalled streams end in typed errors in time."""

from __future__ import annotations

import contextlib
import gc
import http.server
import io
import itertools
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from fractions import Fraction

import numpy as np
import pytest

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils.backends import load_backend
from qwen_vl_utils.container._probe import probe_video
from qwen_vl_utils.sources import _resolve
from qwen_vl_utils.sources._policy import get_fetch_policy
from qwen_vl_utils.sources._resolve import library_tmpdir, resolve_source
from qwen_vl_utils.stream import _file as sf
from qwen_vl_utils.stream import _video_stream as st
from qwen_vl_utils.video import FramePlan, _read_frames

from media import (
    displayed_frame_numbers,
    frame_number,
    keyframe_starts,
    make_intra_refresh,
    make_video,
    numbered_frame,
    played_frames,
)

torch = pytest.importorskip("torch")

try:  # the real client's helpers (transformers' Qwen3-VL video processor, its timestamp computation)
    from test_transformers import _process, timestamps, video_processor  # noqa: F401 - fixtures

    TRANSFORMERS = True
except (ImportError, pytest.skip.Exception):
    TRANSFORMERS = False

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg command-line tool is not installed")


# --- references ------------------------------------------------------------------------------------------------------


def grid_indices(n_frames, src_fps, fps, start=0, end=None):
    """The sampling rule, computed independently with exact fractions: for each target time k / fps inside
    [start, end), the first frame (index i, shown at i / src_fps) at or after it."""
    src_fps, fps = Fraction(src_fps), Fraction(fps)
    k, out = math.ceil(Fraction(start) * fps), []
    while end is None or Fraction(k) / fps < end:
        i = math.ceil(Fraction(k) / fps * src_fps)
        if i >= n_frames:
            break
        out.append(i)
        k += 1
    return out


def reference_frames(path, indices, size):
    """What fetch_video's decoder returns for these indices: its own plan type and frame reader (PyAV)."""
    with resolve_source(str(path), "video", get_fetch_policy()) as src:
        info = probe_video(src)
        plan = FramePlan(indices, min(indices), max(indices), 1.0, info.fps, info.num_frames)
        return _read_frames(load_backend("pyav"), src, info, plan, size)


def sequential_frames(path, indices, size):
    """The same frames decoded front to back with no seek and no skipping, then resized as fetch_video does."""
    import av

    from qwen_vl_utils._frame_resize import resize_frame as _resize

    wanted, out = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                k = round(getattr(frame, "rotation", 0) or 0) % 360 // 90
                h, w = size if k % 2 == 0 else size[::-1]
                out[i] = np.rot90(_resize(frame.to_ndarray(format="rgb24"), w, h), k)
    return np.stack([out[i] for i in indices])


def collect(stream):
    with stream:
        return list(stream)


def indices_of(chunks):
    return [i for c in chunks for i in c.metadata["frames_indices"]]


def unpadded(chunks):
    """(index, frame) of every chunk frame, without the padding at the end (a repeated last index)."""
    out = []
    for c in chunks:
        idx = c.metadata["frames_indices"]
        for pos, i in enumerate(idx):
            if pos and i == idx[pos - 1] and pos == len(idx) - 1:
                continue
            out.append((i, c.frames[pos]))
    return out


# --- media -----------------------------------------------------------------------------------------------------------


def numbered(i, width, height):
    return numbered_frame(i, width, height)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    made = {
        "h264-bframes.mp4": make_video(d / "a.mp4", frames=240, width=192, height=112, pattern=numbered),
        "h264.ts": make_video(d / "b.ts", frames=120, width=192, height=112, container="mpegts", pattern=numbered),
        "hevc.mkv": make_video(
            d / "c.mkv", codec="libx265", frames=96, width=192, height=112, container="matroska", pattern=numbered
        ),
        "vp9.webm": make_video(d / "d.webm", codec="libvpx-vp9", frames=72, width=192, height=112, pattern=numbered),
        "mpeg4.avi": make_video(d / "e.avi", codec="mpeg4", frames=72, width=192, height=112, pattern=numbered),
        "rotated.mp4": make_video(d / "f.mp4", frames=72, width=192, height=112, rotation=90, pattern=numbered),
    }
    return made


FILES = ["h264-bframes.mp4", "h264.ts", "hevc.mkv", "vp9.webm", "mpeg4.avi", "rotated.mp4"]


# --- files: the same frames as fetch_video ---------------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [1, 2])
@pytest.mark.parametrize("name", FILES)
def test_file_chunks_equal_fetch_video_frames(files, name, cpus, monkeypatch):
    """One decoder, or segments decoded in parallel: the same frames."""
    monkeypatch.setattr(st, "usable_cpus", lambda: cpus)
    path = files[name]
    chunks = collect(q.stream_video({"video": str(path), "fps": 2.0}, 1.0, 14))
    info = probe_video(resolve_source(str(path), "video", get_fetch_policy()))
    expected = grid_indices(info.num_frames, 24, 2)
    assert indices_of(chunks)[: len(expected)] == expected
    assert len(indices_of(chunks)) == len(expected) + len(expected) % 2  # the last chunk padded to whole pairs
    assert [(c.index, c.start, c.end) for c in chunks[:-1]] == [(j, float(j), j + 1.0) for j in range(len(chunks) - 1)]
    assert chunks[-1].end == pytest.approx(min(len(chunks), info.num_frames / 24))
    shapes = {tuple(c.frames.shape) for c in chunks}
    assert len(shapes) == 1 and next(iter(shapes))[:2] == (2, 3)
    h, w = next(iter(shapes))[2:]
    meta = chunks[0].metadata
    assert meta["fps"] == pytest.approx(24)
    if probe_video(resolve_source(str(path), "video", get_fetch_policy()), count=False).exact_count:
        assert meta["total_num_frames"] == info.num_frames  # the header's count
    else:  # no count in the header (MPEG-TS, Matroska, WebM): counted as they come, the file not read through
        assert max(meta["frames_indices"]) < meta["total_num_frames"] <= info.num_frames
    assert meta["video_backend"] == "pyav"
    # the pixels: the frames they claim to be (each carries its number in stripes), resized as fetch_video does
    got = np.stack([f.permute(1, 2, 0).numpy() for _, f in unpadded(chunks)])
    upright = np.rot90(got, -1, axes=(1, 2)) if name == "rotated.mp4" else got
    assert [frame_number(f) for f in upright] == expected
    diff = np.abs(got.astype(np.int16) - sequential_frames(path, expected, (h, w)))
    assert diff.max() <= 1 and diff.mean() <= 1e-4
    diff = np.abs(got.astype(np.int16) - reference_frames(path, expected, (h, w)))
    assert diff.max() <= 1 and diff.mean() <= 1e-4


@needs_ffmpeg
@pytest.mark.parametrize("cut", [["-ss", "0.5"], ["-ss", "1.3", "-t", "3"]])
def test_edit_lists_number_the_frames_a_player_shows(files, tmp_path, cut):
    """A stream-copy cut keeps the frames from the keyframe before the cut and hides them with an edit list:
    indices count the shown frames only, as fetch_video's do, and each is the frame FFmpeg shows there."""
    path = tmp_path / "cut.mp4"
    subprocess.run(
        [FFMPEG, "-v", "error", cut[0], cut[1], "-i", str(files["h264-bframes.mp4"]), *cut[2:], "-c", "copy", path],
        check=True,
    )
    shown = displayed_frame_numbers(path)
    chunks = collect(q.stream_video({"video": str(path)}))
    expected = grid_indices(len(shown), 24, 2)
    assert indices_of(chunks)[: len(expected)] == expected
    assert [frame_number(f) for _, f in unpadded(chunks)] == [shown[i] for i in expected]
    meta = q.fetch_video({"video": str(path)}, return_video_metadata=True)[1]
    assert chunks[0].metadata["total_num_frames"] == meta["total_num_frames"] == len(shown)


def test_same_frames_and_pixels_as_fetch_video_where_its_linspace_is_the_grid(files):
    """fetch_video spreads nframes evenly over its window (linspace); where that lands on the grid (frames 0, 12,
    ..., 228 of a 24 fps file at fps=2), the chunks hold exactly fetch_video's frames."""
    path = files["h264-bframes.mp4"]
    video, meta = q.fetch_video({"video": str(path), "nframes": 20, "video_end": 9.5}, 14, return_video_metadata=True)
    chunks = collect(q.stream_video({"video": str(path), "fps": 2.0, "video_end": 9.75}))
    assert meta["frames_indices"] == indices_of(chunks) == list(range(0, 229, 12))
    got = torch.cat([c.frames for c in chunks])
    assert got.shape == video.shape
    diff = (got - video).abs()
    assert diff.max() <= 1 and diff.mean() <= 1e-4
    # chunks carry the stream's frame count; fetch_video's window its own frames (0 to 228, issue 26)
    assert [c.metadata["total_num_frames"] for c in chunks] == [240] * 10 and meta["total_num_frames"] == 229


@pytest.mark.parametrize(
    "extra,chunk",
    [({"fps": 4, "video_start": 1.3, "video_end": 6.2}, 0.5), ({"fps": 1, "video_start": 3.0}, 2.0)],
)
def test_window_is_one_seek_then_the_same_grid(files, extra, chunk):
    path = files["h264-bframes.mp4"]
    chunks = collect(q.stream_video({"video": str(path), **extra}, chunk))
    expected = grid_indices(240, 24, extra["fps"], extra["video_start"], extra.get("video_end"))
    assert indices_of(chunks)[: len(expected)] == expected
    start = extra["video_start"]
    assert [c.start for c in chunks] == pytest.approx([start + j * chunk for j in range(len(chunks))])
    if "video_end" in extra:
        assert chunks[-1].end <= extra["video_end"] + 1e-9
    got = [frame_number(f) for _, f in unpadded(chunks)]
    assert got == expected


def test_odd_frames_per_chunk_are_padded_and_fps_above_the_source_repeats(files):
    path = files["h264-bframes.mp4"]
    chunks = collect(q.stream_video({"video": str(path), "fps": 3, "video_end": 2.0}, 1.0))
    assert [c.metadata["frames_indices"] for c in chunks] == [[0, 8, 16, 16], [24, 32, 40, 40]]
    fast = collect(q.stream_video({"video": str(path), "fps": 48, "video_end": 0.25}, 0.125))
    # a frame serves every grid point it is the first frame at or after: indices repeat, never go back
    assert indices_of(fast) == grid_indices(240, 24, 48, 0, 0.25) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]


def test_uint8_dtype_and_pixel_budget(files):
    path = files["h264-bframes.mp4"]
    ele = {"video": str(path), "dtype": "uint8", "max_pixels": 64 * 28 * 28, "min_pixels": 4 * 28 * 28}
    chunk = next(iter(q.stream_video(ele, 1.0, 14)))
    video = q.fetch_video({"video": str(path), "max_pixels": 64 * 28 * 28, "min_pixels": 4 * 28 * 28, "nframes": 2})
    assert chunk.frames.dtype == torch.uint8 and chunk.frames.shape[2:] == video.shape[2:]
    resized = next(iter(q.stream_video({"video": str(path), "resized_height": 56, "resized_width": 84})))
    assert resized.frames.shape[2:] == (56, 84)


@pytest.mark.skipif(not TRANSFORMERS, reason="transformers is not installed (pip install transformers)")
def test_qwen3_vl_processor_timestamps_are_the_chunk_times(tmp_path, video_processor, timestamps):
    path = make_video(tmp_path / "v.mp4", frames=150, fps=30, width=320, height=180)
    for ele in ({"video": str(path)}, {"video": str(path), "fps": 4, "video_start": 1.1}):
        for chunk in q.stream_video(ele, 1.0, 16):
            meta = chunk.metadata
            out = _process(video_processor, chunk.frames, meta)
            t, _, h, w = chunk.frames.shape
            assert out["video_grid_thw"].tolist() == [[t // 2, h // 16, w // 16]]
            real = [i / 30 for i in meta["frames_indices"]]  # the source's own frame times (30 fps, CFR)
            assert timestamps(meta) == pytest.approx([(real[i] + real[i + 1]) / 2 for i in range(0, t, 2)])
            assert all(chunk.start - 1e-9 <= x < chunk.end for x in real)


def test_skipping_is_exact_and_skips(files, monkeypatch):
    """Non-targets go undecoded (dropped up to the next closed GOP, or left to the decoder as non-reference
    frames); the frames that come out are still exactly the targets, with no second pass."""
    decisions, passes = [], []
    leave, decode = sf._Lookahead._leave, st._Run._decode_file
    monkeypatch.setattr(
        sf._Lookahead, "_leave", lambda self, final: decisions.append(leave(self, final)) or decisions[-1]
    )
    monkeypatch.setattr(st._Run, "_decode_file", lambda self, *a: passes.append(a[-1]) or decode(self, *a))
    path = files["h264-bframes.mp4"]
    chunks = collect(q.stream_video({"video": str(path), "fps": 2.0}))
    assert passes == [True]  # one pass, skipping
    assert [r for _, r, want, _ in decisions if want] == indices_of(chunks) == list(range(0, 240, 12))
    assert sum(want is None for _, _, want, _ in decisions) > 60  # whole runs of packets never decoded
    assert [frame_number(f) for _, f in unpadded(chunks)] == list(range(0, 240, 12))


def test_a_file_skipping_cannot_handle_is_decoded_again_in_full(files, monkeypatch):
    """When the lookahead cannot prove its ordinals (here: made to give up mid-file), the file is decoded again
    without skipping; chunks already handed over are not repeated and the rest are the same."""
    push, count = sf._Lookahead.push, []

    def failing(self, packet):
        count.append(1)
        if len(count) == 100:
            raise sf._Inexact("test")
        return push(self, packet)

    monkeypatch.setattr(sf._Lookahead, "push", failing)
    path = files["h264-bframes.mp4"]
    chunks = collect(q.stream_video({"video": str(path), "fps": 2.0}))
    assert [c.index for c in chunks] == list(range(10))
    assert indices_of(chunks) == list(range(0, 240, 12))
    assert [frame_number(f) for _, f in unpadded(chunks)] == list(range(0, 240, 12))


def test_closed_gops_are_decoded_in_parallel_from_one_read(files, monkeypatch):
    """With two workers, segments (closed GOPs) go to two decoders on two threads while one thread reads the file
    once; the chunks are the same, to the bit, as with the stream's own decoder alone."""
    fed, opened, decode = [], [], st._Run._decode_file
    feed = sf._SegmentDecoder.feed
    monkeypatch.setattr(
        sf._SegmentDecoder,
        "feed",
        lambda self, p, *a: fed.append((threading.get_ident(), id(self))) or feed(self, p, *a),
    )
    monkeypatch.setattr(st._Run, "_decode_file", lambda self, *a: opened.append(a[-1]) or decode(self, *a))
    path = files["h264-bframes.mp4"]  # a keyframe every 12 frames: segments of 36
    monkeypatch.setattr(st, "usable_cpus", lambda: 2)
    parallel = collect(q.stream_video({"video": str(path), "fps": 2.0}))
    threads, decoders = {t for t, _ in fed}, {d for _, d in fed}
    assert opened == [True] and len(threads) == 2 and len(decoders) == 2 and threading.get_ident() not in threads
    fed.clear()
    monkeypatch.setattr(st, "usable_cpus", lambda: 1)
    alone = collect(q.stream_video({"video": str(path), "fps": 2.0}))
    assert len({d for _, d in fed}) == 1
    assert indices_of(parallel) == indices_of(alone) == list(range(0, 240, 12))
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(parallel, alone, strict=True))
    assert [frame_number(f) for _, f in unpadded(parallel)] == list(range(0, 240, 12))


def test_a_worker_decoder_that_fails_is_a_typed_error_and_no_thread_stays(files, monkeypatch):
    def broken(self):
        raise RuntimeError("no decoder here")

    monkeypatch.setattr(sf._Skipping, "_decoder", broken)
    monkeypatch.setattr(st, "usable_cpus", lambda: 2)
    with pytest.raises(q.DecodeError, match=r"a\.mp4 could not be decoded \(RuntimeError: no decoder here\)"):
        collect(q.stream_video({"video": str(files["h264-bframes.mp4"]), "fps": 2.0}))
    assert _resources()[0] == []


def test_a_demux_failure_mid_segment_is_a_typed_error_and_no_thread_stays(files, monkeypatch):
    """The reading thread fails while a segment is being decoded in parallel: the segments before it come out,
    then the error, naming the file; every thread is gone when the iteration ends."""
    push, count = sf._Lookahead.push, []

    def failing(self, packet):
        count.append(1)
        if len(count) == 150:
            raise RuntimeError("the disk went away")
        return push(self, packet)

    monkeypatch.setattr(sf._Lookahead, "push", failing)
    monkeypatch.setattr(st, "usable_cpus", lambda: 2)
    got = []
    stream = q.stream_video({"video": str(files["h264-bframes.mp4"]), "fps": 2.0})
    broken = r"a\.mp4 could not be decoded \(RuntimeError: the disk went away\)"
    with pytest.raises(q.DecodeError, match=broken), stream:
        got.extend(stream)
    assert 0 < len(got) < 10 and indices_of(got) == list(range(0, 24 * len(got), 12))
    assert _resources()[0] == []


def test_a_close_during_parallel_decode_does_not_wait_for_queued_packets(tmp_path, monkeypatch):
    """Packets dealt to a worker and still queued are not decoded after a close: at most the one in hand."""
    path = make_video(tmp_path / "long-gop.mp4", frames=240, width=192, height=112, gop=240)
    feed, fed, closing = sf._SegmentDecoder.feed, [], threading.Event()

    def slow(self, *a):
        fed.append(closing.is_set())
        time.sleep(0.04)  # 47 packets from one target to the next: 1.9 s
        return feed(self, *a)

    monkeypatch.setattr(sf._SegmentDecoder, "feed", slow)
    monkeypatch.setattr(st, "usable_cpus", lambda: 2)
    stream = q.stream_video({"video": str(path), "fps": 0.5}, chunk_seconds=4.0)
    assert next(stream).metadata["frames_indices"] == [0, 48]
    time.sleep(0.5)  # the reading thread fills the worker's inbox meanwhile
    began = time.monotonic()
    closing.set()
    stream.close()
    assert time.monotonic() - began < 0.5 and sum(fed) <= 1
    assert _resources()[0] == []


@pytest.fixture(scope="module")
def intra_refresh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("intra-refresh")
    return {ext: make_intra_refresh(folder / f"refresh.{ext}") for ext in ("mp4", "ts")}


@pytest.mark.parametrize(
    ("codec", "container", "options"),
    [
        ("libx264", "mp4", {}),
        ("libx264", "mpegts", {}),
        ("libx265", "mp4", {"x265-params": "log-level=none:keyint=12:open-gop=0"}),
        ("libx265", "matroska", {"x265-params": "log-level=none:keyint=12:open-gop=0"}),
        ("libx265", "mpegts", {"x265-params": "log-level=none:keyint=12:open-gop=0"}),
    ],
)
def test_idr_keyframes_are_fresh_starts(tmp_path, codec, container, options):
    """Every keyframe of a closed-GOP H.264 or HEVC stream is an IDR picture, length-prefixed or Annex B."""
    import av

    from qwen_vl_utils.container._nal import fresh_start_check

    path = make_video(tmp_path / "v", codec=codec, container=container, frames=60, options=options)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        check = fresh_start_check(stream.codec_context)
        verdicts = [check(p) for p in c.demux(stream) if p.size and p.is_keyframe]
    assert len(verdicts) >= 4 and all(verdicts)


@pytest.mark.parametrize("container", ["mp4", "mpegts"])
def test_h264_open_gop_keyframes_are_fresh_starts(tmp_path, container):
    """x264's open GOPs: keyframes that are non-IDR I-frames whose recovery point SEI says they are exact at once
    (recovery_frame_cnt 0): fresh starts, so the PyAV backend still seeks to them (striking them would make
    it decode every file of this kind from the start)."""
    import av

    from qwen_vl_utils.container._nal import fresh_start_check

    options = {"x264-params": "open-gop=1:keyint=24", "bf": "3"}
    path = make_video(tmp_path / "v", container=container, frames=120, options=options)
    assert not all(keyframe_starts(path)[1:]), "the file must have non-IDR keyframes"
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        check = fresh_start_check(stream.codec_context)
        verdicts = [check(p) for p in c.demux(stream) if p.size and p.is_keyframe]
    assert len(verdicts) >= 4 and all(verdicts)


def test_recovery_point_keyframes_are_not_fresh_starts(intra_refresh):
    import av

    from qwen_vl_utils.container._nal import fresh_start_check

    for path in intra_refresh.values():
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            check = fresh_start_check(stream.codec_context)
            verdicts = [check(p) for p in c.demux(stream) if p.size and p.is_keyframe]
        assert verdicts == keyframe_starts(path) and verdicts[0] and len(verdicts) >= 8 and not any(verdicts[1:])


@pytest.mark.parametrize("cpus", [1, 2])
@pytest.mark.parametrize("ext", ["mp4", "ts"])
@pytest.mark.parametrize("start", [None, 5.2])
def test_intra_refresh_is_read_in_one_pass_and_exactly(intra_refresh, monkeypatch, cpus, ext, start):
    """Keyframes that are only recovery points (x264's intra refresh) are neither where decoding resumes after
    skipped packets nor where a parallel segment starts: one pass, every frame as a player shows it."""
    path = intra_refresh[ext]
    assert not any(keyframe_starts(path)[1:]), "the file must have recovery-point keyframes"
    passes, decode = [], st._Run._decode_file
    monkeypatch.setattr(st._Run, "_decode_file", lambda self, *a: passes.append(a[-1]) or decode(self, *a))
    monkeypatch.setattr(st, "usable_cpus", lambda: cpus)
    ele = {"video": str(path), "fps": 2.0, "dtype": "uint8", "resized_height": 192, "resized_width": 320}
    if start is not None:
        ele["video_start"] = start
    chunks = collect(q.stream_video(ele, image_patch_size=16))
    assert passes == [True]
    first = math.ceil(2 * (start or 0))
    assert [i for i, _ in unpadded(chunks)] == [k * 12 for k in range(first, 20)]
    played = played_frames(path)
    for chunk in chunks:
        for frame, i in zip(chunk.frames, chunk.metadata["frames_indices"], strict=True):
            diff = np.abs(frame.permute(1, 2, 0).numpy().astype(int) - played[i].astype(int)).max()
            assert diff <= 2, f"frame {i} differs by up to {diff} from the frame a player shows"


# --- options ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ele,kwargs,match",
    [
        ({"total_pixels": 1000}, {}, "total_pixels=1000 cannot be used with stream_video: a whole clip's pixel"),
        ({"nframes": 8}, {}, "nframes=8 cannot be used with stream_video"),
        ({"max_frames": 8}, {}, "max_frames=8 cannot be used"),
        ({"video_reader": "decord"}, {}, "PyAV only"),
        ({}, {"backend": "torchcodec"}, "PyAV only"),
        ({"fps": 1.5}, {}, "whole number of frames"),
        ({}, {"chunk_seconds": 0}, "chunk_seconds=0 must be"),
        ({"video_start": 5, "video_end": 2}, {}, "video_start"),
        ({"fps": "2"}, {}, "invalid fps"),
        ({"max_pixels": 64 * 28 * 28}, {}, r"max_pixels \(50176\) must be >= min_pixels"),
    ],
)
def test_options_are_checked_when_called(files, ele, kwargs, match):
    with pytest.raises(q.InvalidOptionError, match=match):
        q.stream_video({"video": str(files["h264-bframes.mp4"]), **ele}, **kwargs)


def test_pyav_backend_is_accepted_and_named(files):
    chunk = next(iter(q.stream_video({"video": str(files["vp9.webm"]), "video_reader": "pyav"}, backend="pyav")))
    assert chunk.metadata["video_backend"] == "pyav"


def test_udp_is_refused_by_the_default_policy_and_bad_sources_are_typed_errors(tmp_path):
    with pytest.raises(q.SourceNotAllowedError, match="does not allow udp"):
        q.stream_video({"video": "udp://127.0.0.1:5000"})
    allow = get_fetch_policy().replace(allowed_schemes=("udp",))
    with pytest.raises(q.InvalidOptionError, match="udp://HOST:PORT"):
        q.stream_video({"video": "udp://127.0.0.1:5000/path?x=1"}, policy=allow)
    with pytest.raises(q.SourceNotFoundError):
        next(iter(q.stream_video({"video": str(tmp_path / "missing.mp4")})))
    (tmp_path / "noise.bin").write_bytes(os.urandom(5000))
    with pytest.raises(q.DecodeError):
        next(iter(q.stream_video({"video": str(tmp_path / "noise.bin")})))
    with pytest.raises(q.InvalidOptionError, match="fetch_video"):
        next(iter(q.stream_video({"video": np.zeros((4, 8, 8, 3), np.uint8)})))
    (tmp_path / "live.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nseg0.ts\n")
    with pytest.raises(q.InvalidOptionError, match="serve its folder over HTTP"):
        next(iter(q.stream_video({"video": str(tmp_path / "live.m3u8")})))


# --- live byte streams: pipes ----------------------------------------------------------------------------------------


def pipe_fed(data, *, stall=None, pace=None):
    """A pipe a thread writes ``data`` into (``pace`` seconds between 4 KiB writes), then closes, or, with
    ``stall`` (an Event), holds open until it is set. Returns (read end as a file object, writer thread, a dict
    with the time the last byte went out)."""
    r, w = os.pipe()
    sent = {}

    def write():
        with os.fdopen(w, "wb", buffering=0) as f, contextlib.suppress(BrokenPipeError):
            for i in range(0, len(data), 4096):
                f.write(data[i : i + 4096])
                if pace:
                    time.sleep(pace)
            sent["at"] = time.monotonic()
            if stall is not None:
                stall.wait(30)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return os.fdopen(r, "rb"), t, sent


def remux(path, *args):
    """The same packets in another container, with the ffmpeg command-line tool."""
    subprocess.run([FFMPEG or "ffmpeg", "-v", "error", "-i", str(path), "-c", "copy", *map(str, args)], check=True)


@pytest.fixture(scope="module")
def fragmented(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("fmp4") / "f.mp4"
    remux(files["h264-bframes.mp4"], "-movflags", "frag_keyframe+empty_moov", "-f", "mp4", out)
    return out


@needs_ffmpeg
@pytest.mark.parametrize("kind", ["mpegts", "fragmented mp4", "matroska"])
def test_a_pipe_is_read_once_as_it_arrives(files, fragmented, kind, tmp_path):
    if kind == "matroska":
        remux(files["h264-bframes.mp4"], "-f", "matroska", tmp_path / "v.mkv")
    data = {"mpegts": files["h264.ts"], "fragmented mp4": fragmented, "matroska": tmp_path / "v.mkv"}[
        kind
    ].read_bytes()
    f, writer, _ = pipe_fed(data)
    with f:
        chunks = collect(q.stream_video({"video": f}))
    n = 120 if kind == "mpegts" else 240
    assert indices_of(chunks) == grid_indices(n, 24, 2)
    assert [frame_number(x) for _, x in unpadded(chunks)] == grid_indices(n, 24, 2)
    # a live stream's total: the frames seen when the chunk was complete
    assert [c.metadata["total_num_frames"] for c in chunks] == [c.metadata["frames_indices"][-1] + 1 for c in chunks]
    assert [c.start for c in chunks] == [float(j) for j in range(n // 24)]


class _Frame:
    def __init__(self, pts, time_base=Fraction(1, 90000)):
        self.pts, self.time_base = pts, time_base


def test_the_live_timeline_follows_timestamps_across_gaps_and_discontinuities():
    clock = st._LiveClock(25.0)
    tick = 3600  # one frame at 25 fps in 90 kHz units
    start = 1_000_000
    places = [clock.place(_Frame(start + n * tick)) for n in (0, 1, 2, 5)]  # frames 3 and 4 lost
    assert [i for i, _ in places] == [0, 1, 2, 5]
    assert [t for _, t in places] == pytest.approx([0.0, 0.04, 0.08, 0.2])
    # an encoder restarting (timestamps back to 0): the timeline goes on one frame later
    places = [clock.place(_Frame(n * tick)) for n in (0, 1)]
    assert [i for i, _ in places] == [6, 7]
    assert [t for _, t in places] == pytest.approx([0.24, 0.28])
    assert clock.place(_Frame(None))[0] == 8  # no timestamp: the next slot


def test_a_stalled_pipe_ends_in_a_timeout_error_in_time(files):
    data = files["h264.ts"].read_bytes()
    release = threading.Event()
    f, writer, sent = pipe_fed(data[: len(data) * 3 // 5 // 188 * 188], stall=release)
    policy = get_fetch_policy().replace(read_timeout=1.0)
    got, fd = [], f.fileno()
    try:
        with f, pytest.raises(q.FetchTimeoutError, match="no data for") as err:
            for chunk in q.stream_video({"video": f}, policy=policy):
                got.append(chunk)
        waited = time.monotonic() - sent["at"]
    finally:
        release.set()
    assert got, "the chunks before the stall came"
    assert f"<BufferedReader on file descriptor {fd}>" in str(err.value)  # the source, named
    assert 1.0 <= waited <= 1.0 + 2.0


@needs_ffmpeg
@pytest.mark.parametrize("kind", ["mpegts", "fragmented mp4"])
def test_a_truncated_pipe_ends_in_a_decode_error(files, fragmented, kind):
    data = (files["h264.ts"] if kind == "mpegts" else fragmented).read_bytes()
    f, writer, _ = pipe_fed(data[: len(data) // 2 + 77])
    got = []
    with f, pytest.raises(q.DecodeError) as err:
        for chunk in q.stream_video({"video": f}):
            got.append(chunk)
    assert got, "the chunks before the cut still came"
    if kind == "mpegts":
        assert "cut off" in str(err.value)


def test_an_mp4_with_its_index_at_the_end_cannot_be_piped(files):
    f, writer, _ = pipe_fed(files["h264-bframes.mp4"].read_bytes())
    with f, pytest.raises(q.DecodeError, match="faststart"):
        next(iter(q.stream_video({"video": f})))


# --- HTTP ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web():
    server = FileServer()
    yield server
    server.close()


def test_a_remote_file_read_by_range_gives_the_local_chunks(files, web):
    path = files["h264-bframes.mp4"]
    url = web.add("/ranged.mp4", path.read_bytes())
    remote, local = collect(q.stream_video({"video": url})), collect(q.stream_video({"video": str(path)}))
    assert indices_of(remote) == indices_of(local)
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(remote, local))


def noisy_numbered(i, width, height):
    """A numbered frame whose lower half is noise: megabytes of video in a few seconds."""
    frame = numbered_frame(i, width, height)
    frame[height // 2 :] = np.random.default_rng(i).integers(0, 256, (height - height // 2, width, 3), np.uint8)
    return frame


def test_without_range_support_chunks_come_before_the_whole_body(web, tmp_path):
    path = make_video(
        tmp_path / "big.ts", frames=120, width=320, height=180, container="mpegts", pattern=noisy_numbered
    )
    data = path.read_bytes()
    assert len(data) > 1 << 20
    url = web.add("/slow.ts", data, ranges=False, rate=len(data) / 1.5)  # the body takes 1.5 s
    served = web.files["/slow.ts"]
    with q.stream_video({"video": url}) as stream:
        first = next(stream)
        sent_at_first = served.sent
        rest = list(stream)
    assert sent_at_first < len(data) * 0.8, "the first chunk came before most of the body had been sent"
    assert indices_of([first, *rest]) == grid_indices(120, 24, 2)
    assert served.requests == [f"bytes=0-{_resolve.FIRST_BYTES - 1}"]  # one request: no download first


def test_an_mp4_with_its_index_at_the_end_over_http_without_ranges(files, web):
    mp4 = files["h264-bframes.mp4"].read_bytes()
    moov = mp4.rfind(b"moov") - 4  # 8 MiB of padding before the index: said at once, not after the whole body
    data = mp4[:moov] + (8 << 20).to_bytes(4, "big") + b"free" + bytes((8 << 20) - 8) + mp4[moov:]
    url = web.add("/moov-last.mp4", data, ranges=False)
    with pytest.raises(q.DecodeError, match="range support"):
        next(iter(q.stream_video({"video": url})))
    assert web.files["/moov-last.mp4"].sent < len(data) // 2


def test_http_errors_are_typed_and_name_the_url(web):
    url = web.url("/missing.mp4")
    with pytest.raises(q.NetworkError, match="missing.mp4"):
        next(iter(q.stream_video({"video": url})))
    with pytest.raises(q.SourceNotAllowedError):
        q.stream_video({"video": url}, policy=get_fetch_policy().replace(allowed_schemes=("file",)))


# --- HLS -------------------------------------------------------------------------------------------------------------


class DirectoryServer:
    """Files of a directory over HTTP on 127.0.0.1, as they are at each request (a live encoder's output)."""

    def __init__(self, folder):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hls_vod(files, tmp_path_factory):
    """The 10 s numbered file as HLS: 1 s MPEG-TS segments, a media playlist and a master playlist."""
    folder = tmp_path_factory.mktemp("hls")
    for sub, args in (("", []), ("fmp4", ["-hls_segment_type", "fmp4"]), ("single", ["-hls_flags", "single_file"])):
        (folder / sub).mkdir(exist_ok=True)
        hls = ["-f", "hls", "-hls_time", 1, "-hls_list_size", 0, "-hls_playlist_type", "vod", *args]
        remux(files["h264-bframes.mp4"], *hls, folder / sub / "media.m3u8")
    (folder / "master.m3u8").write_text(
        "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\nmissing.m3u8\n#EXT-X-STREAM-INF:BANDWIDTH=900000\nmedia.m3u8\n"
    )
    server = DirectoryServer(folder)
    yield server, folder
    server.close()


@needs_ffmpeg
@pytest.mark.parametrize(
    "name", ["media.m3u8", "master.m3u8", "fmp4/media.m3u8", "single/media.m3u8", "ranged/media.m3u8"]
)
def test_hls_playlists_are_followed_segment_by_segment(hls_vod, web, name):
    """MPEG-TS segments; a master playlist (its highest-bandwidth variant); fragmented MP4 segments after an
    EXT-X-MAP; one file cut by EXT-X-BYTERANGE, from a server that ignores ranges and from one that honours them."""
    server, folder = hls_vod
    url = server.url(name)
    if name.startswith(("single", "ranged")):
        assert "#EXT-X-BYTERANGE" in (folder / "single/media.m3u8").read_text()
    if name.startswith("ranged"):
        for part in ("media.m3u8", "media.ts"):
            url = web.add(f"/ranged/{part}", (folder / "single" / part).read_bytes())
        url = web.url("/ranged/media.m3u8")
    chunks = collect(q.stream_video({"video": url}))
    assert indices_of(chunks) == grid_indices(240, 24, 2)
    assert [frame_number(x) for _, x in unpadded(chunks)] == grid_indices(240, 24, 2)


@needs_ffmpeg
def test_a_live_playlist_that_stops_growing_ends_in_a_timeout(hls_vod, tmp_path):
    server, folder = hls_vod
    text = (folder / "media.m3u8").read_text()
    head, _, _ = text.partition("media3.ts")  # the first three segments, and no #EXT-X-ENDLIST
    (folder / "stuck.m3u8").write_text(head.rsplit("#EXTINF", 1)[0])
    policy = get_fetch_policy().replace(read_timeout=1.0)
    got, start = [], time.monotonic()
    with pytest.raises(q.FetchTimeoutError, match="stuck.m3u8.*no data for"):
        for chunk in q.stream_video({"video": server.url("stuck.m3u8")}, policy=policy):
            got.append(chunk)
    assert len(got) >= 2 and time.monotonic() - start <= 1.0 + 2.0 + 1.0  # 3 s of media, then the timeout


@needs_ffmpeg
@pytest.mark.slow
def test_a_consumer_slower_than_the_read_timeout_is_not_a_stall(hls_vod):
    """A live playlist gains a segment every 0.3 s; the model takes 1.2 s per chunk, twice ``read_timeout``.
    The time the producer spent blocked handing chunks over counted as a stall of the source: the reader came
    back to an outdated playlist and raised a false FetchTimeoutError before polling it again. Only time waiting
    on the source counts: every chunk comes, then the playlist that stopped growing times out."""
    server, folder = hls_vod
    text = (folder / "media.m3u8").read_text()
    head, *entries = text.replace("#EXT-X-ENDLIST\n", "").replace("VOD", "EVENT").split("#EXTINF")
    live = folder / "growing.m3u8"
    live.write_text(head + "#EXTINF" + entries[0])
    stop = threading.Event()

    def grow():
        for n in range(2, len(entries) + 1):
            if stop.wait(0.3):
                return
            live.write_text(head + "".join("#EXTINF" + e for e in entries[:n]))

    writer = threading.Thread(target=grow, daemon=True)
    writer.start()
    policy = get_fetch_policy().replace(read_timeout=0.6)
    got = []
    try:
        with pytest.raises(q.FetchTimeoutError, match="no data for"):
            for chunk in q.stream_video({"video": server.url("growing.m3u8")}, policy=policy):
                got.append(chunk)
                time.sleep(1.2)  # a slow model: twice the read timeout per chunk
    finally:
        stop.set()
        writer.join(5)
    assert indices_of(got) == grid_indices(240, 24, 2), "every chunk came before the timeout"


def send_datagrams(data, address, delay=0.5, pace=0.002):
    """From a thread, after ``delay`` (the stream binds its socket on the first next()): ``data`` as MPEG-TS
    datagrams of 7 packets, as ffmpeg sends them."""

    def send():
        time.sleep(delay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            for i in range(0, len(data), 1316):
                s.sendto(data[i : i + 1316], address)
                time.sleep(pace)
        sent["at"] = time.monotonic()

    sent: dict = {}
    threading.Thread(target=send, daemon=True).start()
    return sent


@pytest.mark.parametrize("group", [None, pytest.param("239.255.42.99", marks=pytest.mark.slow)])
def test_udp_datagrams_give_chunks_and_their_end_is_a_stall(files, group):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = group or "127.0.0.1"
    if group is not None:  # a multicast group needs a route (skipped where the network has none)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"", (group, port))
        except OSError as exc:
            pytest.skip(f"no multicast route here: {exc}")
    policy = get_fetch_policy().replace(allowed_schemes=("udp",), read_timeout=1.0)
    sent = send_datagrams(files["h264.ts"].read_bytes(), (host, port))
    got = []
    with pytest.raises(q.FetchTimeoutError, match=f"udp://{host}:{port}: no data for"):
        for chunk in q.stream_video({"video": f"udp://{host}:{port}"}, policy=policy):
            got.append(chunk)
    assert time.monotonic() - sent["at"] <= 1.0 + 2.0
    assert indices_of(got) == grid_indices(120, 24, 2)  # at the stall, the frames in the decoder came out first


@pytest.mark.parametrize("on_lag", ["block", "drop"])
def test_a_consumer_slower_than_a_live_source_blocks_it_or_drops_the_oldest_chunks(files, on_lag):
    """A model taking 0.7 s per chunk on a pipe that sends 10 chunks in about 1.5 s. "block" (the default) holds
    the writer back and delivers every chunk; "drop" keeps decoding at the source's pace, drops the oldest
    chunks not yet taken and says so in the next chunk (``dropped``), so the consumer stays at the present."""
    data = files["h264.ts"].read_bytes()
    f, writer, sent = pipe_fed(data, pace=1.5 / (len(data) / 4096))
    reference = {c.index: c for c in collect(q.stream_video({"video": str(files["h264.ts"])}, 0.5))}
    got = []
    with f, q.stream_video({"video": f}, 0.5, on_lag=on_lag) as stream:
        for chunk in stream:
            got.append(chunk)
            time.sleep(0.7)
    writer.join(10)
    assert [c.index for c in got][-1] == max(reference)  # the last chunk is always delivered
    for chunk in got:
        assert torch.equal(chunk.frames, reference[chunk.index].frames)
        assert chunk.metadata["frames_indices"] == reference[chunk.index].metadata["frames_indices"]
    gaps = [b.index - a.index - 1 for a, b in itertools.pairwise(got)]
    assert gaps == [c.dropped for c in got[1:]] and got[0].dropped == got[0].index
    if on_lag == "block":
        assert [c.index for c in got] == sorted(reference) and not any(c.dropped for c in got)
    else:
        assert sum(c.dropped for c in got) >= 3, [(c.index, c.dropped) for c in got]


def test_on_lag_is_checked():
    with pytest.raises(q.InvalidOptionError, match="on_lag"):
        q.stream_video({"video": "x.ts"}, on_lag="skip")


@pytest.mark.parametrize("scheme", ["rtsp", "rtmp", "srt"])
def test_ffmpeg_protocols_are_refused_unless_allowed_and_fail_typed(scheme):
    """RTSP, RTMP and SRT through PyAV's FFmpeg: refused by the default policy, allowed by scheme as udp is; a
    closed port, a server that never answers and a protocol missing from PyAV's build are typed errors."""
    from test_endpoint import SilentServer

    with pytest.raises(q.SourceNotAllowedError, match=f"does not allow {scheme}"):
        q.stream_video({"video": f"{scheme}://127.0.0.1:9/live/x"})
    with pytest.raises(q.SourceNotAllowedError):  # the host lists hold for these hosts too
        denied = get_fetch_policy().replace(allowed_schemes=(scheme,), denied_hosts=("10.0.0.0/8",))
        q.stream_video({"video": f"{scheme}://10.1.2.3:9/x"}, policy=denied)
    allowed = get_fetch_policy().replace(allowed_schemes=(scheme,), connect_timeout=1.5, read_timeout=60)
    import av

    try:
        av.open(f"{scheme}://127.0.0.1:9/x", timeout=(0.5, 0.5)).close()
    except av.error.ProtocolNotFoundError:
        with pytest.raises(q.SourceError, match=f"no {scheme} protocol; relay the stream"):
            next(iter(q.stream_video({"video": f"{scheme}://127.0.0.1:9/x"}, policy=allowed)))
        return
    except Exception:
        pass
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(q.NetworkError, match="connection refused"):
        next(iter(q.stream_video({"video": f"{scheme}://127.0.0.1:{closed}/live/x"}, policy=allowed)))
    silent = SilentServer()
    try:
        start = time.monotonic()
        with pytest.raises(q.FetchTimeoutError, match="did not start within the connect timeout"):
            next(iter(q.stream_video({"video": f"{scheme}://127.0.0.1:{silent.port}/live/x"}, policy=allowed)))
        assert time.monotonic() - start < 30  # the connect timeout, not the read timeout
    finally:
        silent.close()


def _listening(port):
    """Is a TCP socket listening on ``port`` (from /proc/net/tcp, without connecting to it)?"""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == "0A" for row in rows)


@needs_ffmpeg
@pytest.mark.slow
def test_an_rtmp_stream_from_an_ffmpeg_server_gives_its_chunks(files):
    """ffmpeg serves the numbered file over RTMP at its real pace (-listen 1); the chunks come as it plays, each
    frame the one it claims to be, and the stream ends when the server's does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"rtmp://127.0.0.1:{port}/live/numbered"
    server = subprocess.Popen(
        [FFMPEG, "-nostdin", "-v", "error", "-re", "-i", str(files["h264.ts"]), "-c", "copy", "-f", "flv",
         "-listen", "1", url],
    )  # fmt: skip
    try:
        policy = get_fetch_policy().replace(allowed_schemes=("rtmp",), connect_timeout=20)
        for _ in range(200):  # until it listens (a probe connection would take its one client's place)
            if _listening(port):
                break
            time.sleep(0.05)
        chunks = collect(q.stream_video({"video": url}, policy=policy))
    finally:
        server.kill()
        server.wait(10)
    frames = unpadded(chunks)
    assert [frame_number(f) for _, f in frames] == [i for i, _ in frames]
    assert indices_of(chunks) == grid_indices(120, 24, 2)


def test_a_udp_feed_that_starts_after_the_listener_is_waited_for_up_to_the_connect_timeout(files):
    """The encoder starts 2 s after the listener, the read timeout is 1 s: the first datagram is waited for up to
    connect_timeout (it was a false FetchTimeoutError after the read timeout); a feed that never starts is
    reported after connect_timeout, saying so."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = get_fetch_policy().replace(allowed_schemes=("udp",), read_timeout=1.0, connect_timeout=30.0)
    send_datagrams(files["h264.ts"].read_bytes(), ("127.0.0.1", port), delay=2.0)
    got = []
    with pytest.raises(q.FetchTimeoutError, match="no data for"):  # the end: a stall after the read timeout
        for chunk in q.stream_video({"video": f"udp://127.0.0.1:{port}"}, policy=policy):
            got.append(chunk)
    assert indices_of(got) == grid_indices(120, 24, 2)
    never = policy.replace(connect_timeout=1.5, read_timeout=60.0)
    start = time.monotonic()
    with pytest.raises(q.FetchTimeoutError, match="connect timeout.*is its sender running"):
        next(iter(q.stream_video({"video": f"udp://127.0.0.1:{port}"}, policy=never)))
    assert time.monotonic() - start < 30  # the connect timeout, not the 60 s read timeout


def _first_pts_seconds(path):
    import av

    with av.open(str(path)) as container:
        return min(float(f.pts * f.time_base) for f, _ in zip(container.decode(video=0), range(8)))


@needs_ffmpeg
def test_each_chunk_carries_the_sources_own_time_of_its_first_frame(files, tmp_path):
    """A recording from a broadcast starts at the broadcast's clock (an hour in, here), not at 0: each chunk
    says where its first frame is on it, for a file and for the same bytes through a pipe."""
    path = tmp_path / "hour.ts"
    remux(files["h264.ts"], "-output_ts_offset", 3600, path)
    start = _first_pts_seconds(path)
    assert start > 3600
    f, writer, _ = pipe_fed(path.read_bytes())
    with f:  # the file, and the same bytes as a live pipe
        runs = [collect(q.stream_video({"video": str(path)})), collect(q.stream_video({"video": f}))]
    for chunk in runs[0] + runs[1]:
        first = chunk.metadata["frames_indices"][0]
        assert chunk.source_time == pytest.approx(start + first / 24, abs=1e-3), chunk.index
        assert chunk.wall_time is None  # no date in a plain file


def _hls_segments(ts, folder, prefix, *extra):
    """``ts`` cut into 1 s HLS segments named ``prefix*.ts``: the (EXTINF, file name) of each."""
    remux(ts, *extra, "-f", "hls", "-hls_time", 1, "-hls_list_size", 0, "-hls_segment_filename",
          folder / f"{prefix}%d.ts", folder / f"{prefix}.m3u8")  # fmt: skip
    lines = (folder / f"{prefix}.m3u8").read_text().splitlines()
    return [(float(a.split(":")[1].rstrip(",")), b) for a, b in itertools.pairwise(lines) if a.startswith("#EXTINF")]


@needs_ffmpeg
def test_hls_program_dates_give_each_chunk_its_wall_clock_time(files, tmp_path):
    """EXT-X-PROGRAM-DATE-TIME dates a segment's first frame; segments without one are dated by the EXTINF of
    those before them; a later tag that jumps (a clock step, a gap at the packager) is followed."""
    segments = _hls_segments(files["h264.ts"], tmp_path, "seg")
    t0 = 1_796_454_000.0  # 2026-12-05T07:40:00Z
    dates, at = [], t0
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:2", "#EXT-X-MEDIA-SEQUENCE:0"]
    for k, (length, name) in enumerate(segments):
        if k in (0, 3):
            at = t0 if k == 0 else at + 100.0  # segment 3: the packager's clock stepped 100 s
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{round(at % 1 * 1000):03d}Z"
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{stamp}")
        dates.append(at)
        lines += [f"#EXTINF:{length:.6f},", name]
        at += length
    (tmp_path / "dated.m3u8").write_text("\n".join([*lines, "#EXT-X-ENDLIST", ""]))
    starts = list(itertools.accumulate([0.0] + [length for length, _ in segments]))
    server = DirectoryServer(tmp_path)
    try:
        chunks = collect(q.stream_video({"video": server.url("dated.m3u8")}))
    finally:
        server.close()
    assert indices_of(chunks) == grid_indices(120, 24, 2)
    for chunk in chunks:
        t = chunk.metadata["frames_indices"][0] / 24
        k = max(i for i, s in enumerate(starts[:-1]) if s <= t + 1e-6)
        assert chunk.wall_time == pytest.approx(dates[k] + t - starts[k], abs=0.01), (chunk.index, k)


@needs_ffmpeg
def test_an_hls_discontinuity_tag_restarts_the_timeline_even_for_a_small_forward_jump(files, tmp_path):
    """Two recordings joined with EXT-X-DISCONTINUITY, the second's timestamps 3 s past the first's end: below
    the 10 s bound of an untagged jump, so without the tag the 3 s were taken for lost video (72 frames of the
    last one held); the tag says a new timeline starts, and the video continues."""
    first = _hls_segments(files["h264.ts"], tmp_path, "a")
    second = _hls_segments(files["h264.ts"], tmp_path, "b", "-output_ts_offset", 8)
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:2", "#EXT-X-MEDIA-SEQUENCE:0"]
    lines += [x for length, name in first for x in (f"#EXTINF:{length:.6f},", name)]
    lines.append("#EXT-X-DISCONTINUITY")
    lines += [x for length, name in second for x in (f"#EXTINF:{length:.6f},", name)]
    (tmp_path / "joined.m3u8").write_text("\n".join([*lines, "#EXT-X-ENDLIST", ""]))
    server = DirectoryServer(tmp_path)
    try:
        chunks = collect(q.stream_video({"video": server.url("joined.m3u8")}))
    finally:
        server.close()
    assert indices_of(chunks) == grid_indices(240, 24, 2)  # ten seconds, one timeline
    got = [frame_number(f) for _, f in unpadded(chunks)]
    assert got == [i % 120 for i in grid_indices(240, 24, 2)]


@needs_ffmpeg
def test_an_hls_playlist_not_yet_written_is_waited_for_up_to_the_connect_timeout(files, tmp_path):
    """A packager starting a second after the stream was asked for: 404, then the playlist. It failed at once
    with HTTP 404; it is asked again until connect_timeout."""
    folder = tmp_path / "late"
    folder.mkdir()
    remux(files["h264.ts"], "-f", "hls", "-hls_time", "1", "-hls_list_size", "0", folder / "staging.m3u8")
    server = DirectoryServer(folder)
    try:

        def publish():
            time.sleep(1.0)
            (folder / "staging.m3u8").rename(folder / "live.m3u8")

        threading.Thread(target=publish, daemon=True).start()
        policy = get_fetch_policy().replace(connect_timeout=20.0)
        chunks = collect(q.stream_video({"video": server.url("live.m3u8")}, policy=policy))
        assert indices_of(chunks) == grid_indices(120, 24, 2)
        with pytest.raises(q.NetworkError, match="404.*did not appear within the connect timeout"):
            next(iter(q.stream_video({"video": server.url("never.m3u8")}, policy=policy.replace(connect_timeout=1))))
    finally:
        server.close()


@pytest.mark.parametrize(
    "extra,indices",
    [({"video_start": 1.2, "video_end": 3.1}, [36, 48, 60, 72]), ({"video_end": 1.0}, [0, 12])],
)
def test_a_live_window_starts_and_stops_on_the_stream_timeline(files, extra, indices):
    f, writer, _ = pipe_fed(files["h264.ts"].read_bytes())
    with f:
        chunks = collect(q.stream_video({"video": f, **extra}))
    assert indices_of(chunks) == indices
    assert chunks[0].start == extra.get("video_start", 0.0)


def test_the_policy_limits_end_a_live_stream(files):
    f, writer, _ = pipe_fed(files["h264.ts"].read_bytes())
    got = []
    with f, pytest.raises(q.SourceTooLargeError, match="limit of 2 s"):
        for chunk in q.stream_video({"video": f}, policy=get_fetch_policy().replace(max_video_seconds=2)):
            got.append(chunk)
    assert len(got) == 2


# --- closing early ---------------------------------------------------------------------------------------------------


def _resources():
    threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("qwen-vl-stream"))
    return threads, len(os.listdir("/proc/self/fd")), sorted(os.listdir(library_tmpdir()))


@pytest.fixture(scope="module")
def big_ts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    return make_video(folder / "big.ts", frames=120, width=320, height=180, container="mpegts", pattern=noisy_numbered)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize(
    "kind,how",
    [
        (kind, how) if kind == "file" or how == "close" else pytest.param(kind, how, marks=pytest.mark.slow)
        for kind in ("file", "pipe", "http")
        for how in ("close", "break", "garbage")
    ],
)
def test_closing_early_releases_everything_at_once(files, big_ts, web, kind, how):
    """Stop after the first chunk, three times over: no thread, file descriptor or temporary file stays behind,
    and closing is prompt."""
    data = big_ts.read_bytes()
    url = web.add(f"/early-{kind}-{how}.ts", data, ranges=False)
    counts = []
    for _ in range(3):
        release = threading.Event()
        f = None
        if kind == "pipe":
            f, writer, _ = pipe_fed(data, stall=release, pace=0.002)
        value = {"file": str(files["h264-bframes.mp4"]), "pipe": f, "http": url}[kind]
        stream = q.stream_video({"video": value})
        first = next(stream)
        assert first.index == 0 and _resources()[0], "the producer thread is running"
        start = time.monotonic()
        if how == "close":
            stream.close()
        elif how == "break":
            with stream:
                for _ in stream:
                    break
        else:
            del stream
            gc.collect()
        # prompt (milliseconds: a close wakes every waiting thread; benchmarks/close.py measures it), but a loaded
        # machine may take its time: this bound only catches a close that waits on polls or joins for seconds
        assert time.monotonic() - start < 5.0
        threads, fds, tmp = _resources()
        assert threads == [] and tmp == []
        counts.append(fds)
        release.set()
        if f is not None:
            f.close()  # the writer's next write fails: it stops
            writer.join(5)
    # (the in-process server's end of a connection may close a little later: one descriptor of slack)
    assert counts[2] <= counts[0] + 1, f"file descriptors grew over three streams: {counts}"


def test_closing_from_another_thread_ends_a_waiting_next(files):
    """A server stopping a stream its worker is waiting on: next() ends the iteration, everything released."""
    release = threading.Event()
    data = files["h264.ts"].read_bytes()
    f, writer, _ = pipe_fed(data[: len(data) // 2 // 188 * 188], stall=release)
    stream = q.stream_video({"video": f})
    got, ended = [], {}

    def consume():
        for chunk in stream:
            got.append(chunk)
        ended["at"] = time.monotonic()

    consumer = threading.Thread(target=consume)
    consumer.start()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the consumer now waits for data that does not come
    closed = time.monotonic()
    stream.close()
    consumer.join(5)
    release.set()
    f.close()
    assert got and ended["at"] - closed < 1.0
    assert _resources()[0] == []


def test_closing_while_a_chunks_frames_are_resizing_ends_the_iteration(files, monkeypatch):
    """close() from another thread while next() waits for a chunk whose last frame is still queued for its
    resize (cancelled by the close): the iteration ends, it does not raise."""
    monkeypatch.setenv("QWENVL_RESIZE_THREADS", "1")  # frames resize one after another
    prepare = st._Run._prepare

    def slow_prepare(self, frame, out):
        time.sleep(0.6)
        prepare(self, frame, out)

    monkeypatch.setattr(st._Run, "_prepare", slow_prepare)
    stream = q.stream_video({"video": str(files["h264-bframes.mp4"])})
    got, errors = [], []

    def consume():
        try:
            for chunk in stream:
                got.append(chunk)
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # chunk 1: its first frame resizing, its second queued
    stream.close()
    consumer.join(10)
    assert not consumer.is_alive() and got and errors == []
    assert _resources()[0] == []


def test_a_producer_that_cannot_start_does_not_hang_the_close(files, monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(st._Producer, "start", refuse)
    stream = q.stream_video({"video": str(files["h264-bframes.mp4"])})
    done = []

    def consume():
        with pytest.raises(RuntimeError, match="can't start"):
            next(iter(stream))
        done.append(True)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(5)
    assert done == [True]


# --- live sources written in real time by ffmpeg (slow) --------------------------------------------------------------


def live_ffmpeg(output, seconds=6, fmt="mpegts", extra=()):
    """ffmpeg encoding a test pattern in real time (-re) to ``output``: the live encoder."""
    command = [FFMPEG, "-nostdin", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25"]
    command += ["-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-bf", "2", "-g", "25"]
    command += [*extra, "-f", fmt, output]
    return subprocess.Popen(command, stdout=subprocess.PIPE if output == "pipe:1" else subprocess.DEVNULL)


def check_live(chunks, seconds, fps=25):
    assert [c.index for c in chunks] == list(range(len(chunks)))
    idx = indices_of(chunks)
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert idx[: 2 * (seconds - 1)] == grid_indices(fps * seconds, fps, 2)[: 2 * (seconds - 1)]
    for c in chunks:
        assert c.frames.shape[:2] == (2, 3) and c.metadata["fps"] == fps
        assert all(c.start <= i / fps < c.end for i in c.metadata["frames_indices"])


@needs_ffmpeg
@pytest.mark.slow
def test_a_pipe_from_a_live_encoder_gives_chunks_while_it_runs():
    proc = live_ffmpeg("pipe:1", seconds=6)
    try:
        chunks, running = [], []
        for chunk in q.stream_video({"video": proc.stdout}):
            chunks.append(chunk)
            running.append(proc.poll() is None)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.stdout.close()
    assert running[:3] == [True, True, True], "chunks came while the encoder was still writing"
    check_live(chunks, 6)
    assert len(chunks) == 6


@needs_ffmpeg
@pytest.mark.slow
def test_an_hls_playlist_being_written_gives_chunks_while_it_grows(tmp_path):
    server = DirectoryServer(tmp_path)
    proc = live_ffmpeg(
        str(tmp_path / "live.m3u8"), seconds=6, fmt="hls", extra=["-hls_time", "1", "-hls_list_size", "0"]
    )
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "live.m3u8").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        chunks, running = [], []
        for chunk in q.stream_video({"video": server.url("live.m3u8")}):
            chunks.append(chunk)
            running.append(proc.poll() is None)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        server.close()
    assert running[:2] == [True, True], "chunks came while the playlist was still growing"
    check_live(chunks, 6)
    assert len(chunks) == 6, "the stream ended at #EXT-X-ENDLIST, after the last segment"


@needs_ffmpeg
@pytest.mark.slow
def test_a_udp_feed_gives_chunks_while_it_runs_and_a_stall_ends_it():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = get_fetch_policy().replace(allowed_schemes=("udp",), read_timeout=2.0)
    stream = q.stream_video({"video": f"udp://127.0.0.1:{port}"}, policy=policy)
    got, running, result = [], [], {}
    proc = None

    def consume():
        try:
            for chunk in stream:
                got.append(chunk)
                running.append(proc is not None and proc.poll() is None)
        except q.QwenVLError as exc:
            result["error"], result["at"] = exc, time.monotonic()

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.5)  # the socket is bound on the first next()
    proc = live_ffmpeg(f"udp://127.0.0.1:{port}?pkt_size=1316", seconds=5)
    try:
        assert proc.wait(15) == 0
        stopped = time.monotonic()
        consumer.join(15)
    finally:
        proc.kill()
        stream.close()
    assert running[:2] == [True, True]
    assert isinstance(result.get("error"), q.FetchTimeoutError) and f"{port}" in str(result["error"])
    assert result["at"] - stopped <= 2.0 + 2.0, "the stall was reported within the read timeout + 2 s"
    idx = indices_of(got)
    assert len(got) >= 3 and idx == sorted(idx)
    assert _resources()[0] == [], "the receiver thread is gone"


# --- the command line ------------------------------------------------------------------------------------------------


def run_cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", *map(str, args)], capture_output=True, text=True, timeout=120, **kwargs
    )


@pytest.mark.slow
def test_cli_prints_one_line_per_chunk(files):
    path = files["h264-bframes.mp4"]
    res = run_cli("stream", path, "--json", "--fps", "4", "--chunk", "0.5", "--end", "3", "--max-pixels", 200000)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    chunks = collect(q.stream_video({"video": str(path), "fps": 4, "video_end": 3, "max_pixels": 200000}, 0.5))
    assert [x["frames_indices"] for x in lines] == [c.metadata["frames_indices"] for c in chunks]
    assert [(x["index"], x["start"], x["end"]) for x in lines] == [(c.index, c.start, c.end) for c in chunks]
    assert [x["shape"] for x in lines] == [list(c.frames.shape) for c in chunks]
    assert lines[1]["frame_times"] == [0.5, 0.75] and all(x["seconds"] >= 0 for x in lines)
    text = run_cli("stream", path, "--end", "2")
    assert text.returncode == 0 and text.stdout.splitlines()[1].startswith("chunk 1  1.00-2.00 s  frames 24 36  2x3x")
    bad = run_cli("stream", path, "--fps", "1.5")  # options that cannot be honoured: a usage error
    assert bad.returncode == 2 and "whole number of frames" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_a_reader_that_goes_away_is_a_quiet_end(files):
    """`qwen-vl-utils stream ... | head -1`: the pipe closes under the printing loop. It printed
    "error: BrokenPipeError" and exited 1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_vl_utils", "stream", str(files["h264-bframes.mp4"]), "--chunk", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read()
    assert proc.wait(60) == 0 and first.startswith(b"chunk 0 ")
    assert err == b"", err.decode()


def test_cli_offers_only_the_options_a_stream_uses():
    """--help offered options that were then refused (--nframes, --min-frames, --max-frames, --total-pixels,
    --backend other than pyav) or ignored (--quiet); refusals exited 1, not 2 as for every usage error."""
    text = run_cli("stream", "--help").stdout
    for gone in ("--nframes", "--min-frames", "--max-frames", "--total-pixels", "--backend", "--quiet"):
        assert gone not in text, gone
    for offered in ("--fps", "--max-pixels", "--start", "--end", "--allow", "--read-timeout", "--json"):
        assert offered in text, offered
    res = run_cli("stream", "x.mp4", "--nframes", "4")
    assert res.returncode == 2 and "unrecognized arguments: --nframes" in res.stderr


def test_cli_takes_on_lag(files):
    data = files["h264.ts"].read_bytes()
    res = subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", "stream", "-", "--json", "--on-lag", "drop"],
        input=data,
        capture_output=True,
        timeout=120,
    )
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.returncode == 0 and lines and lines[-1]["index"] == 4, res.stderr
    # (a file piped in comes faster than real time: chunks the printing falls behind on may be dropped, and
    # each line says how many went before it)
    gaps = [b["index"] - a["index"] - 1 for a, b in itertools.pairwise(lines)]
    assert gaps == [x["dropped"] for x in lines[1:]] and lines[0]["dropped"] == lines[0]["index"]
    assert run_cli("stream", "-", "--on-lag", "skip").returncode == 2


def test_cli_allows_udp_by_flag_with_its_read_timeout():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # a port nobody sends to
    refused = run_cli("stream", f"udp://127.0.0.1:{port}")
    assert refused.returncode == 1 and "SourceNotAllowedError" in refused.stderr and "udp" in refused.stderr
    quiet = run_cli("stream", f"udp://127.0.0.1:{port}", "--allow", "udp", "--read-timeout", "0.5")
    assert quiet.returncode == 1 and "FetchTimeoutError" in quiet.stderr, quiet.stderr
    assert "Traceback" not in quiet.stderr


@pytest.mark.slow
def test_cli_ctrl_c_exits_130_without_a_traceback(files):
    """Standard input that never ends: Ctrl-C (SIGINT) stops it at once, exit code 130, no traceback."""
    r, w = os.pipe()
    with os.fdopen(w, "wb") as writer:
        writer.write(files["h264.ts"].read_bytes()[: 188 * 100])
        writer.flush()
        # `python -m qwen_vl_utils stream -`, with Python's Ctrl-C handling even where this test run inherited
        # SIGINT ignored (started in the background by a shell), which the CLI would inherit too
        main = (
            "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv = ['qwen-vl-utils', 'stream', '-']; runpy.run_module('qwen_vl_utils', run_name='__main__')"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", main],
            stdin=r,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # a hang below dumps every thread's stack
        )
        os.close(r)
        ready = select.select([proc.stdout], [], [], 60)[0]
        first = proc.stdout.readline() if ready else ""  # a chunk came out: it now waits for more input
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=10)
            finally:
                proc.kill()
            pytest.fail(f"still running 10 s after SIGINT; its threads:\n{err}")
    assert first.startswith("chunk 0 ")
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_a_stopped_handoff_releases_its_waiters_at_once():
    """Closing a stream stops its hand-over queues: a thread blocked in get() or put() (no timeout: no poll) is
    released at once, and later calls do not wait either. Before, each stage polled every 0.1 s."""
    from qwen_vl_utils.stream._handoff import STOPPED, Handoff

    empty, full = Handoff(2), Handoff(1)
    assert full.put("x") is True
    got = {}
    waiters = [
        threading.Thread(target=lambda: got.__setitem__("get", empty.get())),
        threading.Thread(target=lambda: got.__setitem__("put", full.put("y"))),
    ]
    for t in waiters:
        t.start()
    time.sleep(0.2)
    assert got == {}, "both wait while the queue is open"
    empty.stop()
    full.stop()
    for t in waiters:
        t.join(10)
    assert got == {"get": STOPPED, "put": False}
    assert full.get() is STOPPED and empty.put("z") is False


def test_changing_a_chunk_in_place_leaves_the_next_one_alone(tmp_path):
    """At the default fps 2 on a 1 fps source, one decoded frame serves two grid points, often in two chunks.
    It was copied into the later chunk lazily, from the earlier chunk's tensor, when the later chunk was handed
    over: a consumer normalising chunks in place (``frames.div_(255)``) corrupted 8 of 10 chunks."""
    path = make_video(tmp_path / "one_fps.mp4", frames=21, width=96, height=64, fps=1, pattern=numbered)
    clean = [c.frames.clone() for c in q.stream_video({"video": str(path)}, chunk_seconds=2.0)]
    mutated = []
    for chunk in q.stream_video({"video": str(path)}, chunk_seconds=2.0):
        mutated.append(chunk.frames.clone())
        chunk.frames.div_(255)  # what model code does to the chunk it was given
        chunk.frames.zero_()
    assert len(clean) == len(mutated) >= 10
    spoiled = [i for i, (a, b) in enumerate(zip(clean, mutated)) if not torch.equal(a, b)]
    assert spoiled == [], f"chunks {spoiled} changed when an earlier chunk was changed in place"


# --- sources that are not regular files ------------------------------------------------------------------------------


def test_a_named_pipe_given_by_path_is_read_once_as_it_comes(files, tmp_path):
    """A FIFO path was probed as a regular file (read to its end), then reopened: it hung for good (and since
    issue 23, it was refused). It is read once, like ``-``, with the same chunks as the file."""
    fifo = tmp_path / "live.fifo"
    os.mkfifo(fifo)
    data = files["h264.ts"].read_bytes()

    def write():
        with open(fifo, "wb") as w:  # opens once the stream opened its end
            w.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = collect(q.stream_video({"video": str(fifo)}))
    writer.join(10)
    ref = collect(q.stream_video({"video": str(files["h264.ts"])}))
    assert [c.metadata["frames_indices"] for c in got] == [c.metadata["frames_indices"] for c in ref]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(got, ref))
    assert _resources()[0] == []


def test_a_named_pipe_nobody_writes_to_fails_at_the_connect_timeout(tmp_path):
    fifo = tmp_path / "silent.fifo"
    os.mkfifo(fifo)
    q.set_fetch_policy(connect_timeout=0.5)
    try:
        with pytest.raises(q.FetchTimeoutError, match="named pipe.*connect_timeout"):
            collect(q.stream_video({"video": str(fifo)}))
    finally:
        q.set_fetch_policy(None)
    assert _resources()[0] == [], "the thread that waited in open() was released"


def test_a_named_pipe_stream_closes_from_another_thread(files, tmp_path):
    """A writer that stalls after a few chunks: close() from another thread returns, everything released."""
    fifo = tmp_path / "stalling.fifo"
    os.mkfifo(fifo)
    release = threading.Event()
    data = files["h264.ts"].read_bytes()

    def write():
        with open(fifo, "wb") as w, contextlib.suppress(BrokenPipeError):
            w.write(data[: len(data) // 2 // 188 * 188])
            w.flush()
            release.wait(30)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    stream = q.stream_video({"video": str(fifo)})
    first = next(stream)
    closer = threading.Thread(target=lambda: (time.sleep(0.3), stream.close()))
    closer.start()
    rest = list(stream)
    closer.join(10)
    release.set()
    writer.join(10)
    assert first.index == 0 and not closer.is_alive() and len(rest) < 10
    assert _resources()[0] == []


def test_cli_reads_dev_stdin_as_a_path(files):
    data = files["h264.ts"].read_bytes()
    by_path = run_cli("stream", "/dev/stdin", "--json", input=None, stdin=open(files["h264.ts"], "rb"))  # noqa: SIM115
    piped = subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", "stream", "/dev/stdin", "--json"],
        input=data,
        capture_output=True,
        timeout=120,
    )
    dash = subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", "stream", "-", "--json"], input=data, capture_output=True, timeout=120
    )
    assert piped.returncode == dash.returncode == by_path.returncode == 0, piped.stderr
    assert piped.stdout.splitlines()[0].startswith(b'{"index": 0')
    strip = lambda out, *more: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k not in ("seconds", *more)} for x in out.splitlines()
    ]
    assert strip(piped.stdout) == strip(dash.stdout)  # a pipe behind /dev/stdin: read once, as "-" is
    # (a regular file behind it is a file: probed, so it knows its frame count from the start)
    assert strip(piped.stdout, "total_num_frames") == strip(by_path.stdout, "total_num_frames")


def test_a_timestamp_leap_in_a_live_stream_is_a_discontinuity(tmp_path):
    """2 s of MPEG-TS, then 2 s whose timestamps are an hour later (an encoder restart, a camera clock step):
    it made 3,602 chunks, nearly all one frame repeated, in 54 s of CPU. A leap forward beyond a bound is a
    discontinuity, as one back already was: the timeline goes on, 4 s of video make 4 chunks."""
    pts = [round(i / 24 * 1000) for i in range(48)]
    pts += [round((3600 + 2 + i / 24) * 1000) for i in range(48)]
    path = make_video(
        tmp_path / "leap.ts", frames=96, width=96, height=64, container="mpegts", pts=pts, pattern=numbered
    )
    f, writer, _ = pipe_fed(path.read_bytes())
    chunks = collect(q.stream_video({"video": f}, chunk_seconds=1.0))
    writer.join(10)
    assert [c.index for c in chunks] == [0, 1, 2, 3], len(chunks)
    assert [(c.start, c.end) for c in chunks] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]
    shown = [frame_number(np.asarray(fr.permute(1, 2, 0))) for c in chunks for fr in c.frames]
    assert shown == sorted(shown) and shown[3] < 48 <= shown[4] and shown[-1] >= 84, shown  # both halves, in order


def test_a_live_http_body_is_not_cut_at_the_download_deadline(big_ts, web):
    """MPEG-TS over HTTP without ranges is read as it comes, and may be live: it was cut at
    ``FetchPolicy.deadline`` (300 s by default, here 1 s). A live source has no total deadline; its stalls are
    bounded by the read timeout."""
    data = big_ts.read_bytes()
    assert len(data) > 40 * 16384, "the first pieces come at once, the whole body in 3 s"
    url = web.add("/live-body.ts", data, ranges=False, rate=len(data) / 3)
    policy = get_fetch_policy().replace(deadline=1.0, read_timeout=5.0)
    got = collect(q.stream_video({"video": url}, policy=policy))
    ref = collect(q.stream_video({"video": str(big_ts)}))
    assert [c.metadata["frames_indices"] for c in got] == [c.metadata["frames_indices"] for c in ref]


# --- finite file objects end cleanly -----------------------------------------------------------------------------


class _ReadOnly:
    """A file object with read() and nothing else: no fileno, no seek (a custom reader, a decompressor)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 5000) if n and n > 0 else n)


class _ChunkedServer:
    """HTTP/1.1 with Transfer-Encoding: chunked and keep-alive, as a live origin answers."""

    def __init__(self, data: bytes) -> None:
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(data), 7000):
                    piece = data[i : i + 7000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/live.ts"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("kind", ["read-only", "urllib-keep-alive", "urllib-chunked"])
def test_a_finite_file_object_ends_cleanly_with_its_last_chunk(files, web, kind):
    """A read()-only object ended in FetchTimeoutError after its data and lost the last partial chunk; a
    keep-alive urllib response timed out (select on its socket cannot see the bytes it buffered); a chunked one
    raised EBADF as a DecodeError. EOF is remembered, and only raw descriptors are waited on in select."""
    data = files["h264.ts"].read_bytes()
    server = None
    if kind == "read-only":
        value = _ReadOnly(data)
    elif kind == "urllib-keep-alive":
        value = urllib.request.urlopen(web.add("/keep-alive.ts", data, ranges=False), timeout=30)
    else:
        server = _ChunkedServer(data)
        value = urllib.request.urlopen(server.url, timeout=30)
    q.set_fetch_policy(read_timeout=3)
    try:
        got = collect(q.stream_video({"video": value}))
    finally:
        q.set_fetch_policy(None)
        if server is not None:
            server.close()
    ref = collect(q.stream_video({"video": str(files["h264.ts"])}))
    assert [c.metadata["frames_indices"] for c in got] == [c.metadata["frames_indices"] for c in ref]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(got, ref))


# --- raw elementary streams and text-mode files ----------------------------------------------------------------------


@needs_ffmpeg
@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_a_raw_elementary_stream_reads_by_path_as_through_a_pipe(files, tmp_path, codec):
    """``.h264`` / ``.hevc`` files by path failed (PermissionError from a seek the raw demuxer cannot do, as a
    DecodeError) in stream_video and fetch_video alike; through a pipe they worked. Rewinding falls back to byte 0."""
    src = files["h264-bframes.mp4"] if codec == "h264" else files["hevc.mkv"]
    raw = tmp_path / f"clip.{codec}"
    bsf = "h264_mp4toannexb" if codec == "h264" else "hevc_mp4toannexb"
    subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(src), "-c", "copy", "-bsf:v", bsf, "-f", codec, str(raw)], check=True
    )
    by_path = collect(q.stream_video({"video": str(raw)}))
    f, writer, _ = pipe_fed(raw.read_bytes())
    piped = collect(q.stream_video({"video": f}))
    writer.join(10)
    assert [c.metadata["frames_indices"] for c in by_path] == [c.metadata["frames_indices"] for c in piped]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(by_path, piped)) and len(by_path) >= 3
    video, meta = q.fetch_video({"video": str(raw), "nframes": 8}, return_video_metadata=True)
    # (a raw stream carries no timing: FFmpeg's 25 fps, the same on both paths)
    assert meta["fps"] == by_path[0].metadata["fps"] and video.shape[0] == 8
    shown = [frame_number(np.asarray(fr.permute(1, 2, 0))) for fr in video]
    assert shown == meta["frames_indices"], "the i-th frame is the i-th frame shown"


@pytest.mark.parametrize("api", ["stream_video", "fetch_video", "fetch_image"])
def test_a_text_mode_file_object_is_a_typed_error(files, api):
    """It raised a raw UnicodeDecodeError from deep inside the read."""
    with open(files["h264-bframes.mp4"]) as text, pytest.raises(q.InvalidOptionError, match=r"binary mode \('rb'\)"):
        if api == "stream_video":
            collect(q.stream_video({"video": text}))
        elif api == "fetch_video":
            q.fetch_video({"video": text})
        else:
            q.fetch_image({"image": text})
