"""The displayed timeline (issue 16, items 4-7): frame ``i`` is the ``i``-th frame a player shows, on every backend.

Every medium here is generated with frames that carry their own number (``media.numbered_frame``), and every
expectation is the list of numbers FFmpeg's command-line decoder shows for the file (``displayed_frame_numbers``):
a separate FFmpeg build and process, so a mistake in how this library drives PyAV cannot leak into the reference.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import av
import pytest

import qwen_vl_utils as q
from qwen_vl_utils import BackendFallbackWarning, fetch_video
from qwen_vl_utils.container._probe import probe_video
from qwen_vl_utils.sources._policy import get_fetch_policy
from qwen_vl_utils.sources._resolve import resolve_source
from qwen_vl_utils.video import linspace_round

from conftest import BACKENDS, DECORD, REQUIRE
from media import displayed_frame_numbers, frame_number, make_video, numbered_frame

torch = pytest.importorskip("torch")

W, H, FPS, N = 320, 180, 24, 240
#: a keyframe every second exactly (no scene-cut keyframes), B-frames: a cut hides the frames before it back to
#: the keyframe it must decode from
X264 = {"bf": "3", "g": "24", "keyint_min": "24", "sc_threshold": "0"}
#: backends that cannot follow these files and hand them to PyAV with a BackendFallbackWarning
DEFERS = ("torchcodec", "decord")


@pytest.fixture(scope="session")
def ffmpeg_cli() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        if REQUIRE:
            pytest.fail("the ffmpeg command-line tool is needed for the reference decode (apt-get install ffmpeg)")
        pytest.skip("the ffmpeg command-line tool is not installed (apt-get install ffmpeg)")
    return path


def _ffmpeg(*args: str) -> bytes:
    return subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", *args], capture_output=True, check=True, timeout=120
    ).stdout


@pytest.fixture(scope="session")
def numbered(media_dir: Path, ffmpeg_cli: str) -> Path:
    """10 s at 24 fps, frame i showing the number i."""
    return make_video(
        media_dir / "numbered.mp4", frames=N, width=W, height=H, fps=FPS, pattern=numbered_frame, options=X264
    )


#: how users get edit lists: stream-copy trims and cuts (-ss before -i seeks to the keyframe before the cut and
#: writes an edit list that hides the frames between them), and an empty edit that delays the start
EDITS = {
    "trim-start.mp4": (["-ss", "0.5"], ["-c", "copy"]),  # hides frames 0..11
    "cut-middle.mp4": (["-ss", "1.3"], ["-t", "3", "-c", "copy"]),  # hides 24..31; 3 s from 32
    "cut.mov": (["-ss", "4.3"], ["-c", "copy"]),  # hides 96..103
    "delayed.mp4": (["-itsoffset", "0.5"], ["-c", "copy"]),  # hides nothing: the first frame is shown at 0.5 s
}
HIDING = [name for name in EDITS if name != "delayed.mp4"]


@pytest.fixture(scope="session")
def edited(media_dir: Path, numbered: Path) -> dict:
    """name -> (path, the frame numbers FFmpeg shows)."""
    out = {}
    for name, (before, after) in EDITS.items():
        path = media_dir / name
        _ffmpeg(*before, "-i", str(numbered), *after, str(path))
        out[name] = (path, displayed_frame_numbers(path))
    return out


def _probe(path: Path):
    with resolve_source(str(path), "video", get_fetch_policy()) as source:
        return probe_video(source)


def _fetch(path, backend: str, expect_fallback: bool, **ele):
    """fetch_video with metadata; the BackendFallbackWarning must come exactly when expected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        video, meta = fetch_video(
            {"video": str(path), **ele}, image_patch_size=16, return_video_metadata=True, backend=backend
        )
    fallbacks = [w for w in caught if issubclass(w.category, BackendFallbackWarning)]
    assert len(fallbacks) == int(expect_fallback), [str(w.message) for w in fallbacks]
    assert meta["video_backend"] == ("pyav" if expect_fallback else backend)
    return video, meta


def _numbers(video) -> list:
    return [frame_number(f) for f in video.numpy()]


# --- the reference ---------------------------------------------------------------------------------------------


def test_frame_numbers_survive_coding_and_resizing(numbered):
    assert displayed_frame_numbers(numbered) == list(range(N))
    for n in (0, 1, 2047, 2048, 4095):
        assert frame_number(numbered_frame(n, 33, 5)) == n  # 2 pixels a stripe is enough
    with pytest.raises(ValueError, match="not a numbered frame"):
        frame_number(numbered_frame(5, 320, 8) // 2)  # mid-grey stripes


def test_the_reference_sees_each_edit_list(edited):
    """The test media really hide frames, and PyAV decoding straight through shows what the ffmpeg tool shows."""
    for name, (path, shown) in edited.items():
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            packets = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
            straight = [frame_number(f.to_ndarray(format="gray")) for f in container.decode(stream)]
        assert straight == shown, name
        assert shown == list(range(shown[0], shown[0] + len(shown))), name
        if name in HIDING:
            assert packets > len(shown) and shown[0] > 0, f"{name} hides no frames: the test would not test"
        else:
            assert packets == len(shown) == N and shown[0] == 0


# --- item 5: edit lists ----------------------------------------------------------------------------------------


def test_probe_counts_the_frames_a_player_shows(edited):
    for name, (path, shown) in edited.items():
        info = _probe(path)
        assert info.num_frames == len(shown), name
        assert (info.hidden_frames > 0) == (name in HIDING), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EDITS))
