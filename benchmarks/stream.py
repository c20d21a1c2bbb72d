"""The streaming case: ``python benchmarks/stream.py [--quick] [--reps N] [--media DIR] [--json FILE]``.

A 10-minute 720p30 H.264 video with B-frames (a keyframe every 2 s), cut into 1-second chunks of 2 frames
(fps=2) under Qwen2.5-VL's per-frame cap of 768·28·28 pixels, three ways, each in a fresh process:

- **ours**: ``stream_video`` (one pass over the file; time to the first chunk and in all);
- **StreamingVLM's loop**, reimplemented: one decord ``VideoReader(num_threads=2)``; for each second, the
  frames whose end timestamps fall in the window, sampled at fps 2 from the window's first frame, the last two
  fetched with ``get_batch`` and resized (bicubic, antialias: torchvision's arithmetic, through torch);
- **FFmpeg's full decode** of the file: ``ffmpeg -threads 2 -i FILE -f null -``.

Then the peak RSS of ``stream_video`` over a 1-minute and a 1-hour video of the same kind (fresh processes):
memory must not grow with the length. ``--quick``: a 2-minute video and 1 vs 10 minutes for the memory pair.
Runs alternate between the implementations; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from suite import describe_machine, make_long_video  # noqa: E402

MAX_PIXELS = 768 * 28 * 28
FPS = 2.0

#: one measurement of ours, in a fresh process: argv = [path]; prints JSON
OURS = r"""
import json, sys, time
import av, torch  # imported before the clock starts, as in the other cases
from qwen_vl_utils import stream_video
path, max_pixels, fps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.perf_counter()
first, indices, shapes = None, [], set()
for chunk in stream_video({"video": path, "fps": fps, "max_pixels": max_pixels}, 1.0, 14):
    if first is None:
        first = time.perf_counter() - start
    indices += chunk.metadata["frames_indices"]
    shapes.add(tuple(chunk.frames.shape))
seconds = time.perf_counter() - start
with open("/proc/self/status") as f:
    rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
print(json.dumps({"seconds": seconds, "first": first, "chunks": len(indices) // 2, "indices": indices,
                  "shapes": sorted(shapes), "rss_mb": rss}))
"""

#: StreamingVLM's per-chunk decord loop (streaming_vlm/inference/inference.py with livecc_utils'
#: _read_video_decord_plus(strict_fps=True, only_get_last_frame=2) and _spatial_resize_video), reimplemented
DECORD_LOOP = r"""
import json, math, sys, time
import numpy as np, torch
import decord
from qwen_vl_utils import smart_resize
path, max_pixels, fps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.perf_counter()
vr = decord.VideoReader(path, num_threads=2)
height, width = vr[0].shape[:2]
rh, rw = smart_resize(height, width, factor=28, min_pixels=128 * 28 * 28, max_pixels=max_pixels)
pts = vr.get_frame_timestamp(np.arange(len(vr)))[:, 1]  # each frame's end time, as StreamingVLM reads it
duration = int(math.ceil(pts[-1]))
first, indices, shapes = None, [], set()
for i in range(duration):
    window = ((i <= pts) & (pts <= i + 1)).nonzero()[0]
    if len(window) == 0:
        break
    clip_pts = pts[window]
    expected = np.arange(clip_pts[0], clip_pts[-1] + 1e-6, 1 / fps)
    idx = window[(expected[:, None] <= clip_pts).argmax(axis=1)].tolist()
    while len(idx) % 2:
        idx.append(idx[-1])
    idx = idx[-2:]  # only_get_last_frame = chunk seconds * fps
    clip = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)
    clip = torch.nn.functional.interpolate(clip.float(), size=(rh, rw), mode="bicubic", antialias=True)
    clip = clip.round_().clamp_(0, 255).to(torch.uint8).float()  # torchvision on uint8, then .float()
    if first is None:
        first = time.perf_counter() - start
    indices += idx
    shapes.add(tuple(clip.shape))
seconds = time.perf_counter() - start
with open("/proc/self/status") as f:
    rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
print(json.dumps({"seconds": seconds, "first": first, "chunks": len(indices) // 2, "indices": indices,
                  "shapes": sorted(shapes), "rss_mb": rss}))
