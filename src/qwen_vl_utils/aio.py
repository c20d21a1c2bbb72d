"""The asyncio API: ``aprocess_vision_info``, ``afetch_image``, ``afetch_video``, ``acount_visual_tokens``.

Same arguments, results and typed errors as the synchronous functions, whose code they run: each stage of an
element (download, then decode) runs on a worker thread, so the event loop only ever awaits. Around that:

- **Backpressure.** Two process-wide limits, shared by every call from every event loop and thread: downloads
  in flight (``FetchPolicy.max_concurrent_downloads``, default 8 per usable core, at least 16) and decodes in
  flight (``max_concurrent_decodes``, default one per usable core). A stage waits for a slot before it starts,
  in arrival order, so 64 concurrent requests hold at most the limits' worth of media in memory, not 64.
  The limits are read from the process policy (``set_fetch_policy`` or ``QWENVL_*``), not from a call's
  ``policy=``, since they are shared.
- **Cancellation.** When the awaiting task is cancelled (``task.cancel()``, ``asyncio.timeout``, a client
  that went away), its work is cancelled with it: a download stops at once (its sockets are shut down, even
  mid-connect or waiting for headers), a decode stops at the next frame or image, temporary files are removed,
  and the slots are given back as soon as the worker thread has let go (milliseconds). Other requests are
  unaffected.
- **Any loop.** No state is tied to an event loop: slots are handed over with ``call_soon_threadsafe`` to
  whichever loop is waiting, so several loops (in sequence or in threads, uvloop included) share the limits.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

from . import _cancel
from ._errors import InvalidOptionError, OverloadedError, describe
from ._options import image_options, patch_factor, video_options
from ._slots import Lease, Slots
from ._util import usable_cpus
from .image import _image_source, load_image, resolve_image
from .sources._policy import FetchPolicy, get_fetch_policy
from .sources._resolve import Source, remote_host, resolve_source
from .video import fetch_video
from .vision_process import assemble, count_visual_tokens, split_elements

__all__ = [
    "OverloadedError",
    "acount_visual_tokens",
    "afetch_image",
    "afetch_video",
    "aprocess_vision_info",
    "stats",
]


def _resolve_image_value(value: Any, ele: dict, policy: FetchPolicy) -> Source:
    return resolve_image(ele, policy)


# --- process-wide lanes ------------------------------------------------------------------------------------------


def _download_capacity() -> int:
    n = get_fetch_policy().max_concurrent_downloads
    return n if n is not None else max(16, 8 * usable_cpus())


def _decode_capacity() -> int:
    n = get_fetch_policy().max_concurrent_decodes
    return n if n is not None else usable_cpus()


def _host_capacity() -> int:
    n = get_fetch_policy().max_concurrent_per_host
    return n if n is not None else 1 << 30


def _queue_bound() -> Optional[int]:
    return get_fetch_policy().max_queued


_HINT = " (or raise FetchPolicy.max_queued / QWENVL_MAX_QUEUED and the lane's max_concurrent_*)"


class _Hosts:
    """One :class:`Slots` per remote host while it has downloads in flight or waiting (then forgotten: a
    stream of distinct hosts leaves nothing behind)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lanes: dict = {}

    def lane(self, host: str) -> Slots:
        with self._lock:
            lane = self._lanes.get(host)
            if lane is None:
                lane = self._lanes[host] = Slots(f"downloads from {host}", _host_capacity, _queue_bound, _HINT)
                lane.users = 0
            lane.users += 1
            return lane

    def done(self, host: str, lane: Slots) -> None:
        with self._lock:
            lane.users -= 1
            if lane.users <= 0 and self._lanes.get(host) is lane:
                del self._lanes[host]

    def stats(self) -> dict:
        with self._lock:
            lanes = list(self._lanes.items())
        busiest = sorted(lanes, key=lambda kv: -(kv[1].in_use + kv[1].waiting))[:5]
        return {
            "active": len(lanes),
            "in_use": sum(lane.in_use for _, lane in lanes),
            "waiting": sum(lane.waiting for _, lane in lanes),
            "busiest": [{"host": h, "in_use": lane.in_use, "waiting": lane.waiting} for h, lane in busiest],
        }


_state_lock = threading.Lock()
_state: dict = {}


def _shared() -> dict:
    """The lanes and the worker threads, one set per process (a forked child makes its own)."""
    with _state_lock:
        if _state.get("pid") != os.getpid():
            _state.clear()
            _state.update(
                pid=os.getpid(),
                downloads=Slots("downloads", _download_capacity, _queue_bound, _HINT),
                decodes=Slots("decodes", _decode_capacity, _queue_bound, _HINT),
                hosts=_Hosts(),
                pool=ThreadPoolExecutor(max_workers=256, thread_name_prefix="qwen-vl-aio"),
            )
        return _state