def test_edit_lists_on_every_backend(edited, backend, name):
    path, shown = edited[name]
    deferred = backend in DEFERS and name in HIDING
    video, meta = _fetch(path, backend, deferred, nframes=8, min_pixels=W * H)
    assert meta["total_num_frames"] == len(shown)
    assert meta["frames_indices"] == linspace_round(0, len(shown) - 1, 8)
    assert _numbers(video) == [shown[i] for i in meta["frames_indices"]]
    # a window in seconds is on the displayed timeline too: 1 s .. 2 s is shown frames 24..48
    video, meta = _fetch(path, backend, deferred, video_start=1.0, video_end=2.0, fps=4, min_pixels=W * H)
    assert meta["frames_indices"] == linspace_round(24, 48, 4)
    assert _numbers(video) == [shown[i] for i in meta["frames_indices"]]


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("name", HIDING)
def test_every_frame_of_a_cut_on_pyav(edited, name, threads, monkeypatch):
    """Every shown frame once, through PyAV's seeking, skipping and parallel decoders."""
    monkeypatch.setenv("QWENVL_DECODER_THREADS", threads)
    path, shown = edited[name]
    count = len(shown) - len(shown) % 2
    video, meta = _fetch(path, "pyav", False, nframes=count, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 8)
    assert _numbers(video) == [shown[i] for i in meta["frames_indices"]]
    assert meta["frames_indices"] == linspace_round(0, len(shown) - 1, count)


def test_a_frame_shared_by_several_targets_is_converted_once(numbered):
    """Targets in a gap, or past a stream's end, share one decoded frame, and the resize workers convert it at the
    same time: converting one PyAV frame from several threads at once hangs or crashes the process."""
    from qwen_vl_utils.backends._pyav import _Rgb

    with av.open(str(numbered)) as container:
        frame = next(container.decode(video=0))
        shared = _Rgb(frame)
        results: list = []
        workers = [threading.Thread(target=lambda: results.append(shared()), daemon=True) for _ in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=30)
    assert len(results) == 8, "a conversion hung"
    assert all(r is results[0] for r in results) and frame_number(results[0]) == 0