"""


def _python(code: str, *args: object, timeout: float = 3600) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    env["PYTHONPATH"] = os.path.join(os.path.dirname(HERE), "src")
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ffmpeg(path: str) -> dict:
    exe = shutil.which("ffmpeg")
    if exe is None:
        return {"error": "ffmpeg is not installed"}
    start = time.perf_counter()
    subprocess.run([exe, "-v", "error", "-threads", "2", "-i", path, "-f", "null", "-"], check=True)
    return {"seconds": time.perf_counter() - start}


def _median(runs: list, key: str) -> float | None:
    values = [r[key] for r in runs if key in r and r[key] is not None]
    return statistics.median(values) if values else None


def run(media: str, quick: bool, reps: int) -> dict:
    os.makedirs(media, exist_ok=True)
    seconds = 120 if quick else 600
    long_seconds = 600 if quick else 3600
    video, short, long = (
        make_long_video(os.path.join(media, f"stream_720p_{n}s.mp4"), seconds=n, width=1280, height=720)
        for n in (seconds, 60, long_seconds)
    )
    args = (MAX_PIXELS, FPS)
    runs: dict = {"ours": [], "streamingvlm": [], "ffmpeg": []}
    for rep in range(reps):  # alternating: A B C A B C ...
        runs["ours"].append(_python(OURS, video, *args))
        runs["streamingvlm"].append(_python(DECORD_LOOP, video, *args))
        runs["ffmpeg"].append(_ffmpeg(video))
        print(f"rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1].get('seconds', v[-1])}" for k, v in runs.items()))
    ours, theirs = runs["ours"][0], runs["streamingvlm"][0]
    memory = {
        f"{60}s": _python(OURS, short, *args),
        f"{long_seconds}s": _python(OURS, long, *args),
    }
    result = {
        "machine": describe_machine(),
        "video": f"{seconds} s 720p30 H.264, B-frames, keyframe every 2 s; 1 s chunks at fps {FPS:g}, "
        f"max_pixels {MAX_PIXELS}",
        "runs": reps,
        "ours_seconds": _median(runs["ours"], "seconds"),
        "ours_first_chunk": _median(runs["ours"], "first"),
        "ours_rss_mb": _median(runs["ours"], "rss_mb"),
        "streamingvlm_seconds": _median(runs["streamingvlm"], "seconds"),
        "streamingvlm_first_chunk": _median(runs["streamingvlm"], "first"),
        "streamingvlm_rss_mb": _median(runs["streamingvlm"], "rss_mb"),
        "ffmpeg_seconds": _median(runs["ffmpeg"], "seconds"),
        "errors": [r["error"] for v in runs.values() for r in v if "error" in r],
        "agreement": _agreement(ours, theirs),
        "memory_rss_mb": {k: v.get("rss_mb", v.get("error")) for k, v in memory.items()},
        "memory_seconds": {k: v.get("seconds", v.get("error")) for k, v in memory.items()},
    }
    return result


def _agreement(ours: dict, theirs: dict) -> str:
    """Both produce one chunk of two frames per second at the same size; their frame choices differ by design
    (StreamingVLM samples from each window's first frame end time, ours on one global grid)."""
    if "error" in ours or "error" in theirs:
        return f"error: {ours.get('error') or theirs.get('error')}"
    same_shape = ours["shapes"] == [[2, 3, *theirs["shapes"][0][2:]]] if theirs["shapes"] else False
    differ = sum(a != b for a, b in zip(ours["indices"], theirs["indices"]))
    return (
        f"chunks {ours['chunks']} vs {theirs['chunks']}; frame size {'same' if same_shape else 'different'}; "
        f"{differ} of {min(len(ours['indices']), len(theirs['indices']))} frame choices differ"
    )


def to_markdown(r: dict) -> str:
    def f(x: object, unit: str = "s") -> str:
        return f"{x:.2f} {unit}" if isinstance(x, (int, float)) else str(x)

    def ratio(a: object, b: object) -> object:
        return a / b if isinstance(a, float) and isinstance(b, float) and b else None

    speedup = ratio(r["streamingvlm_seconds"], r["ours_seconds"])
    vs_ffmpeg = ratio(r["ours_seconds"], r["ffmpeg_seconds"])
    mem = list(r["memory_rss_mb"].items())
    lines = [
        f"### stream: {r['video']}",
        "",
        f"Median of {r['runs']} runs each, fresh processes. {r['agreement']}.",
        "",
        "| run | total | first chunk | peak RSS |",
        "| --- | --- | --- | --- |",
        f"| ours (`stream_video`) | {f(r['ours_seconds'])} | {f(r['ours_first_chunk'])} | "
        f"{f(r['ours_rss_mb'], 'MB')} |",
        f"| StreamingVLM's per-chunk decord loop | {f(r['streamingvlm_seconds'])} | "
        f"{f(r['streamingvlm_first_chunk'])} | {f(r['streamingvlm_rss_mb'], 'MB')} |",
        f"| FFmpeg's full decode (`-threads 2`) | {f(r['ffmpeg_seconds'])} | | |",
        "",
        f"Speed-up over the per-chunk loop: {f(speedup, 'x')}; ours / FFmpeg's full decode: {f(vs_ffmpeg, 'x')}.",
        f"Peak RSS of `stream_video`: {mem[0][0]} video {f(mem[0][1], 'MB')}, {mem[1][0]} video {f(mem[1][1], 'MB')}.",
    ]
    if r["errors"]:
        lines.append(f"Errors: {r['errors']}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2-minute video; 1 vs 10 minutes for memory")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--media", default=os.path.join(HERE, "media"))
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    result = run(args.media, args.quick, args.reps)
    print(to_markdown(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
