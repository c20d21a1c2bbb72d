"""Dataset tools on a generated set: counts against process_vision_info's actual output, every problem code,
text tokens against the processor's own expansion, JSON arrays, packing, resuming, stats, the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from qwen_vl_utils import dataset as ds

from media import gradient, load_script, make_audio_only, make_video

# index -> expected problem code, for the records of the generated set that are not valid
PROBLEMS = {}


def _turns(human: str, gpt: str = "It shows a scene.") -> list:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def _finetune(media: dict, human: str, gpt: str = "It shows a scene.") -> dict:
    return {**media, "conversations": _turns(human, gpt)}


def _chat(*content: dict, answer: str = "A moving block.") -> dict:
    return {"messages": [{"role": "user", "content": list(content)}, {"role": "assistant", "content": answer}]}


def _exif_jpeg(path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    gradient(200, 120).save(path, exif=exif)


def _png_exif_after_data(path: Path, orientation: int) -> None:
    """A PNG whose eXIf chunk comes after the image data (Pillow must not decode pixels to find it)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    gradient(180, 100).save(buf, "PNG")
    data, payload = buf.getvalue(), exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("dataset")
    m = d / "media"
    m.mkdir()
    gradient(640, 480).save(m / "a.png")
    gradient(300, 200).save(m / "b.jpg")
    gradient(1920, 1080).save(m / "c.jpg", quality=80)
    gradient(97, 61).save(m / "small.png")
    gradient(2000, 300, "RGBA").save(m / "wide.png")
    gradient(1000, 4).save(m / "sliver.png")  # aspect ratio 250: the model rejects it
    _exif_jpeg(m / "rotated.jpg", 6)
    _png_exif_after_data(m / "rotated.png", 8)
    (m / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    full = (m / "c.jpg").read_bytes()
    (m / "truncated.jpg").write_bytes(full[: len(full) // 3])  # the header is intact; the data is not
    make_video(m / "h264.mp4", frames=48)
    make_video(m / "vp9.webm", codec="libvpx-vp9", container="webm", frames=60, width=320, height=180)
    make_video(m / "mpeg4.avi", codec="mpeg4", container="avi", frames=36, width=176, height=144)
    make_video(m / "rot.mp4", frames=30, width=192, height=108, rotation=90)
    make_video(m / "long.mp4", frames=240, fps=24, width=256, height=144)
    make_audio_only(m / "audio.mp4")
    whole = (m / "h264.mp4").read_bytes()
    (m / "cut.mp4").write_bytes(whole[:600])
    frames = []
    for i in range(3):
        gradient(160 + i, 90).save(m / f"frame{i}.png")
        frames.append(f"media/frame{i}.png")
    return d, frames


def _records(frames: list, root: Path) -> list:
    """The generated set: valid samples of every kind, and each problem code at a known index."""
    valid = [
        _finetune({"image": "media/a.png"}, "<image>\nWhat is this?"),
        _finetune({"image": ["media/b.jpg", "media/c.jpg", "media/small.png"]}, "<image><image> and <image>: compare"),
        _finetune({"image": "media/wide.png"}, "Describe <image>"),
        _finetune({"image": ["media/rotated.jpg", "media/rotated.png"]}, "<image> <image>"),
        _finetune({"video": "media/h264.mp4"}, "<video>\nWhat happens?"),
        _finetune({"video": ["media/vp9.webm", "media/mpeg4.avi"]}, "<video> then <video>"),
        _finetune({"video": "media/rot.mp4", "image": "media/a.png"}, "<image> and <video>"),
        _finetune({"video": "media/long.mp4"}, "<video> summarize"),
        _finetune({"image": str(root / "media" / "b.jpg")}, "<image> absolute path"),
        {"conversations": _turns("no media at all")},
        _chat({"type": "image", "image": "media/c.jpg", "max_pixels": 200 * 28 * 28}, {"type": "text", "text": "hi"}),
        _chat({"type": "video", "video": "media/long.mp4", "fps": 4.0, "max_pixels": 200 * 32 * 32}),
        _chat({"type": "video", "video": "media/long.mp4", "video_start": 2.0, "video_end": 6.5}),
        _chat({"type": "video", "video": frames, "sample_fps": 1.0}, {"type": "text", "text": "frames"}),
        _chat({"type": "image_url", "image_url": {"url": "media/small.png"}}),
    ]
    problems = [
        (_finetune({"image": "media/nope.png"}, "<image>"), "missing"),
        (_finetune({"video": "media/nope.mp4"}, "<video>"), "missing"),
        (_finetune({"image": "media/junk.png"}, "<image>"), "undecodable"),
        (_finetune({"image": "media/sliver.png"}, "<image>"), "undecodable"),
        (_finetune({"video": "media/audio.mp4"}, "<video>"), "undecodable"),
        (_finetune({"video": "media/cut.mp4"}, "<video>"), "undecodable"),
        (_finetune({"image": "media/a.png"}, "no tag here"), "tag_mismatch"),
        (_finetune({"image": ["media/a.png"]}, "<image><image>"), "tag_mismatch"),
        (_finetune({"image": "media/a.png"}, "<image>", "see <image>"), "tag_in_response"),
        ({"messages": [{"role": "assistant", "content": [{"image": "media/a.png"}]}]}, "tag_in_response"),
        ({"image": "media/a.png"}, "malformed"),
        ({"image": 5, "conversations": _turns("<image>")}, "malformed"),
        ({"conversations": [{"from": "robot", "value": "hi"}]}, "malformed"),
        ([1, 2, 3], "malformed"),
        (_chat({"type": "video", "video": "media/h264.mp4", "nframes": 1000}), "invalid_option"),
    ]
    out = []
    for i in range(max(len(valid), len(problems))):
        if i < len(valid):
            out.append((valid[i], None))
        if i < len(problems):
            out.append(problems[i])
    return out


@pytest.fixture(scope="module")
def dataset_file(media):
    d, frames = media
    path = d / "train.jsonl"
    records = _records(frames, d)
    with open(path, "w") as f:
        for n, (rec, _) in enumerate(records):
            if n == 5:
                f.write("\n")  # a blank line keeps its line number
            f.write(json.dumps(rec) + "\n")
        f.write('{"conversations": [ torn\n')
    expected = {}
    line = 0
    for n, (_, code) in enumerate(records):
        line += 1 if n == 5 else 0
        if code:
            expected[line] = code
        line += 1
    expected[line] = "malformed"
    return path, expected, line + 1


def _read(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _tokens_from_output(images, videos, factor):
    """Visual tokens implied by process_vision_info's actual output: (H/f)(W/f), ceil(T/2)(H/f)(W/f)."""
    total = sum((img.height // factor) * (img.width // factor) for img in images or [])
    for v in videos or []:
        t, _, h, w = v.shape
        total += math.ceil(t / 2) * (h // factor) * (w // factor)
    return total


ADDED = ("index", "visual_tokens", "text_tokens", "assistant_tokens", "num_tokens", "media_info")


def _original(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ADDED}


@pytest.mark.parametrize("patch", [14, 16])
def test_counts_equal_process_vision_info_output(dataset_file, tmp_path, patch):
    pytest.importorskip("torch")
    data, expected, n_lines = dataset_file
    flags = {
        "patch_size": patch,
        "video_max_pixels": 160 * 32 * 32,
        "max_frames": 12,
        "image_max_pixels": 1024 * 28 * 28,
    }
    summary = ds.count(str(data), str(tmp_path / "out.jsonl"), jobs=1, **flags)
    counted = _read(tmp_path / "out.jsonl")
    problems = _read(tmp_path / "out.problems.jsonl")
    assert {p["index"]: p["problem"] for p in problems} == expected
    assert summary.exit_code == 1 and summary.records == n_lines - 1  # the blank line is not a record
    indices = [r["index"] for r in counted]
    assert indices == sorted(indices) and not set(indices) & set(expected)
    settings = ds.make_settings(str(data), **flags)
    factor = patch * 2
    for record in counted:
        messages = ds.to_messages(_original(record), settings)
        images, videos = q.process_vision_info(messages, image_patch_size=patch)
        assert record["visual_tokens"] == _tokens_from_output(images, videos, factor), record["index"]
        assert record["num_tokens"] == record["visual_tokens"] and "text_tokens" not in record
        assert sum(m["tokens"] for m in record["media_info"]) == record["visual_tokens"]
        elements = [e for e in q.extract_vision_info(messages)]
        assert [m["tokens"] for m in record["media_info"]] == [q.count_visual_tokens(e, patch) for e in elements]
    kinds = [m["kind"] for r in counted for m in r["media_info"]]
    assert kinds.count("video") >= 8 and kinds.count("image") >= 10


def test_sample_keys_win_over_settings(dataset_file, tmp_path):
    data, _, _ = dataset_file
    ds.count(str(data), str(tmp_path / "a.jsonl"), jobs=1, image_max_pixels=4 * 28 * 28)
    counted = {r["index"]: r for r in _read(tmp_path / "a.jsonl")}
    chat_image = next(
        r for r in counted.values() if "messages" in r and r["messages"][0]["content"][0].get("max_pixels")
    )
    assert chat_image["visual_tokens"] > 4, "the element's own max_pixels (200 tokens) wins over the flag (4)"
    assert counted[0]["visual_tokens"] <= 4


def test_headers_miss_a_truncated_image_that_deep_finds(media, tmp_path):
    d, _ = media
    data = d / "truncated.jsonl"
    data.write_text(json.dumps(_finetune({"image": "media/truncated.jpg"}, "<image>")) + "\n")
    assert ds.check(str(data), str(tmp_path / "fast"), jobs=1).exit_code == 0
    summary = ds.check(str(data), str(tmp_path / "deep"), jobs=1, deep=True)
    assert summary.problems == {"undecodable": 1}
    assert "truncated.jpg" in _read(tmp_path / "deep" / "problems.jsonl")[0]["message"]


def test_check_writes_valid_samples_unchanged(dataset_file, tmp_path):
    data, expected, _ = dataset_file
    ds.check(str(data), str(tmp_path), jobs=1)
    valid = _read(tmp_path / "valid.jsonl")
    lines = [line for line in data.read_text().splitlines()]
    for record in valid:
        assert _original(record) == json.loads(lines[record["index"]])
    assert {p["index"] for p in _read(tmp_path / "problems.jsonl")} == set(expected)


def test_png_orientation_is_read_without_decoding(media, monkeypatch):
    d, _ = media
    path = str(d / "media" / "rotated.png")
    out = q.fetch_image({"image": path})
    assert out.height > out.width, "orientation 8 after the image data is applied"
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("counting decoded the PNG"))
    monkeypatch.setattr(q.image.Image.Image, "load", lambda self: pytest.fail("counting decoded the PNG"))
    from PIL import PngImagePlugin

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("counting decoded the PNG"))
    assert q.count_visual_tokens({"image": path}) == (out.height // 28) * (out.width // 28)


# --- input formats ---------------------------------------------------------------------------------------------


def test_json_array_gives_the_same_output_as_jsonl(dataset_file, tmp_path):
    data, _, _ = dataset_file
    records = [json.loads(line) for line in data.read_text().splitlines()[:-1] if line.strip()]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    array = tmp_path / "a.json"
    array.write_text("\ufeff[\n" + ",\n  ".join(json.dumps(r, indent=1) for r in records) + "\n]")
    assert ds.detect_format(str(array)) == "json" and ds.detect_format(str(jsonl)) == "jsonl"
    ds.count(str(jsonl), str(tmp_path / "l.jsonl"), jobs=1)
    ds.count(str(array), str(tmp_path / "j.jsonl"), jobs=1)
    assert (tmp_path / "l.jsonl").read_text() == (tmp_path / "j.jsonl").read_text()
    assert (tmp_path / "l.problems.jsonl").read_text() == (tmp_path / "j.problems.jsonl").read_text()


def test_json_array_streams_and_reports_where_it_breaks(tmp_path):
    from qwen_vl_utils.dataset import _records

    path = tmp_path / "big.json"
    item = {"conversations": _turns("x" * 3000)}
    with open(path, "w") as f:
        f.write("[" + ",".join(json.dumps({**item, "n": n}) for n in range(2000)) + ", {broken ]")
    out = list(_records.iter_records(str(path), start=1990))
    assert [r.index for r in out] == [*range(1990, 2000), 2000]
    assert json.loads(out[0].raw)["n"] == 1990 and out[-1].raw is None and "not a valid JSON array" in out[-1].error


# --- text tokens ---------------------------------------------------------------------------------------------

TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c or 'image_url' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' or 'video' in c %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _model_dir():
    """scripts/trainers/model_dir.py, which trains the trainers' tokenizers the same way."""
    return load_script("scripts/trainers/model_dir.py")


def make_tokenizer(folder: Path, template: bool = True) -> Path:
    """A tiny byte-level BPE tokenizer trained here, saved as a Hugging Face tokenizer folder."""
    corpus = ["What happens? It shows a scene. <0.5 seconds> compare frames"] * 20
    _model_dir().train_bpe(folder, SPECIAL, 300, corpus)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    if template:
        config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def real_processor(tok, patch):
    """transformers' own Qwen2.5-VL (patch 14) or Qwen3-VL (patch 16) processor, built offline from explicit
    arguments around the local tokenizer. Its class check looks the video processor up in the auto mapping,
    which needs torchvision (not loadable next to the CPU torch): only that check is skipped."""
    from transformers.processing_utils import ProcessorMixin

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Image
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as Image
    # (Qwen2-VL's video processor imports torchvision at once; Qwen3-VL's, with the same patch, temporal patch
    # and merge sizes, gives the same grid, which is all the Qwen2.5-VL processor's expansion reads from it)
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as Video

    if patch == 16:
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as Processor
    else:
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as Processor
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return Processor(
            image_processor=Image(patch_size=patch, merge_size=2),
            tokenizer=tok,
            video_processor=Video(patch_size=patch, temporal_patch_size=2, merge_size=2),
            chat_template=TEMPLATE,
        )
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def _processor_length(proc, messages, images, videos) -> int:
    """len(input_ids) from the real processor's ``__call__`` on the rendered conversation and our media (pixel
    work that needs torchvision is turned off: it changes values, not lengths)."""
    from transformers.video_utils import VideoMetadata

    text = proc.tokenizer.apply_chat_template(ds._samples.template_messages(messages), tokenize=False)
    metadata = [
        VideoMetadata(
            total_num_frames=m["total_num_frames"],
            fps=m["fps"],
            frames_indices=list(m["frames_indices"]),
            width=v.shape[3],
            height=v.shape[2],
        )
        for v, m in videos or []
    ]
    kwargs = {"do_resize": False, "do_convert_rgb": False, "do_rescale": False, "do_normalize": False}
    if videos:
        kwargs.update(videos=[v for v, _ in videos], video_metadata=metadata, do_sample_frames=False)
        kwargs.update(return_metadata=True)
    out = proc(text=[text], images=images or None, **kwargs)
    return len(out["input_ids"][0])


@pytest.mark.parametrize("patch", [14, 16])
def test_num_tokens_is_the_processor_length_with_a_chat_template(dataset_file, tmp_path, patch):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = make_tokenizer(tmp_path / "tok")
    proc = real_processor(transformers.AutoTokenizer.from_pretrained(str(folder)), patch)
    data, _, _ = dataset_file
    ds.count(str(data), str(tmp_path / "out.jsonl"), jobs=1, patch_size=patch, tokenizer=str(folder), max_frames=10)
    settings = ds.make_settings(str(data), patch_size=patch, max_frames=10)
    counted = _read(tmp_path / "out.jsonl")
    assert any(r["text_tokens"] > 0 for r in counted)
    for record in counted:
        messages = ds.to_messages(_original(record), settings)
        images, videos = q.process_vision_info(messages, image_patch_size=patch, return_video_metadata=True)
        assert record["num_tokens"] == record["visual_tokens"] + record["text_tokens"]
        length = _processor_length(proc, messages, images, videos)
        assert record["num_tokens"] == length, record["index"]
        # the trainable tokens (a trainer masking the prompt, as qwen-vl-finetune's labels): each assistant
        # turn's content, its <|im_end|> and the newline after it; the processor's own length without the
        # answers tells the content apart
        answers = [m for m in messages if m["role"] == "assistant"]
        unanswered = [{**m, "content": ""} if m["role"] == "assistant" else m for m in messages]
        without = _processor_length(proc, unanswered, images, videos)
        assert record["assistant_tokens"] == length - without + 2 * len(answers), record["index"]


def test_text_tokens_without_a_template_count_the_turns(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    folder = make_tokenizer(tmp_path / "tok", template=False)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversations": _turns("What happens?", "It shows a scene.")}) + "\n")
    ds.count(str(data), str(tmp_path / "o.jsonl"), jobs=1, tokenizer=str(folder))
    (record,) = _read(tmp_path / "o.jsonl")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert record["text_tokens"] == len(tok.encode("What happens?\nIt shows a scene.", add_special_tokens=False).ids)
    assert record["num_tokens"] == record["text_tokens"] and record["visual_tokens"] == 0
    assert record["assistant_tokens"] == len(tok.encode("It shows a scene.", add_special_tokens=False).ids)


# --- packing -------------------------------------------------------------------------------------------------


def _realistic_lengths(n: int, seed: int = 0) -> list:
    """Token counts shaped like a mixed fine-tuning set: short text QA, image QA, multi-image, video."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(4, size=n, p=[0.3, 0.45, 0.15, 0.1])
    base = np.array([120, 700, 1800, 3500])[kinds]
    return [int(x) for x in np.clip(rng.lognormal(np.log(base), 0.5), 20, 8000)]


def test_best_fit_decreasing_fills_better_than_binpacking():
    binpacking = pytest.importorskip("binpacking")
    sizes = _realistic_lengths(6000)
    cap = 8192
    groups = ds.best_fit_decreasing(sizes, cap)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in g) <= cap for g in groups)
    fill = sum(sizes) / (len(groups) * cap)
    assert fill >= 0.99
    theirs = binpacking.to_constant_volume(list(enumerate(sizes)), cap, weight_pos=1)
    assert len(groups) <= len(theirs)
    batched = sum(
        len(binpacking.to_constant_volume(list(enumerate(sizes[k : k + 256])), cap, weight_pos=1))
        for k in range(0, len(sizes), 256)
    )
    assert len(groups) < batched, "packing the whole set beats qwen-vl-finetune's batches of 256"


def test_pack_respects_max_len_and_keeps_every_sample_once(tmp_path):
    sizes = [*_realistic_lengths(3000, seed=1), 9500, 12000]
    counted = tmp_path / "counted.jsonl"
    with open(counted, "w") as f:
        for i, n in enumerate(sizes):
            f.write(json.dumps({"index": i, "conversations": _turns(f"q{i}"), "num_tokens": n}) + "\n")
        f.write('{"index": 99999, "num_tok')  # a torn last line of an interrupted count
    summary = ds.pack(str(counted), str(tmp_path / "packed.json"), 8192, visual_only=True)
    groups = json.loads((tmp_path / "packed.json").read_text())
    assert all(isinstance(g, list) and sum(s["num_tokens"] for s in g) <= 8192 for g in groups)
    packed = sorted(s["index"] for g in groups for s in g)
    assert packed == list(range(3000))
    assert summary.groups == len(groups) and summary.fill >= 0.99 and summary.exit_code == 1
    problems = _read(tmp_path / "packed.problems.jsonl")
    assert [(p.get("index"), p["problem"]) for p in problems] == [
        (3000, "too_long"),
        (3001, "too_long"),
        (None, "malformed"),
    ]


# --- resuming ------------------------------------------------------------------------------------------------


def test_a_torn_line_is_dropped_and_the_run_resumes(dataset_file, tmp_path):
    data, _, _ = dataset_file
    whole = tmp_path / "whole"
    ds.count(str(data), str(whole / "out.jsonl"), jobs=1)
    part = tmp_path / "part"
    part.mkdir()
    lines = (whole / "out.jsonl").read_text().splitlines(keepends=True)
    last = json.loads(lines[3])["index"]
    bad = [line for line in (whole / "out.problems.jsonl").read_text().splitlines(keepends=True)]
    bad = [line for line in bad if json.loads(line)["index"] < last]
    # what a run stopped while writing its fifth valid line leaves
    (part / "out.jsonl").write_text("".join(lines[:4]) + lines[4][:30])
    (part / "out.problems.jsonl").write_text("".join(bad))
    (part / "out.settings.json").write_text((whole / "out.settings.json").read_text())
    summary = ds.count(str(data), str(part / "out.jsonl"), jobs=1)
    assert summary.resumed == 4 + len(bad) and bad
    assert (part / "out.jsonl").read_text() == (whole / "out.jsonl").read_text()
    assert (part / "out.problems.jsonl").read_text() == (whole / "out.problems.jsonl").read_text()


def test_resuming_with_other_settings_is_refused(dataset_file, tmp_path):
    data, _, _ = dataset_file
    ds.count(str(data), str(tmp_path / "out.jsonl"), jobs=1)
    with pytest.raises(q.InvalidOptionError, match="other settings"):
        ds.count(str(data), str(tmp_path / "out.jsonl"), jobs=1, patch_size=16)
    summary = ds.count(str(data), str(tmp_path / "out.jsonl"), jobs=1, patch_size=16, overwrite=True)
    assert summary.resumed == 0


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", *map(str, args)], capture_output=True, text=True, **kw
    )


def _children(pid: int) -> list:
    """The processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return kids


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_output(media, tmp_path, server):
    """A CLI run killed (SIGKILL) mid-way, then run again, writes exactly what one uninterrupted run writes."""
    import time

    d, _ = media
    png = (d / "media" / "a.png").read_bytes()

    def slow(req):
        time.sleep(0.03)
        req.send_response(200)
        req.send_header("Content-Length", str(len(png)))
        req.end_headers()
        req.wfile.write(png)

    url = server.add("/slow.png", slow)
    data = tmp_path / "remote.jsonl"
    with open(data, "w") as f:
        for i in range(160):
            media_ = {"image": f"{url}?n={i}"} if i % 9 else {"image": "media/nope.png"}
            f.write(json.dumps(_finetune(media_, "<image> what?")) + "\n")
    args = ["dataset", "count", data, "--media-root", d, "--jobs", "2", "--quiet"]
    assert _cli(*args, "-o", tmp_path / "once.jsonl").returncode == 1
    proc = subprocess.Popen([sys.executable, "-m", "qwen_vl_utils", *map(str, args), "-o", str(tmp_path / "k.jsonl")])
    out = tmp_path / "k.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert workers, "the run has its worker processes"
    proc.kill()
    proc.wait()
    gone = time.monotonic() + 5
    while time.monotonic() < gone and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.05)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "workers outlived the killed run"
    written = out.read_text()
    assert 20 <= written.count("\n") < 140, "killed mid-run"
    assert all(json.loads(line) for line in written.splitlines()), "what a killed run leaves is valid JSONL"
    again = _cli(*args, "-o", out)
    assert again.returncode == 1, again.stderr
    assert "already done by an earlier run" in again.stdout
    assert out.read_text() == (tmp_path / "once.jsonl").read_text()
    assert (tmp_path / "k.problems.jsonl").read_text() == (tmp_path / "once.problems.jsonl").read_text()


# --- engines -------------------------------------------------------------------------------------------------


def test_process_pool_gives_the_in_process_output(dataset_file, tmp_path):
    data, _, _ = dataset_file
    ds.count(str(data), str(tmp_path / "one.jsonl"), jobs=1)
    ds.count(str(data), str(tmp_path / "pool.jsonl"), jobs=2)
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "pool.jsonl").read_text()
    assert (tmp_path / "one.problems.jsonl").read_text() == (tmp_path / "pool.problems.jsonl").read_text()


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'qwen-vl-utils[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_gives_the_local_output(dataset_file, tmp_path, ray_instance):
    data, _, _ = dataset_file
    options = {"patch_size": 16, "max_frames": 8}
    ds.count(str(data), str(tmp_path / "local.jsonl"), jobs=1, **options)
    summary = ds.count(str(data), str(tmp_path / "ray.jsonl"), engine="ray", **options)
    assert summary.exit_code == 1
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    assert (tmp_path / "ray.problems.jsonl").read_text() == (tmp_path / "local.problems.jsonl").read_text()
    ds.check(str(data), str(tmp_path / "rc"), engine="ray")
    ds.check(str(data), str(tmp_path / "lc"), jobs=1)
    for name in ("valid.jsonl", "problems.jsonl"):
        assert (tmp_path / "rc" / name).read_text() == (tmp_path / "lc" / name).read_text()


@pytest.mark.slow
def test_ray_engine_resumes(dataset_file, tmp_path, ray_instance):
    data, _, _ = dataset_file
    ds.count(str(data), str(tmp_path / "local.jsonl"), jobs=1)
    lines = (tmp_path / "local.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "ray.jsonl").write_text("".join(lines[:6]))
    (tmp_path / "ray.settings.json").write_text((tmp_path / "local.settings.json").read_text())
    (tmp_path / "ray.problems.jsonl").write_text("")
    summary = ds.count(str(data), str(tmp_path / "ray.jsonl"), engine="ray")
    assert summary.resumed == 6
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()


# --- a worker that crashes ------------------------------------------------------------------------------------

CRASH_HOOK = """\
import ctypes, os, sys

def _crash(event, args):  # a real segmentation fault, as a decoder bug on a hostile file gives
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and os.fsdecode(args[0]).endswith("{name}"):
        ctypes.string_at(0)

sys.addaudithook(_crash)
"""


@pytest.fixture(scope="module")
def crash_set(dataset_file, tmp_path_factory):
    """The generated set plus, at index 7, a valid image whose opening segfaults the process (with the hook)."""
    data, _, _ = dataset_file
    d = tmp_path_factory.mktemp("crash")
    (d / "boom.png").write_bytes((data.parent / "media" / "a.png").read_bytes())
    lines = data.read_text().splitlines(keepends=True)
    record = json.dumps(_finetune({"image": str(d / "boom.png")}, "<image> crashes the decoder")) + "\n"
    path = d / "train.jsonl"
    path.write_text("".join([*lines[:7], record, *lines[7:]]))
    # (the crashing image lies outside the set's media root: allowed for this test)
    ds.count(str(path), str(d / "ok.jsonl"), media_root=str(data.parent), jobs=1, allow_outside_root=True)
    return path, d, _hooked_env(d / "hook", CRASH_HOOK.format(name="boom.png"))


def _hooked_env(folder: Path, code: str) -> dict:
    """An environment whose Python processes (the CLI's workers too) run ``code`` as they start."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def _assert_crash_recorded(crash_set, out: Path) -> None:
    _, d, _ = crash_set
    ok = (d / "ok.jsonl").read_text().splitlines(keepends=True)
    others = [line for line in ok if json.loads(line)["index"] != 7]
    assert len(others) == len(ok) - 1, "without the crash, the record is counted"
    assert out.read_text() == "".join(others), "every other sample is counted as without the crash"
    problems = _read(out.with_suffix(".problems.jsonl"))
    crashed = [p for p in problems if p["problem"] == "crashed"]
    assert [p["index"] for p in crashed] == [7]
    assert "SIGSEGV" in crashed[0]["message"] and str(d / "boom.png") in crashed[0]["message"]
    assert [p for p in problems if p["index"] != 7] == _read(d / "ok.problems.jsonl")
    assert [p["index"] for p in problems] == sorted(p["index"] for p in problems), "input order"


@pytest.mark.slow
def test_a_worker_crash_costs_only_its_record_and_the_run_resumes(dataset_file, crash_set, tmp_path):
    path, d, env = crash_set
    out = tmp_path / "out.jsonl"
    args = ["dataset", "count", path, "--media-root", dataset_file[0].parent, "--allow-outside-root", "--quiet"]
    args += ["-o", out]
    res = _cli(*args, "--jobs", "2", env=env, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "1 crashed" in res.stdout
    _assert_crash_recorded(crash_set, out)
    whole = out.read_text(), out.with_suffix(".problems.jsonl").read_text()
    again = _cli(*args, "--jobs", "2", env=env, timeout=300)
    assert again.returncode == 1 and "already done by an earlier run" in again.stdout, again.stderr
    assert (out.read_text(), out.with_suffix(".problems.jsonl").read_text()) == whole
    # a run stopped before the crashing record: resuming crashes on it again and ends as one run does; here
    # with the default engine on one core, which still runs the samples in a worker process
    for name, text in zip((out, out.with_suffix(".problems.jsonl")), whole):
        name.write_text("".join(line for line in text.splitlines(keepends=True) if json.loads(line)["index"] < 5))
    taskset = shutil.which("taskset")
    one_core = [taskset, "-c", str(min(os.sched_getaffinity(0)))] if taskset else []
    cmd = [*one_core, sys.executable, "-m", "qwen_vl_utils", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1 and "already done by an earlier run" in res.stdout, res.stderr
    assert (out.read_text(), out.with_suffix(".problems.jsonl").read_text()) == whole


def test_workers_that_cannot_start_stop_the_run(dataset_file, tmp_path):
    """Not every sample "crashed", one spawn each: a usage error that says what to check."""
    data, _, _ = dataset_file
    env = _hooked_env(tmp_path / "hook", "import os, sys\nif '--multiprocessing-fork' in sys.argv:\n    os._exit(3)\n")
    res = _cli("dataset", "count", data, "-o", tmp_path / "out.jsonl", "--jobs", "2", env=env, timeout=120)
    assert res.returncode == 2 and "worker process ended as it started (exit code 3)" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out.problems.jsonl").read_text()


@pytest.mark.slow
def test_ray_engine_survives_a_worker_crash(dataset_file, crash_set, tmp_path):
    """Ray retries a task whose worker died, forever: without a guard, one crashing record hangs the run."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'qwen-vl-utils[ray]')")
    path, d, env = crash_set
    out = tmp_path / "out.jsonl"
    args = ["dataset", "count", path, "--media-root", dataset_file[0].parent, "--engine", "ray", "--quiet"]
    args.append("--allow-outside-root")
    res = _cli(*args, "-o", out, env={**env, "RAY_ADDRESS": ""}, timeout=240)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    _assert_crash_recorded(crash_set, out)


# --- stats and the command line ------------------------------------------------------------------------------


def test_stats_writes_histograms_and_a_summary(dataset_file, tmp_path):
    data, _, _ = dataset_file
    ds.count(str(data), str(tmp_path / "c.jsonl"), jobs=1)
    counted = _read(tmp_path / "c.jsonl")
    result = ds.stats(str(tmp_path / "c.jsonl"), str(tmp_path / "stats"))
    summary = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert summary["samples"] == len(counted) == result["samples"]
    assert summary["num_tokens"]["max"] == max(r["num_tokens"] for r in counted)
    assert summary["video_seconds"]["max"] == pytest.approx(10.0, abs=0.05)
    widths = sorted(m["width"] for r in counted for m in r["media_info"] if m["kind"] == "image")
    assert summary["image_width"]["max"] == widths[-1] == 2000
    assert "num_tokens" in (tmp_path / "stats" / "summary.txt").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result["png"] is None
    else:
        with Image.open(result["png"]) as png:
            assert png.format == "PNG" and png.width > 800


def test_cli_exit_codes(dataset_file, tmp_path):
    data, expected, _ = dataset_file
    res = _cli("dataset", "check", data, "-o", tmp_path / "chk", "--jobs", "1")
    assert res.returncode == 1 and f"{len(expected)} with problems" in res.stdout, res.stderr
    res = _cli("dataset", "count", data, "-o", tmp_path / "c.jsonl", "--jobs", "1", "--fps", "1")
    assert res.returncode == 1 and "visual tokens only" in res.stderr
    res = _cli("dataset", "pack", tmp_path / "c.jsonl", "--max-len", "100000", "-o", tmp_path / "p.json")
    assert res.returncode == 2 and "--visual-only" in res.stderr, res.stderr  # counted without text tokens
    res = _cli(
        "dataset", "pack", tmp_path / "c.jsonl", "--max-len", "100000", "-o", tmp_path / "p.json", "--visual-only"
    )
    # (the set's frame-list video and video window are chat samples qwen-vl-finetune's format cannot hold)
    assert res.returncode == 1 and "fill" in res.stdout and "2 chat samples" in res.stdout, res.stdout + res.stderr
    res = _cli("dataset", "count", tmp_path / "nope.jsonl", "-o", tmp_path / "x.jsonl")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_cli_more_exit_codes_and_stats(dataset_file, tmp_path):
    data, _, _ = dataset_file
    ds.check(str(data), str(tmp_path / "chk"), jobs=1)
    valid = tmp_path / "chk" / "valid.jsonl"
    res = _cli("dataset", "check", valid, "-o", tmp_path / "chk2", "--media-root", data.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    ds.count(str(data), str(tmp_path / "c.jsonl"), jobs=1, fps=1.0)
    pack = ["dataset", "pack", tmp_path / "c.jsonl", "--visual-only"]
    assert _cli(*pack, "--max-len", "50", "-o", tmp_path / "p.json").returncode == 1
    res = _cli("dataset", "count", data, "-o", tmp_path / "c.jsonl", "--fps", "3")
    assert res.returncode == 2 and "other settings" in res.stderr
    assert _cli("dataset", "count", data, "-o", tmp_path / "t.jsonl", "--tokenizer", tmp_path / "no").returncode == 2
    assert _cli("dataset", "pack", tmp_path / "c.jsonl", "-o", tmp_path / "p.json").returncode == 2
    assert _cli("dataset").returncode == 2
    res = _cli("dataset", "stats", tmp_path / "c.jsonl", "-o", tmp_path / "stats")
    assert res.returncode == 0 and "histograms:" in res.stdout, res.stderr


def test_importing_the_package_stays_light():
    heavy = "('torch', 'ray', 'transformers', 'matplotlib', 'tokenizers')"
    code = f"import sys, qwen_vl_utils.dataset; print([m for m in {heavy} if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_problem_codes_are_documented():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for code in ds.PROBLEM_CODES:
        assert f"`{code}`" in readme, code
