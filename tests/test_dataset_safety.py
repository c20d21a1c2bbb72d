"""The dataset tools on real data: outputs never overwrite the data, resuming only from the same data under the
same policy, impossible flags refused before the run, every frame of a frame list looked at, media paths kept
inside the media root. Each case failed before (found attacking the tools from outside)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import qwen_vl_utils as q
from qwen_vl_utils import dataset as ds
from qwen_vl_utils.sources._policy import get_fetch_policy

from media import gradient


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _sample(image: str, answer: str = "A gradient.") -> dict:
    return {
        "image": image,
        "conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": answer}],
    }


@pytest.fixture
def data(tmp_path):
    (tmp_path / "media").mkdir()
    for i in range(3):
        gradient(64 + i, 48).save(tmp_path / "media" / f"{i}.png")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(_sample(f"media/{i}.png")) + "\n" for i in range(3)))
    return path


def _lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("how", ["count", "check"])
def test_an_output_that_is_the_data_file_is_refused_and_the_data_kept(data, how):
    """`count d.jsonl -o d.jsonl --overwrite` truncated the data before reading it and reported 0 samples, exit
    0; so did re-checking valid.jsonl into its own folder."""
    before = data.read_bytes()
    if how == "count":
        res = _cli("dataset", "count", data, "-o", data, "--overwrite")
    else:
        ds.check(str(data), str(data.parent / "chk"), jobs=1)
        valid = data.parent / "chk" / "valid.jsonl"
        before = valid.read_bytes()
        res = _cli("dataset", "check", valid, "-o", data.parent / "chk", "--overwrite", "--media-root", data.parent)
        data = valid
    assert res.returncode == 2 and "it would be overwritten before it is read" in res.stderr, res.stdout + res.stderr
    assert data.read_bytes() == before
    link = data.parent / "alias.jsonl"  # the same file under another name (same inode)
    os.link(data, link)
    assert _cli("dataset", "count", data, "-o", link, "--overwrite").returncode == 2
    assert data.read_bytes() == before


def test_pack_and_stats_refuse_to_overwrite_their_input(data, tmp_path):
    ds.count(str(data), str(tmp_path / "c.jsonl"), jobs=1)
    counted = tmp_path / "c.jsonl"
    before = counted.read_bytes()
    assert _cli("dataset", "pack", counted, "--max-len", "100000", "-o", counted).returncode == 2
    assert counted.read_bytes() == before


def test_resuming_after_the_data_file_changed_is_refused(data, tmp_path):
    """Resume was keyed on the data path and flags: a fixed data file reused the old file's results."""
    out = tmp_path / "c.jsonl"
    ds.count(str(data), str(out), jobs=1)
    lines = data.read_text().splitlines()
    lines[1] = json.dumps(_sample("media/2.png", "Another answer."))  # fixed in place, same path
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(q.InvalidOptionError, match="other settings"):
        ds.count(str(data), str(out), jobs=1)
    assert ds.count(str(data), str(out), jobs=1, overwrite=True).records == 3


def test_resuming_under_a_stricter_policy_is_refused(data, tmp_path):
    out = tmp_path / "c.jsonl"
    ds.count(str(data), str(out), jobs=1)
    strict = get_fetch_policy().replace(max_image_bytes=100)
    with pytest.raises(q.InvalidOptionError, match="other settings"):
        ds.count(str(data), str(out), jobs=1, policy=strict)


@pytest.mark.parametrize(
    "flags",
    [
        ["--fps", "0"],
        ["--fps", "nan"],
        ["--max-frames", "1"],
        ["--min-frames", "8", "--max-frames", "4"],
        ["--image-max-pixels", "10"],
        ["--video-min-pixels", "200000", "--video-max-pixels", "100000"],
    ],
)
def test_impossible_flags_fail_before_the_run(data, tmp_path, flags):
    """They processed the whole set, marked every sample invalid_option, and pinned the bad value in
    settings.json."""
    res = _cli("dataset", "count", data, "-o", tmp_path / "c.jsonl", *flags)
    assert res.returncode == 2 and flags[0] in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "c.settings.json").exists()


