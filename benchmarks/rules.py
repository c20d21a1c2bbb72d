"""Counting by each trainer's rules: ``python benchmarks/rules.py [--quick] [--out DIR]``.

The sets of ``benchmarks/dataset.py`` (2,000 image samples over a few hundred photos; 2,000 video samples over
tens of clips) and a set of distinct videos (50 clips of 3 to 20 s, each under 4 names: every sample is
probed afresh, nothing reused from a cache), counted with
``dataset count --rules R`` for every rule set, each in a fresh process with the local engine (default workers),
rule sets alternating, median of ``--reps`` runs. That the counts are the trainers' own is what
``tests/test_rules.py`` checks against their code; here the speed is measured, and the counts of the rule sets
are compared with each other (how far apart the trainers are on the same set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from dataset import make_media, measure_count, write_set  # noqa: E402

from suite import describe_machine, make_long_video  # noqa: E402

RULES = ["qwen-vl-utils", "qwen-vl-finetune", "qwen-vl-finetune-legacy", "llamafactory", "ms-swift"]


def totals(path: str) -> dict:
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return {"counted": len(records), "visual_tokens": sum(r["visual_tokens"] for r in records)}


def distinct_videos(folder: str, n: int) -> list:
    names = []
    for i in range(n):
        name = f"distinct{i:03d}.mp4"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            w, h = (1280, 720) if i % 3 == 0 else (640, 360)
            make_long_video(path, seconds=3 + (i * 7) % 18, width=w, height=h, fps=30)
        names.append(name)
    return names


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/rules.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer media")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", help="one set: image, video or distinct video")
    p.add_argument("--media", default=os.path.join(tempfile.gettempdir(), "qwen-vl-utils-bench-dataset"))
    p.add_argument("--out", help="write rules.json into this folder")
    args = p.parse_args(argv)
    images, videos = make_media(args.media, 60 if args.quick else 300, 8 if args.quick else 30)
    unique = distinct_videos(args.media, 20 if args.quick else 50)
    distinct = os.path.join(args.media, "distinct.jsonl")
    with open(distinct, "w") as f:  # every clip under 4 names (hard links): 4 x the clips, each measured afresh
        for copy in range(4):
            for name in unique:
                alias = f"{copy}-{name}"
                if not os.path.exists(os.path.join(args.media, alias)):
                    os.link(os.path.join(args.media, name), os.path.join(args.media, alias))
                conv = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A."}]
                f.write(json.dumps({"video": alias, "conversations": conv}) + "\n")
    sets = {
        "image": write_set(os.path.join(args.media, "images.jsonl"), "image", images, 2000),
        "video": write_set(os.path.join(args.media, "videos.jsonl"), "video", videos, 2000),
        "distinct video": distinct,
    }
    results: dict = {"machine": describe_machine(), "cases": {}}
    for kind, data in sets.items():
        if args.only not in (None, kind):
            continue
        runs: dict = {r: [] for r in RULES}
        tokens: dict = {}
        for _ in range(args.reps):
            for rules in RULES:  # alternating: each rep runs every rule set once
                out = os.path.join(args.media, f"rules-{kind.replace(' ', '-')}-{rules}.jsonl")
                options = {} if rules == "qwen-vl-utils" else {"rules": rules, "model": "qwen2.5-vl"}
                got = measure_count(data, out, options)
                runs[rules].append(got["seconds"])
                tokens[rules] = {"samples": got["samples"], "valid": got["valid"], **totals(out)}
        case = {}
        for rules in RULES:
            seconds = statistics.median(runs[rules])
            case[rules] = {**tokens[rules], "seconds": seconds, "samples_per_s": tokens[rules]["samples"] / seconds}
        results["cases"][kind] = case
        print(kind, json.dumps(case, indent=1), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "rules.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
