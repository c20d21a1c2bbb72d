"""examples/server.py, started with uvicorn on 127.0.0.1 and sent real HTTP requests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

import qwen_vl_utils as q
from httpfiles import FileServer
from test_aio import at_rest
from test_remote import textured_video

from media import gradient, image_bytes, make_video

pytest.importorskip("starlette", reason="the example server needs starlette")
pytest.importorskip("uvicorn", reason="the example server needs uvicorn")
torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "server.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str, env: Optional[dict] = None) -> tuple:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", str(port), "--trusted", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    limit = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/stats", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > limit:
                raise RuntimeError(f"the example server did not start: {proc.stderr.read().decode()}") from None
            time.sleep(0.1)
    return proc, base


@pytest.fixture(scope="module")
def app():
    proc, base = _start()
    yield base
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def files():
    s = FileServer()
    yield s
    s.close()


def _post(base: str, payload: dict) -> tuple:
    req = urllib.request.Request(
        base + "/v1/vision", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _stats(base: str) -> dict:
    with urllib.request.urlopen(base + "/stats", timeout=5) as resp:
        return json.loads(resp.read())


def test_the_server_returns_what_the_library_computes(app, files, tmp_path):
    image = tmp_path / "a.png"
    gradient(300, 200).save(image)
    video = make_video(tmp_path / "v.mp4", frames=48)
    url = files.add("/b.png", image_bytes(gradient(120, 90), "PNG"))
    content = [
        {"type": "image", "image": str(image)},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "video", "video": str(video), "nframes": 4},
        {"type": "text", "text": "What happens?"},
    ]
    for patch in (14, 16):
        status, body = _post(app, {"messages": [{"role": "user", "content": content}], "image_patch_size": patch})
        assert status == 200, body
        images, videos = q.process_vision_info([{"role": "user", "content": content}], image_patch_size=patch)[:2]
        assert [i["size"] for i in body["images"]] == [list(im.size) for im in images]
        assert [i["tokens"] for i in body["images"]] == [q.count_visual_tokens(c, patch) for c in content[:2]]
        v = body["videos"][0]
        assert v["shape"] == list(videos[0].shape)
        assert v["tokens"] == q.count_visual_tokens(content[2], patch)
        _, meta = q.fetch_video(content[2], patch, return_video_metadata=True)
        assert v["metadata"]["frames_indices"] == meta["frames_indices"]


def test_errors_come_back_typed(app, tmp_path):
    status, body = _post(app, {"messages": [{"role": "user", "content": [{"image": str(tmp_path / "no.png")}]}]})
    assert status == 404 and body["error"] == "SourceNotFoundError"
    image = tmp_path / "a.png"
    gradient(64, 48).save(image)
    status, body = _post(app, {"messages": [{"role": "user", "content": [{"image": str(image), "max_pixels": -1}]}]})
    assert status == 400 and body["error"] == "InvalidOptionError" and "max_pixels" in body["message"]


def test_a_client_that_disconnects_stops_its_work(app, files, tmp_path):
    video = textured_video(tmp_path / "slow.mp4")
    url = files.add("/slow.mp4", video.read_bytes(), ranges=False, rate=30000)
    f = files.files["/slow.mp4"]
    payload = json.dumps({"messages": [{"role": "user", "content": [{"video": url}]}]}).encode()
    port = int(app.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(
        b"POST /v1/vision HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    limit = time.monotonic() + 20
    while f.sent < 20000:
        assert time.monotonic() < limit, "the download never started"
        time.sleep(0.05)
    assert _stats(app)["downloads"] == 1
    client.close()  # the client goes away mid-request
    limit = time.monotonic() + 2.0
    while not at_rest(_stats(app)):
        assert time.monotonic() < limit, _stats(app)
        time.sleep(0.05)
    sent = f.sent
    time.sleep(0.5)
    assert f.sent - sent < 64 << 10, "the server stopped downloading for the client that left"


def _raw(base: str, body: bytes, content_type: str = "application/json") -> tuple:
    req = urllib.request.Request(base + "/v1/vision", body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_malformed_requests_get_a_json_4xx_and_no_traceback(tmp_path):
    """Each of these was answered 500 with a traceback in the server's log."""
    image = tmp_path / "ok.png"
    gradient(64, 48).save(image)
    content = lambda *items: {"messages": [{"role": "user", "content": list(items)}]}  # noqa: E731
    proc, base = _start("--max-body", str(256 << 10))
    try:
        cases = [
            (b"not json", 400),
            (b"", 400),
            (b"[1, 2]", 422),
            (b'{"messages": "hi"}', 422),
            (json.dumps({**content({"image": str(image)}), "image_patch_size": "abc"}).encode(), 422),
            (json.dumps({**content({"image": str(image)}), "image_patch_size": 3000}).encode(), 400),
            (json.dumps(content({"image": str(tmp_path)})).encode(), 400),  # a directory
            (json.dumps(content({"image": "x" * (300 << 10)})).encode(), 413),  # over --max-body
            (b"\xff\xfe{", 400),
            # found attacking from outside: 500s, the first two with a traceback
            (b"[" * 100_000 + b"]" * 100_000, 400),  # nested past the parser's recursion limit (the body's limit
            (json.dumps(content({"type": "image", "image": "\ud800"})).encode(), 400),  # a lone surrogate, echoed
            (b'{"messages": [1, 2]}', 400),
            (json.dumps(content({"type": "text", "text": "x"}))[:-1].encode() + b', "image_patch_size": NaN}', 400),
            (json.dumps(content({"type": "text", "text": "x"}))[:-1].encode() + b', "image_patch_size": 14.5}', 400),
        ]
        for body, status in cases:
            code, answer = _raw(base, body)
            assert code == status and {"error", "message"} <= set(answer), (body[:60], code, answer)
        code, answer = _raw(base, json.dumps({**content({"image": str(image)}), "image_patch_size": None}).encode())
        assert code == 200 and answer["images"][0]["size"], answer  # null: the default patch size
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"Traceback" not in err, err.decode()


