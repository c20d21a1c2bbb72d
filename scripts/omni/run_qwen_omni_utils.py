"""Run the public ``qwen-omni-utils`` (PyPI, checked with 0.0.9) on a list of cases and save what it returns, as
goldens for qwen-vl-utils' audio support (a drop-in for ``qwen_omni_utils.process_mm_info``).

Setup (the versions this was checked with, Python 3.11.7, Debian 12's ffmpeg 5.1 CLI on PATH)::

    python3 -m venv /work/venvs/omni
    /work/venvs/omni/bin/pip install "qwen-omni-utils==0.0.9" torch torchvision torchcodec librosa av soundfile
    # resolved: torch 2.14.1 (default CUDA build, runs on CPU), torchvision 0.29.1, torchcodec 0.17.0,
    # librosa 0.11.0, audioread 3.1.0, soundfile 0.14.0, soxr 1.1.0, av 18.1.0, numpy 2.4.6

Notes on that setup:

* ``torchvision`` >= 0.24 has no ``torchvision.io.read_video``: without ``torchcodec`` (or ``decord``) every video
  fails in qwen-omni-utils (``AttributeError``), so ``torchcodec`` is installed; its backend is picked first.
  ``--video-reader`` sets ``FORCE_QWENVL_VIDEO_READER`` (read by qwen-omni-utils at import) to force one.
* ``librosa`` must be < 1.0 (1.0 requires Python >= 3.12 and drops audioread): qwen-omni-utils hands librosa an
  ``audioread.ffdec.FFmpegAudioFile`` for every video/URL audio, and needs librosa's audioread fallback for
  formats libsndfile cannot read (m4a/AAC). ``audioread`` itself comes in through librosa 0.11, not through
  qwen-omni-utils' own requirements. The ``ffmpeg`` CLI must be on PATH (audioread runs it).
* Goldens of the audioread path (videos, URLs, m4a/AAC) depend on that ffmpeg CLI's version: it decides, e.g.,
  whether AAC priming/padding is trimmed (ffmpeg 5.1 keeps the trailing padding: 3.0 s of AAC gives 3.0186 s).

Usage, with the venv's python::

    run_qwen_omni_utils.py --cases CASES.json --out OUT.npz [--save-vision] [--video-reader torchcodec]
    run_qwen_omni_utils.py --make-media DIR      # writes test media and DIR/cases.json, then run as above

``--only ID ...`` runs a subset. The runner sets torch to 1 thread and ``TORCHCODEC_NUM_THREADS`` to 1 unless set
(neither changes the results), and runs each case with the working directory set to the folder of CASES.json.

CASES.json is a list of::

    {"id": "m4a", "conversation": [...messages...] or [[...], [...]] (a batch),
     "use_audio_in_video": false, "kwargs": {"return_video_kwargs": true, ...},
     "call": "process_mm_info" (default) | "process_audio_info" | "process_vision_info",
     "step_signal": {"f0": 300, "df": 50, "seg": 0.1}   (optional: analyse each audio as a stepped tone)}

Inside a conversation, a value ``{"__npy__": "x.npy"}`` is replaced by ``np.load("x.npy")`` (numpy audio input)
and ``{"__data_uri__": "x.wav", "mime": "audio/wav"}`` by ``"data:audio/wav;base64,..."`` of that file; relative
paths are taken from the folder of CASES.json. ``--make-media`` covers: WAV/FLAC/MP3/m4a/Opus files, windows
(``audio_start``/``audio_end``), numpy and base64 inputs, videos with aligned / 1.0 s-late (mp4 AAC, mkv Opus) /
mono / 5.1 / quad / two audio tracks / no audio, ``video_start``/``video_end``, batches and the error cases.

Output: OUT.npz holds, per case, each returned audio as float32 under ``f"{id}/audio{i}"`` (the dtype that
qwen-omni-utils returned is in the sidecar; a numpy input keeps its own dtype there), and with ``--save-vision``
``f"{id}/image{i}"`` (uint8 HWC) and ``f"{id}/video{i}"`` (float32 TCHW). OUT.json (beside OUT.npz) holds a
header (versions, video backend) and per case: ``n_audios`` (null when qwen-omni-utils returned ``None``),
``audios`` [{len, dtype, min, max, rms, seconds, steps?}], ``images``, ``videos`` [{shape, dtype, metadata}],
``video_kwargs``, ``n_returned`` (length of the returned tuple), ``warnings`` and, instead, ``error``
{type, message, where}. The stepped-tone analysis gives ``start_s``/``end_s``: the source-signal time (seconds
from the first sample of the encoded audio stream) of the first and last returned samples (to about 0.5 ms).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import subprocess
import sys
import traceback
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

SR = 16000


# ----------------------------------------------------------------------------------------------------------
# stepped-tone analysis: segment k (``seg`` seconds long) holds a sine of f0 + k*df Hz, phase-continuous.


def steps_signal(duration: float, sr: int, f0: float = 300.0, df: float = 50.0, seg: float = 0.1) -> np.ndarray:
    t = np.arange(round(duration * sr)) / sr
    freq = f0 + df * np.floor(t / seg + 1e-9)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return np.sin(phase).astype(np.float64)


def analyse_steps(y: np.ndarray, sr: int = SR, f0: float = 300.0, df: float = 50.0, seg: float = 0.1) -> dict:
    """Locate the first and last frequency step of a stepped tone; return where the array starts/ends in the
    source signal's time (seconds), from the segment indices seen at its two ends."""
    y = np.asarray(y, dtype=np.float64)
    win, hop, nfft = int(0.02 * sr), max(1, sr // 2000), 1 << 14
    if len(y) < 4 * win:
        return {"error": "too short"}
    window = np.hanning(win)
    starts = np.arange(0, len(y) - win + 1, hop)
    frames = np.stack([y[s : s + win] * window for s in starts])
    spec = np.abs(np.fft.rfft(frames, nfft, axis=1))
    freqs = np.argmax(spec, axis=1) * sr / nfft
    energy = np.sqrt(np.mean(frames**2, axis=1))
    k = np.round((freqs - f0) / df).astype(int)
    centres = (starts + win / 2) / sr
    loud = energy > 0.05 * energy.max()
    idx = np.nonzero(loud)[0]
    if len(idx) < 3:
        return {"error": "silent"}
    first, last = idx[0], idx[-1]
    out = {
        "leading_silence_s": round(float(centres[first] - win / 2 / sr), 4) if first > 0 else 0.0,
        "first_segment": int(k[first]),
        "last_segment": int(k[last]),
    }
    change = np.nonzero(k[first:] != k[first])[0]
    if len(change):
        j = first + change[0]
        t_step = float((centres[j - 1] + centres[j]) / 2)  # boundary between last old and first new frame
        out["first_step_at_s"] = round(t_step, 4)
        out["start_s"] = round((k[first] + 1) * seg - t_step, 4)
    change = np.nonzero(k[: last + 1][::-1] != k[last])[0]
    if len(change):
        j = last - change[0]
        t_step = float((centres[j] + centres[j + 1]) / 2)
        out["last_step_at_s"] = round(t_step, 4)
        out["end_s"] = round(k[last] * seg + (len(y) / sr - t_step), 4)
    return out


# ----------------------------------------------------------------------------------------------------------
# test media


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _write_wav(path: Path, y: np.ndarray, sr: int, subtype: str = "PCM_16") -> None:
    """A WAV of ``y`` (channels first), 16-bit PCM or 32-bit float, written with PyAV (both environments have it)."""
    import av

    data = np.atleast_2d(np.asarray(y, dtype=np.float64))
    layout = {1: "mono", 2: "stereo"}[data.shape[0]]
    if subtype == "FLOAT":
        codec, fmt, samples = "pcm_f32le", "flt", data.astype(np.float32)
    else:
        codec, fmt, samples = "pcm_s16le", "s16", np.round(np.clip(data, -1, 32767 / 32768) * 32768).astype(np.int16)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream(codec, rate=sr)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T).reshape(1, -1), format=fmt, layout=layout)
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _write_video(path: Path, seconds: float, fps: int = 25, size=(160, 120)) -> None:
    """H.264 (lossless) video whose frame i is a flat gray of 20 + i."""
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = size[0], size[1], "yuv420p"
        st.options = {"qp": "0", "preset": "ultrafast"}
        for i in range(int(seconds * fps)):
            img = np.full((size[1], size[0], 3), 20 + i, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode():
            out.mux(p)


def make_media(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    sr = 44100
    t = np.arange(2 * sr) / sr
    tone = np.sin(2 * np.pi * 440 * t)
    _write_wav(d / "tone440_stereo_44k.wav", np.stack([0.5 * tone, -0.1 * tone]), sr)
    st = steps_signal(3.0, sr)
    _write_wav(d / "steps_stereo_44k.wav", np.stack([0.5 * st, 0.25 * st]), sr)
    _ffmpeg("-i", str(d / "steps_stereo_44k.wav"), "-c:a", "libmp3lame", "-b:a", "128k", str(d / "steps.mp3"))
    _ffmpeg("-i", str(d / "steps_stereo_44k.wav"), "-c:a", "aac", "-b:a", "128k", str(d / "steps.m4a"))
    _ffmpeg("-i", str(d / "steps_stereo_44k.wav"), "-c:a", "libopus", "-b:a", "96k", str(d / "steps.opus"))
    _ffmpeg("-i", str(d / "steps_stereo_44k.wav"), "-c:a", "flac", str(d / "steps.flac"))
    _write_wav(d / "steps_mono_16k.wav", steps_signal(3.0, 16000) * 0.5, 16000)
    _write_wav(d / "steps_f32_48k.wav", steps_signal(3.0, 48000) * 1.2, 48000, subtype="FLOAT")
    np.save(d / "steps_16k_f32.npy", (steps_signal(3.0, 16000) * 0.5).astype(np.float32))
    np.save(d / "steps_16k_i16.npy", (steps_signal(3.0, 16000) * 16000).astype(np.int16))
    np.save(d / "stereo_16k.npy", np.zeros((2, 16000), np.float32))
    # videos: 6 s at 25 fps; audio = stepped tone (44.1 kHz stereo AAC)
    _write_video(d / "video_noaudio.mp4", 6.0)
    _write_wav(d / "steps6_44k.wav", np.stack([0.5 * steps_signal(6.0, sr)] * 2), sr)
    _write_wav(d / "steps5_44k.wav", np.stack([0.5 * steps_signal(5.0, sr)] * 2), sr)
    video = str(d / "video_noaudio.mp4")

    def mux(name: str, *audio: str, offset: str = "", codec: tuple = ("aac", "-b:a", "128k"), extra: tuple = ()):
        """The silent video with ``audio`` tracks (each file's first stream), the video stream copied."""
        inputs = ["-i", video]
        for n, track in enumerate(audio):
            inputs += (["-itsoffset", offset] if offset and n == 0 else []) + ["-i", str(d / track)]
        maps = ["-map", "0:v"] + [arg for n in range(len(audio)) for arg in ("-map", f"{n + 1}:a")]
        _ffmpeg(*inputs, *maps, "-c:v", "copy", "-c:a", *codec, *extra, str(d / name))

    mux("video_av.mp4", "steps6_44k.wav")
    # audio track starts 1.0 s after the video (empty edit in the mp4 edit list)
    mux("video_av_off1.mp4", "steps5_44k.wav", offset="1.0")
    mux("video_av_off1.mkv", "steps5_44k.wav", offset="1.0", codec=("libopus",))
    for name, extra in [
        ("video_mono.mp4", ("-ac", "1")),
        ("video_51.mp4", ("-af", "pan=5.1|FL=c0|FR=c1|FC=c0|LFE=c1|BL=c0|BR=c1")),
        ("video_quad.mp4", ("-af", "pan=quad|FL=c0|FR=c1|BL=c0|BR=c1")),
        ("video_loud.mp4", ("-af", "volume=4")),
    ]:
        mux(name, "steps6_44k.wav", codec=("aac",), extra=extra)
    mux("video_2tracks.mp4", "steps6_44k.wav", "steps5_44k.wav", codec=("aac",))
    Image = __import__("PIL.Image", fromlist=["Image"])
    Image.new("RGB", (100, 80), (200, 30, 30)).save(d / "red.png")

    S = {"f0": 300, "df": 50, "seg": 0.1}

    def A(src, **kw):
        return {"type": "audio", "audio": src, **kw}

    def V(src, **kw):
        return {"type": "video", "video": src, **kw}

    def conv(*content):
        return [{"role": "user", "content": [*content, {"type": "text", "text": "hi"}]}]

    vk = {"return_video_kwargs": True}
    cases = [
        {"id": "wav440_stereo_44k", "conversation": conv(A("tone440_stereo_44k.wav"))},
        {"id": "wav440_file_uri", "conversation": conv(A("file://" + str(d / "tone440_stereo_44k.wav")))},
        {"id": "wav440_audio_url_key", "conversation": conv({"type": "audio", "audio_url": "tone440_stereo_44k.wav"})},
        {"id": "steps_wav_44k", "conversation": conv(A("steps_stereo_44k.wav")), "step_signal": S},
        {"id": "steps_flac", "conversation": conv(A("steps.flac")), "step_signal": S},
        {"id": "steps_mp3", "conversation": conv(A("steps.mp3")), "step_signal": S},
        {"id": "steps_m4a", "conversation": conv(A("steps.m4a")), "step_signal": S},
        {"id": "steps_opus", "conversation": conv(A("steps.opus")), "step_signal": S},
        {"id": "steps_mono_16k", "conversation": conv(A("steps_mono_16k.wav")), "step_signal": S},
        {"id": "steps_f32_48k_peak1.2", "conversation": conv(A("steps_f32_48k.wav")), "step_signal": S},
        {
            "id": "window_wav",
            "conversation": conv(A("steps_stereo_44k.wav", audio_start=0.55, audio_end=1.25)),
            "step_signal": S,
        },
        {"id": "window_m4a", "conversation": conv(A("steps.m4a", audio_start=0.55, audio_end=1.25)), "step_signal": S},
        {"id": "window_mp3", "conversation": conv(A("steps.mp3", audio_start=0.55, audio_end=1.25)), "step_signal": S},
        {"id": "window_end_only", "conversation": conv(A("steps_stereo_44k.wav", audio_end=1.0)), "step_signal": S},
        {
            "id": "window_end_before_start",
            "conversation": conv(A("steps_stereo_44k.wav", audio_start=1.0, audio_end=0.5)),
            "step_signal": S,
        },
        {"id": "window_start_past_end", "conversation": conv(A("steps_stereo_44k.wav", audio_start=5.0))},
        {"id": "window_start_past_end_m4a", "conversation": conv(A("steps.m4a", audio_start=5.0))},
        {
            "id": "npy_f32",
            "conversation": conv(A({"__npy__": "steps_16k_f32.npy"}, audio_start=0.55, audio_end=1.25)),
            "step_signal": S,
        },
        {"id": "npy_i16", "conversation": conv(A({"__npy__": "steps_16k_i16.npy"}))},
        {"id": "npy_stereo", "conversation": conv(A({"__npy__": "stereo_16k.npy"}))},
        {
            "id": "b64_wav",
            "conversation": conv(A({"__data_uri__": "steps_stereo_44k.wav", "mime": "audio/wav"})),
            "step_signal": S,
        },
        {
            "id": "b64_mp3",
            "conversation": conv(A({"__data_uri__": "steps.mp3", "mime": "audio/mpeg"})),
            "step_signal": S,
        },
        {"id": "b64_m4a", "conversation": conv(A({"__data_uri__": "steps.m4a", "mime": "audio/mp4"}))},
        {"id": "missing_file", "conversation": conv(A("does_not_exist.wav"))},
        {"id": "no_type_key", "conversation": conv({"audio": "tone440_stereo_44k.wav"})},
        {"id": "audio_without_source", "conversation": conv({"type": "audio"})},
        {
            "id": "type_audio_url_ignored",
            "conversation": conv({"type": "audio_url", "audio_url": "tone440_stereo_44k.wav"}),
        },
        {"id": "string_content_only", "conversation": [{"role": "user", "content": "hello"}]},
        {
            "id": "image_and_audio",
            "conversation": conv({"type": "image", "image": "red.png"}, A("steps.flac")),
            "kwargs": vk,
        },
        {
            "id": "video_av",
            "conversation": conv(V("video_av.mp4")),
            "use_audio_in_video": True,
            "kwargs": vk,
            "step_signal": S,
        },
        {
            "id": "video_av_no_audio_flag",
            "conversation": conv(V("video_av.mp4")),
            "use_audio_in_video": False,
            "kwargs": vk,
        },
        {
            "id": "video_av_meta",
            "conversation": conv(V("video_av.mp4")),
            "use_audio_in_video": True,
            "kwargs": {"return_video_kwargs": True, "return_video_metadata": True},
            "step_signal": S,
        },
        {
            "id": "video_av_off1",
            "conversation": conv(V("video_av_off1.mp4")),
            "use_audio_in_video": True,
            "kwargs": {"return_video_kwargs": True, "return_video_metadata": True},
            "step_signal": S,
        },
        {
            "id": "video_av_off1_mkv_opus",
            "conversation": conv(V("video_av_off1.mkv")),
            "use_audio_in_video": True,
            "kwargs": {"return_video_kwargs": True, "return_video_metadata": True},
            "step_signal": S,
        },
        {
            "id": "video_av_start2.02",
            "conversation": conv(V("video_av.mp4", video_start=2.02, video_end=4.0)),
            "use_audio_in_video": True,
            "kwargs": {"return_video_kwargs": True, "return_video_metadata": True},
            "step_signal": S,
        },
        {
            "id": "video_av_off1_start2.02",
            "conversation": conv(V("video_av_off1.mp4", video_start=2.02, video_end=4.0)),
            "use_audio_in_video": True,
            "kwargs": {"return_video_kwargs": True, "return_video_metadata": True},
            "step_signal": S,
        },
        {
            "id": "video_file_uri",
            "conversation": conv(V("file://" + str(d / "video_av.mp4"))),
            "use_audio_in_video": True,
            "step_signal": S,
        },
        {
            "id": "video_noaudio",
            "conversation": conv(V("video_noaudio.mp4")),
            "use_audio_in_video": True,
            "kwargs": vk,
        },
        {
            "id": "video_noaudio_flag_off",
            "conversation": conv(V("video_noaudio.mp4")),
            "use_audio_in_video": False,
            "kwargs": vk,
        },
        {
            "id": "video_url_key",
            "conversation": conv({"type": "video", "video_url": "video_av.mp4"}),
            "use_audio_in_video": True,
        },
        {
            "id": "video_url_key_audio_only",
            "conversation": conv({"type": "video", "video_url": "video_av.mp4"}),
            "use_audio_in_video": True,
            "call": "process_audio_info",
            "step_signal": S,
        },
        {"id": "video_frame_list", "conversation": conv(V(["red.png", "red.png"])), "use_audio_in_video": True},
        {
            "id": "batch_order",
            "conversation": [
                conv(V("video_av.mp4"), A("tone440_stereo_44k.wav")),
                conv(A("steps.flac"), {"type": "image", "image": "red.png"}, A("steps_mono_16k.wav")),
            ],
            "use_audio_in_video": True,
            "kwargs": vk,
        },
        {"id": "empty_conversation", "conversation": []},
        {"id": "missing_video", "conversation": conv(V("nope.mp4")), "use_audio_in_video": True},
        {
            "id": "video_mono",
            "conversation": conv(V("video_mono.mp4")),
            "use_audio_in_video": True,
            "call": "process_audio_info",
            "step_signal": S,
        },
        {
            "id": "video_51",
            "conversation": conv(V("video_51.mp4")),
            "use_audio_in_video": True,
            "call": "process_audio_info",
            "step_signal": S,
        },
        {
            "id": "video_quad",
            "conversation": conv(V("video_quad.mp4")),
            "use_audio_in_video": True,
            "call": "process_audio_info",
        },
        {
            "id": "video_2tracks",
            "conversation": conv(V("video_2tracks.mp4")),
            "use_audio_in_video": True,
            "call": "process_audio_info",
            "step_signal": S,
        },
        {
            "id": "video_loud",
            "conversation": conv(V("video_loud.mp4")),
            "use_audio_in_video": True,
            "call": "process_audio_info",
        },
        {
            "id": "video_start_only",
            "conversation": conv(V("video_av.mp4", video_start=1.5)),
            "use_audio_in_video": True,
            "kwargs": {"return_video_kwargs": True, "return_video_metadata": True},
            "step_signal": S,
        },
        {
            "id": "video_end_only",
            "conversation": conv(V("video_av.mp4", video_end=2.5)),
            "use_audio_in_video": True,
            "kwargs": {"return_video_kwargs": True, "return_video_metadata": True},
            "step_signal": S,
        },
        {"id": "data_uri_no_base64", "conversation": conv(A("data:audio/wav,abc"))},
        {
            "id": "data_uri_non_audio_mime",
            "conversation": conv(A({"__data_uri__": "steps.m4a", "mime": "application/octet-stream"})),
        },
        {"id": "b64_flac", "conversation": conv(A({"__data_uri__": "steps.flac", "mime": "audio/flac"}))},
        {"id": "b64_opus", "conversation": conv(A({"__data_uri__": "steps.opus", "mime": "audio/ogg"}))},
        {"id": "npy_audio_start_none", "conversation": conv(A({"__npy__": "steps_16k_f32.npy"}, audio_start=None))},
        {"id": "npy_negative_start", "conversation": conv(A({"__npy__": "steps_16k_f32.npy"}, audio_start=-1.0))},
        {"id": "path_audio_start_none", "conversation": conv(A("steps.flac", audio_start=None))},
        {"id": "wav_negative_start", "conversation": conv(A("steps_stereo_44k.wav", audio_start=-1.0))},
        {"id": "m4a_end_before_start", "conversation": conv(A("steps.m4a", audio_start=1.0, audio_end=0.5))},
        {
            "id": "both_audio_and_audio_url",
            "conversation": conv(
                {"type": "audio", "audio": "steps_mono_16k.wav", "audio_url": "tone440_stereo_44k.wav"}
            ),
        },
        {"id": "int_source", "conversation": conv(A(5))},
        {"id": "message_without_content", "conversation": [{"role": "user"}]},
        {"id": "text_elem_no_type", "conversation": [{"role": "user", "content": [{"text": "hi"}]}]},
        {"id": "vision_call_audio_only", "conversation": conv(A("steps.flac")), "call": "process_vision_info"},
        {
            "id": "patch16",
            "conversation": conv({"type": "image", "image": "red.png"}, V("video_av.mp4")),
            "use_audio_in_video": True,
            "kwargs": {"return_video_kwargs": True, "image_patch_size": 16},
        },
    ]
    for c in cases:
        c.setdefault("use_audio_in_video", False)
        c.setdefault("kwargs", {})
    (d / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"wrote media and {len(cases)} cases to {d}")


# ----------------------------------------------------------------------------------------------------------
# running


def _resolve(obj, base: Path):
    if isinstance(obj, dict):
        if "__npy__" in obj:
            return np.load(base / obj["__npy__"])
        if "__data_uri__" in obj:
            data = base64.b64encode((base / obj["__data_uri__"]).read_bytes()).decode()
            return f"data:{obj.get('mime', 'audio/wav')};base64,{data}"
        return {k: _resolve(v, base) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, base) for v in obj]
    return obj


def _stats(a: np.ndarray) -> dict:
    a = np.asarray(a)
    f = a.astype(np.float64)
    return {
        "len": int(a.shape[-1]) if a.ndim else 0,
        "shape": list(a.shape),
        "dtype": str(a.dtype),
        "seconds": round(a.shape[-1] / SR, 6) if a.ndim else 0.0,
        "min": float(f.min()) if f.size else None,
        "max": float(f.max()) if f.size else None,
        "rms": float(np.sqrt(np.mean(f**2))) if f.size else None,
    }


def _jsonable(x):
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.tolist()
    except ImportError:
        pass
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in (
        "qwen-omni-utils",
        "librosa",
        "audioread",
        "soundfile",
        "soxr",
        "av",
        "numpy",
        "torch",
        "torchvision",
        "torchcodec",
        "decord",
        "pillow",
        "scipy",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import soundfile

        out["libsndfile"] = soundfile.__libsndfile_version__
    except Exception:
        pass
    try:
        out["ffmpeg_cli"] = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[
            0
        ]
    except OSError:
        out["ffmpeg_cli"] = None
    return out


def run_case(case: dict, base: Path, qou, arrays: dict, save_vision: bool) -> dict:
    cid = case["id"]
    res: dict = {
        "id": cid,
        "call": case.get("call", "process_mm_info"),
        "use_audio_in_video": case.get("use_audio_in_video", False),
        "kwargs": case.get("kwargs", {}),
    }
    conv = _resolve(case["conversation"], base)
    cwd = os.getcwd()
    os.chdir(base)  # relative media paths are relative to CASES.json
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if res["call"] == "process_mm_info":
                ret = qou.process_mm_info(conv, case.get("use_audio_in_video", False), **case.get("kwargs", {}))
                audios, vision = ret[0], ret[1:]
            elif res["call"] == "process_audio_info":
                ret = (qou.process_audio_info(conv, case.get("use_audio_in_video", False)),)
                audios, vision = ret[0], ()
            elif res["call"] == "process_vision_info":
                ret = qou.process_vision_info(conv, **case.get("kwargs", {}))
                audios, vision = None, ret
            else:
                raise SystemExit(f"unknown call {res['call']!r}")
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)
            where = [f"{Path(f.filename).name}:{f.lineno}" for f in tb if "run_qwen_omni_utils" not in f.filename]
            res["error"] = {
                "type": type(e).__name__,
                "module": type(e).__module__,
                "message": str(e)[:500],
                "where": where[-4:],
            }
            ret = None
        finally:
            os.chdir(cwd)
    res["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
    if ret is None:
        return res
    res["n_returned"] = len(ret)
    res["n_audios"] = None if audios is None else len(audios)
    res["audios"] = []
    for i, a in enumerate(audios or []):
        st = _stats(a)
        st["type"] = type(a).__name__
        if case.get("step_signal") and np.asarray(a).ndim == 1:
            st["steps"] = analyse_steps(
                np.asarray(a, dtype=np.float64) / (32768.0 if np.asarray(a).dtype.kind == "i" else 1.0),
                SR,
                **case["step_signal"],
            )
        res["audios"].append(st)
        arrays[f"{cid}/audio{i}"] = np.asarray(a, dtype=np.float32)
    if vision:
        images, videos = vision[0], vision[1]
        res["images"] = None if images is None else [{"size": list(im.size), "mode": im.mode} for im in images]
        res["videos"] = None
        if videos is not None:
            res["videos"] = []
            for i, v in enumerate(videos):
                meta = None
                if isinstance(v, tuple):
                    v, meta = v
                res["videos"].append(
                    {
                        "shape": list(v.shape),
                        "dtype": str(v.dtype),
                        "frame_means": [round(float(x), 2) for x in v.float().mean(dim=(1, 2, 3))],
                        "metadata": _jsonable(meta),
                    }
                )
                if save_vision:
                    arrays[f"{cid}/video{i}"] = v.float().numpy()
        if save_vision and images:
            for i, im in enumerate(images):
                arrays[f"{cid}/image{i}"] = np.asarray(im)
        if len(vision) > 2:
            res["video_kwargs"] = _jsonable(vision[2])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=Path)
    ap.add_argument("--out", type=Path, help="OUT.npz; the JSON sidecar is OUT.json")
    ap.add_argument("--save-vision", action="store_true", help="also save images (uint8) and videos (float32)")
    ap.add_argument(
        "--video-reader",
        choices=["torchcodec", "decord", "torchvision"],
        help="sets FORCE_QWENVL_VIDEO_READER before importing qwen_omni_utils",
    )
    ap.add_argument("--only", nargs="*", help="run only these case ids")
    ap.add_argument("--make-media", type=Path, metavar="DIR", help="write test media and DIR/cases.json, then exit")
    args = ap.parse_args()
    if args.make_media:
        make_media(args.make_media.resolve())
        return
    if not args.cases or not args.out:
        ap.error("--cases and --out are required")
    if args.video_reader:
        os.environ["FORCE_QWENVL_VIDEO_READER"] = args.video_reader
    os.environ.setdefault("TORCHCODEC_NUM_THREADS", "1")  # decode threads only; keeps CPU use modest
    import torch

    torch.set_num_threads(1)
    import qwen_omni_utils as qou
    from qwen_omni_utils.v2_5 import vision_process

    cases = json.loads(args.cases.read_text())
    if args.only:
        cases = [c for c in cases if c["id"] in set(args.only)]
    base = args.cases.resolve().parent
    arrays: dict = {}
    results = []
    for case in cases:
        r = run_case(case, base, qou, arrays, args.save_vision)
        results.append(r)
        brief = r.get("error") or {"n_audios": r.get("n_audios"), "lens": [a["len"] for a in r.get("audios") or []]}
        print(f"{case['id']}: {json.dumps(brief)[:300]}", file=sys.stderr)
    header = {
        "versions": _versions(),
        "video_reader": vision_process.get_video_reader_backend(),
        "FORCE_QWENVL_VIDEO_READER": os.environ.get("FORCE_QWENVL_VIDEO_READER"),
        "sample_rate": SR,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "cases": results}, indent=1))
    print(f"wrote {args.out} ({len(arrays)} arrays) and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
