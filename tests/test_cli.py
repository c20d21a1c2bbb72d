"""The command line, run as a subprocess on generated media; values checked against the library."""

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from qwen_vl_utils.video import decode_video, qwen3_timestamps

from media import gradient, make_video


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    video = make_video(d / "clip.mkv", frames=60, fps=24, width=320, height=180, container="matroska")
    image = d / "pic.png"
    gradient(500, 300).save(image)
    return video, image


def test_inspect_json_matches_the_library(files):
    video, image = files
    res = run("inspect", video, image, "--json", "--patch-size", "16", "--nframes", "6", "--max-pixels", 200 * 32 * 32)
    assert res.returncode == 0, res.stderr
    v, i = json.loads(res.stdout)
    ele = {"video": str(video), "nframes": 6, "max_pixels": 200 * 32 * 32}
    frames, meta, sample_fps, info = decode_video(ele, 16)
    assert v["kind"] == "video" and v["codec"] == "h264" and v["container"] == "matroska,webm"
    assert v["frames_indices"] == meta["frames_indices"] and v["total_frames"] == 60
    assert (v["frames"], v["resized_height"], v["resized_width"]) == frames.shape[:3]
    assert v["frame_times"] == pytest.approx([x / 24 for x in meta["frames_indices"]], abs=1e-4)
    assert v["qwen3_timestamps"] == pytest.approx(qwen3_timestamps(meta["frames_indices"], meta["fps"]), abs=1e-4)
    assert v["tokens"] == q.count_visual_tokens(ele, 16)
    assert v["backend"] == meta["video_backend"] and v["seconds"] > 0
    out = q.fetch_image({"image": str(image), "max_pixels": 200 * 32 * 32}, 16)
    assert i["kind"] == "image" and (i["width"], i["height"]) == (500, 300)
    assert (i["resized_width"], i["resized_height"]) == out.size
    assert i["tokens"] == q.count_visual_tokens({"image": str(image), "max_pixels": 200 * 32 * 32}, 16)


def _row(stdout: str, label: str) -> str:
    rows = [line for line in stdout.splitlines() if line.startswith(label + "  ")]
    assert len(rows) == 1, stdout
    return rows[0][len(label) :].strip()


def test_inspect_table_and_other_source_kinds(files):
    video, image = files
    data_uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    res = run("inspect", video.as_uri(), data_uri, "--fps", "4", "--start", "0.5", "--end", "2.0")
    assert res.returncode == 0, res.stderr
    assert "Qwen3-VL timestamps" in res.stdout and "visual tokens" in res.stdout
    meta = decode_video({"video": str(video), "fps": 4, "video_start": 0.5, "video_end": 2.0})[1]
    assert len(meta["frames_indices"]) == 6  # 1.5 s at 4 fps
    # the whole row: every sampled index with its time (index / 24 fps), in order
    shown = [cell.split("@") for cell in _row(res.stdout, "sampled frames").split()]
    assert [int(i) for i, _ in shown] == meta["frames_indices"]
    assert [float(t.rstrip("s")) for _, t in shown] == pytest.approx(
        [i / 24 for i in meta["frames_indices"]], abs=1e-4
    )
    groups = _row(res.stdout, "Qwen3-VL timestamps").split("> <")
    assert len(groups) == 3, "one timestamp per pair of frames"


@pytest.fixture(scope="module")
def ten_seconds(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("cli10") / "ten.mp4", frames=120, fps=12, width=64, height=48)


@pytest.mark.parametrize(
    ("flags", "frames"),
    [
        ((), 20),  # the default, 2 fps over 10 s
        (("--fps", "1"), 10),  # fps decides
        (("--fps", "1", "--min-frames", "16"), 16),  # min_frames decides
        (("--fps", "0.2"), 4),  # the default min_frames floor decides
        (("--max-frames", "6"), 6),  # max_frames decides
        (("--fps", "1.5", "--max-frames", "13"), 12),  # 15 frames, capped at 13, even: 12
    ],
)
def test_inspect_sampling_flags_decide_the_count(ten_seconds, flags, frames):
    res = run("inspect", ten_seconds, "--json", *flags)
    assert res.returncode == 0, res.stderr
    (v,) = json.loads(res.stdout)
    assert v["frames"] == frames and len(v["frames_indices"]) == frames
    ele = {"video": str(ten_seconds)}
    for flag, key in (("--fps", "fps"), ("--min-frames", "min_frames"), ("--max-frames", "max_frames")):
        if flag in flags:
            ele[key] = float(flags[flags.index(flag) + 1])
    assert v["frames_indices"] == decode_video(ele)[1]["frames_indices"]