def test_an_overloaded_server_answers_503_with_retry_after():
    """Every download slot for a host that never answers is taken and its queue is full: the next request is
    refused at once with 503 (the library's OverloadedError), not queued behind them."""
    from test_endpoint import SilentServer

    silent = SilentServer()
    env = {"QWENVL_MAX_CONCURRENT_PER_HOST": "1", "QWENVL_MAX_QUEUED": "0", "QWENVL_IMAGE_DEADLINE": "60"}
    proc, base = _start(env=env)
    stuck = threading.Thread(
        target=_post, args=(base, {"messages": [{"role": "user", "content": [{"image": silent.url}]}]}), daemon=True
    )
    try:
        stuck.start()
        limit = time.monotonic() + 30
        while silent.accepted < 1:
            assert time.monotonic() < limit, "the first request never reached the silent host"
            time.sleep(0.05)
        req = urllib.request.Request(
            base + "/v1/vision",
            json.dumps({"messages": [{"role": "user", "content": [{"image": silent.url}]}]}).encode(),
            {"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        body = json.loads(refused.value.read())
        assert body["error"] == "OverloadedError" and "retry later" in body["message"]
    finally:
        silent.close()  # the stuck request fails now, so the server can shut down
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err, err.decode()


def test_every_public_error_has_its_own_status():
    """The example's STATUS table names every public error class (or its nearest public base), so none falls
    through to the generic 400 by accident."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_server", EXAMPLE)
    server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server)
    errors = [
        getattr(q, n)
        for n in q.__all__
        if isinstance(getattr(q, n), type) and issubclass(getattr(q, n), q.QwenVLError)
    ]
    for kind in errors:
        if kind is q.QwenVLError:
            continue
        first = next(k for k in server.STATUS if issubclass(kind, k))
        assert first is not q.QwenVLError, f"{kind.__name__} falls through to the generic status"
    assert server.STATUS[q.OverloadedError] == 503
