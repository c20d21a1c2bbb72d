"""Audio for Qwen-Omni against qwen-omni-utils 0.0.9: ``python benchmarks/audio.py [--reps N] [--omni-python PATH]``.

A 10-minute 640x360 30 fps H.264 video with 44.1 kHz stereo AAC (generated once with the ffmpeg command line),
and in fresh processes, alternating, medians of ``--reps``:

- the audio of its last 60 s (``audio_start=540, audio_end=600``) and of the whole track, by this library
  (``fetch_audio``) and by qwen-omni-utils (``process_audio_info``, from ``--omni-python``: a virtualenv with it,
  see ``scripts/omni/run_qwen_omni_utils.py``), their outputs compared first (length, SNR);
- peak memory (VmHWM) of this library for the window and for the whole track;
- ``process_mm_info`` on the last 60 s as a video window (``video_start``/``video_end``) with and without
  ``use_audio_in_video``: what the sound adds to the call;
- ``stream_video`` over its first 120 s in 1-second chunks, with and without ``audio=True``: what each chunk's
  sound adds to a stream (``--only stream`` runs just this case).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, HERE)

from suite import describe_machine  # noqa: E402

OURS = r"""
import json, sys, time, numpy as np
import av  # (imports before the clock, as qwen_omni_utils' are)
import qwen_vl_utils as q
path, mode, start, end, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
t = time.perf_counter()
if mode == "audio":
    ele = {"audio": path} if end <= 0 else {"audio": path, "audio_start": start, "audio_end": end}
    result = q.fetch_audio(ele)
elif mode.startswith("stream"):
    ele = {"video": path, "fps": 2.0, "video_start": start, "video_end": end, "max_pixels": 360 * 640}
    sound = [c.audio for c in q.stream_video(ele, 1.0, audio=(mode == "stream+audio"))]
    result = np.concatenate(sound) if sound[0] is not None else np.zeros(0, np.float32)
else:
    msg = [{"role": "user", "content": [{"type": "video", "video": path, "video_start": start, "video_end": end}]}]
    audios, _, videos = q.process_mm_info(msg, use_audio_in_video=(mode == "video+audio"))
    result = audios[0] if audios else np.zeros(0, np.float32)
seconds = time.perf_counter() - t
rss = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
np.save(out, result)
print(json.dumps({"seconds": seconds, "rss_mb": rss, "samples": len(result)}))
"""

THEIRS = r"""
import json, os, sys, time, numpy as np
import torch
torch.set_num_threads(1)
import qwen_omni_utils as qou
path, start, end, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ele = {"type": "audio", "audio": path}
if end > 0:
    ele.update(audio_start=start, audio_end=end)
t = time.perf_counter()
audios = qou.process_audio_info([{"role": "user", "content": [ele]}], False)
seconds = time.perf_counter() - t
rss = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
np.save(out, np.asarray(audios[0], np.float32))
print(json.dumps({"seconds": seconds, "rss_mb": rss, "samples": len(audios[0])}))
"""


def make_video(path: str, seconds: int = 600) -> str:
    if not os.path.exists(path):
        subprocess.run(
            [
                "ffmpeg", "-v", "error", "-y",
                "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=30:duration={seconds}",
                "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
                "-ac", "2", "-c:v", "libx264", "-preset", "ultrafast", "-g", "60", "-c:a", "aac", "-b:a", "128k",
                path,
            ],
            check=True,
        )  # fmt: skip
    return path


def run(cmd: list, env: dict) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def snr_db(a, b) -> float:
    import numpy as np

    n = min(len(a), len(b))
    noise = float(np.sum((a[:n] - b[:n]) ** 2))
    return 10 * np.log10(float(np.sum(b[:n] ** 2)) / max(noise, 1e-20))


def main(argv: list | None = None) -> int:
    import numpy as np

    p = argparse.ArgumentParser(prog="benchmarks/audio.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--omni-python", default="/work/venvs/omni/bin/python")
    p.add_argument("--media", default=os.path.join(tempfile.gettempdir(), "qwen-vl-utils-bench-audio"))
    p.add_argument("--out", help="write audio.json into this folder")
    p.add_argument("--only", choices=("audio", "video", "stream"), help="run one group of cases")
    args = p.parse_args(argv)
    os.makedirs(args.media, exist_ok=True)
    video = make_video(os.path.join(args.media, "ten-minutes.mp4"))
    ours_env = {**os.environ, "PYTHONPATH": SRC}
    theirs_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    have_theirs = os.path.exists(args.omni_python)
    npy = lambda name: os.path.join(args.media, name + ".npy")  # noqa: E731
    results: dict = {"machine": describe_machine(), "cases": {}}
    cases = {"last 60 s": (540.0, 600.0), "whole track": (0.0, 0.0)}
    for case, (start, end) in cases.items() if args.only in (None, "audio") else ():
        runs: dict = {"ours": [], "theirs": []}
        for _ in range(args.reps):
            runs["ours"].append(
                run([sys.executable, "-c", OURS, video, "audio", str(start), str(end), npy("o")], ours_env)
            )
            if have_theirs:
                runs["theirs"].append(
                    run([args.omni_python, "-c", THEIRS, video, str(start), str(end), npy("t")], theirs_env)
                )
        row = {
            "ours_s": statistics.median(r["seconds"] for r in runs["ours"]),
            "ours_rss_mb": max(r["rss_mb"] for r in runs["ours"]),
            "ours_samples": runs["ours"][0]["samples"],
        }
        if have_theirs:
            ours, theirs = np.load(npy("o")), np.load(npy("t"))
            row.update(
                theirs_s=statistics.median(r["seconds"] for r in runs["theirs"]),
                theirs_rss_mb=max(r["rss_mb"] for r in runs["theirs"]),
                theirs_samples=len(theirs),
                snr_db=round(snr_db(ours, theirs), 1),
            )
            row["speedup"] = row["theirs_s"] / row["ours_s"]
        results["cases"][case] = row
        print(case, json.dumps(row), flush=True)
    pairs = {"video": ("use_audio_in_video", "540", "600"), "stream": ("stream_video(audio=True)", "0", "120")}
    for kind, (case, start, end) in pairs.items():
        if args.only not in (None, kind):
            continue
        runs = {kind: [], kind + "+audio": []}
        for _ in range(args.reps):
            for mode in runs:
                runs[mode].append(run([sys.executable, "-c", OURS, video, mode, start, end, npy("v")], ours_env))
        plain = statistics.median(r["seconds"] for r in runs[kind])
        with_sound = statistics.median(r["seconds"] for r in runs[kind + "+audio"])
        row = {
            "without_s": plain,
            "with_audio_s": with_sound,
            "added": with_sound / plain - 1,
            "samples": runs[kind + "+audio"][0]["samples"],
            "rss_mb": [max(r["rss_mb"] for r in runs[m]) for m in runs],
        }
        results["cases"][case] = row
        print(case, json.dumps(row), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "audio.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
