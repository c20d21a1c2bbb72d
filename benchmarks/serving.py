"""The serving case: ``python benchmarks/serving.py [--reps N] [--requests 64]``.

64 concurrent requests of mixed images and short videos, every medium fetched from a loopback HTTP server that
answers each request after 100 ms (tests/httpfiles.py). Each run is a fresh process (benchmarks/serving_worker.py)
that sends all requests at once on one event loop: this library's ``aprocess_vision_info``, against qwen-vl-utils
0.0.14 called through ``asyncio.to_thread`` on the default executor (from benchmarks/.venv-0014), and this
library through ``asyncio.to_thread`` too, for reference. Runs alternate; the table reports the median total
time, throughput, p50/p95 latency and peak RSS. Writes results-serving.{md,json} next to this file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from httpfiles import FileServer  # noqa: E402

from suite import describe_machine, run_worker, save_results  # noqa: E402

VENV_0014 = os.path.join(HERE, ".venv-0014", "bin", "python")
WORKER = os.path.join(HERE, "serving_worker.py")


def make_media(folder: str, width: int = 1920, height: int = 1080) -> tuple:
    """8 photos (JPEG, 1920x1080 by default) and 4 short videos (6 s of 640x360 H.264, under 1 MB each)."""
    import numpy as np
    from PIL import Image

    from suite import make_long_video

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(3)
    images = []
    for i in range(8):
        path = os.path.join(folder, f"photo{i}_{width}x{height}.jpg")
        if not os.path.exists(path):
            y, x = np.mgrid[0:height, 0:width]
            base = np.stack([(x * 255 // width), (y * 255 // height), ((x // 7 + y // 5 + i * 13) * 9) % 256], -1)
            noisy = np.clip(base + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(path, quality=88)
        images.append(path)
    videos = [
        make_long_video(os.path.join(folder, f"clip{i}.mp4"), seconds=6, width=640, height=360, gop_seconds=2)
        for i in range(4)
    ]
    return images, videos


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def requests(image_urls: list, video_urls: list, n: int) -> list:
    """Half the requests carry two images, half an image and a video sampled at 2 fps."""
    out = []
    for i in range(n):
        content = [{"type": "image", "image": image_urls[i % len(image_urls)], "max_pixels": 1280 * 28 * 28}]
        if i % 2:
            content.append({"type": "video", "video": video_urls[i % len(video_urls)], "fps": 2.0})
        else:
            content.append({"type": "image", "image": image_urls[(i + 3) % len(image_urls)]})
        out.append(content)
    return out


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--media", default=os.path.join(HERE, "media", "serving"))
    p.add_argument("--image-size", default="1920x1080", help="the photos' WIDTHxHEIGHT")
    p.add_argument("--name", default="results-serving", help="results file stem in benchmarks/")
    args = p.parse_args(argv)
    width, height = (int(n) for n in args.image_size.split("x"))
    images, videos = make_media(args.media, width, height)
    server = FileServer()
    image_urls = [server.add(f"/{os.path.basename(f)}", _read(f), delay=args.latency) for f in images]
    video_urls = [server.add(f"/{os.path.basename(f)}", _read(f), delay=args.latency) for f in videos]
    reqs = requests(image_urls, video_urls, args.requests)
    cands = [("ours, aprocess_vision_info", sys.executable, "async")]
    if os.path.exists(VENV_0014):
        cands.append(("0.0.14, asyncio.to_thread", VENV_0014, "to_thread"))
    cands.append(("ours, asyncio.to_thread", sys.executable, "to_thread"))
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    runs: dict = {label: [] for label, *_ in cands}
    first: dict = {}
    for rep in range(args.reps + 1):  # round 0: the agreement check and warm caches
        for label, python, mode in cands:
            r = run_worker(python, {"mode": mode, "patch": 14, "requests": reqs}, timeout=1800, script=WORKER)
            if "error" in r:
                log(f"  {label}: {r['error']}")
                first.setdefault(label, r)
                continue
            if rep == 0:
                first[label] = r
            else:
                runs[label].append(r)
                log(f"  {label}: {r['seconds']:.2f} s, peak {r['peak_rss_mb']:.0f} MB")
    server.close()
    ref = first.get(cands[0][0], {}).get("shapes")
    rows = []
    for label, *_ in cands:
        rs = runs[label]
        lat = sorted(x for r in rs for x in r["latencies"])
        rows.append(
            {
                "label": label,
                "median_s": statistics.median(r["seconds"] for r in rs) if rs else None,
                "p50_s": lat[len(lat) // 2] if lat else None,
                "p95_s": lat[int(len(lat) * 0.95)] if lat else None,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs) if rs else None,
                "runs": len(rs),
                "output": first.get(label, {}).get("error")
                or ("same" if first[label].get("shapes") == ref else "differs"),
            }
        )
    results = {"machine": describe_machine(), "requests": args.requests, "latency_s": args.latency, "rows": rows}
    results["image_size"] = args.image_size
    save_results(args.name, results, to_markdown(results))
    return 0


def to_markdown(results: dict) -> str:
    rows = results["rows"]
    base = next((r for r in rows if r["label"].startswith("0.0.14") and r["median_s"]), None)
    n = results["requests"]
    lines = [
        f"### serving: {n} concurrent requests ({results.get('image_size', '1920x1080')} photos and 6 s 360p videos "
        f"over HTTP, {results['latency_s'] * 1000:.0f} ms per request)",
        "",
        f"Median of {max((r['runs'] for r in rows), default=0)} alternating runs, each a fresh process.",
        "",
        "| run | total s | requests/s | vs 0.0.14 | p50 latency s | p95 latency s | peak RSS MB | RSS vs 0.0.14 "
        "| output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = r["median_s"]
        cells = [
            r["label"],
            f"{t:.2f}" if t else "failed",
            f"{n / t:.1f}" if t else "",
            f"{base['median_s'] / t:.2f}x" if base and t else "",
            f"{r['p50_s']:.2f}" if r["p50_s"] else "",
            f"{r['p95_s']:.2f}" if r["p95_s"] else "",
            f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "",
            f"{100 * r['peak_rss_mb'] / base['peak_rss_mb']:.0f}%" if base and r["peak_rss_mb"] else "",
            r["output"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if base is None:
        lines.append("\nqwen-vl-utils 0.0.14 was not available (benchmarks/.venv-0014): no ratio against it.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
