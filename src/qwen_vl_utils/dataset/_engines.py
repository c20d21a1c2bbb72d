"""Engines: where the per-sample work runs. Both give result batches in input order.

- ``local``: a process pool over the usable cores, fed bounded batches from the streaming reader (at most
  ``4 x workers`` batches in flight, so memory does not grow with the file).
- ``ray``: Ray Data over a cluster: the JSONL is cut into line ranges (one pass over the file, no parsing),
  each range is read on a worker (``flat_map``), the counting function runs with ``map_batches``, and the
  results stream back to this process in input order (``preserve_order``), which writes them.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator, Optional

from .._errors import InvalidOptionError
from .._util import usable_cpus
from ._records import RawRecord, jsonl_chunks, read_jsonl_chunk
from ._samples import Settings
from ._work import process_batch

__all__ = ["BATCH", "local_engine", "ray_engine"]

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
    """Result batches from a process pool of ``jobs`` workers (default: the usable cores; 1: in this process)."""
    jobs = usable_cpus() if jobs is None else jobs
    batches = _batched(records, BATCH)
    if jobs <= 1:
        for batch in batches:
            yield process_batch(batch, settings, mode)
        return
    # spawn: a fresh interpreter per worker, safe whatever threads this process runs (fork is not)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    pending: deque = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(process_batch, batch, settings, mode))
            while len(pending) >= 4 * jobs or (pending and pending[0].done()):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def _count_batch(batch: dict, settings: Settings, mode: str) -> dict:
    import numpy as np

    records = [(int(i), bytes(raw), None) for i, raw in zip(batch["index"], batch["raw"])]
    out = process_batch(records, settings, mode)
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
    on_total: Optional[Callable[[int], None]] = None,
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
    if on_total is not None:
        on_total(sum(c["lines"] for c in chunks))
    if not chunks:
        return
    ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), 1000))
    ds = ds.flat_map(_read_chunk, fn_kwargs={"path": path})
    ds = ds.map_batches(
        _count_batch, batch_size=BATCH, batch_format="numpy", fn_kwargs={"settings": settings, "mode": mode}
    )
    for batch in ds.iter_batches(batch_size=BATCH * 4, batch_format="numpy"):
        yield [(int(i), str(k), str(line)) for i, k, line in zip(batch["index"], batch["kind"], batch["line"])]