def test_inspect_bad_option_values_are_reported(files):
    video, image = files
    res = run("inspect", video, "--fps", "0")
    assert res.returncode == 1 and "fps=0" in res.stderr and "must be" in res.stderr and "Traceback" not in res.stderr


def test_failing_and_succeeding_sources_mixed(files, tmp_path):
    video, _ = files
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    res = run("inspect", tmp_path / "missing.mp4", video, junk, "--json")
    assert res.returncode == 1
    assert len(json.loads(res.stdout)) == 1, "the good source is still reported"
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "missing.mp4" in errors[0] and "junk.mp4" in errors[1]
    assert "Traceback" not in res.stderr
    assert "Traceback" in run("inspect", junk, "--debug").stderr


def test_usage_errors_exit_2(files):
    video, _ = files
    assert run().returncode == 2
    assert run("inspect").returncode == 2
    assert run("inspect", video, "--fps", "2", "--nframes", "4").returncode == 2
    assert run("inspect", video, "--patch-size", "15").returncode == 2
    assert run("frobnicate").returncode == 2


def test_preview_contact_sheet(files, tmp_path):
    video, image = files
    sheet = tmp_path / "sheet.png"
    res = run("preview", video, "-o", sheet, "--nframes", "6", "--quiet")
    assert res.returncode == 0, res.stderr
    img = Image.open(sheet)
    assert img.format == "PNG"
    frames, meta, _, _ = decode_video({"video": str(video), "nframes": 6})
    # 6 tiles in a 3x2 grid, each a frame scaled to 320 px wide, 4 px apart
    tw = 320
    th = round(frames.shape[1] * tw / frames.shape[2])
    assert img.size == (3 * (tw + 4) + 4, 2 * (th + 4) + 4)
    arr = np.asarray(img)
    tiles = [
        arr[4 + r * (th + 4) : 4 + r * (th + 4) + th, 4 + c * (tw + 4) : 4 + c * (tw + 4) + tw]
        for r in range(2)
        for c in range(3)
    ]
    assert all(t.std() > 1 for t in tiles), "every tile holds a frame"
    res = run("preview", image, "-o", tmp_path / "img.png")
    assert res.returncode == 0 and Image.open(tmp_path / "img.png").size[0] > 300


def test_demo_end_to_end():
    res = run("demo")
    assert res.returncode == 0, res.stderr
    assert "Qwen2.5-VL (patch 14)" in res.stdout and "Qwen3-VL (patch 16)" in res.stdout
    sheet = res.stdout.strip().splitlines()[-1].split(": ", 1)[1]
    assert Image.open(sheet).format == "PNG"


class _TTY:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(("tty", "quiet", "shown"), [(True, False, True), (True, True, False), (False, False, False)])
def test_progress_bar_only_on_a_terminal_after_a_second(monkeypatch, tty, quiet, shown):
    from qwen_vl_utils import _progress

    fake = _TTY(tty)
    monkeypatch.setattr(sys, "stderr", fake)
    progress = _progress.Progress(not quiet)
    progress.update(1, 4, "a")
    assert fake.text == "", "nothing in the first second"
    progress.start -= 2
    progress.update(2, 4, "b")
    progress.close()
    assert ("2/4" in fake.text) is shown


def test_without_tqdm_there_is_no_bar_and_no_failure(monkeypatch):
    from qwen_vl_utils import _progress

    fake = _TTY(True)
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    progress = _progress.Progress(True)
    progress.start -= 2
    progress.update(2, 4, "b")
    progress.update(3, 4, "c")
    progress.close()
    assert fake.text == ""


def test_inspect_http_sources(files, server):
    video, image = files
    vurl = server.add_bytes("/cli.mkv", video.read_bytes(), "video/x-matroska")
    iurl = server.add_bytes("/cli.png", image.read_bytes(), "image/png")
    res = run("inspect", vurl, iurl, "--json", "--nframes", "4")
    assert res.returncode == 0, res.stderr
    v, i = json.loads(res.stdout)
    assert (v["source"], v["kind"], v["frames"]) == (vurl, "video", 4)
    assert (i["source"], i["kind"]) == (iurl, "image")
    assert i["tokens"] == q.count_visual_tokens({"image": str(image)})
    res = run("inspect", server.url("/missing.mp4"))
    assert res.returncode == 1 and "HTTP 404" in res.stderr
