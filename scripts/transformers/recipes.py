"""The README's Qwen2.5-VL and Qwen3-VL recipes through transformers 4.57's own processors (issue 26).

transformers 4.57 cannot be installed next to this project's transformers 5, so its processors run in a
virtualenv of their own (the qwen-vl-finetune one of ``scripts/trainers/goldens.py`` has it: torch, torchvision,
``transformers==4.57.6``, av, tokenizers). This script, run with the project's Python:

1. generates an 8 s 30 fps video and fetches it as each recipe does (``process_vision_info`` with
   ``return_video_kwargs``; for Qwen3-VL with ``return_video_metadata`` and ``image_patch_size=16``): the whole
   video, windows (``video_start``/``video_end``) and another ``fps``;
2. runs this same file in the 4.57 virtualenv (``--consumer``) on those frames and arguments: the processors are
   loaded with ``AutoProcessor`` from a model folder holding the checkpoints' own processor configs and a tiny
   tokenizer (``scripts/trainers/model_dir.py``), and called exactly as the README's Quick start says;
3. writes what the processors gave (Qwen2.5-VL's ``second_per_grid_ts``, Qwen3-VL's timestamps as they appear in
   the expanded prompt, both grids) with the inputs they were given to
   ``tests/goldens/transformers/recipes-4.57.json``, which ``tests/test_transformers.py`` checks the library
   against (its fetches must still be those inputs; the outputs must be right for them)::

    python3 scripts/transformers/recipes.py [--python /work/venvs/finetune/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GOLDEN = ROOT / "tests" / "goldens" / "transformers" / "recipes-4.57.json"

#: (name, element keys) of the video, fetched with each recipe
CASES = [
    ("whole", {"fps": 2.0}),
    ("window", {"fps": 2.0, "video_start": 2.0, "video_end": 6.0}),
    ("from_5.5", {"fps": 2.0, "video_start": 5.5}),
    ("fps4_window", {"fps": 4.0, "video_start": 1.0, "video_end": 3.0}),
]
RECIPES = {"qwen2.5-vl": 14, "qwen3-vl": 16}
VIDEO = {"frames": 240, "width": 160, "height": 96, "fps": 30}


def fetch(video: str, recipe: str, keys: dict) -> tuple:
    """The frames and processor arguments the README's recipe for ``recipe`` hands the processor."""
    import qwen_vl_utils as q

    content = [{"type": "video", "video": video, **keys}, {"type": "text", "text": "?"}]
    messages = [{"role": "user", "content": content}]
    if recipe == "qwen2.5-vl":
        _, videos, video_kwargs = q.process_vision_info(messages, return_video_kwargs=True)
        return videos[0], None, video_kwargs
    _, videos, video_kwargs = q.process_vision_info(
        messages, return_video_kwargs=True, return_video_metadata=True, image_patch_size=16
    )
    ((frames, metadata),) = videos
    return frames, metadata, video_kwargs


def make_video(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from media import make_video as make

    return make(path, **VIDEO)


def produce(python: str) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        video = str(make_video(folder / "v.mp4"))
        inputs = []
        for name, keys in CASES:
            for recipe in RECIPES:
                frames, metadata, kwargs = fetch(video, recipe, keys)
                np.save(folder / f"{name}.{recipe}.npy", frames.numpy())
                inputs.append({"case": name, "recipe": recipe, "keys": keys, "metadata": metadata, "kwargs": kwargs})
        (folder / "inputs.json").write_text(json.dumps(inputs))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        res = subprocess.run([python, __file__, "--consumer", tmp], capture_output=True, text=True, env=env)
        if res.returncode:
            raise SystemExit(f"the transformers 4.57 run failed:\n{res.stderr[-4000:]}")
        outputs = json.loads((folder / "outputs.json").read_text())
    return {"transformers": outputs["version"], "video": VIDEO, "cases": outputs["cases"]}


# --- in the transformers 4.57 virtualenv ------------------------------------------------------------------------


def consume(folder: Path) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoProcessor

    sys.path.insert(0, str(HERE.parent / "trainers"))
    from model_dir import build

    processors = {}
    for recipe in RECIPES:
        processors[recipe] = AutoProcessor.from_pretrained(str(build(folder / recipe, recipe)))
    cases = []
    for case in json.loads((folder / "inputs.json").read_text()):
        recipe = case["recipe"]
        proc = processors[recipe]
        frames = torch.from_numpy(np.load(folder / f"{case['case']}.{recipe}.npy"))
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
        text = proc.apply_chat_template(messages, tokenize=False)
        if recipe == "qwen2.5-vl":  # the README's Quick start, verbatim but for the images
            out = proc(text=[text], images=None, videos=[frames], return_tensors="pt", **case["kwargs"])
            got = {"second_per_grid_ts": [float(x) for x in out["second_per_grid_ts"]]}
        else:
            out = proc(
                text=[text],
                images=None,
                videos=[frames],
                video_metadata=[case["metadata"]],
                do_resize=False,
                return_tensors="pt",
                **case["kwargs"],
            )
            prompt = proc.tokenizer.decode(out["input_ids"][0])
            got = {"timestamps": [float(t) for t in re.findall(r"<([0-9.]+) seconds>", prompt)]}
        got["video_grid_thw"] = out["video_grid_thw"].tolist()
        cases.append({**case, "processor": type(proc).__name__, "output": got})
    (folder / "outputs.json").write_text(json.dumps({"version": transformers.__version__, "cases": cases}))


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="/work/venvs/finetune/bin/python", help="a Python with transformers 4.57")
    p.add_argument("--consumer", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.consumer:
        consume(Path(args.consumer))
        return 0
    golden = produce(args.python)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN.relative_to(ROOT)}: {len(golden['cases'])} cases, transformers {golden['transformers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
