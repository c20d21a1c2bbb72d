"""Files as a player shows them, on both paths: an MPEG-TS cut inside a GOP or damaged mid-file numbers its frames
as FFmpeg's command-line decoder shows them, in fetch_video (every backend) and stream_video alike; streaming
containers (MPEG-TS, Matroska, WebM) are streamed, not read through before the first chunk."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

import qwen_vl_utils as q
from httpfiles import FileServer
from qwen_vl_utils.container._probe import probe_video
from qwen_vl_utils.sources._policy import get_fetch_policy
from qwen_vl_utils.sources._resolve import resolve_source

from media import STRIPES, frame_number, make_video, numbered_frame

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "ffmpeg"], capture_output=True).returncode != 0, reason="needs the ffmpeg CLI"
)

SIZE = {"max_pixels": 192 * 96, "min_pixels": 4096}


def _number(frame):
    try:
        return frame_number(frame)
    except ValueError:  # a frame the damage garbled: it carries no readable number
        return None


def shown_by_ffmpeg(path):
    """The number in each frame FFmpeg's command-line decoder shows for ``path`` (None for a garbled one)."""
    w, h = 8 * STRIPES, 8
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough"]
    command += ["-vf", f"scale={w}:{h}", "-f", "rawvideo", "-pix_fmt", "gray", "-"]
    raw = subprocess.run(command, capture_output=True, check=True, timeout=120).stdout
    return [_number(f) for f in np.frombuffer(raw, np.uint8).reshape(-1, h, w)]


def _ts(path, codec="libx264", frames=300):
    options = {"bf": "2", "sc_threshold": "0" if codec == "libx264" else "1000000000"}
    return make_video(
        path, codec=codec, frames=frames, width=192, height=96, fps=30, gop=48, container="mpegts",
        pattern=numbered_frame, options=options,
    )  # fmt: skip


