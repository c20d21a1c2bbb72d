"""Shared fixtures: generated media, the backend matrix, and an HTTP server on 127.0.0.1.

Set ``QWENVL_REQUIRE_BACKENDS=1`` (CI does) to turn a missing optional backend from a skip into a failure.
"""

from __future__ import annotations

import http.server
import importlib
import os
import sys
import threading
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


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if REQUIRE:
        missing = [name for name, module in BACKEND_MODULES.items() if _loads(module) is not None]
        if missing:
            raise pytest.UsageError(f"QWENVL_REQUIRE_BACKENDS is set and these backends do not load: {missing}")


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
