import base64
import io
import logging
import subprocess
import sys
import threading
import warnings
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from qwen_vl_utils import BackendFallbackWarning, DecodeError, InvalidOptionError, fetch_video
from qwen_vl_utils.video import linspace_round

from conftest import BACKEND_MODULES, BACKENDS, DECORD, REQUIRE, TORCHCODEC, _loads
from media import frame_pattern, keyframe_starts, make_audio_only, make_intra_refresh, make_video, played_frames
from reference_0014 import nframes_0014, smart_resize_0014

torch = pytest.importorskip("torch")

W, H, N, FPS = 160, 96, 48, 24

MATRIX = [
    ("libx264", "mp4"),
    ("libx264", "mkv"),
    ("libx264", "mov"),
    ("libx264", "avi"),
    ("libx265", "mp4"),
    ("libx265", "mkv"),
    ("libvpx-vp9", "webm"),
    ("libsvtav1", "mp4"),
    ("libsvtav1", "webm"),
    ("mpeg4", "avi"),
    ("mpeg4", "mp4"),
]
FORMATS = {"mp4": "mp4", "mkv": "matroska", "mov": "mov", "avi": "avi", "webm": "webm"}


@pytest.fixture(scope="session")
def matrix(media_dir):
    return {
        (codec, ext): make_video(media_dir / f"m_{codec}.{ext}", codec=codec, container=FORMATS[ext])
        for codec, ext in MATRIX
    }


def _identify(frame_chw: np.ndarray, width: int = W, height: int = H, n: int = N) -> int:
    """Which pattern frame this output frame is (nearest by mean absolute difference)."""
    h, w = frame_chw.shape[1:]
    out = frame_chw.transpose(1, 2, 0).astype(np.float32)
    errs = [
        np.abs(np.asarray(Image.fromarray(frame_pattern(i, width, height)).resize((w, h), Image.BICUBIC)) - out).mean()
        for i in range(n)
    ]
    return int(np.argmin(errs))


