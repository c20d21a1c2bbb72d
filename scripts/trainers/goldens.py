"""Regenerate the trainer golden files: run each trainer's own code on the generated set and record, per sample,
what it fed (tokens per medium) or that it failed. ``tests/test_rules.py`` compares ``dataset count --rules``
with these files.

Each trainer runs in its own virtualenv (their pins clash with each other and with this project's CPU torch);
set them up once (each runner's docstring has the details)::

    python3 -m venv /work/venvs/finetune && /work/venvs/finetune/bin/pip install torch torchvision \\
        "transformers==4.57.6" torchcodec decord av tokenizers
    python3 -m venv /work/venvs/llamafactory && /work/venvs/llamafactory/bin/pip install llamafactory==0.9.5
    python3 -m venv /work/venvs/ms-swift && /work/venvs/ms-swift/bin/pip install ms-swift==4.6.0 \\
        qwen-vl-utils==0.0.14 av decord torch torchvision
    git clone https://github.com/QwenLM/Qwen3-VL /tmp/Qwen3-VL   # qwen-vl-finetune, both variants

then::

    python3 scripts/trainers/goldens.py [--only TRAINER] [--qwen3-vl-repo /tmp/Qwen3-VL] [--venvs /work/venvs]

(``--qwen3-vl-repo`` may be a bare mirror too: the two commits are checked out from it into a temporary folder.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GOLDENS = ROOT / "tests" / "goldens" / "trainers"
sys.path.insert(0, str(ROOT / "tests"))

FINETUNE_COMMITS = {
    "current": "96588727e44c78b25ba03ea03b8e12f7e64fd0da",
    "legacy": "ffcd6e4b2e4b10904dc98ec6f5c25a61b4a760da",  # f4c06f4^: the last data_qwen.py
}

#: (rules, model, name, trainer args): each becomes tests/goldens/trainers/<rules>.<model>.<name>.json. An args
#: value naming a file (a LLaMA-Factory training YAML) is read from tests/goldens/trainers/.
RUNS = [
    ("qwen-vl-finetune", "qwen2.5-vl", "default", {}),
    ("qwen-vl-finetune", "qwen2.5-vl", "alt", {"max_pixels": 200704, "video_max_pixels": 100352, "video_fps": 1}),
    ("qwen-vl-finetune", "qwen3-vl", "default", {}),
    (
        "qwen-vl-finetune",
        "qwen3-vl",
        "alt",
        {"max_pixels": 200704, "video_max_pixels": 100352, "video_fps": 1, "video_max_frames": 16},
    ),
    ("qwen-vl-finetune-legacy", "qwen2.5-vl", "default", {}),
    (
        "qwen-vl-finetune-legacy",
        "qwen2.5-vl",
        "alt",
        {"max_pixels": 200704, "video_max_frame_pixels": 100352, "base_interval": 1, "video_max_frames": 16},
    ),
    ("llamafactory", "qwen2.5-vl", "default", {}),
    ("llamafactory", "qwen3-vl", "default", {}),
    (
        "llamafactory",
        "qwen2.5-vl",
        "small",
        {"image_max_pixels": 262144, "video_max_pixels": 65536, "video_fps": 1.0, "video_maxlen": 16},
    ),
    (
        "llamafactory",
        "qwen3-vl",
        "small",
        {"image_max_pixels": 262144, "video_max_pixels": 65536, "video_fps": 1.0, "video_maxlen": 16},
    ),
    (
        "llamafactory",
        "qwen3-vl",
        "grow",
        {
            "image_max_pixels": 100000,
            "image_min_pixels": 50000,
            "video_max_pixels": 4000,
            "video_min_pixels": 3000,
            "video_fps": 3.0,
            "video_maxlen": 7,
        },
    ),
    ("llamafactory", "qwen2.5-vl", "yaml", "llamafactory-train.yaml"),
    ("ms-swift", "qwen2.5-vl", "default", {}),
    ("ms-swift", "qwen3-vl", "default", {}),
    (
        "ms-swift",
        "qwen2.5-vl",
        "documented",
        {"MAX_PIXELS": "1003520", "VIDEO_MAX_PIXELS": "50176", "FPS_MAX_FRAMES": "12"},
    ),
    (
        "ms-swift",
        "qwen3-vl",
        "documented",
        {"IMAGE_MAX_TOKEN_NUM": "1024", "VIDEO_MAX_TOKEN_NUM": "128", "FPS_MAX_FRAMES": "16"},
    ),
    (
        "ms-swift",
        "qwen3-vl",
        "stress",
        {
            "MAX_PIXELS": "1003520",
            "IMAGE_MAX_TOKEN_NUM": "64",
            "IMAGE_MIN_TOKEN_NUM": "20",
            "VIDEO_MIN_TOKEN_NUM": "16",
            "VIDEO_MAX_TOKEN_NUM": "32",
            "FPS": "4",
            "FPS_MIN_FRAMES": "1",
            "FPS_MAX_FRAMES": "7",
        },
    ),
    (
        "ms-swift",
        "qwen2.5-vl",
        "budget",
        {"VIDEO_MIN_PIXELS": "12544", "VIDEO_MAX_PIXELS": "1003520", "FPS": "1.5", "MODEL_SEQ_LEN": "3000"},
    ),
    ("ms-swift", "qwen2.5-vl", "merge1", {"SPATIAL_MERGE_SIZE": "1"}),
    ("ms-swift", "qwen2.5-vl", "template-max-pixels", {"max_pixels": 40000}),
]

VENVS = {"qwen-vl-finetune": "finetune", "qwen-vl-finetune-legacy": "finetune", "llamafactory": "llamafactory"}
VENVS["ms-swift"] = "ms-swift"


def golden_path(rules: str, model: str, name: str) -> Path:
    return GOLDENS / f"{rules}.{model}.{name}.json"


def _checkout(repo: str, commit: str, into: Path) -> Path:
    subprocess.run(["git", "clone", "-q", "--no-checkout", repo, str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "sparse-checkout", "set", "qwen-vl-finetune/qwenvl"], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "-q", commit], check=True)
    return into / "qwen-vl-finetune"


def _command(rules: str, model: str, args, python: str, sources: dict, model_dir: Path, samples: Path, out: Path):
    """The runner's command line: ``args`` as a JSON object, or the path of a trainer's YAML file."""
    given = str(GOLDENS / args) if isinstance(args, str) else json.dumps(args)
    common = ["--model", model, "--model-dir", str(model_dir), "--samples", str(samples), "--out", str(out)]
    if rules.startswith("qwen-vl-finetune"):
        variant = "legacy" if rules.endswith("legacy") else "current"
        source = ["--variant", variant, "--source", str(sources[variant])]
        return [python, str(HERE / "run_qwen_vl_finetune.py"), *source, "--trainer-args", given, *common]
    if rules == "llamafactory":
        return [python, str(HERE / "run_llamafactory.py"), "--trainer-args", given, *common]
    extra = []
    if isinstance(args, dict) and "max_pixels" in args:  # ms-swift's template argument, not an environment variable
        env = {k: v for k, v in args.items() if k != "max_pixels"}
        extra, given = ["--max-pixels", str(args["max_pixels"])], json.dumps(env)
    return [python, str(HERE / "run_ms_swift.py"), "--trainer-args", given, *extra, *common]


def _record(lines: list) -> dict:
    """The runner's output as a golden file: per sample, the tokens of each medium, or the failure."""
    head, rows = lines[0], lines[1:]
    samples = {}
    for row in rows:
        if "error" in row:
            samples[row["id"]] = {"error": row["error"][:300]}
        elif row.get("mismatch"):  # LLaMA-Factory: the text's tokens differ from the features (the forward fails)
            samples[row["id"]] = {"error": f"text tokens {row.get('text')} differ from the features' {row['media']}"}
        elif any(m.get("pixels_dropped") for m in row["media"]):
            samples[row["id"]] = {"dropped": [m["tokens"] for m in row["media"]]}
        else:
            samples[row["id"]] = {"tokens": [m["tokens"] for m in row["media"]]}
    keep = ("trainer", "variant", "source", "versions", "video_reader")
    return {"runner": {k: head[k] for k in keep if k in head}, "samples": samples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="one trainer (rules name)")
    p.add_argument("--venvs", default="/work/venvs", help="the folder holding the trainers' virtualenvs")
    p.add_argument("--qwen3-vl-repo", default="https://github.com/QwenLM/Qwen3-VL", help="a clone or mirror")
    a = p.parse_args()
    from model_dir import build as build_model_dir

    from trainer_corpus import build as build_corpus

    GOLDENS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        samples = corpus / "samples.jsonl"
        built = build_corpus(corpus)
        samples.write_text("".join(json.dumps(s) + "\n" for s in built))
        sources: dict = {}
        runs = [r for r in RUNS if a.only in (None, r[0])]
        if any(r[0].startswith("qwen-vl-finetune") for r in runs):
            for variant, commit in FINETUNE_COMMITS.items():
                sources[variant] = _checkout(a.qwen3_vl_repo, commit, tmp / variant)
        for rules, model, name, args in runs:
            model_dir = tmp / "models" / model
            if not model_dir.exists():
                build_model_dir(model_dir, model)
            out = tmp / f"{rules}.{model}.{name}.jsonl"
            python = os.path.join(a.venvs, VENVS[rules], "bin", "python")
            cmd = _command(rules, model, args, python, sources, model_dir, samples, out)
            print(f"{rules} {model} {name}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            golden = {"rules": rules, "model": model, "trainer_args": args, **_record(lines)}
            golden_path(rules, model, name).write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
