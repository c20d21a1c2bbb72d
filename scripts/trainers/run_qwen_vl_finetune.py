"""Run QwenLM's qwen-vl-finetune data pipeline (the trainer's own code) on a sample set and record, per sample,
the visual grids and token counts it produced.

Two variants of the trainer, both from https://github.com/QwenLM/Qwen3-VL (folder ``qwen-vl-finetune``):

* ``current``: ``qwenvl/data/data_processor.py`` (checked at 96588727e44c78b25ba03ea03b8e12f7e64fd0da):
  ``LazySupervisedDataset(processor, data_args)`` (which calls ``update_processor_pixels``) then its
  ``_get_item([sample])`` = ``preprocess_qwen_visual`` (``processor.apply_chat_template(tokenize=True)``, which
  loads images/videos through transformers) + ``get_rope_index_*``.
* ``legacy``: ``qwenvl/data/data_qwen.py`` as it was just before commit f4c06f4 "support_qwen3vl_finetune"
  removed it (checked at ffcd6e4b2e4b10904dc98ec6f5c25a61b4a760da): ``LazySupervisedDataset(tokenizer,
  data_args)`` then ``_get_item(i)`` (decord frame reading, per-frame pixel budget).

Setup (the versions this was checked with; qwen-vl-finetune's README documents transformers==4.57.0.dev0 and
torchcodec for the current code, transformers==4.50.0.dev0 for the legacy one)::

    python3 -m venv /work/venvs/finetune
    /work/venvs/finetune/bin/pip install torch torchvision "transformers==4.57.6" torchcodec decord av
    git clone https://github.com/QwenLM/Qwen3-VL && cd Qwen3-VL
    git checkout 96588727e44c78b25ba03ea03b8e12f7e64fd0da   # current
    git checkout ffcd6e4b2e4b10904dc98ec6f5c25a61b4a760da   # legacy (f4c06f4^)
    python3 scripts/trainers/model_dir.py /tmp/m25 --model qwen2.5-vl   # processor configs + tiny tokenizer

Run with the venv's python::

    run_qwen_vl_finetune.py --variant current|legacy --source Qwen3-VL/qwen-vl-finetune \\
        --model qwen2.5-vl|qwen3-vl --model-dir /tmp/m25 --trainer-args '{"max_pixels": 200704}' \\
        --samples samples.jsonl --out out.jsonl

``--trainer-args`` takes the trainer's own ``DataArguments`` field names (of the variant's
``qwenvl/train/argument.py``); the others keep that dataclass's defaults. The trainer's ``train()`` (which would
load model weights) is not run: its model-type branch (``train_qwen.py``) is followed by ``--model``. Nothing of
the trainer is copied: its modules are imported from ``--source`` and called; the runner only wraps a few calls
(calling through) to record what they saw (decoder frame counts, frames fed), and calls ``_get_item`` directly
(``__getitem__`` would retry a failing sample and then silently return the next one).

The legacy code predates Qwen3-VL: with ``--model qwen3-vl`` it runs what its ``train()`` would do for a
non-"qwen2.5" checkpoint (``Qwen2VLImageProcessor.from_pretrained``, model_type "qwen2vl"), a hypothetical setup.

Model folder: the trainer hardcodes Qwen's special-token ids (151643..151656; rope2d.py finds images/videos by
them). When ``--model-dir``'s tokenizer.json numbers them otherwise (the tiny tokenizer of
``scripts/trainers/model_dir.py`` uses 0..13), the runner works on a temporary copy whose special tokens get
Qwen's ids (recorded as ``model_dir_patch`` in the header); without that, get_rope_index sees no visual block and
the two-video failure of Qwen2.5-VL never shows. ``input_ids`` lengths are those of the given tokenizer: the
text part differs from the real Qwen tokenizer's; visual placeholder counts do not.

Output: a header line ``{"trainer", "source", "versions", "model", "trainer_args", ...}``, then one line per
sample: ``{"id", "media": [{"kind", "grid_thw", "tokens", "frames", ...}], "visual_tokens", "input_ids"}``
(images first in their order, then videos) or ``{"id", "error": "Type: message", "error_at": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path

MODELS = ("qwen2.5-vl", "qwen3-vl")
DISTRIBUTIONS = ("transformers", "torch", "torchvision", "torchcodec", "decord", "av", "pillow", "numpy", "tokenizers")


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _source_commit(source: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return "unknown"


def _where(exc: BaseException, source: Path) -> dict:
    """The deepest traceback frame, and the deepest one inside the trainer's source."""
    frames = traceback.extract_tb(exc.__traceback__)
    out = {}
    if frames:
        f = frames[-1]
        out["raised_at"] = f"{_short(f.filename)}:{f.lineno} in {f.name}"
    src = str(source.resolve())
    own = [f for f in frames if os.path.abspath(f.filename).startswith(src)]
    if own:
        f = own[-1]
        out["trainer_frame"] = f"{os.path.relpath(f.filename, src)}:{f.lineno} in {f.name}"
    return out