def test_counting_tokens_follows_the_edit_list(edited):
    """count_visual_tokens plans from the same probe: every shown frame, none of the hidden ones."""
    path, shown = edited["cut-middle.mp4"]
    ele = {"fps": 24.0, "min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 8}
    video, meta = _fetch(path, "pyav", False, **ele)
    assert len(meta["frames_indices"]) == len(shown) - len(shown) % 2
    t, _, h, w = video.shape
    assert q.count_visual_tokens({"video": str(path), **ele}, 16) == -(-t // 2) * (h // 32) * (w // 32)


# --- item 6: a resolution change mid-stream --------------------------------------------------------------------

HALF = 36  # frames in each half


@pytest.fixture(scope="session")
def resolution_change(media_dir: Path, numbered: Path) -> tuple:
    """An MPEG-TS of 640x360 frames 0..35, then 1280x720 frames 36..71, on one continuous clock: two encodes
    concatenated, as an adaptive live stream switches renditions. Also a TS of the first half alone."""
    halves = []
    for k, (w, h) in enumerate([(640, 360), (1280, 720)]):
        mp4 = make_video(
            media_dir / f"rendition{k}.mp4",
            frames=HALF,
            width=w,
            height=h,
            fps=FPS,
            pattern=lambda i, w, h, k=k: numbered_frame(i + k * HALF, w, h),
            options=X264,
        )
        ts = media_dir / f"rendition{k}.ts"
        _ffmpeg("-i", str(mp4), "-c", "copy", "-output_ts_offset", str(k * HALF / FPS), "-f", "mpegts", str(ts))
        halves.append(ts)
    joined = media_dir / "resolution-change.ts"
    joined.write_bytes(halves[0].read_bytes() + halves[1].read_bytes())
    shown = displayed_frame_numbers(joined)
    assert shown == list(range(2 * HALF)), "the reference decodes both halves in order"
    return joined, halves[0]


def test_probe_sees_a_resolution_change(resolution_change):
    joined, first = resolution_change
    info = _probe(joined)
    assert info.size_changes and (info.width, info.height) == (640, 360) and info.num_frames == 2 * HALF
    assert not _probe(first).size_changes


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolution_change_on_every_backend(resolution_change, backend):
    joined, first = resolution_change
    video, meta = _fetch(joined, backend, backend in DEFERS, nframes=12)
    assert meta["frames_indices"] == linspace_round(0, 2 * HALF - 1, 12)
    assert _numbers(video) == meta["frames_indices"]  # frame i shows i
    assert video.shape[1:] == (3, 352, 640)  # the plan's one size, from the first frame's 640x360
    _, meta = _fetch(first.with_suffix(".mp4"), backend, False, nframes=4)  # one resolution: no fallback


def test_resolution_change_at_source_size(resolution_change):
    """0.0.14's reader functions return frames at the source size: the first frame's, for every frame."""
    joined, _ = resolution_change
    video, meta, _ = q.VIDEO_READER_BACKENDS["pyav"]({"video": str(joined), "nframes": 8})
    assert video.shape == (8, 3, 360, 640)
    assert _numbers(video) == meta["frames_indices"]


# --- item 7: MKV without cues ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def piped_mkv(media_dir: Path, numbered: Path) -> tuple:
    """The same MKV written through a pipe (a live muxer: no cues, no duration) and to a file (both)."""
    piped = media_dir / "piped.mkv"
    piped.write_bytes(_ffmpeg("-i", str(numbered), "-c", "copy", "-f", "matroska", "pipe:1"))
    seekable = media_dir / "seekable.mkv"
    _ffmpeg("-i", str(numbered), "-c", "copy", str(seekable))
    return piped, seekable


def _segment_children(path: Path) -> set:
    """The EBML ids of a Matroska file's top-level Segment children (SeekHead, Info, Tracks, Cluster, Cues...)."""
    data = path.read_bytes()

    def vint(pos: int, marker: bool) -> tuple:
        length = 9 - data[pos].bit_length()
        value = int.from_bytes(data[pos : pos + length], "big")
        unknown = value == (1 << (7 * length)) - 1 and not marker
        return (None if unknown else value if marker else value & ((1 << (7 * length)) - 1)), pos + length

    _, pos = vint(0, True)  # the EBML header
    size, pos = vint(pos, False)
    segment, pos = vint(pos + size, True)
    assert segment == 0x18538067
    _, pos = vint(pos, False)  # the Segment's size (unknown when written through a pipe)
    ids = set()
    while pos < len(data):
        element, pos = vint(pos, True)
        size, pos = vint(pos, False)
        assert size is not None, "a child of unknown size: cannot walk this file"
        ids.add(element)
        pos += size
    return ids


CUES = 0x1C53BB6B


def test_the_piped_mkv_has_no_cues(piped_mkv):
    piped, seekable = piped_mkv
    assert CUES not in _segment_children(piped) and CUES in _segment_children(seekable)
    assert displayed_frame_numbers(piped) == list(range(N))
    assert not _probe(piped).length_in_header and _probe(seekable).length_in_header


@pytest.mark.parametrize("backend", BACKENDS)
def test_mkv_without_cues_on_every_backend(piped_mkv, backend):
    piped, seekable = piped_mkv
    for path, deferred in ((piped, backend == "decord"), (seekable, False)):
        video, meta = _fetch(path, backend, deferred, nframes=8)
        assert meta["frames_indices"] == linspace_round(0, N - 1, 8) and meta["total_num_frames"] == N
        assert _numbers(video) == meta["frames_indices"]


@pytest.mark.skipif(not DECORD, reason="decord is not installed")
def test_decord_really_cannot_open_it(piped_mkv):
    """Why the fallback exists: decord itself refuses the file (if a decord release fixes it, revisit)."""
    import decord

    piped, seekable = piped_mkv
    assert len(decord.VideoReader(str(seekable))) == N
    with pytest.raises(decord.DECORDError, match="duration"):
        decord.VideoReader(str(piped))


# --- item 4: the torchvision backend ---------------------------------------------------------------------------


def test_torchvision_backend_decodes_through_pyav_without_importing_torchvision(numbered):
    """The name is accepted (0.0.14 compatibility) and the frames are right, and torchvision is never imported:
    there is no read_video route that could decode a whole span into memory."""
    code = f"""
import sys, importlib.abc
tried = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            tried.append(name)
        return None
sys.meta_path.insert(0, Watch())
sys.path.insert(0, {str(Path(__file__).parent)!r})
import qwen_vl_utils as q
from media import frame_number
video, meta = q.fetch_video({{"video": {str(numbered)!r}, "nframes": 6}}, return_video_metadata=True,
                            backend="torchvision")
assert meta["video_backend"] == "torchvision", meta
print([frame_number(f) for f in video.numpy()] == meta["frames_indices"], tried)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True []", out.stdout


# --- MPEG-TS seeks ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def transport_stream(media_dir: Path) -> Path:
    """H.264 with B-frames in MPEG-TS: its seeks go by a search on timestamps and can land past the keyframe."""
    return make_video(
        media_dir / "seek.ts", frames=120, width=320, height=240, container="mpegts", pattern=numbered_frame
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nframes", [4, 10, 40, 120])
def test_mpegts_seeks_give_the_planned_frames(transport_stream, backend, nframes):
    """PyAV retries a seek that landed past its keyframe; torchcodec and decord hand MPEG-TS to PyAV."""
    video, meta = _fetch(transport_stream, backend, backend in ("torchcodec", "decord"), nframes=nframes)
    assert meta["frames_indices"] == linspace_round(0, 119, nframes)
    assert _numbers(video) == meta["frames_indices"]
