"""Run LLaMA-Factory's own preprocessing code on a set of samples and record the visual tokens it produced.

Nothing of LLaMA-Factory is copied here: its argument classes parse the trainer arguments, its ``load_tokenizer``
loads (and patches) the processor, its template registry gives the ``qwen2_vl`` / ``qwen3_vl`` template and with
it the mm_plugin, its sharegpt converter aligns each sample, its ``SupervisedDatasetProcessor`` encodes it (which
calls ``mm_plugin.process_messages``: the image / video tokens written into the text) and the plugin's
``get_mm_inputs`` (what its data collator calls) gives the features' ``image_grid_thw`` / ``video_grid_thw``.

Set-up (once; only package registries are needed)::

    python3 -m venv /work/venvs/llamafactory
    /work/venvs/llamafactory/bin/pip install llamafactory==0.9.5
    # resolves to transformers 5.6.0, torch 2.14.1 (+cu130 wheel, runs on CPU), torchvision 0.29.1, av 16.0.0;
    # llamafactory itself requires torchvision (and torchaudio), so the registry's default torch is used.
    # model folders: model_dir.py needs `tokenizers` (this venv has it; a bare /usr/bin/python3 may not)
    /work/venvs/llamafactory/bin/python scripts/trainers/model_dir.py /tmp/lf_models/qwen2.5-vl --model qwen2.5-vl
    /work/venvs/llamafactory/bin/python scripts/trainers/model_dir.py /tmp/lf_models/qwen3-vl --model qwen3-vl

Usage::

    /work/venvs/llamafactory/bin/python scripts/trainers/run_llamafactory.py --model qwen2.5-vl \\
        --model-dir /tmp/lf_models/qwen2.5-vl --trainer-args '{"image_max_pixels": 262144}' \\
        --samples /tmp/corpus_lf/samples.jsonl --out /tmp/lf_out/qwen2.5-vl.jsonl

``--trainer-args``: a JSON object, or a path to a JSON / YAML file (a LLaMA-Factory training YAML works), with
LLaMA-Factory's own argument names; unspecified ones take its defaults. ``model_name_or_path`` is always the
``--model-dir``; ``template`` defaults to ``qwen2_vl`` / ``qwen3_vl``. Only ModelArguments and DataArguments are
parsed (a YAML's training / hardware settings such as bf16 or deepspeed are accepted and ignored); a key that is
none of LLaMA-Factory's training arguments is refused.

Output (JSON lines): a header ``{"trainer": "llamafactory", "versions": ..., "model": ..., "trainer_args": ...}``,
then per sample ``{"id", "media": [{"kind", "grid_thw", "tokens", "frames"}], "visual_tokens"}`` (images first, in
their order, then videos; grid_thw and frames are those of the features ``get_mm_inputs`` built, what the model is
fed) plus ``"text_tokens"``: the number of ``<|image_pad|>`` / ``<|video_pad|>`` tokens ``process_messages``
wrote into the text (per media in ``text``). Where the two differ the sample carries ``"mismatch": true`` (the
model's forward would reject it); ``"input_ids_tokens"`` appears where ``cutoff_len`` truncated them out of the
encoded sequence. Where LLaMA-Factory raises: ``{"id", "error": "ExceptionType: message"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEMPLATES = {"qwen2.5-vl": "qwen2_vl", "qwen3-vl": "qwen3_vl"}
RELEVANT = (
    "template",
    "image_max_pixels",
    "image_min_pixels",
    "video_max_pixels",
    "video_min_pixels",
    "video_fps",
    "video_maxlen",
    "use_fast_tokenizer",
    "cutoff_len",
)


def read_trainer_args(text: str | None) -> dict:
    if not text:
        return {}
    path = Path(text)
    if not text.lstrip().startswith("{") and path.is_file():
        from omegaconf import OmegaConf  # what llamafactory.hparams.parser.read_args uses for YAML / JSON files

        if path.suffix in (".yaml", ".yml"):
            return OmegaConf.to_container(OmegaConf.load(path.absolute()))
        return OmegaConf.to_container(OmegaConf.create(json.loads(path.read_text())))
    return json.loads(text)


def parse_args(model: str, model_dir: str, user: dict):
    """LLaMA-Factory's own argument classes, parsed by its own ``_parse_args`` (HfArgumentParser.parse_dict).

    Only ModelArguments (which holds ProcessorArguments: image_max_pixels, video_fps, ...) and DataArguments
    (template, cutoff_len, ...) are parsed: the rest of a training YAML (TrainingArguments: bf16, deepspeed,
    output_dir, ...) validates the hardware, not the preprocessing, and is ignored (allow_extra_keys)."""
    import dataclasses

    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )
    from llamafactory.hparams.parser import _parse_args
    from transformers import HfArgumentParser

    known = {
        f.name
        for c in (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments)
        for f in dataclasses.fields(c)
    }
    unknown = sorted(set(user) - known)
    if unknown:  # what LLaMA-Factory's own train parser rejects (without ALLOW_EXTRA_ARGS)
        raise SystemExit(f"not LLaMA-Factory arguments: {unknown}")
    args = dict(user)
    args["model_name_or_path"] = model_dir
    args.setdefault("template", TEMPLATES[model])
    model_args, data_args = _parse_args(HfArgumentParser((ModelArguments, DataArguments)), args, allow_extra_keys=True)
    return model_args, data_args


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for name in ("llamafactory", "transformers", "torch", "torchvision", "av", "pillow"):
        try:
            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def to_sharegpt(sample: dict) -> dict:
    """qwen-vl-finetune's sample -> a row of LLaMA-Factory's sharegpt format (columns named in dataset_info)."""
    row = {"conversations": sample.get("conversations", [])}
    for src, dst in (("image", "images"), ("video", "videos")):
        media = sample.get(src)
        if media is not None:
            row[dst] = media if isinstance(media, list) else [media]
        else:
            row[dst] = None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(TEMPLATES))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--trainer-args", default="{}")
    ap.add_argument("--samples", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    user = read_trainer_args(a.trainer_args)
    model_args, data_args = parse_args(a.model, a.model_dir, user)

    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.model import load_tokenizer

    tokenizer_module = load_tokenizer(model_args)
    tokenizer, processor = tokenizer_module["tokenizer"], tokenizer_module["processor"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    plugin = template.mm_plugin

    attr = DatasetAttr("file", "samples", formatting="sharegpt")
    attr.join(
        {"formatting": "sharegpt", "columns": {"messages": "conversations", "images": "images", "videos": "videos"}}
    )
    converter = get_dataset_converter("sharegpt", attr, data_args)
    dataset_processor = SupervisedDatasetProcessor(
        template=template, tokenizer=tokenizer, processor=processor, data_args=data_args
    )

    # observe (not replace) what process_messages wrote into the text during encoding
    captured: dict = {}
    real_process_messages = plugin.process_messages

    def spy(messages, images, videos, audios, proc):
        out = real_process_messages(messages, images, videos, audios, proc)
        captured["messages"] = out
        return out

    plugin.process_messages = spy

    image_processor = getattr(processor, "image_processor", None)
    video_processor = getattr(processor, "video_processor", None) or image_processor
    img_merge = getattr(image_processor, "merge_size", 2) ** 2
    vid_merge = getattr(video_processor, "merge_size", 2) ** 2
    image_token, video_token = plugin.image_token, plugin.video_token

    effective = {k: getattr(model_args, k, getattr(data_args, k, None)) for k in RELEVANT}
    effective["mm_plugin"] = type(plugin).__name__
    effective["processor"] = type(processor).__name__ if processor is not None else None
    effective["image_processor"] = type(image_processor).__name__ if image_processor is not None else None
    effective["video_processor"] = type(video_processor).__name__ if video_processor is not None else None
    for name, proc in (("image", image_processor), ("video", video_processor)):
        if proc is not None:
            size = getattr(proc, "size", None)
            effective[f"{name}_processor_size"] = dict(size) if size is not None else None
            for k in (
                "min_pixels",
                "max_pixels",
                "patch_size",
                "temporal_patch_size",
                "merge_size",
                "fps",
                "num_frames",
                "do_sample_frames",
                "min_frames",
                "max_frames",
            ):
                if hasattr(proc, k):
                    effective[f"{name}_processor_{k}"] = getattr(proc, k)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.samples) as f:
        samples = [json.loads(line) for line in f if line.strip()]

    with open(a.out, "w") as out:
        header = {
            "trainer": "llamafactory",
            "versions": versions(),
            "model": a.model,
            "trainer_args": effective,
        }
        out.write(json.dumps(header, default=str) + "\n")
        for sample in samples:
            sid = sample.get("id")
            try:
                rec = run_one(
                    sample,
                    converter,
                    dataset_processor,
                    plugin,
                    processor,
                    captured,
                    image_token,
                    video_token,
                    img_merge,
                    vid_merge,
                )
                rec = {"id": sid, **rec}
            except Exception as e:
                if os.environ.get("LF_RUNNER_TRACE"):
                    traceback.print_exc()
                rec = {"id": sid, "error": f"{type(e).__name__}: {e}"[:2000]}
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(json.dumps(rec)[:300], file=sys.stderr)
    return 0


def run_one(
    sample, converter, dataset_processor, plugin, processor, captured, image_token, video_token, img_merge, vid_merge
) -> dict:
    aligned = converter(to_sharegpt(sample))
    if not aligned["_prompt"]:
        raise ValueError("LLaMA-Factory's sharegpt converter dropped the sample (broken conversation)")
    batch = {k: [v] for k, v in aligned.items()}
    captured.clear()
    encoded = dataset_processor.preprocess_dataset(batch)  # the training path: process_messages + tokenization
    if not encoded.get("input_ids"):
        raise ValueError("LLaMA-Factory's SupervisedDatasetProcessor dropped the sample")

    images = encoded["images"][0] or []
    videos = encoded["videos"][0] or []
    text = []
    if "messages" in captured:
        contents = "".join(m["content"] for m in captured["messages"])
        # per media: the runs of pad tokens between vision_start / vision_end, in text order
        text = _pad_runs(contents, plugin, image_token, video_token, len(images), len(videos))
    text_total = sum(text) if text else 0

    media = []
    if images or videos:
        # what the data collator calls (MultiModalDataCollatorForSeq2Seq.__call__) for a batch of this one sample
        mm = plugin.get_mm_inputs(
            images, videos, [], [len(images)], [len(videos)], [0], [encoded["input_ids"][0]], processor
        )
        igrid = mm.get("image_grid_thw")
        vgrid = mm.get("video_grid_thw")
        for i in range(len(images)):
            g = [int(x) for x in igrid[i].tolist()]
            media.append({"kind": "image", "grid_thw": g, "tokens": g[0] * g[1] * g[2] // img_merge, "frames": 1})
        vframes = _video_frames(mm, vgrid, len(videos))
        for i in range(len(videos)):
            g = [int(x) for x in vgrid[i].tolist()]
            media.append(
                {"kind": "video", "grid_thw": g, "tokens": g[0] * g[1] * g[2] // vid_merge, "frames": vframes[i]}
            )
    total = sum(m["tokens"] for m in media)
    rec = {"media": media, "visual_tokens": total, "text_tokens": text_total}
    if text:
        rec["text"] = text
    ids = encoded["input_ids"][0]
    tok = dataset_processor.tokenizer
    in_ids = sum(
        1 for t in ids if t in (tok.convert_tokens_to_ids(image_token), tok.convert_tokens_to_ids(video_token))
    )
    if in_ids != text_total:
        rec["input_ids_tokens"] = in_ids  # cutoff_len truncated the encoded sequence
    if text_total != total:
        rec["mismatch"] = True
    return rec


def _video_frames(mm, vgrid, n):
    """Frames fed per video (after LLaMA-Factory's padding to an even count): Qwen3-VL's video processor returns
    the metadata LLaMA-Factory gave it (``total_num_frames`` = the frames it passed); Qwen2.5-VL's does not, and
    there it is grid t * temporal_patch_size (2), the count is already even."""
    out = []
    meta = mm.get("video_metadata")
    for i in range(n):
        frames = None
        if meta is not None and i < len(meta):
            m = meta[i]
            fi = getattr(m, "frames_indices", None)
            if fi is None and isinstance(m, dict):
                fi = m.get("frames_indices")
            total = getattr(m, "total_num_frames", None)
            if total is None and isinstance(m, dict):
                total = m.get("total_num_frames")
            frames = int(total) if total is not None else (len(fi) if fi is not None else None)
        if frames is None:
            frames = int(vgrid[i][0]) * 2
        out.append(frames)
    return out


def _pad_runs(contents, plugin, image_token, video_token, n_images, n_videos):
    """Count pad tokens per media in the processed text. Images and videos are returned images first, then
    videos; a Qwen3-VL video is one run per frame group (each wrapped in vision_start/end, after a timestamp),
    so its runs are summed until the next media placeholder of the original text."""
    import re

    bos, eos = plugin.vision_bos_token, plugin.vision_eos_token
    runs = [(m.group(1)) for m in re.finditer(re.escape(bos) + "(.*?)" + re.escape(eos), contents, re.S)]
    img, vid = [], []
    for r in runs:
        if r and set(r.replace(image_token, "\0")) == {"\0"}:
            img.append(r.count(image_token))
        elif r and set(r.replace(video_token, "\0")) == {"\0"}:
            vid.append(r.count(video_token))
    if len(vid) != n_videos and n_videos:
        # Qwen3-VL: per-frame runs; split them evenly among the videos in order is not possible in general,
        # so group by the timestamp resets ("<0.x seconds>" after a non-video run)
        vid = _group_qwen3(contents, bos, eos, video_token)
    return img + vid


def _group_qwen3(contents, bos, eos, video_token):
    """Qwen3-VL writes each video as ``<T seconds><vision_start><video_pad>*k<vision_end>`` per frame group: a new
    video starts where that chain is interrupted or its timestamps start over."""
    import re

    groups, cur, last_end, last_ts = [], None, None, None
    pat = re.compile(
        r"<([0-9.]+) seconds>" + re.escape(bos) + "((?:" + re.escape(video_token) + ")*)" + re.escape(eos)
    )
    for m in pat.finditer(contents):
        ts = float(m.group(1))
        if cur is None or m.start() != last_end or ts <= last_ts:
            if cur is not None:
                groups.append(cur)
            cur = 0
        cur += m.group(2).count(video_token)
        last_end, last_ts = m.end(), ts
    if cur is not None:
        groups.append(cur)
    return groups


if __name__ == "__main__":
    sys.exit(main())
