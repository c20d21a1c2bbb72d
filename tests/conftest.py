"""Shared fixtures: generated media, the backend matrix, and an HTTP server on 127.0.0.1.

Set ``QWENVL_REQUIRE_BACKENDS=1`` (CI does) to turn a missing optional backend from a skip into a failure.
"""

from __future__ import annotations

import contextlib
import faulthandler
import http.server
import importlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from media import make_video

REQUIRE = os.environ.get("QWENVL_REQUIRE_BACKENDS", "").lower() in ("1", "true", "yes")


def _loads(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _backend_param(name: str, module: str) -> object:
    why = _loads(module)
    if why is None:
        return pytest.param(name, id=name)
    if REQUIRE:  # run it anyway: the test fails on the missing backend instead of skipping
        return pytest.param(name, id=name)
    return pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"{name} is not installed ({why})"))


BACKEND_MODULES = {"pyav": "av", "torchcodec": "torchcodec.decoders", "decord": "decord", "torchvision": "av"}
BACKENDS = [_backend_param(name, module) for name, module in BACKEND_MODULES.items()]
DECORD = _loads("decord") is None
TORCHCODEC = _loads("torchcodec.decoders") is None


#: what the other optional tests need; their tests skip without it, except under QWENVL_REQUIRE_BACKENDS
OPTIONAL_MODULES = {
    "torch (video tensors)": "torch",
    "transformers (the real-client tests)": "transformers.models.qwen3_vl.video_processing_qwen3_vl",
    "pillow-heif (HEIC images)": "pillow_heif",
    "fsspec and s3fs (object stores)": "s3fs",
    "boto3 and moto's server (the S3 tests)": "moto.server",
    "trustme (the HTTPS tests)": "trustme",
    "starlette and uvicorn (the example server)": "uvicorn",
    "starlette (the example server)": "starlette",
    "uvloop (the asyncio tests on uvloop)": "uvloop",
    "ray[data] (the Ray engine)": "ray.data",
    "tokenizers (text tokens)": "tokenizers",
    "binpacking (the packing comparison)": "binpacking",
    "matplotlib (dataset stats)": "matplotlib",
}


def missing_requirements() -> list:
    """Every backend and optional test dependency that does not import here, with the reason."""
    wanted = {**BACKEND_MODULES, **OPTIONAL_MODULES}
    return [f"{name} ({why})" for name, module in wanted.items() if (why := _loads(module)) is not None]


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if REQUIRE:
        missing = missing_requirements()
        if missing:
            raise pytest.UsageError(
                f"QWENVL_REQUIRE_BACKENDS is set and these do not load (their tests would skip): {missing}"
            )


class ExampleTimeout(BaseException):
    """An example ran past its time bound. Not an Exception: no ``except Exception`` in the library swallows it."""


@contextlib.contextmanager
def time_bound(seconds: float):
    """Fail the block if it takes longer than ``seconds`` (a hang or a pathological slowdown): a timer signal
    interrupts it where Python runs or waits, the elapsed time is checked when it returns, and a hang inside C
    code that never returns ends the whole run with every thread's traceback at 3x the bound plus 10 s."""
    start = time.monotonic()
    timer = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def expire(signum: int, frame: object) -> None:
        raise ExampleTimeout(f"still running after the {seconds:g} s bound")

    if timer:
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 3 + 10, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - start
    if elapsed > seconds:
        raise ExampleTimeout(f"took {elapsed:.2f} s, over the {seconds:g} s bound")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def h264(media_dir: Path) -> Path:
    """H.264 with B-frames, 48 frames at 24 fps, 160x96."""
    return make_video(media_dir / "h264.mp4")


class _Handler(http.server.SimpleHTTPRequestHandler):
    routes: ClassVar[dict] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404, "not found")
            return
        route(self)


class Server:
    """A real HTTP server on 127.0.0.1; ``add(path, handler)`` or ``add_bytes(path, data)``."""

    def __init__(self) -> None:
        handler = type("Handler", (_Handler,), {"routes": {}})
        self.routes = handler.routes
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, handler: object) -> str:
        self.routes[path] = handler
        return self.url(path)

    def add_bytes(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        def send(req: http.server.BaseHTTPRequestHandler) -> None:
            req.send_response(200)
            req.send_header("Content-Type", content_type)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)

        return self.add(path, send)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def server() -> Server:
    s = Server()
    yield s
    s.close()
