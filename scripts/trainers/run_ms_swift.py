"""Run ms-swift's own preprocessing (its template's ``encode``, which calls qwen-vl-utils 0.0.14's ``fetch_image`` /
``fetch_video`` as ms-swift patches them) on a sample set and record the visual tokens it produced per sample.

Nothing here re-implements a rule: the model folder is loaded with ms-swift's loader (``get_processor``, no weights),
the template is ms-swift's (``get_template``, mode ``train`` as ``swift sft`` sets it), and the numbers recorded are
the ``image_grid_thw`` / ``video_grid_thw`` that ``template.encode`` returned, plus the frame count of the video
tensor that ms-swift handed to the HF processor.

Set up the virtualenv (Python 3.11; the default torch wheel is a CUDA build that also runs on CPU, several GB)::

    python3 -m venv /work/venvs/ms-swift
    /work/venvs/ms-swift/bin/pip install -U pip
    /work/venvs/ms-swift/bin/pip install ms-swift==4.6.0 qwen-vl-utils==0.0.14 av decord torch torchvision
    # recorded with: ms-swift 4.6.0, qwen-vl-utils 0.0.14, transformers 5.19.0, torch 2.14.1, torchvision 0.29.1,
    # decord 0.6.0, av 18.1.0 (torchcodec not installed, so 0.0.14 picks decord)

Model folders (``model_dir.py`` needs the ``tokenizers`` package; the venv's python has it)::

    /work/venvs/ms-swift/bin/python scripts/trainers/model_dir.py /tmp/ms_models/qwen2.5-vl --model qwen2.5-vl
    /work/venvs/ms-swift/bin/python scripts/trainers/model_dir.py /tmp/ms_models/qwen3-vl --model qwen3-vl

Run::

    /work/venvs/ms-swift/bin/python scripts/trainers/run_ms_swift.py --model qwen2.5-vl \\
        --model-dir /tmp/ms_models/qwen2.5-vl \\
        --trainer-args '{"MAX_PIXELS": "1003520", "VIDEO_MAX_PIXELS": "50176", "FPS_MAX_FRAMES": "12"}' \\
        --samples /tmp/corpus_ms/samples.jsonl --out /tmp/ms_out/qwen2.5-vl.documented.jsonl

``--trainer-args`` is a JSON object, or a JSON / YAML file holding one, of ms-swift's environment variables
(MAX_PIXELS, MIN_PIXELS, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, IMAGE_MAX_TOKEN_NUM, ..., FPS, FPS_MIN_FRAMES,
FPS_MAX_FRAMES, SPATIAL_MERGE_SIZE, MODEL_SEQ_LEN, FORCE_QWENVL_VIDEO_READER, ...). They are put in ``os.environ``
before swift or qwen_vl_utils is imported, which is how ms-swift reads them.

Output (JSON lines): a header ``{"trainer": "ms-swift", "versions": {...}, "video_reader": ..., "model": ...,
"trainer_args": {...}}``, then per sample ``{"id", "media": [{"kind", "grid_thw", "tokens", "frames"}],
"visual_tokens"}`` (images first, then videos, each in the sample's order) or ``{"id", "error": "Type: message"}``.
``--trace FILE`` also writes, per sample, what qwen-vl-utils saw and returned (image sizes in and out, the video
reader that answered, its frame count and rate, the sampled indices, any reader fallback) for checking the rules.

Two things about the offline model folders, worked around here without touching ms-swift:
  * ms-swift picks a template from the model id / folder name; for a folder named ``qwen2.5-vl`` it finds two
    candidates (``qwen2_5_vl``, ``mimo_vl``) and stops, so the model type and template type are passed explicitly
    (``swift sft --model_type qwen2_5_vl --template qwen2_5_vl`` does the same).
  * The Qwen2/2.5/3-VL templates hard-code ``image_token_id = 151655`` / ``video_token_id = 151656`` (the real Qwen
    vocabulary). The tiny tokenizer has other ids, so ``encode`` would compute the grids but never expand the pad
    tokens; the runner sets the template's two ids to the tokenizer's ids for ``<|image_pad|>`` / ``<|video_pad|>``
    so the expansion runs as with a real checkpoint (and checks the pad count against the grids).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import traceback
from pathlib import Path

MODELS = {
    # --model: (ms-swift model_type, ms-swift template_type)
    "qwen2.5-vl": ("qwen2_5_vl", "qwen2_5_vl"),
    "qwen3-vl": ("qwen3_vl", "qwen3_vl"),
}


def load_trainer_args(text: str | None) -> dict:
    if not text:
        return {}
    path = Path(text)
    if not text.lstrip().startswith("{") and path.exists():
        raw = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit("--trainer-args must be a JSON object (or a JSON/YAML file holding one)")
    return {str(k): ("" if v is None else str(v)) for k, v in data.items()}


def to_swift_row(sample: dict) -> dict:
    """qwen-vl-finetune format -> ms-swift's standard {"messages", "images", "videos"} row."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in sample.get("conversations", [])]
    row: dict = {"messages": messages}
    for src, dst in (("image", "images"), ("video", "videos")):
        media = sample.get(src)
        if media:
            row[dst] = [media] if isinstance(media, str) else list(media)
    return row


