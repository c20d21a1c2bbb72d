"""The remote case: ``python benchmarks/remote.py [--reps N] [--seconds 600]``.

A 10-minute 720p H.264 video (B-frames, a keyframe every 2 s, ``moov`` at the end) is served by a loopback HTTP
server rate-limited to 400 Mbit/s that counts the bytes it sends (tests/httpfiles.py). Each candidate samples 16
frames with ``nframes`` in a fresh process (benchmarks/worker.py), runs alternating; the table reports median
time, bytes transferred and peak RSS:

- ours on a server with range support (the new path: only what the plan needs is transferred);
- qwen-vl-utils 0.0.14 (from benchmarks/.venv-0014) on the same server, each of its backends (they hand the
  URL to FFmpeg);
- ours on a server without range support (the fallback: a streamed download, then the decode), against the
  library before this change on the same server ("before": a git worktree of ``--before`` installed in
  benchmarks/.venv-before), which must be no slower.

Writes results-remote.{md,json} next to this file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from httpfiles import FileServer  # noqa: E402

from suite import describe_machine, make_long_video, run_worker, save_results  # noqa: E402

RATE = 400e6 / 8  # 400 Mbit/s
VENV_0014 = os.path.join(HERE, ".venv-0014", "bin", "python")
VENV_BEFORE = os.path.join(HERE, ".venv-before")


def setup_before(rev: str) -> str:
    """A virtualenv (seeing this environment's packages) with the library as of ``rev`` installed."""
    python = os.path.join(VENV_BEFORE, "bin", "python")
    tree = os.path.join(HERE, ".before-tree")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", VENV_BEFORE], check=True)
    if os.path.exists(tree):
        subprocess.run(["git", "worktree", "remove", "--force", tree], check=False, cwd=HERE)
    subprocess.run(["git", "worktree", "add", "--detach", tree, rev], check=True, cwd=HERE, capture_output=True)
    try:
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", tree], check=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], check=False, cwd=HERE)
    return python


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--nframes", type=int, default=16)
    p.add_argument("--before", default="8f5939b", help="the git revision whose remote path is 'before'")
    p.add_argument("--media", default=os.path.join(HERE, "media"))
    args = p.parse_args(argv)
    os.makedirs(args.media, exist_ok=True)
    path = make_long_video(
        os.path.join(args.media, f"remote_720p_{args.seconds}s.mp4"), seconds=args.seconds, width=1280, height=720
    )
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read()
    server = FileServer()
    ranged = server.add("/ranged.mp4", data, rate=RATE)
    whole = server.add("/whole.mp4", data, rate=RATE, ranges=False)
    before = setup_before(args.before)
    cands = [("ours, ranges", sys.executable, ranged, "pyav")]
    if os.path.exists(VENV_0014):
        cands += [(f"0.0.14 {b}, ranges", VENV_0014, ranged, b) for b in ("torchcodec", "decord")]
    cands += [("ours, no ranges", sys.executable, whole, "pyav"), ("before, no ranges", before, whole, "pyav")]
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{path}: {size / 1e6:.0f} MB, served at {RATE * 8 / 1e6:.0f} Mbit/s")
    rows = {label: {"times": [], "bytes": [], "rss": [], "error": None} for label, *_ in cands}
    first = {}
    for rep in range(args.reps + 1):  # the first round is the agreement check (and warms the page cache)
        for label, python, url, backend in cands:
            if rows[label]["error"]:
                continue
            f = server.files["/ranged.mp4" if url == ranged else "/whole.mp4"]
            f.sent = 0
            spec = {"case": "video", "files": [url], "patch": 14, "ele": {"nframes": args.nframes}, "backend": backend}
            r = run_worker(python, spec, timeout=1800)
            if "error" in r:
                rows[label]["error"] = r["error"]
                log(f"  {label}: {r['error']}")
                continue
            if rep == 0:
                first[label] = r
                continue
            rows[label]["times"].append(r["seconds"])
            rows[label]["bytes"].append(f.sent)
            rows[label]["rss"].append(r["peak_rss_mb"])
            log(f"  {label}: {r['seconds']:.2f} s, {f.sent / 1e6:.1f} MB sent")
    server.close()
    ref = first.get("ours, ranges", {})
    results = {"machine": describe_machine(), "file_bytes": size, "nframes": args.nframes, "rows": []}
    for label, *_ in cands:
        row = rows[label]
        got = first.get(label, {})
        same = ref and got and got.get("indices") == ref.get("indices") and got.get("shapes") == ref.get("shapes")
        diff = max((abs(a - b) for a, b in zip(ref.get("summary", []), got.get("summary", []))), default=None)
        results["rows"].append(
            {
                "label": label,
                "median_s": statistics.median(row["times"]) if row["times"] else None,
                "bytes": statistics.median(row["bytes"]) if row["bytes"] else None,
                "peak_rss_mb": max(row["rss"]) if row["rss"] else None,
                "runs": len(row["times"]),
                "output": row["error"] or ("same" if same and diff is not None and diff <= 1.0 else "differs"),
            }
        )
    save_results("results-remote", results, to_markdown(results))
    return 0


def to_markdown(results: dict) -> str:
    size = results["file_bytes"]
    rows = {r["label"]: r for r in results["rows"]}
    base = [r for r in results["rows"] if r["label"].startswith("0.0.14") and r["median_s"]]
    best = min(base, key=lambda r: r["median_s"]) if base else None
    lines = [
        f"### remote: 10 min 720p30 over loopback HTTP at 400 Mbit/s, nframes={results['nframes']}",
        "",
        f"File: {size / 1e6:.0f} MB. Median of {max(r['runs'] for r in results['rows'])} alternating runs, each a "
        "fresh process. Bytes: what the server sent for one call.",
        "",
        "| run | median s | vs fastest 0.0.14 | bytes transferred | of the file | peak RSS MB | output |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        t, b = r["median_s"], r["bytes"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    f"{t:.2f}" if t else "failed",
                    f"{best['median_s'] / t:.2f}x" if best and t else "",
                    f"{b / 1e6:.1f} MB" if b is not None else "",
                    f"{100 * b / size:.1f}%" if b is not None else "",
                    f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "",
                    r["output"],
                ]
            )
            + " |"
        )
    ours, fallback, before = rows.get("ours, ranges"), rows.get("ours, no ranges"), rows.get("before, no ranges")
    if fallback and before and fallback["median_s"] and before["median_s"]:
        lines.append(
            f"\nWithout range support: ours {fallback['median_s']:.2f} s against {before['median_s']:.2f} s before "
            f"this change ({before['median_s'] / fallback['median_s']:.2f}x)."
        )
    if ours and ours["bytes"] is not None:
        lines.append(f"With ranges ours moved {100 * ours['bytes'] / size:.1f}% of the file.")
    if best is None:
        lines.append("\nqwen-vl-utils 0.0.14 was not available (benchmarks/.venv-0014): no ratio against it.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
