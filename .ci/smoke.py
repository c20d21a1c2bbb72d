"""Smoke test of an installed qwen-vl-utils wheel: run by .ci/release-check inside a fresh virtual environment.

    python -I smoke.py [--torch] [--version X.Y.Z]

Without ``--torch`` the environment holds the wheel with no extras (and nothing else): the package must import
from that environment without pulling in torch or any optional dependency, the command line must work (``demo``,
``inspect --json`` on a generated image, by path and over HTTP from a server on 127.0.0.1), and video decoding
must work while tensor output says how to install torch. With ``--torch`` (the wheel's ``torch`` extra is
installed) the import must still leave torch alone, and ``fetch_video`` / ``process_vision_info`` must return
torch tensors for a generated video. Every failure is an exception: the exit status is non-zero.

Media are generated here with the standard library (PNG) and PyAV (a declared dependency) only, so a dependency
missing from the wheel's metadata shows up as the package's own import or runtime failure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import importlib.metadata
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import zlib

# Never imported by `import qwen_vl_utils` (import names; pillow_heif is the HEIF plugin, starlette/uvicorn the
# serving example's stack). fsspec comes with torch, so the --torch run proves the import leaves it alone too.
OPTIONAL_MODULES = (
    "torch",
    "torchvision",
    "torchcodec",
    "decord",
    "ray",
    "fsspec",
    "s3fs",
    "transformers",
    "httpx",
    "aiohttp",
    "pillow_heif",
    "starlette",
    "uvicorn",
)
IMAGE_SIZE = (640, 427)  # width, height: not a multiple of 28 or 32, so resizing really happens


def step(name: str) -> None:
    print(f"smoke: {name}", flush=True)


# --- generated media ----------------------------------------------------------------------------------------


def write_png(path: str, width: int, height: int) -> str:
    """An RGB gradient PNG written with zlib alone (no dependency of the package under test is needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in (x * 255 // width, y * 255 // height, 128))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + png)
    return path


def write_video(path: str, frames: int = 48, fps: int = 24, width: int = 192, height: int = 108) -> str:
    """A 2-second H.264 MP4 made with PyAV (a declared dependency of the package)."""
    import av
    import numpy as np

    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            a = np.full((height, width, 3), (i * 5) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        out.mux(stream.encode())
    return path


@contextlib.contextmanager
def http_server(folder: str):
    """A real HTTP server on 127.0.0.1 serving `folder` (the package downloads through its declared client)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- checks --------------------------------------------------------------------------------------------------


def check_import(expected_version: str | None, torch_extra: bool):
    step("import qwen_vl_utils")
    import qwen_vl_utils as q

    loaded = [m for m in OPTIONAL_MODULES if m in sys.modules]
    assert not loaded, f"`import qwen_vl_utils` imported optional modules: {loaded}"
    where = os.path.realpath(q.__file__)
    assert where.startswith(os.path.realpath(sys.prefix) + os.sep), f"imported from {where}, not from {sys.prefix}"
    dist_version = importlib.metadata.version("qwen-vl-utils")
    assert q.__version__ == dist_version, f"__version__ {q.__version__} != installed metadata {dist_version}"
    assert expected_version in (None, dist_version), f"installed {dist_version}, expected {expected_version}"
    missing = [name for name in q.__all__ if not hasattr(q, name)]
    assert not missing, f"names in __all__ missing from the package: {missing}"
    torch_found = importlib.util.find_spec("torch") is not None
    assert torch_found == torch_extra, f"torch {'missing' if torch_extra else 'installed'} in this environment"
    if not torch_extra:  # the environment must hold what the wheel declares, not what this machine has
        present = [m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is not None]
        assert not present, f"optional modules installed in the no-extras environment: {present}"
    print(f"smoke: qwen-vl-utils {dist_version} from {os.path.dirname(where)}")
    return q


def run_cli(*args: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "qwen-vl-utils")  # the wheel's console script
    env = dict(os.environ, TMPDIR=tempfile.gettempdir())  # `demo` keeps its sample folder: put it in ours
    res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"qwen-vl-utils {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def check_cli(q, folder: str) -> None:
    step("qwen-vl-utils --version")
    assert run_cli("--version").split() == ["qwen-vl-utils", q.__version__]
    step("qwen-vl-utils demo")
    out = run_cli("demo", "--quiet")
    for text in ("demo: sample media", "Qwen3-VL timestamps", "visual tokens", "contact sheet"):
        assert text in out, f"`qwen-vl-utils demo` output lacks {text!r}:\n{out}"

    image = write_png(os.path.join(folder, "sample.png"), *IMAGE_SIZE)
    step("qwen-vl-utils inspect --json (path and http://127.0.0.1)")
    with http_server(folder) as base:
        by_path, by_url = json.loads(run_cli("inspect", "--json", "--quiet", image, f"{base}/sample.png"))
    rh, rw = q.smart_resize(IMAGE_SIZE[1], IMAGE_SIZE[0], factor=28)
    for r in (by_path, by_url):
        assert r["kind"] == "image" and r["format"] == "PNG", r
        assert (r["width"], r["height"]) == IMAGE_SIZE, r
        assert (r["resized_height"], r["resized_width"]) == (rh, rw), r
        assert r["tokens"] == (rh // 28) * (rw // 28) and rh % 28 == rw % 28 == 0, r
    assert {k: v for k, v in by_path.items() if k not in ("source", "seconds")} == {
        k: v for k, v in by_url.items() if k not in ("source", "seconds")
    }

    step("qwen-vl-utils inspect --json on a generated video (no torch: numpy frames, default backend)")
    video = write_video(os.path.join(folder, "clip.mp4"))
    (v,) = json.loads(run_cli("inspect", "--json", "--quiet", "--nframes", "4", video))
    assert v["kind"] == "video" and v["codec"] == "h264" and v["backend"] == "pyav", v
    assert (v["total_frames"], v["frames"], len(v["frames_indices"]), v["source_fps"]) == (48, 4, 4, 24), v
    assert "torch" not in sys.modules

    step("fetch_image through the Python API")
    img = q.fetch_image({"image": image})
    assert img.size == (rw, rh) and img.mode == "RGB", img


def check_video_without_torch(q, folder: str) -> None:
    step("fetch_video without torch: a typed error that names torch")
    video = os.path.join(folder, "clip.mp4")
    try:
        q.fetch_video({"video": video, "nframes": 4})
    except q.InvalidOptionError as exc:
        assert "torch" in str(exc), exc
    else:
        raise AssertionError("fetch_video returned a tensor without torch installed")
    assert "torch" not in sys.modules


def check_video_tensor(q, folder: str) -> None:
    import torch

    step("fetch_video -> torch tensor")
    video = write_video(os.path.join(folder, "clip.mp4"), frames=48, fps=24, width=192, height=108)
    frames, meta = q.fetch_video({"video": video, "nframes": 4}, return_video_metadata=True)
    assert isinstance(frames, torch.Tensor) and frames.dtype == torch.float32, type(frames)
    t, c, h, w = frames.shape
    assert (t, c) == (4, 3) and h % 28 == 0 and w % 28 == 0, frames.shape
    assert len(meta["frames_indices"]) == 4 and meta["total_num_frames"] == 48, meta
    assert abs(meta["fps"] - 24) < 1e-6, meta
    assert 0 <= float(frames.min()) <= float(frames.max()) <= 255 and float(frames.std()) > 0

    step("process_vision_info with an image and a video")
    image = write_png(os.path.join(folder, "sample.png"), *IMAGE_SIZE)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "video", "video": video, "nframes": 4},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    images, videos = q.process_vision_info(messages)
    assert len(images) == 1 and len(videos) == 1 and torch.equal(videos[0], frames), (images, videos)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="store_true", help="the torch extra is installed: check video tensors")
    parser.add_argument("--version", help="the version the installed distribution must have")
    args = parser.parse_args(argv)
    q = check_import(args.version, args.torch)
    with tempfile.TemporaryDirectory(prefix="qwen-vl-smoke-") as folder:
        tempfile.tempdir = folder  # everything the checks write (the CLI's demo folder too) goes in here
        if args.torch:
            check_video_tensor(q, folder)
        else:
            check_cli(q, folder)
            check_video_without_torch(q, folder)
    print(f"smoke: passed ({'torch extra' if args.torch else 'no extras'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
