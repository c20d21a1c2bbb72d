"""This library against the public qwen-omni-utils 0.0.9 itself, case by case.

``tests/goldens/omni/qwen-omni-utils.json`` was written by ``scripts/omni/goldens.py``, which runs qwen-omni-utils
(its own virtualenv: it imports torch and torchvision at module level) on the 67 cases and the media that
``scripts/omni/run_qwen_omni_utils.make_media`` writes: stepped tones (the frequency steps every 100 ms, so a
sample's time can be read back) as WAV, FLAC, MP3, AAC, Opus, base64 and numpy, windows, videos with aligned,
late, mono, 5.1, quad and two audio tracks, and the error cases. The same media are written here and every case
is compared: where both read the same samples, the same lengths, the same start and end in the source signal to
the analysis' 0.5 ms, and the same values (SNR over an excerpt); where this library follows the container's
timeline and qwen-omni-utils does not, or where one of them fails, what each does, as the README states it.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest

import qwen_vl_utils as q
from qwen_vl_utils import _errors as errors

from media import load_script

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((ROOT / "tests" / "goldens" / "omni" / "qwen-omni-utils.json").read_text())
SR = 16000


RUNNER = load_script("scripts/omni/run_qwen_omni_utils.py")

#: both read the same samples: lengths, times and values agree
SAME = {
    "wav440_stereo_44k", "wav440_file_uri", "wav440_audio_url_key", "steps_wav_44k", "steps_flac", "steps_mp3",
    "steps_m4a", "steps_opus", "steps_mono_16k", "steps_f32_48k_peak1.2", "window_wav", "window_m4a", "window_mp3",
    "window_end_only", "npy_f32", "b64_wav", "b64_mp3",
    "string_content_only", "image_and_audio", "video_av_no_audio_flag", "video_noaudio_flag_off", "b64_flac",
    "b64_opus", "path_audio_start_none", "both_audio_and_audio_url", "vision_call_audio_only",
}  # fmt: skip
#: a video's sound: this library gives exactly the frames' window on the container's timeline, qwen-omni-utils the
#: track from its first sample (AAC's end padding kept, a late track shifted to 0, video_start without the frames)
VIDEO_TIMELINE = {
    "video_av", "video_av_meta", "video_file_uri", "video_mono", "video_51", "video_2tracks", "video_loud",
    "patch16", "video_url_key_audio_only", "video_av_off1", "video_av_off1_mkv_opus", "video_av_start2.02",
    "video_av_off1_start2.02", "video_start_only", "video_end_only", "batch_order", "video_quad",
}  # fmt: skip
#: both refuse, this library with a typed error
BOTH_REFUSE = {
    "npy_stereo", "missing_file", "audio_without_source", "video_noaudio", "video_frame_list", "missing_video",
    "data_uri_no_base64", "int_source",
}  # fmt: skip
#: qwen-omni-utils fails where the input is fine (base64 AAC, no "type" key, an empty conversation, ...)
ONLY_THEY_FAIL = {
    "b64_m4a", "no_type_key", "empty_conversation", "npy_audio_start_none", "message_without_content",
    "text_elem_no_type", "data_uri_non_audio_mime", "video_url_key",
}  # fmt: skip
#: qwen-omni-utils returns something for a window that makes no sense (an empty array for one past the end); this
#: library refuses it
ONLY_WE_REFUSE = {
    "window_end_before_start", "npy_negative_start", "wav_negative_start", "m4a_end_before_start",
    "window_start_past_end", "window_start_past_end_m4a",
}  # fmt: skip
#: read differently on purpose: an int16 array is scaled to [-1, 1]; an audio_url-typed element is read
DIFFERENT = {"npy_i16", "type_audio_url_ignored"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("omni-media")
    RUNNER.make_media(folder)
    return folder, {case["id"]: case for case in json.loads((folder / "cases.json").read_text())}


def _ours(case: dict, folder: Path) -> tuple:
    """(audios, videos) of this library for a case, run as the runner ran qwen-omni-utils."""
    conversation = RUNNER._resolve(case["conversation"], folder)
    call = case.get("call", "process_mm_info")
    flag = case.get("use_audio_in_video", False)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        if call == "process_audio_info":
            return q.process_audio_info(conversation, flag), None
        if call == "process_vision_info":
            return None, q.process_vision_info(conversation, **case.get("kwargs", {}))[1]
        result = q.process_mm_info(conversation, flag, **case.get("kwargs", {}))
        return result[0], result[2]
    finally:
        os.chdir(cwd)


def _excerpt(golden: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(golden["i16"]), "<i2").astype(np.float32) / 32767


def _snr_at_best_lag(ours: np.ndarray, theirs: np.ndarray, at: int, most: int = 16) -> tuple:
    """(lag in samples, SNR in dB) of ``ours`` against ``theirs`` (an excerpt that starts at ``at``)."""
    best = None
    for k in range(-most, most + 1):
        part = ours[at + k : at + k + len(theirs)]
        if len(part) < len(theirs) or at + k < 0:
            continue
        noise = float(np.sum((part - theirs) ** 2))
        snr = 10 * np.log10(float(np.sum(theirs**2)) / max(noise, 1e-20))
        if best is None or snr > best[1]:
            best = (k, snr)
    return best


def _steps(audio: np.ndarray) -> dict:
    return RUNNER.analyse_steps(np.asarray(audio, np.float64), SR)


def test_every_golden_case_is_classified():
    ids = {case["id"] for case in GOLDEN["cases"]}
    groups = [SAME, VIDEO_TIMELINE, BOTH_REFUSE, ONLY_THEY_FAIL, ONLY_WE_REFUSE, DIFFERENT]
    assert set().union(*groups) == ids and sum(map(len, groups)) == len(ids)


@pytest.mark.parametrize("golden", [c for c in GOLDEN["cases"] if c["id"] in SAME], ids=lambda c: c["id"])
def test_the_same_samples_as_qwen_omni_utils(media, golden):
    folder, cases = media
    audios, _ = _ours(cases[golden["id"]], folder)
    theirs = golden.get("audios") or []
    assert (audios is None and golden["n_audios"] in (None, 0)) or len(audios) == len(theirs)
    for ours, want in zip(audios or [], theirs):
        assert len(ours) == want["len"]
        if want["steps"] and "start_s" in want["steps"]:
            got = _steps(ours)
            assert got["start_s"] == pytest.approx(want["steps"]["start_s"], abs=0.001)
            assert got["end_s"] == pytest.approx(want["steps"]["end_s"], abs=0.001)
        if want["len"] >= 800:
            lag, snr = _snr_at_best_lag(ours, _excerpt(want), want["at"])
            assert lag == 0 and snr > 35, (lag, snr)  # (soxr_hq against swresample, and 16-bit excerpts)


def _video_params():
    """Three cases in the default run (the stepped-tone analysis of 6 s takes seconds); all with -m slow."""
    for case in GOLDEN["cases"]:
        if case["id"] in VIDEO_TIMELINE:
            fast = case["id"] in ("video_av", "video_av_off1", "video_av_start2.02")
            yield pytest.param(case, id=case["id"], marks=() if fast else (pytest.mark.slow,))


@pytest.mark.parametrize("golden", _video_params())
def test_a_videos_sound_covers_its_frames_on_the_containers_timeline(media, golden):
    folder, cases = media
    case = cases[golden["id"]]
    audios, videos = _ours(case, folder)
    assert len(audios) == len(golden["audios"])
    eles = [e for m in _messages(case["conversation"]) for e in m.get("content", []) if isinstance(e, dict)]
    media_eles = [e for e in eles if e.get("type") in ("audio", "video")]
    assert len(audios) == len(media_eles) and any(e["type"] == "video" for e in media_eles)
    for ele, ours in zip(media_eles, audios):
        if ele["type"] != "video":
            continue
        value = ele.get("video", ele.get("video_url"))
        plain = {k: v for k, v in ele.items() if k != "video_url"}
        path = value if value.startswith("file:") else str(folder / value)
        meta = q.fetch_video({**plain, "video": path}, return_video_metadata=True)[1]
        first, last, fps = meta["frames_indices"][0], meta["frames_indices"][-1], meta["fps"]
        assert len(ours) == round((last + 1 - first) / fps * SR)  # exactly the frames' window
        if "quad" in value:
            continue  # (its pan filter's mix does not keep the stepped tone's shape: the length is the check)
        late = 1.0 if "off1" in value else 0.0  # the track starts 1 s into the video (an offset in the file)
        # sample 0 is the window's first frame: there the source signal (which starts at ``late``) is at t - late
        got = _steps(ours)
        if "mkv" in value:  # (its muxer put this Opus track 6 ms early; Opus's first frames confuse the analysis)
            assert got["end_s"] == pytest.approx((last + 1) / fps - late, abs=0.008), got
        else:
            assert got["start_s"] == pytest.approx(first / fps - late, abs=0.002), got


def _messages(conversation):
    if conversation and isinstance(conversation[0], list):
        return [m for conv in conversation for m in conv]
    return conversation


@pytest.mark.parametrize("golden", [c for c in GOLDEN["cases"] if c["id"] in BOTH_REFUSE], ids=lambda c: c["id"])
def test_what_both_refuse_is_a_typed_error_here(media, golden):
    folder, cases = media
    assert "error" in golden
    with pytest.raises(errors.QwenVLError):
        _ours(cases[golden["id"]], folder)


@pytest.mark.parametrize(
    "golden", [c for c in GOLDEN["cases"] if c["id"] in ONLY_THEY_FAIL | DIFFERENT], ids=lambda c: c["id"]
)
def test_inputs_qwen_omni_utils_fails_on_are_read(media, golden):
    folder, cases = media
    audios, _ = _ours(cases[golden["id"]], folder)
    for audio in audios or []:
        assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0


@pytest.mark.parametrize("golden", [c for c in GOLDEN["cases"] if c["id"] in ONLY_WE_REFUSE], ids=lambda c: c["id"])
def test_windows_that_make_no_sense_are_refused(media, golden):
    folder, cases = media
    assert "error" not in golden  # qwen-omni-utils returned something for them
    with pytest.raises(errors.InvalidOptionError, match="audio_start"):
        _ours(cases[golden["id"]], folder)
