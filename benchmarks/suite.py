"""The benchmark suite behind ``benchmarks/run.py``: generated media, fresh-process measurements, reports.

Long test videos are built by encoding one GOP and muxing its packets again and again with shifted
timestamps: the same decode cost as a real encode of that length, built in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

import numpy as np


def _texture(i: int, width: int, height: int, base: np.ndarray) -> np.ndarray:
    """Moving gradients over fixed texture: compresses like camera footage, not like noise or flat colour."""
    shift = (i * 6) % width
    frame = np.roll(base, shift, axis=1)
    y0 = (i * 4) % max(1, height - 120)
    frame[y0 : y0 + 120, 100:340] = (230, 200, 40)
    return frame


def make_long_video(
    path: str,
    *,
    seconds: float,
    width: int,
    height: int,
    fps: int = 30,
    gop_seconds: float = 2.0,
    preset: str = "veryfast",
) -> str:
    """An H.264 mp4 (B-frames, a keyframe every ``gop_seconds``) of ``seconds``, from one encoded GOP."""
    import av

    if os.path.exists(path):
        return path
    gop = round(gop_seconds * fps)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x // 7 + y // 5) * 9) % 256], -1).astype(np.uint8)
    base = np.clip(base.astype(np.int16) + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8)
    segment = path + ".gop.mp4"
    with av.open(segment, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {
            "preset": preset,
            "bf": "3",
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
            "crf": "23",
        }
        for i in range(gop):
            frame = av.VideoFrame.from_ndarray(_texture(i, width, height, base), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    repeats = max(1, round(seconds / gop_seconds))
    tmp = path + ".part"
    with av.open(segment) as src, av.open(tmp, "w", format="mp4") as out:
        in_stream = src.streams.video[0]
        packets = [p for p in src.demux(in_stream) if p.size]
        out_stream = out.add_stream_from_template(in_stream)
        step = round(gop / Fraction(fps) / in_stream.time_base)
        for k in range(repeats):
            for p in packets:
                q = av.Packet(bytes(p))
                q.pts, q.dts = p.pts + k * step, p.dts + k * step
                q.is_keyframe = p.is_keyframe
                q.time_base = in_stream.time_base
                q.stream = out_stream
                out.mux(q)
    os.replace(tmp, path)
    os.unlink(segment)
    return path


def make_images(folder: str) -> list[str]:
    """16 images: 8 JPEGs of 12 MP, 2 each of PNG, WebP, TIFF and CMYK JPEG."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    y, x = np.mgrid[0:3000, 0:4000]
    base = np.stack([(x * 255 // 4000), (y * 255 // 3000), ((x // 9 + y // 7) * 5) % 256], -1).astype(np.uint8)
    base = np.clip(base.astype(np.int16) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    big = Image.fromarray(base)
    mid = big.resize((2000, 1500))
    plan = [(f"jpeg{i}.jpg", big, "JPEG", {"quality": 90}) for i in range(8)]
    plan += [(f"png{i}.png", mid, "PNG", {"compress_level": 3}) for i in range(2)]
    plan += [(f"webp{i}.webp", mid, "WEBP", {"quality": 85}) for i in range(2)]
    plan += [(f"tiff{i}.tiff", mid, "TIFF", {}) for i in range(2)]
    plan += [(f"cmyk{i}.jpg", mid.convert("CMYK"), "JPEG", {"quality": 90}) for i in range(2)]
    for name, img, fmt, kwargs in plan:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            img.save(path, format=fmt, **kwargs)
        paths.append(path)
    return paths


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def describe_machine() -> dict[str, Any]:
    import platform

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


# --- the suite ------------------------------------------------------------------------------------------------

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


@dataclass
class Candidate:
    label: str
    python: str
    backend: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_0014(self) -> bool:
        return self.label.startswith("0.0.14")


@dataclass
class Case:
    name: str
    title: str
    files: list
    patch: int
    ele: dict = field(default_factory=dict)
    max_pixels: int = 0
    floor: bool = False
    reps: int = 0  # 0: the suite's default


def _measure(case: Case, cand: Candidate, timeout: float = 1800) -> dict:
    spec = {"case": case.name if case.name == "images" else "video", "files": case.files, "patch": case.patch}
    spec.update({"ele": case.ele, "max_pixels": case.max_pixels, "backend": cand.backend, **cand.extra})
    return run_worker(cand.python, spec, timeout)


def save_results(stem: str, results: dict, markdown: str) -> None:
    """Print a case's table and write ``<stem>.md`` and ``<stem>.json`` into benchmarks/."""
    here = os.path.dirname(os.path.abspath(__file__))
    print(markdown)
    with open(os.path.join(here, f"{stem}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(here, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1)


def run_worker(python: str, spec: dict, timeout: float = 1800, script: str = "") -> dict:
    """One measurement in a fresh process (``worker.py`` unless ``script``): its JSON result, or {"error"}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORCE_QWENVL", "PYTHONPATH"))}
    proc = subprocess.run(
        [python, "-P", script or WORKER, json.dumps(spec)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ffmpeg_floor(path: str) -> Optional[float]:
    exe = shutil.which("ffmpeg")
    if exe is None:
        return None
    start = time.perf_counter()
    subprocess.run([exe, "-v", "error", "-threads", "2", "-i", path, "-f", "null", "-"], check=True)
    return time.perf_counter() - start


def _agree(ref: dict, got: dict) -> str:
    if "error" in got:
        return f"error: {got['error']}"
    if ref.get("shapes") != got.get("shapes"):
        return f"shape {got.get('shapes')} != {ref.get('shapes')}"
    if ref.get("indices") is not None and ref.get("indices") != got.get("indices"):
        return "different frames_indices"
    diff = max((abs(a - b) for a, b in zip(ref["summary"], got["summary"])), default=0.0)
    return "same" if diff <= 1.0 else f"differs (max frame-mean diff {diff:.2f})"


def _cases(media: str, quick: bool) -> list:
    os.makedirs(media, exist_ok=True)
    if quick:
        dense = make_long_video(os.path.join(media, "q_dense_720p_10s.mp4"), seconds=10, width=1280, height=720)
        sparse = make_long_video(
            os.path.join(media, "q_sparse_720p_60s.mp4"), seconds=60, width=1280, height=720, gop_seconds=10
        )
        images = make_images(os.path.join(media, "images"))[6:12]
        return [
            Case("dense", "dense: 10 s 720p30, fps=2", [dense], 16, floor=True),
            Case("sparse", "sparse: 60 s 720p30, keyframe every 10 s, nframes=16", [sparse], 16, {"nframes": 16}),
            Case("images", "images: 6 mixed, max_pixels 1M", images, 14, max_pixels=1280 * 28 * 28),
        ]
    dense = make_long_video(os.path.join(media, "dense_1080p_60s.mp4"), seconds=60, width=1920, height=1080)
    sparse = make_long_video(
        os.path.join(media, "sparse_720p_10min.mp4"), seconds=600, width=1280, height=720, gop_seconds=10
    )
    hour = make_long_video(os.path.join(media, "hour_720p.mp4"), seconds=3600, width=1280, height=720, gop_seconds=10)
    images = make_images(os.path.join(media, "images"))
    return [
        Case("dense", "dense: 60 s 1080p30 H.264, keyframe every 2 s, fps=2, patch 16", [dense], 16, floor=True),
        Case("sparse", "sparse: 10 min 720p30, keyframe every 10 s, nframes=64", [sparse], 16, {"nframes": 64}),
        Case(
            "images",
            "images: 16 (8 JPEG 12 MP, PNG, WebP, TIFF, CMYK JPEG), max_pixels 1M",
            images,
            14,
            max_pixels=1280 * 28 * 28,
            reps=7,  # two seconds a run, so noisy that three runs leave its median swinging by 20%
        ),
        Case(
            "memory",
            "memory: 1 h 720p30, 768 frames at 256 tokens per frame",
            [hour],
            14,
            {"nframes": 768, "max_pixels": 256 * 28 * 28},
            reps=1,
        ),
    ]


def _candidates(case: Case, python_0014: Optional[str], ours_backends: list) -> list:
    me = sys.executable
    if case.name == "images":
        cands = [Candidate("ours", me), Candidate("ours (jpeg_draft)", me, extra={"jpeg_draft": True})]
        if python_0014:
            cands.append(Candidate("0.0.14", python_0014))
        return cands
    cands = [Candidate(f"ours {b}", me, b) for b in ours_backends]
    if case.name == "memory":
        cands = [
            Candidate("ours pyav uint8", me, "pyav", {"dtype": "uint8"}),
            Candidate("ours pyav float32", me, "pyav"),
        ]
    if python_0014:
        cands += [Candidate(f"0.0.14 {b}", python_0014, b) for b in ("torchcodec", "decord")]
    return cands


def run_suite(
    media: str, quick: bool, reps: int, python_0014: Optional[str], log: Any = print, only: Optional[list] = None
) -> dict:
    from qwen_vl_utils.backends import available_backends

    ours_backends = [b for b in available_backends() if b in ("pyav", "torchcodec", "decord")]
    results = {"machine": describe_machine(), "quick": quick, "cases": []}
    for case in _cases(media, quick):
        if only and case.name not in only:
            continue
        cands = _candidates(case, python_0014, ours_backends)
        log(f"\n## {case.title}")
        first = {c.label: _measure(case, c) for c in cands}  # warm-up, and the agreement check
        ref = first[cands[0].label]
        agree = {label: _agree(ref, r) for label, r in first.items()}
        for label, a in agree.items():
            log(f"  {label}: output {a}")
        times: dict = {c.label: [] for c in cands}
        rss: dict = {c.label: [] for c in cands}
        runnable = [c for c in cands if "error" not in first[c.label]]
        floors = []
        for _ in range(case.reps or reps):  # A B A B ...
            for c in runnable:
                r = _measure(case, c)
                if "error" not in r:
                    times[c.label].append(r["seconds"])
                    rss[c.label].append(r["peak_rss_mb"])
            if case.floor:
                f = _ffmpeg_floor(case.files[0])
                if f is not None:
                    floors.append(f)
        rows = []
        for c in cands:
            t = times[c.label]
            rows.append(
                {
                    "label": c.label,
                    "median_s": statistics.median(t) if t else None,
                    "runs": len(t),
                    "peak_rss_mb": max(rss[c.label]) if rss[c.label] else first[c.label].get("peak_rss_mb"),
                    "output": agree[c.label],
                    "error": first[c.label].get("error"),
                }
            )
            log(f"  {c.label}: {rows[-1]['median_s']} s, {rows[-1]['peak_rss_mb']} MB")
        results["cases"].append(
            {
                "name": case.name,
                "title": case.title,
                "rows": rows,
                "ffmpeg_floor_s": statistics.median(floors) if floors else None,
                "note": _draft_difference(case) if case.name == "images" else "",
            }
        )
    return results


def _draft_difference(case: Case) -> str:
    """The pixel cost of the opt-in JPEG draft mode on this case's images, measured untimed."""
    from qwen_vl_utils.image import fetch_image

    diffs = []
    for path in case.files:
        ele = {"image": path, "max_pixels": case.max_pixels}
        exact = np.asarray(fetch_image(ele, case.patch), dtype=np.int16)
        draft = np.asarray(fetch_image({**ele, "jpeg_draft": True}, case.patch), dtype=np.int16)
        diffs.append(float(np.abs(exact - draft).mean()))
    jpeg = [d for d in diffs if d > 0]
    return (
        f"`jpeg_draft` pixel cost: mean absolute difference from the exact decode {np.mean(diffs):.2f} levels "
        f"over all images ({np.mean(jpeg) if jpeg else 0:.2f} over the {len(jpeg)} images it changed), max "
        f"{max(diffs):.2f}."
    )


def _best(rows: list, prefix: str) -> Optional[dict]:
    ok = [r for r in rows if r["label"].startswith(prefix) and r["median_s"] is not None]
    return min(ok, key=lambda r: r["median_s"]) if ok else None


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['system']}.",
        "Each number is the median of alternating runs (A B A B), each run a fresh process timing one call after "
        "its imports; peak RSS is the whole process's. Ratios are against the fastest 0.0.14 backend.",
        "",
    ]
    for case in results["cases"]:
        rows = case["rows"]
        base = _best(rows, "0.0.14")
        floor = case["ffmpeg_floor_s"]
        runs = max((r.get("runs") or 0 for r in rows), default=0)
        lines += [f"### {case['title']}", "", f"Median of {runs} run{'s' if runs != 1 else ''} each.", ""]
        head = "| run | median s | speed-up vs 0.0.14 | peak RSS MB | RSS vs 0.0.14 | output |"
        if floor:
            head += " vs FFmpeg floor |"
        lines += [head, "|" + " --- |" * (head.count("|") - 1)]
        for r in rows:
            t = r["median_s"]
            cells = [
                r["label"],
                f"{t:.2f}" if t is not None else f"failed: {r['error']}",
                f"{base['median_s'] / t:.2f}x" if base and t else "",
                f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "",
                f"{100 * r['peak_rss_mb'] / base['peak_rss_mb']:.0f}%" if base and r["peak_rss_mb"] else "",
                r["output"],
            ]
            if floor:
                cells.append(f"{t / floor:.2f}x" if t else "")
            lines.append("| " + " | ".join(cells) + " |")
        if floor:
            lines.append(f"\nFFmpeg's own full decode (`ffmpeg -threads 2 -i FILE -f null -`): {floor:.2f} s.")
        if case.get("note"):
            lines.append("\n" + case["note"])
        if base is None:
            lines.append("\nqwen-vl-utils 0.0.14 was not available for this run: its columns are empty.")
        lines.append("")
    return "\n".join(lines)


def to_png(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = results["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4.2))
    for ax, case in zip(np.atleast_1d(axes), cases):
        rows = [r for r in case["rows"] if r["median_s"] is not None]
        labels = [r["label"] for r in rows]
        values = [r["median_s"] for r in rows]
        colors = ["#d9822b" if lab.startswith("0.0.14") else "#2b7bd9" for lab in labels]
        ax.barh(labels, values, color=colors)
        if case["ffmpeg_floor_s"]:
            ax.axvline(case["ffmpeg_floor_s"], color="k", ls="--", lw=1, label="FFmpeg decode")
            ax.legend(fontsize=7)
        ax.set_title(case["name"], fontsize=10)
        ax.set_xlabel("seconds (lower is better)")
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: Optional[list] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="benchmarks/run.py", description="Benchmark against 0.0.14 and FFmpeg.")
    p.add_argument("--quick", action="store_true", help="small generated media, 1 run each, no 1-hour video")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--media", default=os.path.join(tempfile.gettempdir(), "qwen-vl-utils-bench-media"))
    p.add_argument(
        "--python-0014",
        default=os.environ.get("QWENVL_BENCH_PYTHON_0014"),
        help="a python that has qwen-vl-utils 0.0.14 installed (see benchmarks/README.md)",
    )
    p.add_argument("--out", help="write results.md, results.json and results.png into this folder")
    p.add_argument("--cases", help="comma-separated subset (dense,sparse,images,memory); merged into --out's results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    only = args.cases.split(",") if args.cases else None
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.python_0014 is None:
        log("qwen-vl-utils 0.0.14 is not configured (--python-0014): its columns are skipped")
    results = run_suite(args.media, args.quick, 1 if args.quick else args.reps, args.python_0014, log, only)
    previous = os.path.join(args.out, "results.json") if args.out else ""
    if only and os.path.exists(previous):  # re-measured cases replace theirs in the last full run
        with open(previous) as f:
            merged = json.load(f)
        fresh = {c["name"]: c for c in results["cases"]}
        merged["cases"] = [fresh.pop(c["name"], c) for c in merged["cases"]] + list(fresh.values())
        results = merged
    md = to_markdown(results)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        to_png(results, os.path.join(args.out, "results.png"))
    return 0
