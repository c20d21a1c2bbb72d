"""Engines: where the per-sample work runs. Both give result batches in input order.

- ``local``: a process pool over the usable cores, fed bounded batches from the streaming reader (at most
  ``4 x workers`` batches in flight, so memory does not grow with the file).
- ``ray``: Ray Data over a cluster: the JSONL is cut into line ranges (one pass over the file, no parsing),
  each range is read on a worker (``flat_map``), the counting function runs with ``map_batches``, and the
  results stream back to this process in input order (``preserve_order``), which writes them.

A worker process that dies (a segmentation fault in a decoder, the out-of-memory killer) costs only the sample
it was working on: the local engine re-runs the batches the broken pool lost one record at a time in fresh
workers, and reports the record whose worker died as ``crashed``; on Ray, each worker runs the batches in a
child process of its own, and does the same when that child dies (a Ray task whose worker dies is retried
without end, so one crashing record would otherwise stall the run).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from typing import Any, Iterator, Optional

from .._errors import InvalidOptionError, describe
from .._util import usable_cpus
from ._records import RawRecord, jsonl_chunks, read_jsonl_chunk
from ._samples import Problem, Settings, parse_sample
from ._work import _problem_line, process_batch

__all__ = ["BATCH", "isolate", "local_engine", "ray_engine"]

#: records per task: large enough to amortise a task's overhead, small enough to keep the workers busy
BATCH = 32
#: JSONL lines per Ray read task
RAY_CHUNK_LINES = 512

Batches = Iterator[list]


def _batched(records: Iterator[RawRecord], size: int) -> Iterator[list]:
    it = iter(records)
    while True:
        batch = [(r.index, r.raw, r.error) for r in itertools.islice(it, size)]
        if not batch:
            return
        yield batch


def local_engine(records: Iterator[RawRecord], settings: Settings, mode: str, jobs: Optional[int] = None) -> Batches:
    """Result batches from a process pool of ``jobs`` workers (default: the usable cores, at least one worker
    process; ``jobs=1``: in this process, where a crash ends the run)."""
    batches = _batched(records, BATCH)
    if jobs is not None and jobs <= 1:
        for batch in batches:
            yield process_batch(batch, settings, mode)
        return
    yield from _pooled(batches, settings, mode, jobs or usable_cpus())


def _pooled(batches: Iterator[list], settings: Settings, mode: str, jobs: int) -> Batches:
    pool = None
    pending: deque = deque()  # (batch, future), in input order
    try:
        for batch in batches:
            if pool is None:
                # spawn: a fresh interpreter per worker, safe whatever threads this process runs (fork is not)
                pool = ProcessPoolExecutor(jobs, mp_context=_SPAWN, initializer=exit_with_parent)
            pending.append((batch, _submit(pool, batch, settings, mode)))
            while len(pending) >= 4 * jobs or (pending and pending[0][1].done()):
                if (yield from _collect(pending, pool, settings, mode, jobs)):
                    pool = None
        while pending:
            yield from _collect(pending, pool, settings, mode, jobs)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def exit_with_parent() -> None:
    """In a pool worker: exit when the parent process dies (a ``kill -9`` of the CLI would otherwise leave the
    workers waiting forever on their task queue, which they hold both ends of)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the driver handles it alone
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's sentinel closes: the parent is gone
        os._exit(1)

    threading.Thread(target=watch, name="qwen-vl-parent-watch", daemon=True).start()


def _submit(pool: ProcessPoolExecutor, batch: list, settings: Settings, mode: str) -> Future:
    try:
        return pool.submit(process_batch, batch, settings, mode)
    except BrokenProcessPool as exc:  # a worker died since the last look: this batch is lost with the others
        lost: Future = Future()
        lost.set_exception(exc)
        return lost


