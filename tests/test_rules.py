"""``dataset count --rules TRAINER``: per sample, what each trainer's own code feeds.

The golden files under ``tests/goldens/trainers/`` were written by ``scripts/trainers/goldens.py``, which runs
each trainer's real code (qwen-vl-finetune current and legacy, LLaMA-Factory 0.9.5, ms-swift 4.6.0 with
qwen-vl-utils 0.0.14) in its own virtualenv on the set ``trainer_corpus.py`` generates; these tests generate the
same set and compare every sample. The default run checks one golden file per rule set; the slow run all of them.
Where the trainers' formulas come from transformers (qwen-vl-finetune), they are also checked against the real
transformers functions installed here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_vl_utils import dataset as ds
from qwen_vl_utils.dataset import _rules, _work
from trainer_corpus import build as build_corpus

GOLDENS = Path(__file__).resolve().parent / "goldens" / "trainers"
GOLDEN_FILES = sorted(GOLDENS.glob("*.json"))
#: one golden file per rule set in the default run (the others run with -m slow)
FAST = {"qwen-vl-finetune.qwen3-vl.default", "qwen-vl-finetune-legacy.qwen2.5-vl.default"}
FAST |= {"llamafactory.qwen3-vl.default", "ms-swift.qwen2.5-vl.documented"}

#: where the trainer's decoder fails on a file in a way no header tells (counted by the rule set): (rules, id) -> why
NOT_PREDICTED = {
    ("qwen-vl-finetune", "video:v10.avi"): (
        "torchcodec on FFmpeg 5.1 (Debian 12) indexes this AVI's 21 packets without a timestamp one frame off and "
        "fails on its last frame; on FFmpeg 8 every packet has a timestamp and it is read"
    ),
    ("qwen-vl-finetune", "video:liar.avi"): "v10.avi with its header's frame counts patched: the same AVI failure",
    ("qwen-vl-finetune", "video:v25.ts"): (
        "torchcodec 0.17 on FFmpeg 5.1 runs out of frames reading this MPEG-TS file in exact mode, though every "
        "packet has a timestamp and PyAV and ffprobe decode all 50 frames"
    ),
}


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainer-corpus")
    samples = build_corpus(folder)
    data = folder / "samples.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return data, [s["id"] for s in samples]


def _read(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _counted(data: Path, out: Path, rules: str, model: str, trainer_args) -> dict:
    """sample id -> our record (counted) or problem."""
    given = str(GOLDENS / trainer_args) if isinstance(trainer_args, str) else json.dumps(trainer_args)
    ds.count(str(data), str(out), rules=rules, model=model, trainer_args=given, jobs=1)
    ids = [record["id"] for record in _read(data)]
    result = {record["id"]: record for record in _read(out)}
    for record in _read(str(out).replace(".jsonl", ".problems.jsonl")):
        result[ids[record["index"]]] = record
    return result


def _tokens_by_kind(record: dict) -> list:
    """Tokens per medium, images first, then videos (the order the trainers' grids come in)."""
    info = record["media_info"]
    return [m["tokens"] for m in info if m["kind"] == "image"] + [m["tokens"] for m in info if m["kind"] == "video"]


def _golden_params():
    for path in GOLDEN_FILES:
        marks = () if path.stem in FAST else (pytest.mark.slow,)
        yield pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("golden", _golden_params())
def test_counts_match_the_trainers_own_code_sample_by_sample(golden, corpus, tmp_path):
    data, ids = corpus
    expected = json.loads(golden.read_text())
    assert set(expected["samples"]) == set(ids), "the golden file is of another corpus: regenerate it"
    ours = _counted(data, tmp_path / "out.jsonl", expected["rules"], expected["model"], expected["trainer_args"])
    wrong = []
    for sid, want in expected["samples"].items():
        got = ours[sid]
        if (expected["rules"], sid) in NOT_PREDICTED:
            assert "problem" not in got, (sid, got)  # counted
            continue
        if "error" in want:
            ok = got.get("problem") == "trainer_fails"
        elif "dropped" in want:
            ok = got.get("problem") == "trainer_drops_media"
        else:
            ok = "problem" not in got and _tokens_by_kind(got) == want["tokens"]
            ok = ok and got["visual_tokens"] == sum(want["tokens"])
        if not ok:
            wrong.append((sid, want, got.get("problem") or _tokens_by_kind(got), got.get("message", "")[:200]))
    assert not wrong, f"{len(wrong)} of {len(ids)} samples differ from {golden.name}: {wrong}"


def test_every_rule_set_has_golden_files_from_the_trainers_code():
    stems = {p.stem.split(".")[0] for p in GOLDEN_FILES}
    assert stems == set(_rules.RULE_SETS), "each rule set is checked against its trainer's own code"
    for path in GOLDEN_FILES:
        runner = json.loads(path.read_text())["runner"]
        assert runner["versions"], path


# --- the transformers functions qwen-vl-finetune and LLaMA-Factory go through, called for real ------------------


def _sizes():
    sides = [1, 9, 12, 27, 28, 29, 31, 32, 33, 61, 97, 144, 180, 240, 333, 480, 720, 1001, 1080, 1500, 2000, 4000]
    return [(h, w) for h in sides for w in sides if max(h, w) / min(h, w) <= 200]


def test_the_image_resize_is_transformers_own():
    try:  # transformers 5 (its torchvision-free module), else 4.x
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as qwen2_vl
    except ImportError:
        qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    for factor, low, high in ((28, 12544, 451584), (32, 65536, 16777216), (28, 3136, 12845056), (32, 4096, 9000)):
        for h, w in _sizes():
            try:
                want = tuple(qwen2_vl.smart_resize(h, w, factor=factor, min_pixels=low, max_pixels=high))
            except ValueError:
                continue  # (older transformers refuse a side under the factor; the rule sets follow 4.53+)
            assert _rules.resize_hf(h, w, factor, low, high) == want, (h, w, factor, low, high)


def test_the_qwen3_video_resize_and_frame_sampling_are_transformers_own():
    video = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    for frames in (2, 3, 4, 7, 8, 31, 60):
        for h, w in _sizes():
            if min(h, w) < 32:
                continue
            for low, high in ((200704, 802816), (4096, 25165824), (100352, 100352 * 3)):
                want = video.smart_resize(frames, h, w, temporal_factor=2, factor=32, min_pixels=low, max_pixels=high)
                assert _rules.resize_hf_video(frames, h, w, 32, low, high) == tuple(want), (frames, h, w, low, high)
    from transformers.video_utils import VideoMetadata

    proc = video.Qwen3VLVideoProcessor(fps=2, min_frames=4, max_frames=8)
    for total, fps in ((60, 30.0), (83, 25.0), (150, 5.0), (50, 30000 / 1001), (5, 24.0), (2400, 24.0)):
        meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
        want = list(proc.sample_frames(meta, fps=2))
        n = min(min(max(int(total / fps * 2), 4), 8), total)
        assert _rules.linspace_indices(total, n) == [int(i) for i in want], (total, fps)


# --- the command line --------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path):
    from media import gradient, make_video

    (tmp_path / "m").mkdir()
    gradient(640, 480).save(tmp_path / "m" / "a.png")
    make_video(tmp_path / "m" / "v.mp4", frames=60, width=320, height=240, fps=30)
    samples = [
        {
            "image": "m/a.png",
            "conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "A."}],
        },
        {
            "video": "m/v.mp4",
            "conversations": [{"from": "human", "value": "<video> what?"}, {"from": "gpt", "value": "B."}],
        },
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--rules", "axolotl"], "unknown; choose one of"),
        (["--trainer-args", "{}"], "needs --rules"),
        (["--rules", "ms-swift", "--image-max-pixels", "100000"], "--trainer-args"),
        (["--rules", "ms-swift", "--model", "qwen3-vl", "--patch-size", "14"], "contradicts"),
        (["--rules", "qwen-vl-finetune-legacy", "--model", "qwen3-vl"], "predates Qwen3-VL"),
        (["--rules", "ms-swift", "--trainer-args", '{"MAX_PIXELS": "1e6"}'], "MAX_PIXELS='1e6'"),
        (["--rules", "llamafactory", "--trainer-args", '{"video_fps": 0}'], "positive number"),
        (["--rules", "llamafactory", "--trainer-args", '{"image_max_pixels": 10, "image_min_pixels": 20}'], "below"),
        (["--rules", "llamafactory", "--trainer-args", "[1]"], "JSON object"),
        (["--rules", "llamafactory", "--trainer-args", "nope.yaml"], "neither a JSON object nor a file"),
        (["--rules", "ms-swift", "--processor", "."], "preprocessor_config.json"),
        (["--rules", "ms-swift", "--deep"], "--deep"),
    ],
)
def test_bad_rule_flags_are_usage_errors_before_the_run(small, tmp_path, flags, needle):
    res = _cli("dataset", "count", small, *flags, "-o", tmp_path / "out.jsonl")
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_check_warns_that_qwen_vl_finetune_feeds_qwen25_every_frame(small, tmp_path):
    res = _cli("dataset", "check", small, "--rules", "qwen-vl-finetune", "--model", "qwen2.5-vl", "-o", tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "EVERY frame" in res.stderr
    res = _cli("dataset", "count", small, "--rules", "qwen-vl-finetune", "--model", "qwen2.5-vl", "-o", tmp_path / "o")
    video = _read(tmp_path / "o")[1]
    assert video["media_info"][0]["frames"] == 60  # all 60 frames: 30 temporal groups
    res = _cli("dataset", "check", small, "--rules", "qwen-vl-finetune", "--model", "qwen3-vl", "-o", tmp_path / "c3")
    assert res.returncode == 0 and "EVERY frame" not in res.stderr


def test_a_llamafactory_yaml_and_a_model_folder_configure_the_count(small, tmp_path):
    yaml = tmp_path / "train.yaml"
    yaml.write_text("model_name_or_path: Qwen/Qwen3-VL-8B-Instruct\ntemplate: qwen3_vl\nimage_max_pixels: 65536\n")
    res = _cli(
        "dataset", "count", small, "--rules", "llamafactory", "--trainer-args", yaml, "-o", tmp_path / "y.jsonl"
    )
    assert res.returncode == 0, res.stderr
    assert "counting for qwen3-vl" in res.stderr  # the template named the model
    image = _read(tmp_path / "y.jsonl")[0]
    # 640x480 shrunk to 65536 pixels (295x221), then the Qwen3-VL processor's minimum of 65536 rounds it up
    h, w = _rules.resize_hf(221, 295, 32, 65536, 16777216)
    assert image["visual_tokens"] == (h // 32) * (w // 32)
    # a local model folder's processor configs instead of the built-in copies
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"min_pixels": 3136, "max_pixels": 50176, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    res = _cli("dataset", "count", small, "--rules", "llamafactory", "--processor", folder, "-o", tmp_path / "p.jsonl")
    assert res.returncode == 0, res.stderr
    image = _read(tmp_path / "p.jsonl")[0]
    assert image["visual_tokens"] <= 50176 // 28**2  # the folder's own limit decides


def test_ms_swifts_documented_video_max_pixels_is_counted_not_refused(small, tmp_path):
    args = json.dumps({"MAX_PIXELS": "1003520", "VIDEO_MAX_PIXELS": "50176", "FPS_MAX_FRAMES": "12"})
    out = tmp_path / "s.jsonl"
    res = _cli("dataset", "count", small, "--rules", "ms-swift", "--trainer-args", args, "-o", out)
    assert res.returncode == 0, res.stderr
    assert "1.05 x the minimum" in res.stderr
    video = _read(out)[1]
    f = 28
    low = 128 * f * f
    h, w = _rules.resize_0014(240, 320, f, low, int(low * 1.05), 200)
    assert video["media_info"][0]["tokens"] == video["media_info"][0]["frames"] // 2 * (h // f) * (w // f)
    # the library's own rules refuse the same budget (max below min) for every video
    res = _cli("dataset", "count", small, "--video-max-pixels", "50176", "-o", tmp_path / "own.jsonl")
    assert res.returncode == 1
    assert _read(tmp_path / "own.problems.jsonl")[0]["problem"] == "invalid_option"


def test_the_rules_are_part_of_what_a_resume_must_match(small, tmp_path):
    out = tmp_path / "o.jsonl"
    assert _cli("dataset", "count", small, "-o", out).returncode == 0
    res = _cli("dataset", "count", small, "--rules", "ms-swift", "-o", out)
    assert res.returncode == 2 and "settings" in res.stderr
    assert _cli("dataset", "count", small, "--rules", "ms-swift", "-o", out, "--overwrite").returncode == 0


def test_media_a_trainer_cannot_be_given_are_problems_under_its_rules(tmp_path):
    from media import gradient

    gradient(64, 48).save(tmp_path / "f0.png")
    gradient(64, 48).save(tmp_path / "f1.png")
    user = {
        "role": "user",
        "content": [{"type": "video", "video": ["f0.png", "f1.png"]}, {"type": "text", "text": "?"}],
    }
    sample = {"messages": [user, {"role": "assistant", "content": "A."}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(sample) + "\n")
    out = tmp_path / "o.jsonl"
    summary = ds.count(str(data), str(out), rules="llamafactory", model="qwen2.5-vl", jobs=1)
    assert summary.problems == {"trainer_fails": 1}
    problem = _read(tmp_path / "o.problems.jsonl")[0]
    assert "by path or URL" in problem["message"]


def test_dataset_rules_lists_every_rule_set_with_its_arguments():
    res = _cli("dataset", "rules")
    assert res.returncode == 0
    for name, rs in _rules.RULE_SETS.items():
        assert name in res.stdout and rs.source.split()[0] in res.stdout
        for arg in rs.defaults:
            assert arg in res.stdout


def test_counting_by_rules_needs_no_decoding_of_pictures(corpus, tmp_path, monkeypatch):
    """Header-only: the rule sets read headers and packet headers (the probe decodes one frame per video, as
    the library's own count does), never the sampled frames."""
    import qwen_vl_utils.video as video

    def no_decoding(*args, **kwargs):
        raise AssertionError("a rule set decoded frames")

    monkeypatch.setattr(video, "decode_video", no_decoding)
    monkeypatch.setattr(_work, "_CACHE", type(_work._CACHE)())  # measured afresh, not from an earlier test
    data, ids = corpus
    summary = ds.count(str(data), str(tmp_path / "o.jsonl"), rules="llamafactory", model="qwen2.5-vl", jobs=1)
    assert summary.records == len(ids) and "error" not in summary.problems
    assert math.isfinite(summary.seconds)


def test_stats_says_which_rules_the_counts_follow(small, tmp_path):
    args = json.dumps({"FPS_MAX_FRAMES": "12"})
    out = tmp_path / "s.jsonl"
    assert _cli("dataset", "count", small, "--rules", "ms-swift", "--trainer-args", args, "-o", out).returncode == 0
    res = _cli("dataset", "stats", out, "-o", tmp_path / "stats")
    assert 'counted by: ms-swift for qwen2.5-vl, trainer arguments {"FPS_MAX_FRAMES": 12}' in res.stdout
    assert _cli("dataset", "count", small, "-o", tmp_path / "own.jsonl").returncode == 0
    res = _cli("dataset", "stats", tmp_path / "own.jsonl", "-o", tmp_path / "stats2")
    assert "counted by: qwen-vl-utils (patch size 14)" in res.stdout


@pytest.mark.slow
def test_the_ray_engine_counts_by_the_same_rules(corpus, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'qwen-vl-utils[ray]')")
    data, _ = corpus
    options = {"rules": "llamafactory", "model": "qwen3-vl", "trainer_args": '{"video_maxlen": 16}'}
    ds.count(str(data), str(tmp_path / "local.jsonl"), jobs=1, **options)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = ds.count(str(data), str(tmp_path / "ray.jsonl"), engine="ray", **options)
    finally:
        ray.shutdown()
    assert summary.problems.get("trainer_fails")
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    assert (tmp_path / "ray.problems.jsonl").read_text() == (tmp_path / "local.problems.jsonl").read_text()


# --- found attacking the rule sets from outside (each case run through the trainer's own code first) -------------


def _count(tmp_path, records, rules, model="qwen2.5-vl", **options):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / f"o-{rules}.jsonl"
    summary = ds.count(str(data), str(out), rules=rules, model=model, jobs=1, overwrite=True, **options)
    counted = {r["index"]: r for r in _read(out)}
    problems = {r["index"]: r for r in _read(str(out).replace(".jsonl", ".problems.jsonl"))}
    return summary, [counted.get(i) or problems.get(i) for i in range(len(records))]


def test_llamafactorys_own_format_is_read_not_counted_as_nothing(small, tmp_path):
    """LLaMA-Factory's sharegpt format (ms-swift reads it too): text with tags, "images" / "videos" beside the
    messages, or "conversations" with "images". Its converter and plugin fed 66 and 352 tokens for such rows;
    they were counted as 0 visual tokens, valid."""
    root = small.parent
    msgs = [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "A."}]
    rows = [
        {"messages": msgs, "images": [str(root / "m/a.png")]},
        {"messages": [{"role": "user", "content": "<video>What?"}, msgs[1]], "videos": [str(root / "m/v.mp4")]},
        {
            "conversations": [{"from": "human", "value": "<image>Who?"}, {"from": "gpt", "value": "A."}],
            "images": [str(root / "m/a.png")],
        },
    ]
    _, got = _count(tmp_path, rows, "llamafactory", allow_outside_root=True)
    assert all("problem" not in g and g["visual_tokens"] > 0 for g in got), got
    assert got[0]["visual_tokens"] == got[2]["visual_tokens"]
    assert got[0]["media_info"][0]["kind"] == "image" and got[1]["media_info"][0]["kind"] == "video"


def test_media_without_tags_go_first_where_the_trainer_puts_them(small, tmp_path):
    """ms-swift and the legacy loader put untagged media before the first user text (they fed 66 / 560 and 66 /
    48 tokens for these); qwen-vl-finetune and LLaMA-Factory fail on them (tag_mismatch)."""
    root = small.parent
    conv = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}]
    rows = [
        {"image": str(root / "m/a.png"), "conversations": conv},
        {"video": str(root / "m/v.mp4"), "conversations": conv},
    ]
    for rules in ("ms-swift", "qwen-vl-finetune-legacy"):
        _, got = _count(tmp_path, rows, rules, allow_outside_root=True)
        assert all("problem" not in g and g["visual_tokens"] > 0 for g in got), (rules, got)
    for rules in ("qwen-vl-finetune", "llamafactory"):
        _, got = _count(tmp_path, rows, rules, allow_outside_root=True)
        assert {g["problem"] for g in got} == {"tag_mismatch"}, rules