def stats() -> dict:
    """Work in flight and waiting, process-wide: ``downloads`` and ``decodes`` in flight, ``waiting`` (all
    lanes), and per lane (``lanes``: ``downloads``, ``decodes``, ``hosts``) capacity, queue length, the oldest
    waiter's age and the queue waits of recent grants (median, p99, max), so an operator can see saturation."""
    s = _shared()
    hosts = s["hosts"].stats()
    return {
        "downloads": s["downloads"].in_use,
        "decodes": s["decodes"].in_use,
        "waiting": s["downloads"].waiting + s["decodes"].waiting + hosts["waiting"],
        "lanes": {"downloads": s["downloads"].stats(), "decodes": s["decodes"].stats(), "hosts": hosts},
    }


def _submit(token: _cancel.Token, func: Callable[..., Any], args: tuple, kwargs: dict, finish: list) -> Any:
    """``func`` on a worker thread under ``token``; then each of ``finish`` on that thread (closing a source
    after the decode that reads it, freeing a slot), or on another worker if the job never started."""
    pool = _shared()["pool"]

    def job() -> Any:
        if token.lease is not None:
            token.lease.owner = threading.get_ident()  # the thread that may lend the decode slot out
        try:
            with _cancel.scope(token):
                return func(*args, **kwargs)
        finally:
            _finish(finish)

    future = pool.submit(job)
    future.add_done_callback(lambda f: f.cancelled() and pool.submit(_finish, finish))
    return future


def _finish(callbacks: list) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # cleanup must not hide the result, nor stop the next cleanup
            continue


async def _await(future: Any, token: _cancel.Token) -> Any:
    """The worker's result; if the awaiting task is cancelled, its work is cancelled too (at once: the loop
    never waits for the worker to stop)."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        token.cancel()
        raise


async def _network_lanes(value: Any) -> list:
    """Take the lanes a remote value's download needs (its host's, then a download slot), in arrival order;
    returns what gives them back. Local and inline values take none: one slow host never delays them."""
    host = remote_host(value)
    if host is None:
        return []
    state = _shared()
    lane = state["hosts"].lane(host)
    held = [lambda: state["hosts"].done(host, lane)]
    try:
        await lane.acquire()
        held.insert(0, lane.release)
        await state["downloads"].acquire()
        held.insert(0, state["downloads"].release)
    except BaseException:
        _finish(held)
        raise
    return held


async def _run(func: Callable[..., Any], *args: Any, lanes_of: Any = None, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` on a worker thread, under the network lanes of ``lanes_of`` (a value)."""
    held = await _network_lanes(lanes_of)
    token = _cancel.Token()
    return await _await(_submit(token, func, args, kwargs, held), token)


async def _download(func: Callable[..., Any], value: Any, *args: Any) -> tuple:
    """Resolve a source (under its host's lane and a download slot if it is remote): returns it with what gives
    those back, still held. A medium downloaded but not yet decoded still counts against the download limit (so
    waiting media cannot pile up in memory)."""
    held = await _network_lanes(value)
    token = _cancel.Token()
    future = _submit(token, func, (value, *args), {}, [])
    try:
        return await _await(future, token), held
    except BaseException:
        future.add_done_callback(lambda f: _shared()["pool"].submit(_abandon, f, held))
        raise


def _abandon(future: Any, held: list) -> None:
    """A download nobody will decode: close what it produced, give its lanes back."""
    try:
        if not future.cancelled() and future.exception() is None and isinstance(future.result(), Source):
            future.result().close()
    finally:
        _finish(held)