def test_a_frame_list_with_a_missing_frame_is_found_without_deep(data, tmp_path):
    """Only the first frame was opened: a list with a missing frame passed check."""
    frames = ["media/0.png", "media/nope.png", "media/2.png"]
    sample = {
        "messages": [
            {"role": "user", "content": [{"type": "video", "video": frames}]},
            {"role": "assistant", "content": "ok"},
        ]
    }
    path = tmp_path / "frames.jsonl"
    path.write_text(json.dumps(sample) + "\n")
    summary = ds.check(str(path), str(tmp_path / "chk"), jobs=1)
    (problem,) = _lines(tmp_path / "chk" / "problems.jsonl")
    assert summary.valid == 0 and problem["problem"] == "missing" and "frame 1" in problem["message"]


def test_media_paths_stay_inside_the_media_root(data, tmp_path):
    """`../../etc/passwd`-style paths, absolute paths elsewhere and symlinks out of the folder were read, and a
    real image there counted as valid."""
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    gradient(50, 40).save(outside)
    os.symlink(outside, data.parent / "media" / "link.png")
    escapes = [os.path.relpath(outside, data.parent), str(outside), "media/link.png", f"file://{outside}"]
    inside = [str(data.parent / "media" / "0.png"), "media/../media/1.png"]
    path = data.parent / "escapes.jsonl"
    path.write_text("".join(json.dumps(_sample(p)) + "\n" for p in escapes + inside))
    summary = ds.check(str(path), str(tmp_path / "chk"), jobs=1)
    codes = {p["index"]: p["problem"] for p in _lines(tmp_path / "chk" / "problems.jsonl")}
    assert codes == {i: "outside_root" for i in range(len(escapes))}, codes
    assert summary.valid == len(inside)
    allowed = ds.check(str(path), str(tmp_path / "chk2"), jobs=1, allow_outside_root=True)
    assert allowed.valid == len(escapes) + len(inside)
    res = _cli("dataset", "check", path, "-o", tmp_path / "chk3", "--allow-outside-root")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_the_ray_engine_reads_a_relative_data_path(data, tmp_path, monkeypatch):
    """Each Ray worker opened the relative DATA path from its own directory."""
    pytest.importorskip("ray")
    monkeypatch.chdir(data.parent)
    res = _cli("dataset", "count", data.name, "-o", tmp_path / "c.jsonl", "--engine", "ray")
    assert res.returncode == 0, res.stdout + res.stderr
    assert [r["index"] for r in _lines(tmp_path / "c.jsonl")] == [0, 1, 2]


def test_conversations_a_trainer_cannot_learn_from_and_duplicates_are_problems(data, tmp_path):
    """Samples without an assistant turn, with an empty answer, starting with the assistant, and exact
    duplicates passed check; trainers crash on them or learn from them twice."""
    chat = lambda *turns: {"messages": [{"role": r, "content": c} for r, c in turns]}  # noqa: E731
    records = [
        _sample("media/0.png"),
        {"image": "media/1.png", "conversations": [{"from": "human", "value": "<image> what?"}]},
        _sample("media/1.png", answer="  "),
        chat(("system", "Be brief."), ("assistant", "Hello."), ("user", "Hi")),
        chat(("user", "Hi"), ("assistant", [])),
        _sample("media/0.png"),  # the first sample again
        chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")),
        _sample("media/0.png", answer="A different answer."),  # the same image, another sample: fine
    ]
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = ds.check(str(path), str(tmp_path / "chk"), jobs=2)
    codes = {p["index"]: p["problem"] for p in _lines(tmp_path / "chk" / "problems.jsonl")}
    assert codes == {
        1: "no_answer",
        2: "empty_answer",
        3: "starts_with_assistant",
        4: "empty_answer",
        5: "duplicate_sample",
    }
    assert "index 0" in _lines(tmp_path / "chk" / "problems.jsonl")[-1]["message"]
    assert summary.valid == 3
    # a run stopped after sample 2 and resumed knows the samples written before it stopped
    full = {name: (tmp_path / "chk" / name).read_text() for name in ("valid.jsonl", "problems.jsonl")}
    for name, text in full.items():
        kept = [line for line in text.splitlines(keepends=True) if json.loads(line)["index"] <= 2]
        (tmp_path / "chk" / name).write_text("".join(kept))
    resumed = ds.check(str(path), str(tmp_path / "chk"), jobs=1)
    assert resumed.resumed > 0
    assert {name: (tmp_path / "chk" / name).read_text() for name in full} == full