def test_conversation_shapes_a_trainer_rejects_are_trainer_failures(small, tmp_path):
    image = str(small.parent / "m/a.png")
    from_user = {
        "image": image,
        "conversations": [{"from": "user", "value": "<image>?"}, {"from": "gpt", "value": "A."}],
    }
    turns = [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "A."}, {"from": "human", "value": "?"}]
    ends_human = {"image": image, "conversations": turns}
    _, got = _count(tmp_path, [from_user, ends_human], "llamafactory", allow_outside_root=True)
    assert [g["problem"] for g in got] == ["trainer_fails", "trainer_fails"]
    _, got = _count(tmp_path, [from_user], "qwen-vl-finetune", allow_outside_root=True)
    assert got[0]["problem"] == "trainer_fails" and "only 'human' is the user" in got[0]["message"]
    _, got = _count(tmp_path, [from_user], "ms-swift", allow_outside_root=True)
    assert "problem" not in got[0]


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: (d / "bin.yaml").write_bytes(b"\xff\xfe\x00x"), "cannot read it as text"),
        (lambda d: (d / "bin.yaml").write_text("template: qwen2_vl\n1: foo\n"), "must be text"),
        (lambda d: (d / "bin.yaml").write_text("template: qwen2_vl\non: true\n"), "must be text"),
        (lambda d: (d / "bin.yaml").write_text("template: llava\n"), "reproduces the Qwen2-VL and Qwen3-VL"),
        (lambda d: (d / "bin.yaml").write_text("template: qwen3_vl\n"), "not qwen2.5-vl"),
    ],
)
def test_odd_trainer_argument_files_are_usage_errors(small, tmp_path, make, needle):
    make(tmp_path)
    res = _cli("dataset", "count", small, "--rules", "llamafactory", "--model", "qwen2.5-vl", "--trainer-args",
               tmp_path / "bin.yaml", "-o", tmp_path / "o.jsonl")  # fmt: skip
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize(
    "config, preprocessor, needle",
    [
        ({"model_type": ["qwen2_vl"]}, {"patch_size": 14, "min_pixels": 1, "max_pixels": 9}, "model_type"),
        ({"model_type": "llava"}, {"patch_size": 14, "min_pixels": 3136, "max_pixels": 9999999}, "not a Qwen"),
        ({"model_type": "qwen2_5_vl"}, {"patch_size": [14]}, "patch_size"),
        ({"model_type": "qwen2_5_vl"}, {"patch_size": 14, "size": "abc"}, "'size'"),
        ({"model_type": "qwen2_5_vl"}, {"patch_size": 14, "size": {"shortest_edge": 0, "longest_edge": -5}}, "limits"),
    ],
)
def test_odd_model_folders_are_usage_errors(small, tmp_path, config, preprocessor, needle):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    res = _cli("dataset", "count", small, "--rules", "llamafactory", "--processor", folder, "-o", tmp_path / "o.jsonl")
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_ms_swift_reads_its_environment_and_its_reads_of_numbers(small, tmp_path):
    import os

    env = {**os.environ, "MAX_PIXELS": "50000", "MODEL_SEQ_LEN": "1e5"}
    res = subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", "dataset", "count", str(small), "--rules", "ms-swift", "-o",
         str(tmp_path / "o.jsonl")], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "read from the environment" in res.stderr and "MAX_PIXELS=50000" in res.stderr
    image = _read(tmp_path / "o.jsonl")[0]
    assert image["visual_tokens"] == 50000 // 28**2 * 0 + _rules.resize_0014(480, 640, 28, 4 * 784, 63 * 784, 200)[
        0
    ] // 28 * (_rules.resize_0014(480, 640, 28, 4 * 784, 63 * 784, 200)[1] // 28)


def test_the_python_api_takes_trainer_args_as_a_dict(small, tmp_path):
    summary = ds.count(str(small), str(tmp_path / "o.jsonl"), rules="llamafactory", trainer_args={"video_fps": 1})
    assert summary.exit_code == 0
    res = _cli("dataset", "count", small, "--rules", "ms-swift", "--fps", "1", "-o", tmp_path / "p.jsonl")
    assert res.returncode == 2 and "--fps" in res.stderr and "--video-fps" not in res.stderr