def _fetch(path, backend, **ele):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)
        return fetch_video(
            {"video": str(path), **ele}, image_patch_size=16, return_video_metadata=True, backend=backend
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("codec", "ext"), MATRIX, ids=[f"{c}-{e}" for c, e in MATRIX])
def test_matrix_right_frames_on_every_backend(matrix, backend, codec, ext):
    path = matrix[(codec, ext)]
    video, meta = _fetch(path, backend, nframes=8, min_pixels=W * H, max_pixels=W * H * 2)
    assert video.dtype == torch.float32 and video.shape[:2] == (8, 3)
    assert video.shape[2] % 32 == 0 and video.shape[3] % 32 == 0
    assert meta["frames_indices"] == linspace_round(0, N - 1, 8)
    assert meta["total_num_frames"] == N and meta["fps"] == pytest.approx(FPS, rel=1e-3)
    deferred = (backend == "decord" and codec in ("libsvtav1", "libx265", "mpeg4")) or (
        backend in ("decord", "torchcodec") and ext == "avi"
    )
    assert meta["video_backend"] == ("pyav" if deferred else backend)
    got = [_identify(f) for f in video.numpy()]
    assert got == meta["frames_indices"], "each output frame must be the planned source frame"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_pyav(matrix, backend):
    for key in [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("libx265", "mkv")]:
        ref, ref_meta = _fetch(matrix[key], "pyav")
        out, meta = _fetch(matrix[key], backend)
        assert meta["frames_indices"] == ref_meta["frames_indices"]
        assert out.shape == ref.shape
        assert (out - ref).abs().mean().item() <= 1.0, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_applied(media_dir, backend, rotation):
    path = make_video(media_dir / f"rot{rotation}.mp4", rotation=rotation, frames=8)
    video, meta = _fetch(path, backend, nframes=2, min_pixels=W * H, max_pixels=W * H * 2)
    upright = np.rot90(frame_pattern(0, W, H), rotation // 90)
    if rotation in (90, 270):
        assert video.shape[2] > video.shape[3], "portrait output"
    h, w = video.shape[2:]
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(upright)).resize((w, h), Image.BICUBIC))
    got = video[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).mean() < 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_clips_give_two_frames(media_dir, backend):
    one = make_video(media_dir / "one.mp4", frames=1)
    video, meta = _fetch(one, backend)
    assert video.shape[0] == 2 and meta["frames_indices"] == [0, 0] and meta["total_num_frames"] == 1
    assert torch.equal(video[0], video[1])
    three = make_video(media_dir / "three.mkv", frames=3, container="matroska")
    video, meta = _fetch(three, backend)
    assert video.shape[0] == 2 and meta["frames_indices"] == [0, 2] and meta["total_num_frames"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_indices_are_absolute(h264, backend):
    video, meta = _fetch(h264, backend, video_start=0.5, video_end=1.5, fps=4)
    # frames 12..36 at 24 fps; 1 s window at 4 fps = 4 frames
    assert meta["frames_indices"] == linspace_round(12, 36, 4)
    # the window's frames (0.0.14 says N, the file's: transformers 5 then halves the sampled rate; issue 26)
    assert meta["total_num_frames"] == 36 - 12 + 1
    assert [_identify(f) for f in video.numpy()] == meta["frames_indices"]
    # a window shorter than one frame: the frame on screen, twice
    video, meta = _fetch(h264, backend, video_start=1.01, video_end=1.02)
    assert meta["frames_indices"] == [24, 24]


def test_window_errors(h264):
    with pytest.raises(InvalidOptionError, match="before video_end"):
        fetch_video({"video": str(h264), "video_start": 1.5, "video_end": 1.0})
    with pytest.raises(InvalidOptionError, match="after the end"):
        fetch_video({"video": str(h264), "video_start": 10.0})
    with pytest.raises(ValueError, match="either 'fps' or 'nframes'"):
        fetch_video({"video": str(h264), "fps": 2, "nframes": 4})
    with pytest.raises(InvalidOptionError, match="more than the 48 frames"):
        fetch_video({"video": str(h264), "nframes": 100})


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate(media_dir, backend):
    # irregular gaps: 30 ms and 50 ms alternating (mean 25 fps)
    pts = np.cumsum([0] + [30 if i % 2 else 50 for i in range(39)]).tolist()
    path = make_video(media_dir / "vfr.mp4", frames=40, pts=pts, rate=Fraction(25))
    video, meta = _fetch(path, backend, nframes=6)
    ref, ref_meta = _fetch(path, "pyav", nframes=6)
    assert meta["frames_indices"] == ref_meta["frames_indices"] == linspace_round(0, 39, 6)
    assert [_identify(f, n=40) for f in video.numpy()] == meta["frames_indices"]


def _installed_backends() -> list:
    """The backends whose decoder imports here (all of them in CI, where a missing one fails the run)."""
    return [name for name, module in BACKEND_MODULES.items() if REQUIRE or _loads(module) is None]


@pytest.mark.parametrize("container", ["matroska", "mp4"])
def test_noisy_frame_rate_same_plan_everywhere(media_dir, container):
    """24.002 fps, sampled at 3 fps: 48 frames give 5.9995 -> 4 frames, where a rate rounded to 24 gives 6. The
    plan is the one the probed rate implies, on every backend, and each frame is the planned one."""
    path = make_video(media_dir / f"noisy.{container}", frames=48, rate=Fraction(24002, 1000), container=container)
    assert nframes_0014(48, 24.0, fps=3) == 6, "the case is one where the rate decides the count"
    plans = {}
    for backend in _installed_backends():  # no try/except: an error from a backend that loads fails the test
        video, meta = _fetch(path, backend, fps=3)
        assert meta["fps"] == pytest.approx(24.002, abs=1e-6), backend
        n = nframes_0014(48, meta["fps"], fps=3)
        assert n == 4 and meta["frames_indices"] == linspace_round(0, 47, n), (backend, meta)
        assert [_identify(f) for f in video.numpy()] == meta["frames_indices"], backend
        plans[backend] = meta["frames_indices"]
    assert len(plans) >= 1 and len(set(map(tuple, plans.values()))) == 1, plans


@pytest.fixture(scope="session")
def ten_seconds(media_dir):
    """10 s at 12 fps (120 frames, 64x48): long enough for fps, min_frames and max_frames to each decide."""
    return make_video(media_dir / "ten_seconds.mp4", frames=120, fps=12, width=64, height=48)


# (element keys, the same keys with only the deciding one changed): each pair samples different frame counts
DECIDING = {
    "fps": ({"fps": 1}, {"fps": 1.5}),  # 10 s * 1 fps = 10, between min_frames 4 and max_frames 120; 15 -> 14
    "default-fps": ({}, {"fps": 1}),  # the default fps, 2: 20
    "min_frames": ({"fps": 1, "min_frames": 16}, {"fps": 1}),  # 16, not 10
    "default-min_frames": ({"fps": 0.2}, {"fps": 0.2, "min_frames": 0}),  # the default floor 4, not 2
    "max_frames": ({"fps": 2, "max_frames": 6}, {"fps": 2}),  # 6, not 20
    "odd-max_frames": ({"max_frames": 9}, {"max_frames": 13}),  # 9 -> even: 8, against 12
}


@pytest.mark.parametrize("case", list(DECIDING))
def test_fps_min_and_max_frames_each_decide_the_count(ten_seconds, case):
    counts = []
    for keys in DECIDING[case]:
        video, meta = _fetch(ten_seconds, "pyav", **keys)
        frames = nframes_0014(120, 12.0, **keys)  # 0.0.14's rule, from the test's own reference
        assert video.shape[0] == frames, keys
        assert meta["frames_indices"] == linspace_round(0, 119, frames)
        assert meta["fps"] == pytest.approx(12.0)
        tokens = -(-frames // 2) * (video.shape[2] // 32) * (video.shape[3] // 32)
        assert q.count_visual_tokens({"video": str(ten_seconds), **keys}, 16) == tokens
        counts.append(frames)
    assert counts[0] != counts[1], "the deciding key changes the count"


def test_total_pixels_decides_the_frame_size(media_dir):
    """A 640x360 clip at 8 frames: total_pixels / 8 * 2 lies between the per-frame floor and the video's own
    size, so it alone sets the size (smaller than without it, and exactly 0.0.14's arithmetic)."""
    path = make_video(media_dir / "hd_total.mp4", frames=8, width=640, height=360)
    f = 28
    total = 150_000 * 8 // 2  # per-frame budget 150,000 pixels: over 128*28*28*1.05 (105,369), under 640x360
    video = fetch_video({"video": str(path), "nframes": 8, "total_pixels": total}, 14)
    expected = smart_resize_0014(360, 640, f, 128 * f * f, 150_000)
    assert tuple(video.shape[2:]) == expected
    unbounded = fetch_video({"video": str(path), "nframes": 8}, 14)
    assert unbounded.shape[2] * unbounded.shape[3] > expected[0] * expected[1] >= 105_369 * 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_faststart_and_misnamed(media_dir, backend):
    for name, kwargs in {
        "audio.mp4": {"audio": True},
        "fast.mp4": {"faststart": True},
        "webm_named.mp4": {"codec": "libvpx-vp9", "container": "webm"},
    }.items():
        path = make_video(media_dir / name, frames=24, **kwargs)
        video, meta = _fetch(path, backend, nframes=4)
        assert [_identify(f) for f in video.numpy()] == meta["frames_indices"] == linspace_round(0, 23, 4), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_videos_are_typed(media_dir, h264, backend, tmp_path):
    data = h264.read_bytes()
    cases = {
        "audio-only": make_audio_only(tmp_path / "a.m4a"),
        "truncated": data[: len(data) // 2],  # the moov box is at the end: gone
        "truncated-faststart": make_video(tmp_path / "fs.mp4", frames=96, faststart=True).read_bytes()[:9000],
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
    }
    pic = tmp_path / "pic.png"
    Image.new("RGB", (64, 64)).save(pic)
    cases["image"] = pic
    for case, value in cases.items():
        with pytest.raises(DecodeError) as info:
            _fetch(value, backend) if not isinstance(value, bytes) else fetch_video({"video": value}, backend=backend)
        assert info.type is DecodeError, case
    with pytest.raises(DecodeError, match="no video stream"):
        _fetch(cases["audio-only"], backend)
    with pytest.raises(DecodeError, match="still image"):
        _fetch(pic, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_source_kind(h264, server, backend):
    data = h264.read_bytes()
    url = server.add_bytes("/v.mp4", data, "video/mp4")
    ref, ref_meta = _fetch(h264, backend, nframes=4)
    for value in (
        h264.as_uri(),
        url,
        "data:video/mp4;base64," + base64.b64encode(data).decode(),
        data,
        io.BytesIO(data),
    ):
        out, meta = fetch_video({"video": value, "nframes": 4}, 16, return_video_metadata=True, backend=backend)
        assert meta["frames_indices"] == ref_meta["frames_indices"]
        assert torch.equal(out, ref)


def test_resize_matches_torchvision_bicubic(media_dir):
    """torchvision's uint8 bicubic antialias resize == interpolate(float) rounded; ours within 0.1 mean."""
    path = make_video(media_dir / "hd.mp4", frames=4, width=640, height=360)
    full, meta = fetch_video({"video": str(path), "nframes": 2}, 16, return_video_metadata=True, backend="pyav")
    small = fetch_video({"video": str(path), "nframes": 2, "max_pixels": 128 * 32 * 32}, 16)
    ref = torch.nn.functional.interpolate(full, size=small.shape[2:], mode="bicubic", antialias=True)
    ref = ref.round().clamp(0, 255)
    assert (small - ref).abs().mean().item() <= 0.1


def _torch_resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    """torchvision's resize of a uint8 frame (what 0.0.14 uses): float bicubic with antialias, rounded."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True).round().clamp(0, 255)
    return y[0].permute(1, 2, 0).to(torch.uint8).numpy()


@pytest.mark.parametrize("with_torch", [True, False])
def test_resize_of_textured_frames_matches_torchvision(monkeypatch, with_torch):
    """Noise-like texture, where rounding between passes shows (Pillow's uint8 resize is 0.16 levels off)."""
    from qwen_vl_utils._frame_resize import resize_frame

    rng = np.random.default_rng(0)
    frame = np.clip(rng.normal(128, 60, (540, 960, 3)), 0, 255).astype(np.uint8)
    if not with_torch:  # the numpy path (CLI, decode_video), when torch is not loaded
        monkeypatch.delitem(sys.modules, "torch")
    for h, w in [(320, 576), (224, 448), (640, 1152), (540, 448), (320, 960), (1080, 1920), (37, 1000), (540, 960)]:
        got = resize_frame(frame, w, h)
        for dtype in (np.float32, np.uint8):  # written channels-first into an output: the same values
            out = np.full((3, h, w), 7, dtype=dtype)
            assert resize_frame(frame, w, h, out) is None
            assert np.array_equal(out, got.transpose(2, 0, 1)), (h, w, dtype)
            assert not np.signbit(out).any()  # no -0.0: the same bytes as through uint8
        monkeypatch.setitem(sys.modules, "torch", torch)
        ref = _torch_resize(frame, h, w)
        if not with_torch:
            monkeypatch.delitem(sys.modules, "torch")
        diff = np.abs(got.astype(np.int16) - ref)
        # torch's weights, summed in another order: a rounding tie falls the other way once in ~100,000 values
        assert diff.max() <= 1 and diff.mean() <= (1e-4 if with_torch else 0.01), (h, w, diff.mean())
    crop = frame[3:-2, 5:-4:2]  # a strided, read-only view: the same as its contiguous copy
    crop.flags.writeable = False
    assert np.array_equal(resize_frame(crop, 200, 96), resize_frame(np.ascontiguousarray(crop), 200, 96))


def test_resize_pool_threads_run_torch_on_one_thread_and_leave_everyone_elses(monkeypatch):
    """Each resize thread runs torch single-threaded (the pool is the parallelism); the calling thread and
    threads started later keep the process's setting."""
    from qwen_vl_utils._frame_resize import resize_pool

    before = torch.get_num_threads()
    monkeypatch.setenv("QWENVL_RESIZE_THREADS", "2")
    try:
        torch.set_num_threads(3)
        with resize_pool("qwen-vl-test") as pool:
            assert {pool.submit(torch.get_num_threads).result() for _ in range(8)} == {1}
        assert torch.get_num_threads() == 3
        later: list = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [3]
    finally:
        torch.set_num_threads(before)


def test_resize_pools_starting_together_leave_the_process_setting(monkeypatch):
    """Pool threads of several pools starting at once: none reads another's 1 as the default and keeps it."""
    from qwen_vl_utils._frame_resize import resize_pool

    def count_on_a_new_thread() -> int:
        seen: list = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    before = torch.get_num_threads()
    monkeypatch.setenv("QWENVL_RESIZE_THREADS", "2")
    try:
        torch.set_num_threads(3)
        for _ in range(15):
            gate = threading.Barrier(6)
            counts: list = []

            def start_a_pool(gate=gate, counts=counts) -> None:
                with resize_pool("qwen-vl-test") as pool:
                    gate.wait()
                    counts.extend(f.result() for f in [pool.submit(torch.get_num_threads) for _ in range(4)])

            starters = [threading.Thread(target=start_a_pool) for _ in range(6)]
            for t in starters:
                t.start()
            for t in starters:
                t.join()
            assert set(counts) == {1} and len(counts) == 24
            assert count_on_a_new_thread() == 3
    finally:
        torch.set_num_threads(before)


def test_pixel_budgets(h264):
    video = fetch_video({"video": str(h264), "resized_height": 64, "resized_width": 100}, 14)
    assert video.shape[2:] == (56, 112)
    video = fetch_video({"video": str(h264), "nframes": 4, "total_pixels": 4 * 28 * 28 * 8}, 14)
    assert video.shape[2] * video.shape[3] <= 128 * 28 * 28 * 1.05 + 1  # max(total/n*2, min*1.05)
    video = fetch_video({"video": str(h264), "max_pixels": 4 * 32 * 32, "min_pixels": 32 * 32}, 16)
    assert video.shape[2] * video.shape[3] <= 4 * 32 * 32


def test_uint8_dtype_and_sample_fps(h264):
    (video, meta), sample_fps = fetch_video(
        {"video": str(h264), "dtype": "uint8"}, return_video_metadata=True, return_video_sample_fps=True
    )
    assert video.dtype == torch.uint8
    assert sample_fps == pytest.approx(len(meta["frames_indices"]) / N * FPS)
    floats = fetch_video({"video": str(h264)})
    assert torch.equal(floats, video.float()) and floats.is_contiguous()


# --- frame lists and decoded arrays -------------------------------------------------------------------


def test_frame_list_resized_once_with_patch_factor(tmp_path):
    frames = []
    for i in range(5):
        path = tmp_path / f"f{i}.png"
        Image.fromarray(frame_pattern(i * 3, 320, 200)).save(path)
        frames.append(str(path))
    ele = {"video": frames, "sample_fps": 2.0, "raw_fps": 30, "min_pixels": 4 * 32 * 32}
    video, meta = fetch_video(ele, 16, return_video_metadata=True)
    # 320x200 inside the default per-frame budget, rounded to multiples of 32 once: 320x192 (0.0.14 gives 56-multiples)
    assert video.shape == (6, 3, 192, 320)
    assert torch.equal(video[5], video[4]), "padded to an even count with the last frame"
    expected = _torch_resize(frame_pattern(3, 320, 200), 192, 320)
    assert np.array_equal(video[1].permute(1, 2, 0).numpy().astype(np.uint8), expected), "a single resize"
    assert meta["fps"] == 30 and meta["frames_indices"] == [0, 15, 30, 45, 60, 60]
    assert [i / meta["fps"] for i in meta["frames_indices"][:5]] == [0, 0.5, 1.0, 1.5, 2.0]


def test_frame_list_timestamps_and_mixed_sources(tmp_path, server):
    img = Image.fromarray(frame_pattern(0, 128, 96))
    url = server.add_bytes("/frame.png", _png(img), "image/png")
    frames = [img, np.asarray(img), url, _png(img)]
    video, meta = fetch_video({"video": frames, "timestamps": [0.0, 0.4, 1.3, 2.25]}, 14, return_video_metadata=True)
    assert video.shape[0] == 4
    assert [i / meta["fps"] for i in meta["frames_indices"]] == [0.0, 0.4, 1.3, 2.25]
    with pytest.raises(InvalidOptionError, match="timestamps"):
        fetch_video({"video": frames, "timestamps": [0.0, 1.0]})


def test_decoded_arrays(h264):
    ref = fetch_video({"video": str(h264), "nframes": 4}, 14, backend="pyav")
    as_uint8 = ref.to(torch.uint8)
    for value in (as_uint8, as_uint8.permute(0, 2, 3, 1), as_uint8.numpy(), as_uint8.permute(0, 2, 3, 1).numpy()):
        video, meta = fetch_video({"video": value, "fps": 2.0}, 14, return_video_metadata=True)
        assert torch.equal(video, ref)
        assert meta["fps"] == 2.0 and len(meta["frames_indices"]) == 4


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- backend selection ----------------------------------------------------------------------------------


def test_backend_selection(h264, monkeypatch):
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "torchvision")
    assert q.get_video_reader_backend() == "torchvision"  # read at call time, not import time
    _, meta = fetch_video({"video": str(h264)}, return_video_metadata=True)
    assert meta["video_backend"] == "torchvision"
    _, meta = fetch_video({"video": str(h264), "video_reader": "pyav"}, return_video_metadata=True)
    assert meta["video_backend"] == "pyav"
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "nope")
    with pytest.raises(InvalidOptionError, match="available: .*pyav"):
        fetch_video({"video": str(h264)})
    monkeypatch.delenv("FORCE_QWENVL_VIDEO_READER")
    assert q.get_video_reader_backend() in ("pyav", "torchcodec", "decord")
    assert set(q.VIDEO_READER_BACKENDS) >= {"decord", "torchvision", "torchcodec", "pyav"}
    video, meta, sample_fps = q.VIDEO_READER_BACKENDS["pyav"]({"video": str(h264), "nframes": 4})
    assert video.shape == (4, 3, H, W) and video.dtype == torch.uint8 and sample_fps == pytest.approx(2.0)


def test_torchvision_backend_says_it_uses_pyav(h264, caplog, monkeypatch):
    from qwen_vl_utils.backends import _torchvision

    monkeypatch.setattr(_torchvision, "_said", False)
    with caplog.at_level(logging.INFO, logger="qwen_vl_utils"):
        for _ in range(2):
            _, meta = fetch_video({"video": str(h264)}, return_video_metadata=True, backend="torchvision")
    assert meta["video_backend"] == "torchvision"
    assert caplog.text.count("decodes through PyAV") == 1, "said once, not on every call"


@pytest.fixture(scope="module")
def intra_refresh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("intra-refresh")
    made = {ext: make_intra_refresh(folder / f"refresh.{ext}") for ext in ("mp4", "ts", "mkv")}
    for ext in ("mp4", "ts"):  # B-frames: an MPEG-TS seek (by dts) lands on a B-frame after the keyframe
        made[f"{ext}-b"] = make_intra_refresh(folder / f"refresh-b.{ext}", bframes=3)
    return made


def _assert_played(video, meta, played):
    """Each output frame is the source frame its index names, as decoding from the start gives it."""
    for k, i in enumerate(meta["frames_indices"]):
        diff = np.abs(video[k].permute(1, 2, 0).numpy().astype(int) - played[i].astype(int)).max()
        assert diff <= 2, f"frame {i} differs by up to {diff} from the frame a player shows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mp4", "mkv", "mp4-b"])
def test_intra_refresh_keyframes_are_not_where_decoding_starts(intra_refresh, backend, kind):
    """x264's intra refresh flags recovery points as keyframes: decoding from one gives wrong frames (decord 0.6
    returned them, PyAV's seek did too) or none (torchcodec 0.13). Every target comes out as a player shows it;
    the backends that seek to flagged keyframes hand the file to PyAV with one warning."""
    path = intra_refresh[kind]
    starts = keyframe_starts(path)
    assert starts[0] and len(starts) >= 8 and not any(starts[1:]), "the file must have recovery-point keyframes"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        video, meta = fetch_video(
            {"video": str(path), "fps": 5.5, "dtype": "uint8", "resized_height": 192, "resized_width": 320},
            16,
            return_video_metadata=True,
            backend=backend,
        )
    fallbacks = [str(w.message) for w in record if issubclass(w.category, BackendFallbackWarning)]
    if backend in ("decord", "torchcodec"):
        assert meta["video_backend"] == "pyav" and len(fallbacks) == 1 and "recovery points" in fallbacks[0]
    else:
        assert fallbacks == []
    assert len(meta["frames_indices"]) >= 50
    _assert_played(video, meta, played_frames(path))


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_non_idr_keyframes_without_a_recovery_point_stay_on_their_backend(tmp_path, backend):
    """x264 with one reference frame flags scene-cut I-frames that are not IDR as keyframes, with no recovery
    point SEI: decoding from them is exact, so decord and torchcodec keep such files (no fallback)."""
    if not (DECORD if backend == "decord" else TORCHCODEC) and not REQUIRE:
        pytest.skip(f"{backend} is not installed")
    scenes = [np.random.default_rng(k).integers(0, 256, (112, 224, 3), dtype=np.uint8) for k in range(10)]
    options = {"bf": "0", "g": "300", "x264-params": "ref=1:min-keyint=151:scenecut=40:keyint=300"}
    path = make_video(
        tmp_path / "scenes.mp4",
        frames=300,
        width=224,
        height=112,
        fps=30,
        pattern=lambda i, w, h: np.roll(scenes[i // 30 % 10], i * 2, axis=1),
        options=options,
    )
    starts = keyframe_starts(path)
    assert len(starts) >= 5 and not any(starts[1:4]), "the keyframes read by the check must be non-IDR"
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        _, meta = fetch_video({"video": str(path), "nframes": 8}, return_video_metadata=True, backend=backend)
    assert meta["video_backend"] == backend


@pytest.mark.parametrize("ext", ["mp4", "ts", "mkv", "ts-b"])
@pytest.mark.parametrize("start", [None, 5.2, 9.0])
def test_intra_refresh_windows_and_containers_on_pyav(intra_refresh, ext, start):
    """Length-prefixed (MP4) and Annex B (MPEG-TS) packets; a window that starts past recovery points."""
    path = intra_refresh[ext]
    ele = {"video": str(path), "nframes": 6, "dtype": "uint8", "resized_height": 192, "resized_width": 320}
    if start is not None:
        ele["video_start"] = start
    video, meta = fetch_video(ele, 16, return_video_metadata=True, backend="pyav")
    assert meta["video_backend"] == "pyav" and (start is None or meta["frames_indices"][0] >= 24 * start - 1)
    _assert_played(video, meta, played_frames(path))


@pytest.mark.skipif(not DECORD, reason="decord is not installed")
def test_decord_av1_falls_back_with_one_warning(matrix):
    with pytest.warns(BackendFallbackWarning, match="decord.*AV1.*pyav") as record:
        _, meta = fetch_video(
            {"video": str(matrix[("libsvtav1", "mp4")])}, return_video_metadata=True, backend="decord"
        )
    assert meta["video_backend"] == "pyav"
    assert len([w for w in record if issubclass(w.category, BackendFallbackWarning)]) == 1


@pytest.mark.skipif(not DECORD, reason="decord is not installed")
def test_the_fallback_warning_points_at_the_callers_line(matrix):
    """However deep in the library the backend is chosen (fetch_video, decode_video, 0.0.14's readers), the
    warning names the caller's line, so that filters by module and once-per-location work."""
    from qwen_vl_utils.video import VIDEO_READER_BACKENDS, decode_video

    ele = {"video": str(matrix[("libsvtav1", "mp4")]), "nframes": 2}
    calls = {
        "fetch_video": lambda: fetch_video(ele, backend="decord"),
        "decode_video": lambda: decode_video(ele, backend="decord"),
        "reader": lambda: VIDEO_READER_BACKENDS["decord"](ele),
    }
    for name, call in calls.items():
        with pytest.warns(BackendFallbackWarning) as record:
            call()
        assert {w.filename for w in record if issubclass(w.category, BackendFallbackWarning)} == {__file__}, name


@pytest.mark.skipif(not TORCHCODEC, reason="torchcodec is not installed")
def test_torchcodec_needs_no_fallback_for_av1(matrix):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        _, meta = fetch_video(
            {"video": str(matrix[("libsvtav1", "webm")])}, return_video_metadata=True, backend="torchcodec"
        )
    assert meta["video_backend"] == "torchcodec"


def test_video_without_torch_is_a_clear_error(h264):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import qwen_vl_utils as q\n"
        "try:\n"
        f"    q.fetch_video({{'video': {str(h264)!r}}})\n"
        "except q.InvalidOptionError as e:\n"
        "    assert 'pip install torch' in str(e), e; print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_linspace_round_matches_torch():
    cases = [(0, 299, 20), (12, 36, 4), (0, 1799, 120), (5, 5, 2), (0, 99, 64), (0, 17999, 64), (0, 107999, 768)]
    rng = np.random.default_rng(0)
    for _ in range(1500):  # long videos: float32 rounding decides some indices, as it does in 0.0.14
        n = int(rng.choice([2, 4, 8, 16, 64, 128, 256, 768, 1000]))
        end = int(rng.integers(n, 400_000))
        start = int(rng.integers(0, end - n + 2)) if rng.random() < 0.3 else 0
        cases.append((start, end, n))
    for start, end, n in cases:
        assert linspace_round(start, end, n) == torch.linspace(start, end, n).round().long().tolist(), (start, end, n)


@pytest.fixture(scope="session")
def long_gop(media_dir):
    """240 frames, a keyframe every 48, B-frames: targets far apart use seeking, skipping and parallel decoders."""
    return make_video(media_dir / "long_gop.mp4", frames=240, fps=24, gop=48)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nframes", [6, 16, 64])
def test_sparse_targets_are_the_right_frames(long_gop, backend, nframes):
    video, meta = _fetch(long_gop, backend, nframes=nframes, min_pixels=W * H, max_pixels=W * H * 2)
    assert meta["frames_indices"] == linspace_round(0, 239, nframes)
    assert [_identify(f, n=240) for f in video.numpy()] == meta["frames_indices"]


@pytest.mark.parametrize("threads", ["1", "2", "4"])
def test_pyav_skip_recovery_and_thread_counts(long_gop, monkeypatch, threads):
    """Force non-reference skipping of the targets themselves: a skipped target must be decoded again."""
    from qwen_vl_utils.backends import _pyav

    seeks = []
    real_seek = _pyav._seek
    monkeypatch.setattr(_pyav, "_skippable", lambda ordinal, wanted, careful_until: (ordinal or -1) > careful_until)
    monkeypatch.setattr(_pyav, "_seek", lambda *a: seeks.append(a[3]) or real_seek(*a))
    monkeypatch.setenv("QWENVL_DECODER_THREADS", threads)
    video, meta = _fetch(long_gop, "pyav", nframes=20, min_pixels=W * H, max_pixels=W * H * 2)
    assert [_identify(f, n=240) for f in video.numpy()] == meta["frames_indices"]
    assert len(seeks) > len(set(seeks)), "some skipped target was decoded again from its keyframe"


# --- backend choice: precedence, and broken installs -----------------------------------------------------------


def test_backend_argument_beats_video_reader_beats_environment(h264, monkeypatch):
    """pyav and torchvision always load (torchvision decodes through PyAV), so each level is checked against a
    different backend at the level below it."""
    cases = [
        ({"backend": "pyav"}, {"video_reader": "torchvision"}, "torchvision", "pyav"),
        ({"backend": "torchvision"}, {"video_reader": "pyav"}, "pyav", "torchvision"),
        ({}, {"video_reader": "pyav"}, "torchvision", "pyav"),
        ({}, {"video_reader": "torchvision"}, "pyav", "torchvision"),
        ({}, {}, "torchvision", "torchvision"),
        ({"backend": "pyav"}, {}, "torchvision", "pyav"),
    ]
    for call, element, environment, expected in cases:
        monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", environment)
        _, meta = fetch_video({"video": str(h264), "nframes": 2, **element}, return_video_metadata=True, **call)
        assert meta["video_backend"] == expected, (call, element, environment)


@pytest.fixture
def broken_backend(tmp_path, monkeypatch):
    """A backend whose decoder is installed but raises on import (a missing shared library), tried first."""
    from qwen_vl_utils import backends

    (tmp_path / "qwenvl_broken_decoder.py").write_text(
        "raise OSError('libbrokendecoder.so.1: cannot open shared object file: No such file or directory')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = backends.BackendSpec(
        "broken", "qwen_vl_utils.backends._pyav", "qwenvl_broken_decoder", "pip install broken-decoder==2.0"
    )
    monkeypatch.setitem(backends.BACKENDS, "broken", spec)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("broken", *backends.AUTO_ORDER))
    monkeypatch.setattr(backends, "_failures", {})
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    monkeypatch.delenv("FORCE_QWENVL_VIDEO_READER", raising=False)
    return "broken"


def test_broken_backend_is_not_available_and_is_skipped_with_a_hint(h264, broken_backend, caplog):
    from qwen_vl_utils import backends

    with caplog.at_level(logging.WARNING, logger="qwen_vl_utils"):
        assert q.get_video_reader_backend() == "pyav", "the automatic choice skips the broken install"
        assert broken_backend not in backends.available_backends()
        _, meta = fetch_video({"video": str(h264), "nframes": 2}, return_video_metadata=True)
    assert meta["video_backend"] == "pyav"
    assert "'broken' cannot be loaded (OSError: libbrokendecoder.so.1" in caplog.text
    assert "pip install broken-decoder==2.0" in caplog.text and caplog.text.count("libbrokendecoder") == 1
    for call, element in (({"backend": "broken"}, {}), ({}, {"video_reader": "broken"})):  # by name: an error
        with pytest.raises(InvalidOptionError, match=r"cannot be loaded \(OSError.*pip install broken-decoder==2.0"):
            fetch_video({"video": str(h264), **element}, **call)


def test_missing_backend_is_skipped_quietly(h264, monkeypatch, caplog):
    """Not installed at all (the usual case for decord): skipped without a warning."""
    from qwen_vl_utils import backends

    spec = backends.BackendSpec("absent", "qwen_vl_utils.backends._pyav", "qwenvl_no_such_decoder", "pip install x")
    monkeypatch.setitem(backends.BACKENDS, "absent", spec)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("absent", *backends.AUTO_ORDER))
    monkeypatch.setattr(backends, "_failures", {})
    with caplog.at_level(logging.WARNING, logger="qwen_vl_utils"):
        assert q.get_video_reader_backend() == "pyav"
    assert "absent" not in caplog.text
    with pytest.raises(InvalidOptionError, match="'absent' cannot be loaded.*pip install x"):
        q.get_video_reader_backend("absent")