def test_pack_refuses_counts_without_text_tokens_and_reads_json_arrays(tmp_path):
    """600 text-only samples counted without a tokenizer were packed "of 0 tokens" into one group; the JSON
    arrays qwen-vl-finetune's tools write could not be read."""
    text_only = [
        {"index": i, "conversations": [{"from": "human", "value": f"q{i}"}], "num_tokens": 0} for i in range(600)
    ]
    counted = tmp_path / "visual.jsonl"
    counted.write_text("".join(json.dumps(r) + "\n" for r in text_only))
    res = _cli("dataset", "pack", counted, "--max-len", "4096", "-o", tmp_path / "p.json")
    assert res.returncode == 2 and "600 samples" in res.stderr and "--tokenizer" in res.stderr, res.stderr
    assert not (tmp_path / "p.json").exists()
    assert (
        _cli("dataset", "pack", counted, "--max-len", "4096", "-o", tmp_path / "p.json", "--visual-only").returncode
        == 0
    )
    records = [{"index": i, "text_tokens": 100 + i, "num_tokens": 400 + i} for i in range(50)]
    jsonl, array = tmp_path / "c.jsonl", tmp_path / "c.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    array.write_text(json.dumps(records, indent=2))
    ds.pack(str(jsonl), str(tmp_path / "a.json"), 2048)
    ds.pack(str(array), str(tmp_path / "b.json"), 2048)
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_filter_writes_the_clean_set_in_the_input_format(data, tmp_path, fmt):
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records += [
        _sample("media/nope.png"),
        _sample("media/0.png"),
        {"conversations": "no"},
    ]  # missing, duplicate, malformed
    path = tmp_path / f"mixed.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / f"clean.{fmt}"
    res = _cli("dataset", "filter", path, "-o", out, "--media-root", data.parent)
    assert res.returncode == 0 and "kept 3" in res.stdout, res.stdout + res.stderr
    clean = json.loads(out.read_text()) if fmt == "json" else [json.loads(x) for x in out.read_text().splitlines()]
    assert clean == records[:3]  # as the input holds them: no fields added
    keep_missing = ds.filter_dataset(
        str(path), str(tmp_path / f"k.{fmt}"), drop=["malformed"], media_root=str(data.parent)
    )
    assert keep_missing.kept == 5 and keep_missing.dropped == {"malformed": 1}
    with pytest.raises(q.InvalidOptionError, match="--visual-only"):  # a length without text tokens
        ds.filter_dataset(str(path), str(tmp_path / f"s.{fmt}"), max_len=2, media_root=str(data.parent))
    short = ds.filter_dataset(  # each image is 4 tokens
        str(path), str(tmp_path / f"s.{fmt}"), max_len=2, visual_only=True, media_root=str(data.parent)
    )
    assert short.kept == 0 and short.dropped.get("too_long") == 3
    assert _cli("dataset", "filter", path, "-o", path).returncode == 2  # never over the input
    assert _cli("dataset", "filter", path, "-o", tmp_path / "x.jsonl", "--drop", "nonsense").returncode == 2