def _collect(pending: deque, pool: ProcessPoolExecutor, settings: Settings, mode: str, jobs: int) -> Any:
    """Yield the oldest batch's result. When a worker died, the pool is broken: shut it down and yield the
    result of every pending batch, re-running the ones it lost record by record. Returns whether it broke."""
    batch, future = pending.popleft()
    try:
        result = future.result()
    except BrokenProcessPool:
        pass
    else:
        yield result
        return False
    pool.shutdown(wait=True)  # once its manager thread has ended, every future is settled
    lost = [(batch, future), *pending]
    pending.clear()
    redone = iter(isolate([b for b, f in lost if not _succeeded(f)], settings, mode, jobs))
    for _, f in lost:
        yield f.result() if _succeeded(f) else next(redone)
    return True


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


# --- crash isolation -----------------------------------------------------------------------------------------

_SPAWN = multiprocessing.get_context("spawn")
_READY = (None, None)


class WorkerDied(Exception):
    """A worker process ended while it held a request; the message says how (signal or exit code)."""


class _Worker:
    """A spawned process that runs ``process_batch`` requests one at a time (:func:`_serve`)."""

    def __init__(self) -> None:
        self.conn, child = _SPAWN.Pipe()
        self.process = _SPAWN.Process(target=_serve, args=(child,), name="qwen-vl-utils dataset", daemon=True)
        self.process.start()
        child.close()  # this end lives in the worker only: its death reads as EOF here
        self.started = False

    def submit(self, records: list, settings: Settings, mode: str) -> None:
        try:
            self.conn.send((records, settings, mode))
        except OSError:
            raise self._died() from None

    def receive(self) -> Optional[list]:
        """The next reply: the request's results, or None for the worker's start-up message."""
        try:
            ok, value = self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if ok is None:
            self.started = True
            return None
        if not ok:
            raise value  # process_batch raised it in the worker
        return value

    def call(self, records: list, settings: Settings, mode: str) -> list:
        self.submit(records, settings, mode)
        reply = self.receive()
        return reply if reply is not None else self.receive()

    def _died(self) -> Exception:
        how = self._ended()
        if self.started:
            return WorkerDied(how)
        return InvalidOptionError(  # every record would "crash": stop instead
            f"a dataset worker process ended as it started ({how}): check that "
            "`python -c 'import qwen_vl_utils.dataset'` works, or run in this process with --jobs 1"
        )

    def _ended(self) -> str:
        self.process.join(5)  # its end of the pipe is closed: it is exiting, or gone
        code = self.process.exitcode
        self.close(now=True)
        if code is None:
            return "it stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}, signal {-code}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def close(self, now: bool = False) -> None:
        """Stop the worker: ``now`` terminates it (it may be running a request), else it ends its loop."""
        if self.conn.closed:
            return
        if not now:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.conn.close()
        if now and self.process.is_alive():
            self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process.close()


