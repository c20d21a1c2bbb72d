"""The dataset case: ``python benchmarks/dataset.py [--quick] [--python-0014 PATH] [--out DIR]``.

Generates 2,000 image samples over a few hundred local images and 2,000 video samples over tens of short
videos (qwen-vl-finetune JSONL), then measures, each in a fresh process:

- ``dataset count`` with the local engine (default workers): samples per second, peak RSS of the driver and
  of the largest worker, and the same at 10x the samples (memory must stay flat);
- counting by decoding every sample with ``process_vision_info`` (what qwen-vl-finetune's ``pack_data.py``
  does), with qwen-vl-utils 0.0.14 when ``benchmarks/.venv-0014`` exists (``run.py --setup-0014``), else with
  this library's own decode path as a stand-in (said so in the output), on a subset; its token counts are
  compared with ours;
- ``best_fit_decreasing`` on 10^6 realistic lengths against ``binpacking.to_constant_volume``, whole-set and
  in qwen-vl-finetune's batches of 256.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, HERE)

from suite import describe_machine, make_long_video  # noqa: E402

DEFAULT_0014 = os.path.join(HERE, ".venv-0014", "bin", "python")

# Counting by decoding, run under either interpreter (it imports whichever qwen_vl_utils that one has).
DECODE_WORKER = r"""
import json, math, os, re, sys, time
from qwen_vl_utils import process_vision_info
data, root, limit, patch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
f = patch * 2
out, start = [], time.perf_counter()
with open(data) as fh:
    for n, line in enumerate(fh):
        if n >= limit:
            break
        rec = json.loads(line)
        content = []
        for key in ("image", "video"):
            values = rec.get(key) or []
            for v in values if isinstance(values, list) else [values]:
                content.append({"type": key, key: os.path.join(root, v)})
        images, videos = process_vision_info([{"role": "user", "content": content}], image_patch_size=patch)[:2]
        tokens = sum((i.height // f) * (i.width // f) for i in images or [])
        tokens += sum(math.ceil(v.shape[0] / 2) * (v.shape[2] // f) * (v.shape[3] // f) for v in videos or [])
        out.append(tokens)
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": out}))
"""

# Our count in a fresh process: the API call timed, peak RSS of this process and of its largest worker.
COUNT_WORKER = r"""
import json, resource, sys, time
from qwen_vl_utils.dataset import count
data, out = sys.argv[1], sys.argv[2]
start = time.perf_counter()
summary = count(data, out, overwrite=True, **json.loads(sys.argv[3]))
seconds = time.perf_counter() - start
rss = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "samples": summary.records, "valid": summary.valid,
                  "driver_rss_mb": rss, "worker_rss_mb": workers}))
"""


def make_media(folder: str, images: int, videos: int) -> tuple:
    """JPEG and PNG photos of several sizes, and short 720p/360p H.264 clips of 3 to 20 seconds."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (1024, 768), (1280, 720), (1920, 1080), (3024, 4032), (800, 1200), (512, 512)]
    y, x = np.mgrid[0:4032, 0:4032]
    base = np.stack([x * 255 // 4032, y * 255 // 4032, ((x // 9 + y // 7) * 5) % 256], -1).astype(np.uint8)
    base = Image.fromarray(np.clip(base.astype(np.int16) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8))
    image_names = []
    for i in range(images):
        w, h = sizes[i % len(sizes)]
        name = f"img{i:04d}.{'png' if i % 5 == 0 else 'jpg'}"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            base.crop((i % 7, i % 11, i % 7 + w, i % 11 + h)).save(path, quality=88)
        image_names.append(name)
    video_names = []
    for i in range(videos):
        name = f"vid{i:03d}.mp4"
        w, h = (1280, 720) if i % 3 == 0 else (640, 360)
        make_long_video(os.path.join(folder, name), seconds=3 + (i * 7) % 18, width=w, height=h, fps=30)
        video_names.append(name)
    return image_names, video_names


def write_set(path: str, kind: str, names: list, samples: int, seed: int = 0) -> str:
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for n in range(samples):
            k = rnd.choice([1, 1, 1, 2, 3]) if kind == "image" else 1
            picked = rnd.sample(names, k)
            rec = {kind: picked if k > 1 else picked[0]}
            rec["conversations"] = [
                {"from": "human", "value": f"<{kind}>" * k + f"\nQuestion {n}: what is shown?"},
                {"from": "gpt", "value": "An answer of a few words."},
            ]
            f.write(json.dumps(rec) + "\n")
    return path


def run_json(cmd: list, env: dict | None = None) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ours_env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def measure_count(data: str, out: str, options: dict) -> dict:
    return run_json([sys.executable, "-c", COUNT_WORKER, data, out, json.dumps(options)], ours_env())


def measure_decode(python: str, data: str, root: str, limit: int, ours: bool) -> dict:
    env = ours_env() if ours else {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return run_json([python, "-c", DECODE_WORKER, data, root, str(limit), "14"], env)


def bench_pack(n: int) -> dict:
    import numpy as np

    sys.path.insert(0, SRC)
    from qwen_vl_utils.dataset import best_fit_decreasing

    rng = np.random.default_rng(0)
    kinds = rng.choice(4, size=n, p=[0.3, 0.45, 0.15, 0.1])
    base = np.array([120, 700, 1800, 3500])[kinds]
    sizes = [int(x) for x in np.clip(rng.lognormal(np.log(base), 0.5), 20, 8000)]
    cap = 8192
    start = time.perf_counter()
    groups = best_fit_decreasing(sizes, cap)
    ours = {"n": n, "seconds": round(time.perf_counter() - start, 2), "fill": sum(sizes) / (len(groups) * cap)}
    result = {"ours": ours}
    try:
        import binpacking
    except ImportError:
        result["binpacking"] = "not installed (pip install binpacking)"
        return result
    m = min(n, 20_000)  # to_constant_volume is O(n x groups): the whole million would take hours
    sub = sizes[:m]
    start = time.perf_counter()
    theirs = binpacking.to_constant_volume(list(enumerate(sub)), cap, weight_pos=1)
    t_theirs = time.perf_counter() - start
    ours_sub = best_fit_decreasing(sub, cap)
    batched = sum(
        len(binpacking.to_constant_volume(list(enumerate(sub[k : k + 256])), cap, weight_pos=1))
        for k in range(0, m, 256)
    )
    result["same_input"] = {
        "n": m,
        "ours_fill": sum(sub) / (len(ours_sub) * cap),
        "binpacking_fill": sum(sub) / (len(theirs) * cap),
        "binpacking_seconds": round(t_theirs, 2),
        "pack_data_batches_of_256_fill": sum(sub) / (batched * cap),
    }
    return result


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/dataset.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer media, and no 10x memory run")
    p.add_argument("--media", default=os.path.join(tempfile.gettempdir(), "qwen-vl-utils-bench-dataset"))
    p.add_argument("--python-0014", default=DEFAULT_0014, help="a python with qwen-vl-utils 0.0.14")
    p.add_argument("--decode-samples", type=int, default=100, help="samples counted by decoding (a subset)")
    p.add_argument("--out", help="write dataset.json into this folder")
    args = p.parse_args(argv)
    images, videos = make_media(args.media, 60 if args.quick else 300, 8 if args.quick else 30)
    sets = {
        "image": write_set(os.path.join(args.media, "images.jsonl"), "image", images, 2000),
        "video": write_set(os.path.join(args.media, "videos.jsonl"), "video", videos, 2000),
    }
    results: dict = {"machine": describe_machine(), "cases": {}}
    have_0014 = os.path.exists(args.python_0014)
    for kind, data in sets.items():
        out = os.path.join(args.media, f"{kind}.counted.jsonl")
        ours = measure_count(data, out, {})
        case = {"samples": ours["samples"], "ours": ours, "samples_per_s": ours["samples"] / ours["seconds"]}
        if not args.quick:
            big = write_set(
                os.path.join(args.media, f"{kind}s-10x.jsonl"), kind, images if kind == "image" else videos, 20000
            )
            case["ours_10x"] = measure_count(big, out + ".10x", {})
        with open(out) as f:
            counted = [json.loads(line)["visual_tokens"] for line in f][: args.decode_samples]
        python = args.python_0014 if have_0014 else sys.executable
        dec = measure_decode(python, data, args.media, args.decode_samples, ours=not have_0014)
        case["decode"] = {
            "by": "qwen-vl-utils 0.0.14" if have_0014 else "this library's decode path (stand-in: no 0.0.14 venv)",
            "samples": len(dec["tokens"]),
            "samples_per_s": len(dec["tokens"]) / dec["seconds"],
            "same_tokens": sum(a == b for a, b in zip(dec["tokens"], counted)),
        }
        case["speedup_vs_decode"] = case["samples_per_s"] / case["decode"]["samples_per_s"]
        results["cases"][kind] = case
        print(f"{kind}: {json.dumps(case)}", flush=True)
    results["pack"] = bench_pack(200_000 if args.quick else 1_000_000)
    print(f"pack: {json.dumps(results['pack'])}")
    print(to_markdown(results))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "dataset.json"), "w") as f:
            json.dump(results, f, indent=2)
    return 0


def to_markdown(results: dict) -> str:
    rows = [
        "| set | samples | ours samples/s | by decoding samples/s | speed-up | same tokens | "
        "peak RSS driver / worker MB (2k) | (20k) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, c in results["cases"].items():
        o, big = c["ours"], c.get("ours_10x")
        mem_big = f"{big['driver_rss_mb']:.0f} / {big['worker_rss_mb']:.0f}" if big else "-"
        rows.append(
            f"| {kind} | {c['samples']} | {c['samples_per_s']:.0f} | {c['decode']['samples_per_s']:.1f} | "
            f"{c['speedup_vs_decode']:.0f}x | {c['decode']['same_tokens']}/{c['decode']['samples']} | "
            f"{o['driver_rss_mb']:.0f} / {o['worker_rss_mb']:.0f} | {mem_big} |"
        )
    by = {c["decode"]["by"] for c in results["cases"].values()}
    rows.append(f"\nCounting by decoding: {', '.join(sorted(by))}.")
    pk = results["pack"]
    rows.append(
        f"\nPacking {pk['ours']['n']} lengths into 8192: {pk['ours']['seconds']} s, fill {pk['ours']['fill']:.2%}."
    )
    if isinstance(pk.get("same_input"), dict):
        s = pk["same_input"]
        rows.append(
            f"Same {s['n']} lengths: ours {s['ours_fill']:.2%}, binpacking.to_constant_volume "
            f"{s['binpacking_fill']:.2%} ({s['binpacking_seconds']} s), pack_data.py's batches of 256 "
            f"{s['pack_data_batches_of_256_fill']:.2%}."
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