def _short(path: str) -> str:
    for marker in ("site-packages/", "qwen-vl-finetune/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _grids(t) -> list:
    """A grid_thw tensor (n, 3), a list/tuple of such tensors or of (3,) tensors, into [[t, h, w], ...]."""
    if t is None:
        return []
    if isinstance(t, (list, tuple)):
        rows = []
        for x in t:
            rows.extend(_grids(x))
        return rows
    t = t.tolist() if hasattr(t, "tolist") else t
    if t and not isinstance(t[0], list):
        return [[int(v) for v in t]]
    return [[int(v) for v in row] for row in t]


def _data_args(DataArguments, trainer_args: dict, dataset_name: str):
    names = {f.name for f in dataclasses.fields(DataArguments)}
    unknown = sorted(set(trainer_args) - names)
    if unknown:
        raise SystemExit(f"unknown trainer argument(s) {unknown}; this variant's DataArguments has {sorted(names)}")
    if "dataset_use" in trainer_args:
        raise SystemExit("dataset_use is set by the runner (it registers --samples as the dataset)")
    return DataArguments(dataset_use=dataset_name, **trainer_args)


def _effective(data_args) -> dict:
    out = {}
    for f in dataclasses.fields(data_args):
        if f.name == "dataset_use":
            continue
        out[f.name] = getattr(data_args, f.name)
    return out


# Qwen's real ids of its special tokens (Qwen2.5-VL and Qwen3-VL tokenizers alike)
QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
CONFIG_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _with_qwen_token_ids(model_dir: Path, work: Path) -> tuple[Path, str | None]:
    """The trainer hardcodes Qwen's token ids: rope2d.py's get_rope_index_* find visual blocks by
    vision_start 151652 / image_pad 151655 / video_pad 151656, and data_processor.py's label masking looks for
    77091 ("assistant") and 151645 (<|im_end|>). A tokenizer whose special tokens have other ids (the tiny one of
    scripts/trainers/model_dir.py numbers them 0..13) makes get_rope_index see no image or video at all, so a
    failure there (two videos in one Qwen2.5-VL sample) never shows. Work on a copy of the model folder whose
    tokenizer.json gives the special tokens Qwen's ids (the other tokens keep theirs)."""
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.exists():
        return model_dir, None
    tok = json.loads(tok_path.read_text())
    vocab = tok.get("model", {}).get("vocab", {})
    if all(vocab.get(k) == v for k, v in QWEN_SPECIAL_IDS.items() if k in vocab):
        return model_dir, None
    copy = work / model_dir.name
    shutil.copytree(model_dir, copy)
    for added in tok.get("added_tokens", []):
        if added["content"] in QWEN_SPECIAL_IDS:
            added["id"] = QWEN_SPECIAL_IDS[added["content"]]
    for k, v in QWEN_SPECIAL_IDS.items():
        if k in vocab:
            vocab[k] = v
    # fill the id gap with never-produced entries (no merge leads to them), so the vocabulary has no holes
    used = set(vocab.values())
    for i in range(max(used)):
        if i not in used:
            vocab[f"<|runner_unused_{i}|>"] = i
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    cfg_path = copy / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        for key, token in CONFIG_IDS.items():
            if key in cfg:
                cfg[key] = QWEN_SPECIAL_IDS[token]
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return copy, "special-token ids of tokenizer.json remapped to Qwen's 151643..151656 (rope2d.py hardcodes them)"


def _register(qwenvl_data, samples: Path) -> str:
    """Register --samples as a dataset in the trainer's own registry (qwenvl/data/__init__.py data_dict), the way
    a user adds one there; data_path "" keeps the samples' absolute paths as they are."""
    name = "runner_samples"
    qwenvl_data.data_dict[name] = {"annotation_path": str(samples), "data_path": ""}
    return name


class _Spy:
    """Records what the decoders returned while the trainer's code runs (wrappers call through)."""

    def __init__(self):
        self.videos: list[dict] = []
        self.pending = None

    def reset(self):
        self.videos = []
        self.pending = None


def run_current(args, source: Path, samples: list) -> tuple[dict, list]:
    import transformers.video_processing_utils as vpu
    from qwenvl import data as qwenvl_data
    from qwenvl.data import data_processor
    from qwenvl.train.argument import DataArguments
    from transformers import AutoProcessor

    data_args = _data_args(DataArguments, json.loads(args.trainer_args), _register(qwenvl_data, args.samples))
    # train_qwen.py train(): model_type from the checkpoint name (qwen3 -> "qwen3vl", qwen2.5 -> "qwen2.5vl"), then
    # processor = AutoProcessor.from_pretrained(model_name_or_path); make_supervised_data_module(processor, data_args)
    data_args.model_type = {"qwen2.5-vl": "qwen2.5vl", "qwen3-vl": "qwen3vl"}[args.model]
    processor = AutoProcessor.from_pretrained(str(args.model_dir), local_files_only=True)
    dataset = data_processor.LazySupervisedDataset(processor, data_args)  # calls update_processor_pixels

    spy = _Spy()
    original_load_video = vpu.load_video

    def load_video(*a, **k):
        video, meta = original_load_video(*a, **k)
        rec = {"frames": int(video.shape[0])}
        if meta is not None:
            rec["decoder"] = {
                "backend": getattr(meta, "video_backend", None),
                "total_num_frames": getattr(meta, "total_num_frames", None),
                "fps": getattr(meta, "fps", None),
                "duration": getattr(meta, "duration", None),
                "frames_indices": None
                if getattr(meta, "frames_indices", None) is None
                else [int(i) for i in meta.frames_indices],
                "decoded_hw": [int(video.shape[-2]), int(video.shape[-1])],
            }
        spy.videos.append(rec)
        return video, meta

    vpu.load_video = load_video  # fetch_videos (video_processing_utils) calls it by this module-level name

    vp = processor.video_processor
    ip = processor.image_processor
    header_extra = {
        "model_type": data_args.model_type,
        "processor": {
            "class": type(processor).__name__,
            "image_processor": type(ip).__name__,
            "video_processor": type(vp).__name__,
            "image_size": dict(ip.size),
            "video_size": dict(vp.size),
            "video_fps": getattr(vp, "fps", None),
            "video_min_frames": getattr(vp, "min_frames", None),
            "video_max_frames": getattr(vp, "max_frames", None),
            "video_do_sample_frames": getattr(vp, "do_sample_frames", None),
            "patch_size": ip.patch_size,
            "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size,
        },
    }
    merge = dataset.merge_size
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    by_id = {s["id"]: s for s in dataset.list_data_dict}
    rows = []
    for sample in samples:
        spy.reset()
        source_item = by_id[sample["id"]]
        try:
            # LazySupervisedDataset.__getitem__ minus its retry/fall-back-to-the-next-sample loop
            data_dict = dataset.item_fn([source_item])
        except Exception as e:  # the trainer's failure is the result
            rows.append({"id": sample["id"], "error": f"{type(e).__name__}: {e}", "error_at": _where(e, source)})
            continue
        media = []
        for g in _grids(data_dict.get("image_grid_thw")):
            media.append(_medium("image", g, merge))
        for i, g in enumerate(_grids(data_dict.get("video_grid_thw"))):
            m = _medium("video", g, merge)
            if i < len(spy.videos):
                m.update(spy.videos[i])
            media.append(m)
        rows.append(_row(sample["id"], media, data_dict["input_ids"][0].tolist(), (image_id, video_id)))
    return {"trainer": "qwen-vl-finetune", "trainer_args": _effective(data_args), **header_extra}, rows


def _medium(kind: str, grid: list, merge: int) -> dict:
    return {"kind": kind, "grid_thw": grid, "tokens": grid[0] * grid[1] * grid[2] // merge**2}


def _row(sample_id: str, media: list, ids: list, pads: tuple) -> dict:
    """One sample's output line: its media, their tokens, the input_ids length and the pads in it."""
    return {
        "id": sample_id,
        "media": media,
        "visual_tokens": sum(m["tokens"] for m in media),
        "input_ids": len(ids),
        "placeholder_tokens": sum(1 for t in ids if t in pads),
    }


def run_legacy(args, source: Path, samples: list) -> tuple[dict, list]:
    import transformers
    from qwenvl import data as qwenvl_data
    from qwenvl.data import data_qwen
    from qwenvl.train.argument import DataArguments
    from transformers import AutoProcessor, Qwen2VLImageProcessor

    data_args = _data_args(DataArguments, json.loads(args.trainer_args), _register(qwenvl_data, args.samples))
    # train_qwen.py train() at f4c06f4^ (lines 106-127): "qwen2.5" in the checkpoint name -> the AutoProcessor's
    # image_processor and model_type "qwen2.5vl"; anything else (Qwen3-VL included: that code predates it) ->
    # Qwen2VLImageProcessor.from_pretrained and model_type "qwen2vl".
    if args.model == "qwen2.5-vl":
        data_args.image_processor = AutoProcessor.from_pretrained(
            str(args.model_dir), local_files_only=True
        ).image_processor
        data_args.model_type = "qwen2.5vl"
    else:
        data_args.image_processor = Qwen2VLImageProcessor.from_pretrained(str(args.model_dir), local_files_only=True)
        data_args.model_type = "qwen2vl"
    # train_qwen.py lines 143-149 (model_max_length is TrainingArguments' default, 512; nothing truncates here)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(args.model_dir), model_max_length=512, padding_side="right", use_fast=False, local_files_only=True
    )
    dataset = data_qwen.LazySupervisedDataset(tokenizer=tokenizer, data_args=data_args)

    spy = _Spy()
    OriginalVideoReader = data_qwen.VideoReader

    def video_reader(*a, **k):
        vr = OriginalVideoReader(*a, **k)
        spy.pending = {"backend": "decord", "len": len(vr), "avg_fps": vr.get_avg_fps()}
        return vr

    data_qwen.VideoReader = video_reader  # video_decord() calls the module-level name `VideoReader`
    original_frames = dataset.process_video_frames

    def process_video_frames(video, frame_idx, video_length):
        out = original_frames(video, frame_idx, video_length)
        decoder = spy.pending or {"backend": "torchcodec"}
        spy.pending = None
        shape = tuple(video.shape)  # decord: (n, h, w, 3); torchcodec: (n, 3, h, w)
        decoder.update(
            {
                "frames_indices": [int(i) for i in frame_idx],
                "video_length": float(video_length),
                "decoded_hw": [int(shape[1]), int(shape[2])] if shape[-1] == 3 else [int(shape[2]), int(shape[3])],
            }
        )
        spy.videos.append({"frames": len(frame_idx), "decoder": decoder, "grid_thw": _grids(out[1])[0]})
        return out

    dataset.process_video_frames = process_video_frames

    ip = data_args.image_processor
    header_extra = {
        "model_type": data_args.model_type,
        "processor": {
            "image_processor": type(ip).__name__,
            "image_size": dict(ip.size),
            "patch_size": ip.patch_size,
            "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size,
        },
    }
    merge = ip.merge_size
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    index = {s["id"]: i for i, s in enumerate(dataset.list_data_dict)}  # __init__ shuffled the list
    rows = []
    for sample in samples:
        spy.reset()
        i = index[sample["id"]]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                # LazySupervisedDataset.__getitem__ minus its retry/fall-back-to-the-next-sample loop
                data_dict = dataset._get_item(i)
        except Exception as e:  # the trainer's failure is the result
            rows.append({"id": sample["id"], "error": f"{type(e).__name__}: {e}", "error_at": _where(e, source)})
            continue
        media = []
        for g in _grids(data_dict.get("image_grid_thw")):
            media.append(_medium("image", g, merge))
        fed_videos = _grids(data_dict.get("video_grid_thw"))
        for i, rec in enumerate(spy.videos):
            g = rec.pop("grid_thw")
            m = {**_medium("video", g, merge), **rec}
            if not fed_videos:
                # _get_item's `if "image" ... elif "video"` (data_qwen.py:462-472): a sample with images keeps
                # only pixel_values; the video's grid was computed and its <|video_pad|> tokens are in
                # input_ids, but pixel_values_videos / video_grid_thw are not returned.
                m["pixels_dropped"] = True
            elif i >= len(fed_videos) or fed_videos[i] != g:
                m["runner_warning"] = f"returned video_grid_thw {fed_videos} differs from the recorded grid"
            media.append(m)
        rows.append(_row(sample["id"], media, data_dict["input_ids"][0].tolist(), (image_id, video_id)))
    return {"trainer": "qwen-vl-finetune-legacy", "trainer_args": _effective(data_args), **header_extra}, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=("current", "legacy"), required=True)
    p.add_argument("--source", type=Path, required=True, help="the qwen-vl-finetune folder of a Qwen3-VL checkout")
    p.add_argument("--source-commit", help="commit of --source when it is not a git checkout")
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--trainer-args", default="{}", help="JSON object of DataArguments fields")
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    args.samples = args.samples.resolve()
    source = args.source.resolve()
    if not (source / "qwenvl").is_dir():
        p.error(f"{source} has no qwenvl/ (pass the qwen-vl-finetune folder)")
    if not isinstance(json.loads(args.trainer_args), dict):
        p.error("--trainer-args must be a JSON object")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    sys.path.insert(0, str(source))

    with open(args.samples) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    runner = run_current if args.variant == "current" else run_legacy
    args.model_dir_given = args.model_dir
    with tempfile.TemporaryDirectory(prefix="ft-model-") as work:
        args.model_dir, patch = _with_qwen_token_ids(args.model_dir.resolve(), Path(work))
        header, rows = runner(args, source, samples)
    header["model_dir"] = str(Path(args.model_dir_given).resolve())
    if patch:
        header["model_dir_patch"] = patch
    header = {
        "trainer": header.pop("trainer"),
        "source": _source_commit(source, args.source_commit),
        "variant": args.variant,
        "versions": _versions(),
        "model": args.model,
        "trainer_args": header.pop("trainer_args"),
        **header,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        f.write(json.dumps(header, default=str) + "\n")
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    errors = sum(1 for r in rows if "error" in r)
    print(f"{args.out}: {len(rows)} samples, {errors} errors", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