def _cut(path, out, fraction):
    """``path`` from a TS packet boundary ``fraction`` into it: a recording joined mid-GOP."""
    data = path.read_bytes()
    out.write_bytes(data[int(len(data) // 188 * fraction) * 188 :])
    return out


def _damaged(path, out, packets=40):
    """``path`` with ``packets`` TS packets lost from its middle (a broadcast's dropout)."""
    data = path.read_bytes()
    at = len(data) // 188 // 2 * 188
    out.write_bytes(data[:at] + data[at + packets * 188 :])
    return out


def _flipped(path, out, first=80, packets=4):
    """``path`` with the payloads of ``packets`` TS packets garbled, their headers intact: the demuxer sees
    nothing wrong, the decoder rejects a slice (FFmpeg conceals it and shows the others)."""
    data = bytearray(path.read_bytes())
    for i in range(first, first + packets):
        for j in range(20, 188, 7):
            data[i * 188 + j] ^= 0x5A
    out.write_bytes(bytes(data))
    return out


def _mismatches(indices, frames, shown):
    """(index, number in our frame, number in FFmpeg's frame at that index) wherever they differ; an index past
    FFmpeg's last frame is a mismatch; a frame FFmpeg shows garbled (damage) is not compared."""
    out = []
    for i, frame in zip(indices, frames):
        expected = shown[i] if i < len(shown) else "past the end"
        if expected is not None and _number(frame) != expected:
            out.append((i, _number(frame), expected))
    return out


def _streamed(value, **options):
    indices, frames = [], []
    with q.stream_video({"video": value, "fps": 4, **SIZE, **options}, chunk_seconds=2) as stream:
        for chunk in stream:
            indices += list(chunk.metadata["frames_indices"])
            frames += list(chunk.frames)
    return indices, frames


@pytest.fixture(scope="module")
def cuts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuts")
    h264, mpeg2 = _ts(d / "h264.ts"), _ts(d / "mpeg2.ts", codec="mpeg2video")
    return {
        "h264-mid-gop": _cut(h264, d / "h264-cut.ts", 0.07),
        "h264-mid-gop-late": _cut(h264, d / "h264-cut2.ts", 0.25),
        "mpeg2-open-gop": _cut(mpeg2, d / "mpeg2-cut.ts", 0.13),
        "h264-damaged": _damaged(h264, d / "h264-damaged.ts"),
        "h264-raw-mid-gop": _raw_cut(h264, d / "cut.h264"),
        "h264-corrupt-slices": _flipped(h264, d / "flipped.ts"),
    }


def _raw_cut(ts, out):
    """An H.264 elementary stream (no timestamps at all) cut inside a GOP."""
    raw = out.with_suffix(".full.h264")
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(ts), "-c", "copy", "-f", "h264", str(raw)], check=True
    )
    data = raw.read_bytes()
    out.write_bytes(data[len(data) // 7 :])
    return out


CASES = [
    "h264-mid-gop",
    "h264-mid-gop-late",
    "mpeg2-open-gop",
    "h264-damaged",
    "h264-raw-mid-gop",
    "h264-corrupt-slices",
]


@pytest.mark.parametrize("backend", ["pyav", "torchcodec", "decord"])
@pytest.mark.parametrize("case", CASES)
def test_fetch_video_numbers_frames_as_ffmpeg_shows_them(cuts, case, backend, monkeypatch):
    """The probe counted the packets before the first keyframe (483 frames for the 464 a player shows), so the
    plan ran past the end and index i was not the i-th frame shown."""
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", backend)
    path = cuts[case]
    shown = shown_by_ffmpeg(path)
    video, meta = q.fetch_video({"video": str(path), "fps": 4, **SIZE}, return_video_metadata=True)
    assert meta["total_num_frames"] == len(shown)
    indices = [int(i) for i in meta["frames_indices"]]
    assert indices[-1] >= len(shown) - 8  # the plan reaches the end of what is shown
    assert _mismatches(indices, video, shown) == []


@pytest.mark.parametrize("case", CASES)
def test_stream_numbers_frames_as_ffmpeg_shows_them_and_as_fetch_video(cuts, case):
    """The stream numbered the undecodable leading packets too (frame 340 for fetch_video's 337), lost its last
    chunk and ended in a false DecodeError ("ends after frame 319 of the 323 its header announces": an MPEG-TS
    has no such header)."""
    path = cuts[case]
    shown = shown_by_ffmpeg(path)
    indices, frames = _streamed(str(path))
    assert _mismatches(indices, frames, shown) == []
    assert max(indices) >= len(shown) - 8  # the last chunk is there
    # the same index is the same frame on both paths
    video, meta = q.fetch_video({"video": str(path), "fps": 4, **SIZE}, return_video_metadata=True)
    ours = dict(zip(indices, frames))
    for i, frame in zip(meta["frames_indices"], video):
        if int(i) in ours and shown[int(i)] is not None:
            assert _number(ours[int(i)]) == _number(frame), i


def test_the_probe_says_where_the_shown_frames_begin(cuts):
    policy = get_fetch_policy(None)
    info = probe_video(resolve_source(str(cuts["h264-mid-gop"]), "video", policy))
    assert info.leading_frames > 0 and info.first_pts is not None
    assert info.num_frames == len(shown_by_ffmpeg(cuts["h264-mid-gop"]))
    whole = probe_video(resolve_source(str(cuts["h264-damaged"]), "video", policy))
    assert whole.leading_frames == 0 and whole.first_pts is None


# --- streaming containers are streamed ----------------------------------------------------------------------------


def _noisy(i, width, height):
    frame = numbered_frame(i, width, height)  # its number is read from the middle half of its rows
    noise = np.random.default_rng(i).integers(0, 256, (height - height * 3 // 4, width, 3), np.uint8)
    frame[height * 3 // 4 :] = noise
    return frame


@pytest.fixture(scope="module")
def web():
    server = FileServer()
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("container", "suffix", "codec"),
    [
        ("mpegts", "ts", "libx264"),
        ("matroska", "mkv", "libx264"),
        ("webm", "webm", "libvpx-vp9"),
        ("mp4", "mp4", "libx264"),
    ],
)
def test_a_streaming_container_over_http_gives_its_first_chunk_after_the_bytes_it_needs(
    web, tmp_path, container, suffix, codec, monkeypatch
):
    """MPEG-TS, Matroska and WebM were demuxed end to end by the probe (57 MB before chunk 0 of a 57 MB file);
    now their frames are counted as they come, and the first chunk (the first second of ten) comes after a part
    of the file, as MP4's does. The reader's readahead is held to 1 MiB requests and no prefetch here, so that
    what was read says what the reading needed, however fast the machine is."""
    from qwen_vl_utils.sources import _ranges

    monkeypatch.setattr(_ranges, "MAX_SPAN_BLOCKS", 4)
    monkeypatch.setattr(_ranges, "PREFETCH_AHEAD", 0)
    options = {"b": "30M", "g": "24"} if codec == "libvpx-vp9" else {"crf": "10"}
    path = make_video(
        tmp_path / f"big.{suffix}", codec=codec, frames=240, width=800, height=600, fps=24, container=container,
        pattern=_noisy, options=options,
    )  # fmt: skip
    data = path.read_bytes()
    assert len(data) > 20 << 20, len(data)
    url = web.add(f"/big.{suffix}", data)
    served = web.files[f"/big.{suffix}"]
    with q.stream_video({"video": url, "fps": 2}, chunk_seconds=1) as stream:
        first = next(stream)
        sent_at_first = served.sent
        rest = list(stream)
    assert sent_at_first < len(data) * 0.5, f"{sent_at_first} of {len(data)} bytes were read before the first chunk"
    chunks = [first, *rest]
    indices = [i for c in chunks for i in c.metadata["frames_indices"]]
    assert [frame_number(f) for c in chunks for f in c.frames] == indices
    assert indices[-1] == 228  # every chunk, up to the last target (9.5 s at 24 fps)
    if container == "mp4":  # the header's count
        assert chunks[-1].metadata["total_num_frames"] == 240
    else:  # counted as they come: the frames up to the one that completed the chunk (as for a live source)
        assert chunks[-1].metadata["total_num_frames"] == indices[-1] + 1


# --- reproducing a chunk with the single call ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["mp4", "ts"])
def test_fetch_video_with_a_chunks_frames_indices_gives_the_chunk_exactly(tmp_path, suffix):
    """For evaluation against offline runs: the chunk's indices and size, given to fetch_video, give its
    frames bit for bit, on every backend."""
    path = make_video(
        tmp_path / f"v.{suffix}", frames=150, width=192, height=96, fps=30, gop=30, pattern=numbered_frame,
        container="mpegts" if suffix == "ts" else None,
    )  # fmt: skip
    with q.stream_video({"video": str(path), "fps": 3, **SIZE}, chunk_seconds=2) as stream:
        chunks = list(stream)
    assert len(chunks) >= 2
    for backend in ("pyav", "torchcodec", "decord"):
        for chunk in chunks:
            _, _, h, w = chunk.frames.shape
            ele = {"video": str(path), "frames_indices": chunk.metadata["frames_indices"]}
            video, meta = q.fetch_video(
                {**ele, "resized_height": h, "resized_width": w}, return_video_metadata=True, backend=backend
            )
            assert meta["frames_indices"] == chunk.metadata["frames_indices"]
            assert video.dtype == chunk.frames.dtype and torch.equal(video, chunk.frames), (backend, chunk.index)


def test_frames_indices_are_checked():
    with pytest.raises(q.InvalidOptionError, match="without fps"):
        q.fetch_video({"video": "x.mp4", "frames_indices": [0, 1], "fps": 2})
    for bad in ([], [3, 1], [-1], [0.5], "0,1"):
        with pytest.raises(q.InvalidOptionError, match="frames_indices"):
            q.fetch_video({"video": "x.mp4", "frames_indices": bad})
    with pytest.raises(q.InvalidOptionError, match="stream samples with fps"):
        q.stream_video({"video": "x.mp4", "frames_indices": [0, 1]})


# --- found attacking streams from outside --------------------------------------------------------------------------


def test_a_window_of_a_ranged_file_ends_without_reading_the_rest(tmp_path):
    """With video_end=1 of a 10 s file served by range at a slow rate, the iterator went on after the last chunk
    until the whole file had come (its readahead asks for up to 8 MiB at a time)."""
    path = make_video(
        tmp_path / "big.ts", frames=240, width=320, height=180, fps=24, container="mpegts", pattern=_noisy,
        options={"crf": "10"},
    )  # fmt: skip
    data = path.read_bytes()
    server = FileServer()
    try:
        url = server.add("/big.ts", data, rate=len(data) / 6)  # the whole file would take 6 s
        with q.stream_video({"video": url, "video_end": 1.0}) as stream:
            chunks = list(stream)
        sent = server.files["/big.ts"].sent
    finally:
        server.close()
    assert [c.metadata["frames_indices"] for c in chunks] == [[0, 12]]
    assert sent < len(data) * 0.9, f"{sent} of {len(data)} bytes were sent for a 1 s window"


def test_a_data_uri_streams(tmp_path):
    import base64

    path = make_video(tmp_path / "v.mp4", frames=48, pattern=numbered_frame)
    uri = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    chunks = list(q.stream_video({"video": uri}))
    assert [c.metadata["frames_indices"] for c in chunks] == [[0, 12], [24, 36]]
    assert all(frame_number(f) == i for c in chunks for i, f in zip(c.metadata["frames_indices"], c.frames))


@pytest.mark.parametrize("backend", ["pyav", "torchcodec", "decord"])
def test_a_raw_h264_stream_decodes_on_every_backend(cuts, tmp_path, backend, monkeypatch):
    """torchcodec failed with "Could not seek file to pts=0: Operation not permitted" instead of handing the file
    to PyAV, as it does for the formats it cannot number."""
    raw = tmp_path / "plain.h264"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(cuts["h264-damaged"].parent / "h264.ts"),
         "-c", "copy", "-f", "h264", str(raw)], check=True,
    )  # fmt: skip
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", backend)
    shown = shown_by_ffmpeg(raw)
    video, meta = q.fetch_video({"video": str(raw), "fps": 4, **SIZE}, return_video_metadata=True)
    assert _mismatches([int(i) for i in meta["frames_indices"]], video, shown) == []