async def _decode(source: Optional[Source], held: list, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Decode under a decode slot, taken before the download's lanes are given back. A source read by range
    keeps its lanes until the decode is done (it is still downloading); while the decode waits on the network
    its decode slot is lent out (:func:`qwen_vl_utils._cancel.network`). The source is closed on the worker
    thread once the decode has let go of it."""
    state = _shared()
    closing = [source.close] if source is not None else []
    try:
        await state["decodes"].acquire()
    except BaseException:
        state["pool"].submit(_finish, [*closing, *held])
        raise
    if source is None or source.ranged is None:
        _finish(held)
        held = []
    token = _cancel.Token()
    token.lease = Lease(state["decodes"])
    return await _await(_submit(token, func, args, kwargs, [*closing, token.lease.close, *held]), token)


async def _first_error(coros: list) -> list:
    """Run coroutines concurrently. The error raised is the synchronous API's: that of the earliest element (in
    the given order) that fails, so a failure cancels only the elements after it; on cancellation all go."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        while True:
            failed = [i for i, t in enumerate(tasks) if t.done() and not t.cancelled() and t.exception()]
            first = failed[0] if failed else len(tasks)
            for t in tasks[first + 1 :]:
                t.cancel()
            waiting = [t for t in tasks[:first] if not t.done()]
            if not waiting:
                break
            await asyncio.wait(waiting, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if first < len(tasks):
        await asyncio.gather(*tasks[first + 1 :], return_exceptions=True)
        raise tasks[first].exception()
    return [t.result() for t in tasks]


# --- the API -----------------------------------------------------------------------------------------------------


async def afetch_image(
    ele: dict[str, Any], image_patch_size: int = 14, *, policy: Optional[FetchPolicy] = None
) -> Any:
    """:func:`~qwen_vl_utils.fetch_image`, awaited: the download, then the decode, each under its limit."""
    factor = patch_factor(image_patch_size, policy)
    policy = get_fetch_policy(policy)
    options = image_options(ele)  # a bad option fails here, before any download
    source, held = await _download(_resolve_image_value, _image_source(ele), ele, policy)
    return await _decode(source, held, load_image, source, options, factor, policy)


async def afetch_video(
    ele: dict[str, Any],
    image_patch_size: int = 14,
    return_video_sample_fps: bool = False,
    return_video_metadata: bool = False,
    *,
    backend: Optional[str] = None,
    dtype: Any = None,
    policy: Optional[FetchPolicy] = None,
) -> Any:
    """:func:`~qwen_vl_utils.fetch_video`, awaited: the source is resolved (downloaded, or opened for ranged
    reads) under the download limit, then decoded under the decode limit."""
    if not isinstance(ele, dict) or "video" not in ele:
        raise InvalidOptionError(f"a video element must be a dict with a 'video' key, got {describe(ele)}")
    video_options(ele)  # a bad option fails here, before the download (fetch_video checks it again, unawaited)
    policy = get_fetch_policy(policy)
    value = ele["video"]
    args = (image_patch_size, return_video_sample_fps, return_video_metadata)
    kwargs = {"backend": backend, "dtype": dtype, "policy": policy}
    if isinstance(value, str) or (hasattr(value, "read") and not isinstance(value, (list, tuple))):
        source, held = await _download(resolve_source, value, "video", policy)
        return await _decode(source, held, fetch_video, {**ele, "video": source}, *args, **kwargs)
    # frames or an array: nothing to download first (frames given by URL are fetched with the slot lent out)
    return await _decode(None, [], fetch_video, ele, *args, **kwargs)


async def acount_visual_tokens(
    ele: dict[str, Any], image_patch_size: int = 14, *, policy: Optional[FetchPolicy] = None
) -> int:
    """:func:`~qwen_vl_utils.count_visual_tokens`, awaited (headers and the probe: under the download limit)."""
    value = None
    if isinstance(ele, dict):
        value = (
            ele.get("video")
            if "video" in ele
            else _image_source(ele)
            if "image" in ele or "image_url" in ele
            else None
        )
    return await _run(count_visual_tokens, ele, image_patch_size, policy=policy, lanes_of=value)


async def aprocess_vision_info(
    conversations: Union[list[dict[str, Any]], list[list[dict[str, Any]]]],
    return_video_kwargs: bool = False,
    return_video_metadata: bool = False,
    image_patch_size: int = 14,
    *,
    policy: Optional[FetchPolicy] = None,
    backend: Optional[str] = None,
) -> tuple:
    """:func:`~qwen_vl_utils.process_vision_info`, awaited: every element of the call concurrently, each stage
    under the process-wide limits. The result is the synchronous function's, element for element."""
    image_eles, video_eles = split_elements(conversations)
    policy = get_fetch_policy(policy)
    patch_factor(image_patch_size, policy)  # checked where it enters, media or none (NaN, 14.5)
    coros = [afetch_image(ele, image_patch_size, policy=policy) for ele in image_eles]
    coros += [
        afetch_video(
            ele,
            image_patch_size,
            return_video_sample_fps=True,
            return_video_metadata=return_video_metadata,
            backend=backend,
            policy=policy,
        )
        for ele in video_eles
    ]
    results = await _first_error(coros)
    return assemble(results[: len(image_eles)], results[len(image_eles) :], return_video_kwargs, return_video_metadata)