def test_smaller_things_a_real_run_meets(data, tmp_path):
    # an empty data file (or one of blank lines) is no success, nor are stats of nothing
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    res = _cli("dataset", "count", empty, "-o", tmp_path / "e.jsonl")
    assert res.returncode == 1 and "no samples" in res.stdout, res.stdout + res.stderr
    res = _cli("dataset", "stats", tmp_path / "e.jsonl", "-o", tmp_path / "st")
    assert res.returncode == 2 and "no counted samples" in res.stderr
    # 1e400 was written back as JSON's non-standard Infinity
    odd = tmp_path / "odd.jsonl"
    odd.write_text(data.read_text().splitlines()[0][:-1] + ', "score": 1e400}\n')
    ds.check(str(odd), str(tmp_path / "chk"), jobs=1)
    (problem,) = _lines(tmp_path / "chk" / "problems.jsonl")
    assert problem["problem"] == "malformed" and "1e400" in problem["message"]
    assert "Infinity" not in (tmp_path / "chk" / "valid.jsonl").read_text()
    # 0.0.14's "exceeds limit" line for every video, even with --quiet
    from media import make_video

    make_video(data.parent / "media" / "v.mp4", frames=24)
    video = {
        "video": "media/v.mp4",
        "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "ok"}],
    }
    many = tmp_path / "videos.jsonl"
    many.write_text(json.dumps(video) + "\n" + json.dumps({**video, "id": 2}) + "\n")
    res = _cli(
        "dataset",
        "count",
        many,
        "-o",
        tmp_path / "v.jsonl",
        "--media-root",
        data.parent,
        "--video-max-pixels",
        "10000000",
        "--quiet",
    )
    assert res.returncode == 0 and "exceeds limit" not in res.stderr, res.stderr
    # every flag of every dataset command says what it is (--max-len, -o and --engine had no help)
    import argparse

    from qwen_vl_utils.cli._main import build_parser

    sub = lambda p: next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: E731
    for name, command in sub(sub(build_parser())["dataset"]).items():
        for action in command._actions:
            if action.option_strings and action.dest not in ("help",):
                assert action.help, (name, action.option_strings)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_sample_whose_media_never_deliver_times_out_and_the_run_goes_on(data, tmp_path, jobs):
    """One media URL on a server that accepts and never answers held the whole run (nothing written) for as
    long as the policy's timeouts allowed; a per-sample limit reports it as timeout and goes on."""
    from test_endpoint import SilentServer

    silent = SilentServer()
    try:
        records = [_sample("media/0.png"), _sample(f"http://127.0.0.1:{silent.port}/x.png"), _sample("media/1.png")]
        path = data.parent / "stuck.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        env = {**os.environ, "QWENVL_READ_TIMEOUT": "600", "QWENVL_IMAGE_DEADLINE": "600"}
        args = ["dataset", "check", path, "-o", tmp_path / "chk", "--sample-timeout", "2", "--jobs", jobs]
        res = subprocess.run(
            [sys.executable, "-m", "qwen_vl_utils", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        silent.close()
    assert res.returncode == 1 and "1 timeout" in res.stdout, res.stdout + res.stderr
    assert [r["index"] for r in _lines(tmp_path / "chk" / "valid.jsonl")] == [0, 2]
    assert _cli("dataset", "check", path, "-o", tmp_path / "x", "--sample-timeout", "-1").returncode == 2


def test_a_samples_own_index_field_is_kept(data, tmp_path):
    """check's output overwrote a user field named index with the run's."""
    records = [{**_sample(f"media/{i}.png"), "index": f"user-{i}"} for i in range(3)]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds.check(str(path), str(tmp_path / "chk"), jobs=1, media_root=str(data.parent))
    valid = _lines(tmp_path / "chk" / "valid.jsonl")
    assert [r["index"] for r in valid] == ["user-0", "user-1", "user-2"]
    assert [r["qwen_vl_index"] for r in valid] == [0, 1, 2]
    # resuming reads the run's index, counting and packing too
    again = ds.check(str(path), str(tmp_path / "chk"), jobs=1, media_root=str(data.parent))
    assert again.resumed == 3 and again.valid == 3
    ds.count(str(path), str(tmp_path / "c.jsonl"), jobs=1, media_root=str(data.parent))
    ds.pack(str(tmp_path / "c.jsonl"), str(tmp_path / "p.json"), 4096, visual_only=True)
    packed = [s for g in json.loads((tmp_path / "p.json").read_text()) for s in g]
    assert sorted(s["index"] for s in packed) == ["user-0", "user-1", "user-2"]


def test_the_same_medium_twice_in_a_sample_under_two_names_is_a_problem(data, tmp_path):
    import shutil

    shutil.copy(data.parent / "media" / "0.png", data.parent / "media" / "copy.png")

    def two(a, b):
        return {
            "image": [a, b],
            "conversations": [{"from": "human", "value": "<image><image> differ?"}, {"from": "gpt", "value": "No."}],
        }

    records = [
        two("media/0.png", "media/copy.png"),
        two("media/0.png", "media/0.png"),
        two("media/0.png", "media/1.png"),
    ]
    path = data.parent / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = ds.check(str(path), str(tmp_path / "chk"), jobs=1)
    (problem,) = _lines(tmp_path / "chk" / "problems.jsonl")
    assert problem["index"] == 0 and problem["problem"] == "duplicate_media" and "copy.png" in problem["message"]
    assert summary.valid == 2  # the same path twice, and two different pictures, are fine


def test_chat_samples_pack_into_qwen_vl_finetunes_own_format(data, tmp_path):
    """Packed chat-format samples kept their messages, which qwen-vl-finetune's loader cannot read; converted,
    each reads back through this library's own reader of that format as the same conversation."""
    from qwen_vl_utils.dataset._samples import Settings, parse_sample

    chat = {
        "id": 7,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "media/0.png", "max_pixels": 50000},
                    {"type": "text", "text": "And this?"},
                    {"type": "image", "image": "media/1.png"},
                ],
            },
            {"role": "assistant", "content": "Two gradients."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ],
    }
    system = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(chat) + "\n" + json.dumps(system) + "\n")
    ds.count(str(path), str(tmp_path / "c.jsonl"), jobs=1, media_root=str(data.parent))
    summary = ds.pack(str(tmp_path / "c.jsonl"), str(tmp_path / "p.json"), 100000, visual_only=True)
    (sample,) = [s for g in json.loads((tmp_path / "p.json").read_text()) for s in g]
    assert "messages" not in sample and sample["id"] == 7
    assert sample["image"] == ["media/0.png", "media/1.png"]
    assert [t["from"] for t in sample["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert sample["conversations"][0]["value"] == "<image>\nAnd this?\n<image>"
    settings = Settings(media_root=str(data.parent))
    back = parse_sample(json.dumps(sample).encode(), settings)
    assert not back.problems and [k for k, _ in back.media] == ["image", "image"]
    (problem,) = _lines(tmp_path / "p.problems.jsonl")
    assert problem["problem"] == "not_convertible" and "system" in problem["message"] and summary.exit_code == 1


# --- found attacking the dataset tools from outside ------------------------------------------------------------


def test_a_tiny_sample_timeout_never_breaks_later_samples(data, tmp_path):
    """An alarm landing in the first `import av` left it half made: every later video was `undecodable`."""
    from media import make_video

    make_video(data.parent / "media" / "v.mp4", frames=12, width=64, height=48)
    video = {
        "video": "media/v.mp4",
        "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a"}],
    }
    path = data.parent / "many.jsonl"
    path.write_text("".join(json.dumps({**video, "id": i}) + "\n" for i in range(20)))
    res = _cli(
        "dataset", "count", path, "-o", tmp_path / "c.jsonl", "--jobs", "1", "--sample-timeout", "0.005", "--quiet"
    )
    codes = (
        {p["problem"] for p in _lines(tmp_path / "c.problems.jsonl")}
        if (tmp_path / "c.problems.jsonl").exists()
        else set()
    )
    assert codes <= {"timeout"}, (codes, res.stdout)


