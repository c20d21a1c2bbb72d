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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

from . import _cancel
from ._errors import InvalidOptionError, describe
from ._options import image_options, patch_factor, video_options
from ._util import usable_cpus
from .image import load_image, resolve_image
from .sources._policy import FetchPolicy, get_fetch_policy
from .sources._resolve import Source, resolve_source
from .video import fetch_video
from .vision_process import assemble, count_visual_tokens, split_elements

__all__ = ["acount_visual_tokens", "afetch_image", "afetch_video", "aprocess_vision_info", "stats"]


# --- process-wide slots ------------------------------------------------------------------------------------------


class Slots:
    """A FIFO counting semaphore usable from any event loop and any thread."""

    def __init__(self, name: str, capacity: Callable[[], int]) -> None:
        self.name = name
        self._capacity = capacity
        self._lock = threading.Lock()
        self._used = 0
        self._waiters: deque = deque()  # (loop, future), first come first served

    @property
    def in_use(self) -> int:
        return self._used

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._used < max(1, self._capacity()) and not self._waiters:
                self._used += 1
                return
            waiter = (loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiters:  # never granted
                    self._waiters.remove(waiter)
                    raise
            if waiter[1].done() and not waiter[1].cancelled():  # granted as we were cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter (on its own loop), or to the pool."""
        with self._lock:
            while self._waiters:
                loop, fut = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(self._grant, fut)
                    return
                except RuntimeError:  # that loop is closed: its waiter is gone
                    continue
            self._used -= 1

    def _grant(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self.release()
        else:
            fut.set_result(None)


def _download_capacity() -> int:
    n = get_fetch_policy().max_concurrent_downloads
    return n if n is not None else max(16, 8 * usable_cpus())


def _decode_capacity() -> int:
    n = get_fetch_policy().max_concurrent_decodes
    return n if n is not None else usable_cpus()


_state_lock = threading.Lock()
_state: dict = {}


def _shared() -> dict:
    """The slots and the worker threads, one set per process (a forked child makes its own)."""
    with _state_lock:
        if _state.get("pid") != os.getpid():
            _state.clear()
            _state.update(
                pid=os.getpid(),
                downloads=Slots("downloads", _download_capacity),
                decodes=Slots("decodes", _decode_capacity),
                pool=ThreadPoolExecutor(max_workers=256, thread_name_prefix="qwen-vl-aio"),
            )
        return _state


def stats() -> dict:
    """Work in flight and waiting, process-wide: ``{"downloads", "decodes", "waiting"}``."""
    s = _shared()
    return {
        "downloads": s["downloads"].in_use,
        "decodes": s["decodes"].in_use,
        "waiting": s["downloads"].waiting + s["decodes"].waiting,
    }


def _submit(token: _cancel.Token, func: Callable[..., Any], args: tuple, kwargs: dict, finish: list) -> Any:
    """``func`` on a worker thread under ``token``; then each of ``finish`` on that thread (closing a source
    after the decode that reads it, freeing a slot), or on another worker if the job never started."""
    pool = _shared()["pool"]

    def job() -> Any:
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


async def _run(slots_name: str, func: Callable[..., Any], *args: Any, finish: tuple = (), **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` on a worker thread under one slot, freed once the thread has let go."""
    slots: Slots = _shared()[slots_name]
    await slots.acquire()
    token = _cancel.Token()
    return await _await(_submit(token, func, args, kwargs, [*finish, slots.release]), token)


async def _download(func: Callable[..., Any], *args: Any) -> Source:
    """Resolve a source under a download slot, which stays held when this returns: a medium downloaded but not
    yet decoded still counts against the download limit (so waiting media cannot pile up in memory)."""
    downloads: Slots = _shared()["downloads"]
    await downloads.acquire()
    token = _cancel.Token()
    future = _submit(token, func, args, {}, [])
    try:
        return await _await(future, token)
    except BaseException:
        future.add_done_callback(lambda f: _shared()["pool"].submit(_abandon, f, downloads))
        raise


def _abandon(future: Any, downloads: Slots) -> None:
    """A download nobody will decode: close what it produced, free its slot."""
    try:
        if not future.cancelled() and future.exception() is None and isinstance(future.result(), Source):
            future.result().close()
    finally:
        downloads.release()


async def _decode(source: Source, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Decode a downloaded source under a decode slot (taken before the download slot is given back); the
    source is closed on the worker thread once the decode has let go of it."""
    state = _shared()
    try:
        await state["decodes"].acquire()
    except BaseException:
        state["pool"].submit(_finish, [source.close])
        raise
    finally:
        state["downloads"].release()
    token = _cancel.Token()
    return await _await(_submit(token, func, args, kwargs, [source.close, state["decodes"].release]), token)


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
    source = await _download(resolve_image, ele, policy)
    return await _decode(source, load_image, source, options, factor, policy)


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
        source = await _download(resolve_source, value, "video", policy)
        return await _decode(source, fetch_video, {**ele, "video": source}, *args, **kwargs)
    return await _run("decodes", fetch_video, ele, *args, **kwargs)  # frames or an array: nothing to download


async def acount_visual_tokens(
    ele: dict[str, Any], image_patch_size: int = 14, *, policy: Optional[FetchPolicy] = None
) -> int:
    """:func:`~qwen_vl_utils.count_visual_tokens`, awaited (headers and the probe: under the download limit)."""
    return await _run("downloads", count_visual_tokens, ele, image_patch_size, policy=policy)


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