def _serve(conn: Any) -> None:
    """A worker's loop: answer each ``(records, settings, mode)`` with process_batch's result, until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops its workers
    conn.send(_READY)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        try:
            reply = (True, process_batch(*request))
        except Exception as exc:
            reply = (False, exc)
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            return
        except Exception as exc:  # an exception that does not pickle
            conn.send((False, RuntimeError(f"{reply[1]!r} (and it could not be sent back: {exc})")))


def isolate(batches: list, settings: Settings, mode: str, jobs: int) -> list:
    """The results of ``batches`` with each record run alone, one at a time per worker, in up to ``jobs`` fresh
    worker processes: a record whose worker dies is reported ``crashed`` and a new worker takes over."""
    records = [r for b in batches for r in b]
    results: list = [None] * len(records)
    todo = deque(range(len(records)))
    idle: list = []
    busy: dict = {}  # connection -> (worker, position of the record it runs)
    try:
        while todo or busy:
            while todo and len(busy) < jobs:
                worker = idle.pop() if idle else _Worker()
                pos = todo.popleft()
                try:
                    worker.submit([records[pos]], settings, mode)
                except WorkerDied:  # it died idle: not this record's doing
                    todo.appendleft(pos)
                    continue
                busy[worker.conn] = (worker, pos)
            for conn in wait(list(busy)):
                worker, pos = busy[conn]
                try:
                    reply = worker.receive()
                except WorkerDied as died:
                    del busy[conn]
                    results[pos] = crashed(records[pos], settings, str(died))
                    continue
                if reply is not None:
                    del busy[conn]
                    results[pos] = reply[0]
                    idle.append(worker)
    finally:
        for worker in idle:
            worker.close()
        for worker, _ in busy.values():
            worker.close(now=True)
    out = iter(results)
    return [[next(out) for _ in b] for b in batches]


def crashed(record: tuple, settings: Settings, how: str) -> tuple:
    """The ``crashed`` problem result of a record whose worker died (``how``: the signal or exit code)."""
    index, raw, _ = record
    message = (
        f"sample {index}{_media_names(raw, settings)}: the worker process checking it died ({how}), a crash in "
        "a decoder or native library or the out-of-memory killer; it is left out and the run goes on"
    )
    line = _problem_line(index, [Problem("crashed", message)])
    return index, "problem", json.dumps(line, ensure_ascii=False)


def _media_names(raw: Optional[bytes], settings: Settings, most: int = 3) -> str:
    from ..image import _image_source

    try:
        media = parse_sample(raw, settings).media
        sources = [_image_source(ele) if kind == "image" else ele.get("video") for kind, ele in media]
    except Exception:
        return ""
    names = [f"{len(s)} frames from {describe(s[0])}" if isinstance(s, list) and s else describe(s) for s in sources]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f" ({', '.join(names[:most])}{more})" if names else ""


# --- Ray -----------------------------------------------------------------------------------------------------


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise InvalidOptionError(
            "--engine ray needs Ray Data: pip install 'qwen-vl-utils[ray]' (or pip install 'ray[data]')"
        ) from exc
    return ray


def _read_chunk(row: dict, path: str) -> list:
    return [{"index": i, "raw": raw} for i, raw in read_jsonl_chunk(path, row["first"], row["offset"], row["lines"])]


_SANDBOX: list = []  # the worker this process keeps for run_sandboxed
_SANDBOX_LOCK = threading.Lock()


def run_sandboxed(records: list, settings: Settings, mode: str) -> list:
    """``process_batch`` in a child process that this process keeps, so that a crash costs the sample, not this
    (Ray worker) process: the batch is then re-run record by record."""
    with _SANDBOX_LOCK:
        worker = _SANDBOX.pop() if _SANDBOX else _Worker()
        try:
            result = worker.call(records, settings, mode)
        except WorkerDied:
            return isolate([records], settings, mode, 1)[0]
        except BaseException:
            worker.close(now=True)
            raise
        _SANDBOX.append(worker)
        return result


def _count_batch(batch: dict, settings: Settings, mode: str) -> dict:
    import numpy as np

    records = [(int(i), bytes(raw), None) for i, raw in zip(batch["index"], batch["raw"])]
    out = run_sandboxed(records, settings, mode)
    return {
        "index": np.array([r[0] for r in out], dtype=np.int64),
        "kind": np.array([r[1] for r in out], dtype=object),
        "line": np.array([r[2] for r in out], dtype=object),
    }


def ray_engine(
    path: str,
    start: int,
    settings: Settings,
    mode: str,
    address: Optional[str] = None,
) -> Batches:
    """Result batches from Ray Data. Uses the running Ray instance if there is one, else ``ray.init(address)``
    (``None``: ``RAY_ADDRESS`` or a new local instance; ``"auto"``: the cluster this machine belongs to)."""
    ray = import_ray()
    if not ray.is_initialized():
        client = bool(address) and address.startswith("ray://")  # Ray Client takes no local-instance options
        ray.init(address=address, log_to_driver=False, **({} if client else {"include_dashboard": False}))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    chunks = [{"first": a, "offset": b, "lines": n} for a, b, n in jsonl_chunks(path, start, RAY_CHUNK_LINES)]
    if not chunks:
        return
    ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), 1000))
    ds = ds.flat_map(_read_chunk, fn_kwargs={"path": path})
    ds = ds.map_batches(
        _count_batch, batch_size=BATCH, batch_format="numpy", fn_kwargs={"settings": settings, "mode": mode}
    )
    for batch in ds.iter_batches(batch_size=BATCH * 4, batch_format="numpy"):
        yield [(int(i), str(k), str(line)) for i, k, line in zip(batch["index"], batch["kind"], batch["line"])]