def test_resuming_under_another_model_seq_len_is_refused(data, tmp_path):
    """MODEL_SEQ_LEN changes video budgets (as in 0.0.14) but was not in the fingerprint: a resume mixed counts."""
    out = tmp_path / "c.jsonl"
    assert _cli("dataset", "count", data, "-o", out).returncode == 0
    env = {**os.environ, "MODEL_SEQ_LEN": "200"}
    res = subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", "dataset", "count", str(data), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 2 and "other settings" in res.stderr, res.stderr


def test_outputs_that_cannot_be_written_are_usage_errors_before_the_work(data, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    ds.count(str(data), str(tmp_path / "c.jsonl"), jobs=1)
    for args in (
        ["check", data, "-o", tmp_path / "afile"],
        ["count", data, "-o", "/proc/nope/c.jsonl"],
        ["pack", tmp_path / "c.jsonl", "--max-len", "100", "-o", tmp_path / "adir", "--visual-only"],
        ["filter", data, "-o", tmp_path / "adir"],
        ["stats", tmp_path / "c.jsonl", "-o", tmp_path / "afile"],
    ):
        res = _cli("dataset", *args)
        errors = [line for line in res.stderr.splitlines() if not line.startswith("note:")]
        assert res.returncode == 2 and len(errors) == 1 and errors[0].startswith("error:"), (args, res.stderr)


def test_bad_paths_in_a_sample_are_named_problems(data, tmp_path):
    """A frame given as a file:// URI was not looked at without --deep; a NUL in a path was an `error`."""
    missing = f"file://{data.parent}/media/nope.png"
    frames = {
        "messages": [
            {"role": "user", "content": [{"type": "video", "video": [f"file://{data.parent}/media/0.png", missing]}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    nul = _sample("media/0.png\u0000../x")
    path = data.parent / "bad.jsonl"
    path.write_text(json.dumps(frames) + "\n" + json.dumps(nul) + "\n")
    ds.check(str(path), str(tmp_path / "chk"), jobs=1)
    assert [p["problem"] for p in _lines(tmp_path / "chk" / "problems.jsonl")] == ["missing", "malformed"]
