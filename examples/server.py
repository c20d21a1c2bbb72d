"""A minimal preprocessing server on Starlette: OpenAI-style chat messages in, what the model would get out.

    pip install 'qwen-vl-utils[torch]' starlette uvicorn
    python examples/server.py --port 8000
    curl -s localhost:8000/v1/vision -d '{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]}'

``POST /v1/vision`` takes ``{"messages": [...], "image_patch_size": 14 | 16}`` and answers with each image's and
video's shape, grid (as the Qwen processors compute it), visual tokens and, for videos, the Qwen3-VL metadata.
The work runs through ``aprocess_vision_info``: the event loop is never blocked, downloads and decodes are
limited process-wide, and a client that disconnects cancels its request's downloads and decodes at once.
``GET /stats`` shows the work in flight. Errors in the messages are answered with the library's typed error
(400 for bad input, 403 when the fetch policy refuses a source, 404 for missing media, 502 for remote failures,
413 for media over the limits).

A server that takes messages from strangers must not let them read its files or its network: the policy below
refuses local paths and private addresses unless ``--trusted`` is given (the tests pass it to use local media).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import qwen_vl_utils as q
from qwen_vl_utils import aio

STATUS = {
    q.InvalidOptionError: 400,
    q.DecodeError: 400,
    q.SourceNotAllowedError: 403,
    q.SourceNotFoundError: 404,
    q.SourceTooLargeError: 413,
    q.FetchTimeoutError: 504,
    q.NetworkError: 502,
}


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
    body = await request.json()
    patch = int(body.get("image_patch_size", 14))
    work = asyncio.ensure_future(
        q.aprocess_vision_info(
            body.get("messages"), return_video_kwargs=True, return_video_metadata=True, image_patch_size=patch
        )
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
    except q.QwenVLError as exc:
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status)
    return JSONResponse(summarize(images, videos, patch))


async def stats(request: Request) -> Response:
    return JSONResponse(aio.stats())


def make_app(trusted: bool = False) -> Starlette:
    if not trusted:
        q.set_fetch_policy(allow_local=False, block_private_networks=True)
    return Starlette(routes=[Route("/v1/vision", vision, methods=["POST"]), Route("/stats", stats)])


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="qwen-vl-utils preprocessing server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--trusted", action="store_true", help="allow local files and private addresses (tests only)")
    args = p.parse_args()
    uvicorn.run(make_app(args.trusted), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
