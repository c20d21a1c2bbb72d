"""A minimal preprocessing server on Starlette: OpenAI-style chat messages in, what the model would get out.

    pip install 'qwen-vl-utils[torch]' starlette uvicorn
    python examples/server.py --port 8000
    curl -s localhost:8000/v1/vision -d '{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]}'

``POST /v1/vision`` takes ``{"messages": [...], "image_patch_size": 14 | 16}`` and answers with each image's and
video's shape, grid (as the Qwen processors compute it), visual tokens and, for videos, the Qwen3-VL metadata.
The work runs through ``aprocess_vision_info``: the event loop is never blocked, downloads and decodes are
limited process-wide, and a client that disconnects cancels its request's downloads and decodes at once.
``GET /stats`` shows the work in flight. A malformed request (no body, not JSON, not an object, ``messages`` not
a list, ``image_patch_size`` not a number) is answered 400 or 422, a body over ``--max-body`` 413; errors in the
messages with the library's typed error (400 for bad input, 403 when the fetch policy refuses a source, 404 for
missing media, 413 for media over the limits, 502 for remote failures, 504 for timeouts). Every answer is JSON
``{"error", "message"}``; nothing is answered 500 with a traceback in the log.

A server that takes messages from strangers must not let them read its files or its network: the policy below
refuses local paths and private addresses unless ``--trusted`` is given (the tests pass it to use local media).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import qwen_vl_utils as q
from qwen_vl_utils import aio

#: every error the library raises, most specific first (the first that matches answers)
STATUS = {
    q.OverloadedError: 503,  # every slot busy and the queue full: the client should retry (Retry-After)
    q.InvalidOptionError: 400,
    q.DecodeError: 400,
    q.SourceNotAllowedError: 403,
    q.SourceNotFoundError: 404,
    q.SourceTooLargeError: 413,
    q.FetchTimeoutError: 504,
    q.NetworkError: 502,
    q.SourceError: 400,  # a directory, a FIFO, an unreadable file
    q.QwenVLError: 400,
}
MAX_BODY = 32 << 20  # data: URIs travel in the body; media by URL do not count
logger = logging.getLogger("qwen_vl_utils.server")


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, kind: str, message: str) -> JSONResponse:
    # a message quoting the request may hold what UTF-8 cannot encode (a lone surrogate, "\ud800"): escaped
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": kind, "message": message}, status_code=status)


async def _payload(request: Request, limit: int) -> tuple:
    """``(messages, image_patch_size)`` from the body, or BadRequest saying what is wrong with it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the body is {declared} bytes, over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"the body is over the limit of {limit} bytes")
    if not body.strip():
        raise BadRequest(400, 'the body is empty: send a JSON object {"messages": [...]}')
    try:
        payload = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError too
        raise BadRequest(400, f"the body is not JSON ({exc})") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser goes
        raise BadRequest(400, "the body is JSON nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest(422, f'the body must be a JSON object {{"messages": [...]}}, not a {type(payload).__name__}')
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(422, "'messages' must be a non-empty list of chat messages")
    patch = payload.get("image_patch_size")
    patch = 14 if patch is None else patch  # null: the default, as the library reads a None key
    if isinstance(patch, bool) or not isinstance(patch, (int, float)):
        raise BadRequest(422, f"image_patch_size must be 14 (Qwen2.5-VL) or 16 (Qwen3-VL), got {patch!r}")
    return messages, patch


def summarize(images: Any, videos: Any, patch: int) -> dict:
    """Shapes, grids (t, h, w in patches, as the processors compute them), tokens and video metadata."""
    merge = 2 * patch
    out: dict = {"images": [], "videos": []}
    for img in images or []:
        w, h = img.size
        out["images"].append(
            {"size": [w, h], "grid_thw": [1, h // patch, w // patch], "tokens": (h // merge) * (w // merge)}
        )
    for video in videos or []:
        tensor, meta = video if isinstance(video, tuple) else (video, None)
        t, _, h, w = tensor.shape
        item = {
            "shape": list(tensor.shape),
            "grid_thw": [-(-t // 2), h // patch, w // patch],
            "tokens": -(-t // 2) * (h // merge) * (w // merge),
        }
        if meta is not None:
            item["metadata"] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in meta.items()}
        out["videos"].append(item)
    return out


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


async def vision(request: Request) -> Response:
    try:
        messages, patch = await _payload(request, request.app.state.max_body)
    except BadRequest as exc:
        return _error(exc.status, "BadRequest", str(exc))
    work = asyncio.ensure_future(
        q.aprocess_vision_info(messages, return_video_kwargs=True, return_video_metadata=True, image_patch_size=patch)
    )
    watch = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:  # the client went away: its downloads and decodes stop now
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return Response(status_code=499)
    watch.cancel()
    try:
        images, videos, _kwargs = work.result()
        return JSONResponse(summarize(images, videos, int(patch)))
    except q.QwenVLError as exc:
        status = next(code for kind, code in STATUS.items() if isinstance(exc, kind))
        answer = _error(status, type(exc).__name__, str(exc))
        if status == 503:
            answer.headers["Retry-After"] = "1"
        return answer
    except Exception as exc:  # a defect: one log line and a JSON answer, never a traceback per request
        logger.error("internal error on /v1/vision: %s: %s", type(exc).__name__, exc)
        return _error(500, "InternalError", f"{type(exc).__name__}: {exc}")


async def stats(request: Request) -> Response:
    return JSONResponse(aio.stats())


def make_app(trusted: bool = False, max_body: int = MAX_BODY) -> Starlette:
    if not trusted:
        q.set_fetch_policy(allow_local=False, block_private_networks=True)
    app = Starlette(routes=[Route("/v1/vision", vision, methods=["POST"]), Route("/stats", stats)])
    app.state.max_body = max_body
    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="qwen-vl-utils preprocessing server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--trusted", action="store_true", help="allow local files and private addresses (tests only)")
    p.add_argument("--max-body", type=int, default=MAX_BODY, help="largest request body in bytes (413 over it)")
    args = p.parse_args()
    uvicorn.run(make_app(args.trusted, args.max_body), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
