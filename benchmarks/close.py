"""How promptly a stream lets go: ``python benchmarks/close.py [--reps 20]``.

A ``stream_video`` over a file, a pipe and an HTTP body (no ranges) is stopped after its first chunk, by
``close()``, by ``break`` inside ``with``, and by dropping it (``del`` and ``gc.collect()``); the time until the
call returns, with every thread of the stream joined. ``gc.collect()`` alone is timed too, since the third way
includes it. Writes results-close.{md,json} next to this file.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from suite import describe_machine, save_results  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()

    import qwen_vl_utils as q
    from httpfiles import FileServer
    from test_stream import noisy_numbered, pipe_fed

    from media import make_video

    folder = os.path.join(HERE, "media")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "close_320x180.ts")
    if not os.path.exists(path):
        make_video(
            __import__("pathlib").Path(path),
            frames=120,
            width=320,
            height=180,
            container="mpegts",
            pattern=noisy_numbered,
        )
    with open(path, "rb") as fh:
        data = fh.read()
    web = FileServer()
    url = web.add("/close.ts", data, ranges=False)
    rows = []
    bare = []
    for kind in ("file", "pipe", "http"):
        for how in ("close", "break", "garbage"):
            times = []
            for _ in range(args.reps):
                release, f = threading.Event(), None
                if kind == "pipe":
                    f, writer, _ = pipe_fed(data, stall=release, pace=0.002)
                stream = q.stream_video({"video": {"file": path, "pipe": f, "http": url}[kind]})
                next(stream)
                t = time.perf_counter()
                if how == "close":
                    stream.close()
                elif how == "break":  # timed from the break (not from waiting for the next chunk)
                    with stream:
                        for _ in stream:
                            t = time.perf_counter()
                            break
                else:
                    del stream
                    gc.collect()
                times.append(time.perf_counter() - t)
                release.set()
                if f is not None:
                    f.close()
                    writer.join(5)
                t = time.perf_counter()
                gc.collect()
                bare.append(time.perf_counter() - t)
            times.sort()
            rows.append(
                {
                    "source": kind,
                    "how": how,
                    "median_ms": 1000 * statistics.median(times),
                    "max_ms": 1000 * times[-1],
                    "reps": len(times),
                }
            )
    web.close()
    results = {"machine": describe_machine(), "rows": rows, "gc_collect_median_ms": 1000 * statistics.median(bare)}
    lines = [
        "### closing a stream after its first chunk",
        "",
        f"Time until the call returns with every thread of the stream joined ({args.reps} runs each).",
        "",
        "| source | stopped by | median ms | max ms |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['source']} | {r['how']} | {r['median_ms']:.1f} | {r['max_ms']:.1f} |" for r in rows]
    lines += [
        "",
        f"`gc.collect()` alone: {results['gc_collect_median_ms']:.1f} ms (median), included in 'garbage'.",
        "",
    ]
    save_results("results-close", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
