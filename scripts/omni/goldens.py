"""Regenerate ``tests/goldens/omni/qwen-omni-utils.json``: run the public qwen-omni-utils 0.0.9 (in its own
virtualenv, see ``run_qwen_omni_utils.py``) on the cases and media ``run_qwen_omni_utils.make_media`` writes, and
keep per case what the tests compare: the error type, or per audio its length, where it starts and ends in the
source signal's time (the stepped tone's analysis) and a 50 ms excerpt of its samples (16-bit) from its middle.

    python3 scripts/omni/goldens.py [--python /work/venvs/omni/bin/python]

``tests/test_omni_golden.py`` writes the same media and compares this library's output case by case.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GOLDEN = ROOT / "tests" / "goldens" / "omni" / "qwen-omni-utils.json"
EXCERPT = 800  # samples (50 ms at 16 kHz)


def excerpt(audio: np.ndarray) -> dict:
    """``EXCERPT`` samples from the middle of ``audio``, as 16-bit base64, and where they start."""
    at = max(0, len(audio) // 2 - EXCERPT // 2)
    part = np.round(np.clip(audio[at : at + EXCERPT], -1, 1) * 32767).astype("<i2")
    return {"at": at, "i16": base64.b64encode(part.tobytes()).decode()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", default="/work/venvs/omni/bin/python", help="the qwen-omni-utils virtualenv's python")
    a = p.parse_args()
    runner = HERE / "run_qwen_omni_utils.py"
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp) / "media"
        subprocess.run([a.python, str(runner), "--make-media", str(media)], check=True)
        out = Path(tmp) / "out.npz"
        cmd = [a.python, str(runner), "--cases", str(media / "cases.json"), "--out", str(out)]
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        result = json.loads(out.with_suffix(".json").read_text())
        arrays = np.load(out)
        cases = []
        for case in result["cases"]:
            keep = {k: case[k] for k in ("id", "call", "use_audio_in_video", "kwargs") if k in case}
            if "error" in case:
                keep["error"] = case["error"]["type"]
            else:
                keep["n_audios"] = case.get("n_audios")
                keep["audios"] = []
                for i, stats in enumerate(case.get("audios") or []):
                    audio = arrays[f"{case['id']}/audio{i}"]
                    keep["audios"].append({"len": stats["len"], "steps": stats.get("steps"), **excerpt(audio)})
                keep["videos"] = [v["shape"] for v in case.get("videos") or []] or None
            cases.append(keep)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    header = {k: result["header"][k] for k in ("versions", "video_reader", "sample_rate")}
    GOLDEN.write_text(json.dumps({"header": header, "cases": cases}, indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