def versions() -> dict:
    out = {}
    for dist in ("ms-swift", "qwen-vl-utils", "transformers", "torch", "torchvision", "decord", "av", "torchcodec"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


class _Records(logging.Handler):
    """Collects qwen-vl-utils' warnings (reader fallback, max_pixels clipping, nframes > total_frames)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--trainer-args", default=None, help="JSON object, or a JSON/YAML file, of ms-swift env vars")
    p.add_argument("--samples", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trace", default=None, help="optional JSONL file with what qwen-vl-utils saw per sample")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="ms-swift's own --max_pixels template argument (not an env var; default None = off): images "
        "larger than this are rescaled by ms-swift before qwen-vl-utils sees them",
    )
    a = p.parse_args()

    trainer_args = load_trainer_args(a.trainer_args)
    # ms-swift (get_env_args, compat_qwen_vl_utils) and qwen-vl-utils (MODEL_SEQ_LEN, FORCE_QWENVL_VIDEO_READER) read
    # these at import / processor load time: set them before either is imported.
    os.environ.update(trainer_args)

    import torch
    from swift.model import get_processor
    from swift.template import get_template

    import qwen_vl_utils
    from qwen_vl_utils import vision_process

    model_type, template_type = MODELS[a.model]
    try:
        # runs the loader's _check_qwen_vl_utils (compat_qwen_vl_utils) and patch_qwen_vl_utils
        processor = get_processor(a.model_dir, model_type=model_type)
        template = get_template(processor, template_type=template_type, max_pixels=a.max_pixels)
    except Exception as e:  # a bad env value stops ms-swift before any sample (e.g. MAX_PIXELS=1e6: int('1e6'))
        header = {
            "trainer": "ms-swift",
            "versions": versions(),
            "video_reader": None,
            "model": a.model,
            "trainer_args": trainer_args,
            "error": f"{type(e).__name__}: {e}",
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(header) + "\n")
        traceback.print_exc()
        raise SystemExit(2) from e
    template.set_mode("train")  # as swift sft does (swift/pipelines/train/sft.py)
    tokenizer = processor.tokenizer
    pad_ids = {}
    for attr, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>")):
        tid = tokenizer.convert_tokens_to_ids(token)
        if getattr(template, attr) != tid:  # tiny offline tokenizer: see the module docstring
            setattr(template, attr, tid)
        pad_ids[attr] = tid
    merge = processor.image_processor.merge_size

    # Observe (never change) what qwen-vl-utils does: wrap the public functions the template imports at call time and
    # the reader backends ms-swift already patched. Each wrapper calls the real function with the same arguments.
    trace: dict = {}
    real_fetch_image, real_fetch_video = qwen_vl_utils.fetch_image, qwen_vl_utils.fetch_video

    def fetch_image(ele, *args, **kwargs):
        src = ele.get("image")
        size_in = list(src.size) if hasattr(src, "size") and not isinstance(src, str) else None
        out = real_fetch_image(ele, *args, **kwargs)
        trace.setdefault("images", []).append(
            {"size_in": size_in, "mode_in": getattr(src, "mode", None), "size_out": list(out.size), "kwargs": kwargs}
        )
        return out

    def fetch_video(ele, *args, **kwargs):
        rec = {"kwargs": {k: v for k, v in kwargs.items()}, "reads": []}
        trace.setdefault("videos", []).append(rec)
        out = real_fetch_video(ele, *args, **kwargs)
        video = out[0] if kwargs.get("return_video_sample_fps") else out
        if isinstance(video, tuple):
            video = video[0]
        rec["shape_out"] = list(video.shape)
        if kwargs.get("return_video_sample_fps"):
            rec["sample_fps"] = out[1]
        return out

    qwen_vl_utils.fetch_image = fetch_image
    qwen_vl_utils.fetch_video = fetch_video

    def wrap_reader(name, fn):
        def reader(ele):
            try:
                video, meta, sample_fps = fn(ele)
            except Exception as e:
                trace["videos"][-1]["reads"].append({"backend": name, "error": f"{type(e).__name__}: {e}"})
                raise
            idx = meta.get("frames_indices")
            idx = idx.tolist() if hasattr(idx, "tolist") else list(idx)
            trace["videos"][-1]["reads"].append(
                {
                    "backend": name,
                    "total_frames": meta.get("total_num_frames"),
                    "video_fps": float(meta.get("fps")),
                    "nframes": len(idx),
                    "indices": idx,
                    "decoded_hw": list(video.shape[-2:]),
                    "sample_fps": sample_fps,
                }
            )
            return video, meta, sample_fps

        return reader

    for name, fn in list(vision_process.VIDEO_READER_BACKENDS.items()):
        vision_process.VIDEO_READER_BACKENDS[name] = wrap_reader(name, fn)

    warnings = _Records()
    logging.getLogger(vision_process.__name__).addHandler(warnings)

    video_reader = vision_process.get_video_reader_backend()
    header = {
        "trainer": "ms-swift",
        "versions": versions(),
        "video_reader": video_reader,
        "model": a.model,
        "model_type": model_type,
        "template": template_type,
        "trainer_args": trainer_args,
        "template_max_pixels": a.max_pixels,
        "qwen_vl_utils_globals": getattr(processor, "global_vars", None),
        "model_seq_len": vision_process.MODEL_SEQ_LEN,
        "vision_process_file": vision_process.__file__,  # the installed 0.0.14, never this repository's src/
    }

    samples = [json.loads(line) for line in Path(a.samples).read_text().splitlines() if line.strip()]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    trace_file = open(a.trace, "w") if a.trace else contextlib.nullcontext()  # noqa: SIM115
    with open(a.out, "w") as f, trace_file as tf:
        f.write(json.dumps(header) + "\n")
        for sample in samples:
            sid = sample.get("id")
            trace.clear()
            warnings.messages.clear()
            try:
                enc = template.encode(to_swift_row(sample))
                media = []
                for kind, key, frames in (("image", "image_grid_thw", None), ("video", "video_grid_thw", "videos")):
                    grid = enc.get(key)
                    if grid is None:
                        continue
                    grids = torch.as_tensor(grid).tolist()
                    # Template.encode is wrapped in retry_decorator(3): a sample may be fetched more than once, so
                    # the frames of video i are those of the last len(grids) fetches.
                    fetched = trace.get("videos", [])[-len(grids) :] if frames else []
                    for i, thw in enumerate(grids):
                        t, h, w = (int(x) for x in thw)
                        entry = {"kind": kind, "grid_thw": [t, h, w], "tokens": t * h * w // merge**2}
                        entry["frames"] = fetched[i]["shape_out"][0] if frames else 1
                        media.append(entry)
                total = sum(m["tokens"] for m in media)
                ids = enc["input_ids"]
                pads = sum(1 for x in ids if x in (pad_ids["image_token_id"], pad_ids["video_token_id"]))
                if pads != total:
                    raise AssertionError(f"runner check: {pads} pad tokens in input_ids, grids say {total}")
                row = {"id": sid, "media": media, "visual_tokens": total}
            except Exception as e:  # per sample, as ms-swift's dataset map drops failing rows (strict=False)
                row = {"id": sid, "error": f"{type(e).__name__}: {e}"}
                trace["traceback"] = traceback.format_exc(limit=-4)
            f.write(json.dumps(row) + "\n")
            if tf:
                tf.write(json.dumps({"id": sid, **trace, "warnings": list(warnings.messages)}, default=str) + "\n")
    print(a.out, file=sys.stderr)


if __name__ == "__main__":
    main()
