"""Audio for Qwen-Omni (issue 26): ``fetch_audio``, ``process_audio_info``, ``process_mm_info`` and the audio token
counts, on media generated here whose signal encodes time (a tone whose frequency steps every 100 ms), so that
misalignment is measurable; token counts against transformers' own Whisper feature extractor and Omni formulas."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from qwen_vl_utils import _errors as errors

SR = 16000


def stepped(seconds: float, rate: int = SR, shift: float = 0.0) -> np.ndarray:
    """A tone whose frequency steps by 100 Hz every 100 ms (wrapping after 2 s), a function of the time ``shift +
    i / rate`` with its phase integrated exactly (the same signal at any rate): two windows of it line up only at
    the right offset."""
    t = shift + np.arange(round(seconds * rate)) / rate
    step = np.floor(t * 10).astype(np.int64)
    freqs = 300 + (100 * np.arange(step.max() + 2)) % 2000
    start_phase = np.concatenate([[0.0], np.cumsum(freqs * 0.1)])  # the phase at the start of each step
    phase = start_phase[step] + freqs[step] * (t - step / 10)
    return (0.4 * np.sin(2 * np.pi * phase)).astype(np.float32)


def write_audio(path: Path, codec: str, rate: int, channels: int, seconds: float = 3.0) -> Path:
    """``seconds`` of the stepped tone (channel 2: the same at half the amplitude): a WAV written with PyAV,
    encoded by the ffmpeg command line into ``codec`` where it is not PCM."""
    mono = stepped(seconds, rate)
    data = np.stack([mono, mono * 0.5][:channels])
    layout = "mono" if channels == 1 else "stereo"
    wav = path.with_suffix(".src.wav") if codec != "pcm_s16le" else path
    with av.open(str(wav), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate)
        stream.layout = layout
        pcm = (np.clip(data, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    if codec != "pcm_s16le":
        cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-c:a", codec, "-ar", str(rate), str(path)]
        subprocess.run(cmd, check=True)
    return path


def write_video(
    path: Path, seconds: float = 6.0, fps: int = 25, audio_at: float = 0.0, audio_to=None, spans=None
) -> Path:
    """A video of ``seconds`` at ``fps`` whose audio track (AAC, mono 16 kHz, the stepped tone of the container
    time) runs from ``audio_at`` to ``audio_to`` seconds on the container's timeline (or over each of ``spans``,
    ``(from, to)``, with no packets between: sparse sound)."""
    spans = spans or [(audio_at, seconds if audio_to is None else audio_to)]
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 160, 96, "yuv420p"
        aus = out.add_stream("aac", rate=SR)
        aus.layout = "mono"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((96, 160, 3), i % 250, np.uint8), format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        tone = stepped(max(to for _, to in spans), SR)
        for at, to in spans:
            for start in range(int(at * SR), int(to * SR), 1024):
                piece = tone[None, start : min(start + 1024, int(to * SR))]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="flt", layout="mono")
                frame.sample_rate = SR
                frame.pts = start
                frame.time_base = Fraction(1, SR)
                for packet in aus.encode(frame):
                    out.mux(packet)
        for packet in aus.encode():
            out.mux(packet)
    return path


def lag(ours: np.ndarray, ref: np.ndarray, most: int = 400) -> int:
    """The shift (samples) that best lines ``ours`` up with ``ref`` (positive: ours is late)."""
    n = min(len(ours), len(ref)) - 2 * most
    scores = [float(np.dot(ours[most + k : most + k + n], ref[most : most + n])) for k in range(-most, most + 1)]
    return int(np.argmax(scores)) - most


def snr_db(ours: np.ndarray, ref: np.ndarray) -> float:
    n = min(len(ours), len(ref))
    noise = ours[:n] - ref[:n]
    return 10 * np.log10(float(np.sum(ref[:n] ** 2)) / max(float(np.sum(noise**2)), 1e-20))


def _message(*content):
    return [{"role": "user", "content": list(content)}]


CODECS = [  # (file, codec): the container follows the name
    ("a.wav", "pcm_s16le"),
    ("a.flac", "flac"),
    ("a.mp3", "libmp3lame"),
    ("a.ogg", "libvorbis"),
    ("a.opus", "libopus"),
    ("a.m4a", "aac"),
    ("a.mka", "flac"),
    ("a.webm", "libopus"),
]
# (AAC in Matroska is left out: FFmpeg marks no encoder delay there, so its 1024 priming samples sit at time 0 on
# the container's timeline for every decoder, the ffmpeg command line's included)


@pytest.mark.parametrize("name, codec", CODECS)
@pytest.mark.parametrize("rate, channels", [(8000, 1), (16000, 2), (44100, 2), (48000, 1)])
def test_every_codec_and_rate_gives_16khz_mono_on_time(tmp_path, name, codec, rate, channels):
    if codec == "libopus" and rate == 44100:
        pytest.skip("Opus encodes at 8, 12, 16, 24 or 48 kHz")
    path = write_audio(tmp_path / name, codec, rate, channels)
    audio = q.fetch_audio({"type": "audio", "audio": str(path)})
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.min() >= -1.0 and audio.max() <= 1.0
    ref = stepped(3.0, SR) * (0.75 if channels == 2 else 1.0)  # the mean of the two channels
    # at most one codec frame of the encoder's end padding (AAC: 1024 samples at the source rate)
    assert -16 <= len(audio) - len(ref) <= 1024 * SR / rate + 1  # (WebM rounds its end trim to 1 ms)
    assert abs(lag(audio, ref)) <= 16  # within 1 ms
    if rate >= 16000 and codec in ("pcm_s16le", "flac"):
        assert snr_db(audio, ref) > 40  # lossless: what two good resamplers differ by


def test_a_window_starts_at_audio_start_on_the_tracks_timeline(tmp_path):
    path = write_audio(tmp_path / "a.wav", "pcm_s16le", 44100, 1, seconds=5.0)
    part = q.fetch_audio({"audio": str(path), "audio_start": 2.55, "audio_end": 3.25})
    assert len(part) == round(0.7 * SR)
    ref = stepped(5.0, SR)[round(2.55 * SR) : round(3.25 * SR)]  # (2.55 s is a whole sample at 44.1 and 16 kHz)
    assert lag(part, ref, most=100) == 0 and snr_db(part, ref) > 50


def test_sources_of_every_kind_give_the_same_samples(tmp_path):
    path = write_audio(tmp_path / "a.m4a", "aac", 44100, 2)
    data = path.read_bytes()
    want = q.fetch_audio({"audio": str(path)})
    b64 = "data:audio/mp4;base64," + base64.b64encode(data).decode()
    for value in (path.as_uri(), data, io.BytesIO(data), b64, {"url": str(path)}):
        key = "audio_url" if isinstance(value, dict) else "audio"
        got = q.fetch_audio({"type": "audio", key: value})
        assert np.array_equal(got, want), type(value)


def test_arrays_are_taken_as_16khz_samples(tmp_path):
    tone = stepped(2.0)
    assert np.array_equal(q.fetch_audio({"audio": tone, "audio_start": 0.5, "audio_end": 1.0}), tone[8000:16000])
    ints = (tone * 32767).astype(np.int16)
    assert np.allclose(q.fetch_audio({"audio": ints}), tone, atol=1e-4)  # scaled to [-1, 1]
    with pytest.raises(errors.InvalidOptionError, match="1-D mono"):
        q.fetch_audio({"audio": np.stack([tone, tone])})


@pytest.mark.parametrize(
    "ele, error, needle",
    [
        ({"type": "audio"}, errors.InvalidOptionError, "needs an 'audio' or 'audio_url'"),
        ({"audio": "missing.wav"}, errors.SourceNotFoundError, "missing.wav"),
        ({"audio": "x.wav", "audio_start": 2, "audio_end": 1}, errors.InvalidOptionError, "before audio_end"),
        ({"audio": "x.wav", "audio_start": float("nan")}, errors.InvalidOptionError, "audio_start"),
        ({"audio": 3}, errors.InvalidOptionError, "cannot use"),
    ],
)
def test_bad_audio_elements_are_typed_errors(tmp_path, monkeypatch, ele, error, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.wav").write_bytes(b"")
    with pytest.raises(error, match=needle):
        q.fetch_audio(ele)


def test_a_file_without_sound_is_a_typed_error(tmp_path):
    from media import make_video

    video = make_video(tmp_path / "silent.mp4", frames=10)
    with pytest.raises(errors.DecodeError, match="no audio stream"):
        q.fetch_audio({"audio": str(video)})
    with pytest.raises(errors.DecodeError, match="use_audio_in_video"):
        q.process_mm_info(_message({"type": "video", "video": str(video)}), use_audio_in_video=True)
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really")
    with pytest.raises(errors.DecodeError):
        q.fetch_audio({"audio": str(tmp_path / "junk.wav")})


def test_the_sound_of_a_video_lines_up_with_its_frames(tmp_path):
    """The track starts 1 s after the video and ends 1 s before it: silence fills both, and every sample sits at
    its container time (qwen-omni-utils returns this track shifted 1 s early against the frames)."""
    path = write_video(tmp_path / "late.mp4", seconds=6.0, audio_at=1.0, audio_to=5.0)
    audios, images, videos = q.process_mm_info(_message({"type": "video", "video": str(path)}), True)
    assert images is None and len(videos) == 1 and len(audios) == 1
    sound = audios[0]
    assert len(sound) == 6 * SR  # the frames' whole span
    assert np.abs(sound[: int(0.9 * SR)]).max() < 1e-3 and np.abs(sound[int(5.1 * SR) :]).max() < 1e-3
    ref = stepped(6.0)
    ref[: SR * 1] = 0
    ref[SR * 5 :] = 0
    assert abs(lag(sound, ref)) <= 16


def test_a_video_window_gets_the_sound_of_its_frames_exactly(tmp_path):
    path = write_video(tmp_path / "v.mp4", seconds=6.0, fps=25)
    ele = {"type": "video", "video": str(path), "video_start": 2.02, "video_end": 4.0}
    audios, _, videos, kwargs = q.process_mm_info(_message(ele), True, return_video_kwargs=True)
    frames = q.fetch_video(ele, return_video_metadata=True)[1]["frames_indices"]
    first, last = frames[0] / 25, (frames[-1] + 1) / 25  # the frames' window: 2.04 s to the end of frame 100
    sound = audios[0]
    assert len(sound) == round((last - first) * SR)
    ref = stepped(6.0)[round(first * SR) : round(last * SR)]
    assert abs(lag(sound, ref, most=200)) <= 16
    assert kwargs["fps"] and len(videos) == 1
    assert np.array_equal(q.process_audio_info(_message(ele), True)[0], sound)  # without decoding the frames


def test_audios_come_in_document_order_across_a_batch(tmp_path):
    a = write_audio(tmp_path / "a.wav", "pcm_s16le", 16000, 1, seconds=1.0)
    b = write_audio(tmp_path / "b.wav", "pcm_s16le", 16000, 1, seconds=2.0)
    v = write_video(tmp_path / "v.mp4", seconds=3.0)
    batch = [
        _message({"type": "audio", "audio": str(b)}, {"type": "text", "text": "x"}),
        _message({"type": "video", "video": str(v)}, {"type": "audio", "audio": str(a)}),
    ]
    assert [len(x) for x in q.process_audio_info(batch, use_audio_in_video=True)] == [2 * SR, 3 * SR, SR]
    assert [len(x) for x in q.process_audio_info(batch, use_audio_in_video=False)] == [2 * SR, SR]
    assert q.process_audio_info(_message({"type": "text", "text": "hi"}), False) is None
    audios, images, videos = q.process_mm_info(_message({"type": "text", "text": "hi"}), False)
    assert audios is images is videos is None
    with pytest.raises(TypeError):
        q.process_mm_info(batch)  # use_audio_in_video stays required, as in qwen-omni-utils
    with pytest.raises(errors.InvalidOptionError, match="use_audio_in_video"):
        q.process_mm_info(batch, use_audio_in_video="yes")


def test_audio_token_counts_are_the_omni_processors():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_5_omni import processing_qwen2_5_omni as p25
    from transformers.models.qwen3_omni_moe import processing_qwen3_omni_moe as p3

    # the checkpoints' feature extractor (preprocessor_config.json of Qwen2.5-Omni-7B): what counts is chunk_length
    fe = transformers.WhisperFeatureExtractor(
        feature_size=128, sampling_rate=SR, hop_length=160, chunk_length=300, n_fft=400, return_attention_mask=True
    )
    for n in (1601, 16000, 16159, 16160, 16161, 59200, 480000, 4_800_000, 4_800_001, 5_000_000):
        x = np.zeros(n, np.float32)
        # Qwen2.5-Omni's processor pads to 300 s and truncates there
        mask = fe(x, sampling_rate=SR, padding="max_length", return_attention_mask=True)["attention_mask"]
        frames25 = int(np.asarray(mask).sum())
        assert q.audio_token_count(n, "qwen2.5-omni") == int(
            p25._get_feat_extract_output_lengths(torch.tensor(frames25))
        )
        # Qwen3-Omni's (transformers 5): the longest in the batch, no truncation
        mask = fe(x, sampling_rate=SR, padding=True, truncation=False, return_attention_mask=True)["attention_mask"]
        frames3 = int(np.asarray(mask).sum())
        assert q.audio_token_count(n, "qwen3-omni") == int(p3._get_feat_extract_output_lengths(torch.tensor(frames3)))
    assert q.audio_token_count(59200) == 92 and q.audio_token_count(59200, "qwen3-omni") == 48


def test_importing_the_package_imports_no_decoder():
    code = "import qwen_vl_utils, sys; print([m for m in ('torch', 'av', 'librosa') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    assert not any(Path(p).name == "qwen_omni_utils" for p in map(Path, sys.path) if p.is_dir() and False)
    import importlib.util

    spec = importlib.util.find_spec("qwen_omni_utils")
    assert spec is None or "qwen_vl_utils" not in (spec.origin or "")  # never shadows the real package


def test_inspect_shows_the_audio_stream_and_its_tokens(tmp_path):
    import json as _json

    video = write_video(tmp_path / "v.mp4", seconds=4.0)
    res = subprocess.run([sys.executable, "-m", "qwen_vl_utils", "inspect", str(video), "--json"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = _json.loads(res.stdout)[0]
    assert out["audio"]["codec"] == "aac" and out["audio"]["sample_rate"] == SR
    frames = out["frames_indices"]
    window = (frames[-1] + 1 - frames[0]) / out["source_fps"]
    assert out["audio"]["tokens"]["qwen2.5-omni"] == q.audio_token_count(round(window * SR))
    sound = write_audio(tmp_path / "a.flac", "flac", 44100, 2)
    res = subprocess.run([sys.executable, "-m", "qwen_vl_utils", "inspect", str(sound), "--json"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    out = _json.loads(res.stdout)[0]
    assert out["kind"] == "audio" and out["channels"] == 2 and out["duration"] == pytest.approx(3.0, abs=0.01)
    assert out["audio_tokens"]["qwen3-omni"] == q.audio_token_count(3 * SR, "qwen3-omni")
    # an MP3 with cover art (an ID3 picture: a "video" stream of one attached picture) is still sound
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "cover.png")
    mp3 = tmp_path / "cover.mp3"
    cmd = ["ffmpeg", "-v", "error", "-i", str(sound), "-i", str(tmp_path / "cover.png"), "-map", "0:a", "-map", "1:v",
           "-c:v", "mjpeg", "-disposition:v", "attached_pic", str(mp3)]  # fmt: skip
    subprocess.run(cmd, check=True)
    res = subprocess.run([sys.executable, "-m", "qwen_vl_utils", "inspect", str(mp3), "--json"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    out = _json.loads(res.stdout)[0]
    assert out["kind"] == "audio" and out["audio_tokens"]["qwen2.5-omni"] > 70


def test_dataset_count_counts_audio_tokens_of_omni_samples(tmp_path):
    """``<audio>`` tags with ``audio`` paths (qwen-vl-finetune's format) and audio elements (chat format): the
    Omni processor's tokens from the header's duration, added to num_tokens, for the chosen model."""
    import json as _json

    from qwen_vl_utils import dataset as ds

    a = write_audio(tmp_path / "a.flac", "flac", 44100, 2, seconds=3.0)
    conv = [{"from": "human", "value": "<audio>\nWhat is said?"}, {"from": "gpt", "value": "Hello."}]
    chat = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": "a.flac", "audio_end": 1.5}, {"type": "text", "text": "?"}],
        },
        {"role": "assistant", "content": "Hi."},
    ]
    rows = [{"audio": "a.flac", "conversations": conv}, {"messages": chat}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    for model in ("qwen2.5-omni", "qwen3-omni"):
        out = tmp_path / f"{model}.jsonl"
        summary = ds.count(str(data), str(out), jobs=1, audio_model=model)
        assert summary.exit_code == 0
        got = [_json.loads(line) for line in out.read_text().splitlines()]
        assert got[0]["audio_tokens"] == q.audio_token_count(3 * SR, model) == got[0]["num_tokens"]
        assert got[1]["audio_tokens"] == q.audio_token_count(round(1.5 * SR), model)
        assert got[0]["media_info"][0]["kind"] == "audio" and got[0]["visual_tokens"] == 0
    assert a.exists()


def test_dataset_count_deep_counts_the_decoded_sound(tmp_path):
    """The header's duration is an estimate for an MP3 without a Xing/LAME header and says nothing of a file cut
    short: ``deep`` counts the samples ``fetch_audio`` gives, as the processor will see them."""
    import json as _json

    from qwen_vl_utils import dataset as ds

    wav = write_audio(tmp_path / "src.wav", "pcm_s16le", 44100, 2, seconds=6.0)
    vbr = tmp_path / "vbr.mp3"
    cmd = ["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "libmp3lame", "-q:a", "0", "-write_xing", "0", str(vbr)]
    subprocess.run(cmd, check=True)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(vbr.read_bytes()[: vbr.stat().st_size // 2])
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "audio", "audio": n}]},
                {"role": "assistant", "content": "."},
            ]
        }
        for n in ("vbr.mp3", "cut.mp3")
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "deep.jsonl"
    assert ds.count(str(data), str(out), jobs=1, audio_model="qwen3-omni", deep=True).exit_code == 0
    got = [_json.loads(line)["audio_tokens"] for line in out.read_text().splitlines()]
    want = [q.audio_token_count(len(q.fetch_audio({"audio": str(p)})), "qwen3-omni") for p in (vbr, cut)]
    assert got == want and want[1] < want[0] * 0.7


AUDIO_ONLY = [  # (file, ffmpeg arguments): formats that carry no video, each its own signature
    ("a.wav", ["-c:a", "pcm_s16le"]),
    ("a.mp3", ["-c:a", "libmp3lame"]),  # with an ID3v2 tag
    ("b.mp3", ["-c:a", "libmp3lame", "-id3v2_version", "0", "-write_xing", "0"]),  # MPEG frame sync first
    ("a.flac", ["-c:a", "flac"]),
    ("a.aac", ["-c:a", "aac"]),  # ADTS
    ("a.aiff", ["-c:a", "pcm_s16be"]),
    ("a.ac3", ["-c:a", "ac3"]),
    ("a.caf", ["-c:a", "pcm_s16le"]),
]


@pytest.mark.parametrize("ranges", [True, False], ids=["ranged", "body"])
def test_audio_only_formats_come_over_http(tmp_path, ranges):
    """An audio element's body may start like no image or video (WAV, MP3, FLAC, ADTS, AIFF, AC-3, CAF): it is
    read as the same file from disk is; a body that starts like no media at all is still refused at once."""
    from httpfiles import FileServer

    wav = write_audio(tmp_path / "src.wav", "pcm_s16le", 44100, 2, seconds=2.0)
    server = FileServer()
    try:
        for name, args in AUDIO_ONLY:
            path = tmp_path / name
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), *args, str(path)], check=True)
            url = server.add("/" + name, path.read_bytes(), ranges=ranges)
            want = q.fetch_audio({"audio": str(path), "audio_start": 0.5})
            assert len(want) > SR, name
            assert np.array_equal(q.fetch_audio({"audio": url, "audio_start": 0.5}), want), name
        page = server.add("/page", b"<html><body>Not found</body></html>" * 20, ranges=ranges)
        with pytest.raises(errors.DecodeError, match="does not start like any audio or video format"):
            q.fetch_audio({"audio": page})
    finally:
        server.close()


_PICTURES = ["-f", "lavfi", "-i", "color=c=gray:s=64x48:r=5", "-map", "0:a", "-map", "1:v", "-shortest"]
SOUGHT = [  # (file, ffmpeg arguments): codecs that need pre-roll, or whose container seeks or stamps badly
    ("vbr.mp3", ["-c:a", "libmp3lame", "-q:a", "2"]),  # the bit reservoir reaches frames back
    ("a.opus", ["-c:a", "libopus", "-ar", "48000"]),  # 80 ms of pre-roll
    ("a.m4a", ["-c:a", "aac"]),
    ("a.aac", ["-c:a", "aac"]),
    ("a.ogg", ["-c:a", "libvorbis"]),
    ("adpcm.wav", ["-c:a", "adpcm_ima_wav"]),  # the WAV demuxer lands seconds off, stamped with the time asked
    ("a.ac3", ["-c:a", "ac3"]),  # raw AC-3: times estimated from the bit rate, drifting
    ("a.flac", ["-c:a", "flac"]),
    ("a.mka", ["-c:a", "libopus"]),  # Matroska: times rounded to the millisecond
    ("a.webm", ["-c:a", "libvorbis"]),  # laced Vorbis: up to 3.5 ms off
    ("a.wma", ["-c:a", "wmav2"]),  # its first sample stamped 92 ms in
    # Matroska with video, sought to through its cues: millisecond times put back on the codec's frame grid
    ("v.mkv", [*_PICTURES, "-c:v", "libx264", "-c:a", "aac"]),  # 1024 samples at 44.1 kHz: 23.22 ms
    ("v.webm", [*_PICTURES, "-c:v", "libvpx", "-deadline", "realtime", "-c:a", "libopus"]),  # 13.5, 20, 20 ms...
    ("vorbis.webm", [*_PICTURES, "-c:v", "libvpx", "-deadline", "realtime", "-c:a", "libvorbis"]),  # no grid
]


#: a video's sound made again into Matroska as FFmpeg does by default (video stream-copied): stamps truncated
#: (AAC at 48 kHz: 0, 21, 42, 64 ms), or shifted from the samples counted by Opus's pre-skip (19, 39, 59 ms)
COPIED = [
    ("copy-aac.mkv", ["-c:v", "copy", "-c:a", "aac", "-ar", "48000"]),
    ("copy-opus.mkv", ["-c:v", "copy", "-c:a", "libopus"]),
    ("copy-opus60.mkv", ["-c:v", "copy", "-c:a", "libopus", "-frame_duration", "60"]),
]


@pytest.fixture(scope="module")
def long_sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sought")
    wav = write_audio(folder / "src.wav", "pcm_s16le", 44100, 2, seconds=30.0)
    for name, args in SOUGHT:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), *args, str(folder / name)], check=True)
    mp4 = write_video(folder / "src.mp4", seconds=30.0, fps=5)  # (AAC with its priming cut by an edit list)
    for name, args in COPIED:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(mp4), *args, str(folder / name)], check=True)
    return folder


@pytest.mark.parametrize("name", [name for name, _ in SOUGHT + COPIED])
def test_a_window_deep_in_a_file_is_the_same_part_of_the_whole(long_sources, name):
    """A window past the first second is read after a seek (where the container seeks exactly) with the decoder's
    pre-roll before it: its samples are those of the whole track's decode, from the first one on."""
    path = str(long_sources / name)
    whole = q.fetch_audio({"audio": path})
    for start in (1.25, 2.0, 17.3, 28.1):
        part = q.fetch_audio({"audio": path, "audio_start": start, "audio_end": start + 1.0})
        ref = whole[round(start * SR) : round(start * SR) + SR]
        assert len(part) == SR, (start, len(part))
        assert lag(part, ref, most=2000) == 0, start
        assert snr_db(part[:1600], ref[:1600]) > 30, start  # the first 100 ms too


def test_a_hole_in_a_videos_sound_stays_a_hole(tmp_path):
    """A recording that lost a second of sound (its audio stamped 0-2 s, then the sound of 2-5 s at 3-6 s): the
    hole is silence on the container's timeline, so the sound after it stays with its frames, for the whole
    video and for a window that starts after the hole alike; read as audio, windows are the whole track's slice,
    one that starts in the hole too."""
    path = tmp_path / "hole.mkv"
    sr = 48000
    tone = stepped(5.0, sr)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 160, 96, "yuv420p"
        aus = out.add_stream("pcm_s16le", rate=sr)
        aus.layout = "mono"
        packets = []
        for i in range(150):
            frame = av.VideoFrame.from_ndarray(np.full((96, 160, 3), i, np.uint8), format="rgb24")
            frame.pts = i
            packets += vs.encode(frame)
        packets += vs.encode()
        for start in range(0, len(tone), 960):  # 20 ms frames: Matroska's millisecond clock stamps them exactly
            pcm = (tone[None, start : start + 960] * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate, frame.time_base = sr, Fraction(1, sr)
            frame.pts = start + (sr if start >= 2 * sr else 0)
            packets += aus.encode(frame)
        packets += aus.encode()
        for packet in packets:
            out.mux(packet)
    whole = q.process_mm_info(_message({"type": "video", "video": str(path)}), use_audio_in_video=True)[0][0]
    assert len(whole) == 6 * SR
    ref = stepped(5.0)
    assert lag(whole[SR : 2 * SR], ref[SR : 2 * SR]) == 0
    assert np.abs(whole[2 * SR + 160 : 3 * SR - 160]).max() < 0.01  # the hole
    assert lag(whole[4 * SR : 5 * SR], ref[3 * SR : 4 * SR]) == 0  # 4 s of video: 3 s of sound
    ele = {"type": "video", "video": str(path), "video_start": 4.0, "video_end": 5.0}
    part = q.process_mm_info(_message(ele), use_audio_in_video=True)[0][0]
    assert np.array_equal(part, whole[4 * SR : 5 * SR]) or snr_db(part, whole[4 * SR : 5 * SR]) > 40
    # read as an audio file, a window that starts in the hole keeps its silence (it began with the sound after)
    sound = q.fetch_audio({"audio": str(path)})
    assert np.array_equal(sound, whole)
    for start, end in ((2.5, 4.0), (2.0, 3.5), (1.5, 4.0)):
        part = q.fetch_audio({"audio": str(path), "audio_start": start, "audio_end": end})
        ref = sound[round(start * SR) : round(end * SR)]
        assert len(part) == len(ref) and lag(part, ref) == 0, (start, end)
        assert np.array_equal(part[SR // 100 :], ref[SR // 100 :]), (start, end)  # (but the resampler's start)


@pytest.mark.parametrize("rates", [(44100, 48000), (22050, 48000), (48000, 24000)])
def test_a_change_of_sample_rate_is_neither_holes_nor_repeats(tmp_path, rates):
    """An MPEG-TS joined from two recordings at different sample rates (FFmpeg's concat demuxer, stream copy):
    between two timestamps, the parser stamps the second rate's frames with the first rate's frame length,
    drifting from the sound (1.9 ms a frame from 44.1 to 48 kHz, 23 ms from 48 to 24 kHz) and back at the next
    true stamp. That is not holes (they were silence: 94 in 10 s from 44.1 to 48 kHz; 2.2 s of 4 s from 22.05 to
    48 kHz) and repeats (cut): the sound is whole, as long as FFmpeg's own decode of it but for the seam (where
    the stamps place the second recording), and a window after the change is the whole track's slice (it was up to
    28 ms off, with holes, when only the first frames' rate was known)."""
    parts = []
    for rate, tone in zip(rates, (440, 880)):
        part = tmp_path / f"{rate}.ts"
        sine = ["-f", "lavfi", "-i", f"sine=frequency={tone}:duration=10:sample_rate={rate}"]
        pictures = ["-f", "lavfi", "-i", "color=c=gray:s=64x48:r=10:d=10", "-c:v", "libx264", "-c:a", "aac"]
        subprocess.run(["ffmpeg", "-v", "error", "-y", *sine, *pictures, str(part)], check=True)
        parts.append(f"file '{part}'")
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(parts) + "\n")
    joined = tmp_path / "joined.ts"
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listed), "-c", "copy"]
    subprocess.run([*cmd, str(joined)], check=True)
    cmd = ["ffmpeg", "-v", "quiet", "-i", str(joined), "-vn", "-ar", str(SR), "-ac", "1", "-f", "f32le", "-"]
    theirs = len(subprocess.run(cmd, check=True, capture_output=True).stdout) // 4
    ours = q.fetch_audio({"audio": str(joined)})
    sounding = np.flatnonzero(np.abs(ours) > 1e-4)
    holes = [(sounding[i] / SR, sounding[i + 1] / SR) for i in np.flatnonzero(np.diff(sounding) > 16)]
    holes = [(a, b) for a, b in holes if a > 0.1 and not 9.9 < a < 10.1]  # (the tones' starts, and the seam)
    assert not holes, f"{len(holes)} holes: {holes[:3]}"
    # (FFmpeg's decode plays the seam's overlap too; here the second recording's true stamps place its sound)
    assert abs(len(ours) - theirs) < 0.05 * SR, (len(ours), theirs)
    for start in (12.0, 15.5):  # windows after the change, sought to: the whole track's samples
        part = q.fetch_audio({"audio": str(joined), "audio_start": start, "audio_end": start + 1.0})
        ref = ours[round(start * SR) : round(start * SR) + SR]
        # (within a sample of the 880 Hz tone, 0.043: the sound after the seam is placed to the output sample)
        assert len(part) == SR and np.abs(part[SR // 100 :] - ref[SR // 100 :]).max() < 0.043, start


def _wav(path: Path, rate: int, samples: np.ndarray, fmt: int = 1, width: int = 2) -> Path:
    """A WAV written byte by byte, its header saying what it is told to (a rate of 1 Hz, float PCM)."""
    import struct

    data = samples.tobytes()
    fmt_chunk = struct.pack("<HHIIHH", fmt, 1, rate, rate * width, width, width * 8)
    head = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt_chunk
    path.write_bytes(head + b"data" + struct.pack("<I", len(data)) + data)
    return path


def test_an_audio_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """32 KB claiming a rate of 1 Hz would be 16,000 s of sound (256 M samples, 1 GB): refused from the header; a
    window longer than ``max_audio_seconds`` too, from the header, or while decoding where the header has no
    duration (Matroska written to a pipe)."""
    noise = (np.random.default_rng(0).standard_normal(16000) * 3000).astype("<i2")
    with pytest.raises(errors.DecodeError, match="sample rate of 1 Hz"):
        q.fetch_audio({"audio": str(_wav(tmp_path / "bomb.wav", 1, noise))})
    wav = _wav(tmp_path / "two.wav", 8000, noise)  # 2 s
    tight = q.FetchPolicy(max_audio_seconds=1.5)
    with pytest.raises(errors.SourceTooLargeError, match="2.0 s long, over the limit of 1.5 s"):
        q.fetch_audio({"audio": str(wav)}, policy=tight)
    assert len(q.fetch_audio({"audio": str(wav), "audio_end": 1.0}, policy=tight)) == SR  # a window within it
    piped = tmp_path / "piped.mka"
    cmd = ["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "flac", "-f", "matroska", "pipe:1"]
    piped.write_bytes(subprocess.run(cmd, capture_output=True, check=True).stdout)
    with av.open(str(piped)) as c:
        assert c.duration is None  # (nothing in the header to go by)
    with pytest.raises(errors.SourceTooLargeError, match="over the limit of 1.5 s"):
        q.fetch_audio({"audio": str(piped)}, policy=tight)
    monkeypatch.setenv("QWENVL_MAX_AUDIO_SECONDS", "1.5")
    from qwen_vl_utils.sources._policy import _from_env

    assert _from_env(q.FetchPolicy()).max_audio_seconds == 1.5
    assert q.FetchPolicy().max_audio_seconds == 3 * 3600


def test_float_sound_holding_nan_comes_out_finite(tmp_path):
    tone = stepped(1.0).astype("<f4")
    tone[4000] = np.nan
    tone[9000] = np.inf
    out = q.fetch_audio({"audio": str(_wav(tmp_path / "nan.wav", SR, tone, fmt=3, width=4))})
    assert len(out) == SR and np.isfinite(out).all() and np.abs(out).max() <= 1.0


def test_arrays_of_every_kind_are_centred_and_checked():
    assert np.array_equal(q.fetch_audio({"audio": np.full(1600, 128, np.uint8)}), np.zeros(1600, np.float32))
    assert np.array_equal(q.fetch_audio({"audio": np.full(800, 32768, np.uint16)}), np.zeros(800, np.float32))
    assert q.fetch_audio({"audio": np.zeros(10, np.uint8)}).min() == -1.0
    bad = stepped(0.1)
    bad[5] = np.nan
    with pytest.raises(errors.InvalidOptionError, match="NaN or infinity at index 5"):
        q.fetch_audio({"audio": bad})


def test_windows_at_or_past_the_end_say_so(tmp_path):
    path = write_audio(tmp_path / "a.wav", "pcm_s16le", 44100, 1, seconds=3.0)
    for start in (3.0 - 1e-6, 3.5, 100.0):  # (the first: within the last source sample)
        with pytest.raises(errors.InvalidOptionError, match=r"at or after the end of the audio of .*3\.000 s long"):
            q.fetch_audio({"audio": str(path), "audio_start": start})
    assert len(q.fetch_audio({"audio": str(path), "audio_start": 2.5})) == SR // 2
    with pytest.raises(errors.InvalidOptionError, match="at or after the end of the 16000 samples"):
        q.fetch_audio({"audio": np.zeros(SR, np.float32), "audio_start": 1.0})


def test_odd_elements_get_typed_errors_that_say_what_to_do(tmp_path):
    path = write_audio(tmp_path / "a.flac", "flac", 16000, 1, seconds=1.0)
    conv = _message({"type": "audio", "audio": str(path)})
    assert len(q.process_mm_info(conv, np.True_)[0][0]) == SR  # numpy's bool, as a config read by pandas has it
    with pytest.raises(errors.InvalidOptionError, match=r"True or False, got <numpy.float32 np.float32\(1.0\)>"):
        q.process_mm_info(conv, np.float32(1))
    with pytest.raises(errors.InvalidOptionError, match="True or False, got 1$"):
        q.process_mm_info(conv, 1)
    mixed = _message({"type": "audio", "audio": str(path), "image": str(path)})
    with pytest.raises(errors.InvalidOptionError, match=r"both sound and a picture \(audio, image\)"):
        q.process_mm_info(mixed, False)
    bare = base64.b64encode(path.read_bytes()).decode()
    with pytest.raises(errors.SourceNotFoundError, match="needs its data: prefix"):
        q.fetch_audio({"audio": bare})
    with pytest.raises(errors.InvalidOptionError, match="numpy array of 16 kHz samples$"):
        q.fetch_audio({"audio": object()})


@pytest.mark.parametrize("reserved", [None, 1000, 3 * SR, 10 * SR])
def test_samples_written_in_place_are_those_gathered(tmp_path, reserved):
    """A window the header sizes is written into one array as it is decoded; a header that says too little (or
    too much) changes nothing in what comes out."""
    from qwen_vl_utils.audio import AudioTrack

    path = write_audio(tmp_path / "a.m4a", "aac", 44100, 2, seconds=3.0)
    out = []
    for size in (None, reserved):
        track = AudioTrack(0.0)
        if size is not None:
            track.reserve(size)
        with av.open(str(path)) as c:
            stream = c.streams.audio[0]
            for frame in c.decode(stream):
                track.add(frame, frame.pts * float(stream.time_base))
        track.finish()
        out.append(track.take(0, track.end))
    assert np.array_equal(out[0], out[1]) and len(out[0]) > 3 * SR


def test_an_estimated_duration_does_not_refuse_a_file(tmp_path):
    """An MP3 without a table of contents that starts with silence is estimated from its first frame's bit rate
    at several times its length: the limit is checked while decoding there, not from that estimate."""
    mp3 = tmp_path / "vbr.mp3"
    cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=44100:cl=mono:d=3", "-f", "lavfi", "-i",
           "anoisesrc=r=44100:d=20:a=0.5", "-filter_complex", "[0][1]concat=n=2:v=0:a=1", "-c:a", "libmp3lame",
           "-q:a", "0", "-write_xing", "0", str(mp3)]  # fmt: skip
    subprocess.run(cmd, check=True)
    with av.open(str(mp3)) as c:
        assert c.duration / 1e6 > 40  # (the estimate)
    audio = q.fetch_audio({"audio": str(mp3)}, policy=q.FetchPolicy(max_audio_seconds=30))
    assert abs(len(audio) / SR - 23.0) < 0.2
    with pytest.raises(errors.SourceTooLargeError):
        q.fetch_audio({"audio": str(mp3)}, policy=q.FetchPolicy(max_audio_seconds=10))


def _without_sound(src: Path, dst: Path, start: float, end: float) -> Path:
    """``src`` stream-copied with its audio packets stamped in ``[start, end)`` left out: a hole in the sound."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is None:
                continue
            if packet.stream.type == "audio" and start <= float(packet.pts * packet.time_base) < end:
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return dst


def _silences(sound: np.ndarray, least: int = 48) -> list:
    """(first, last) samples of each run of at least ``least`` exact zeros."""
    quiet = np.concatenate([[0], (sound == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(quiet))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= least]


def test_windows_around_holes_are_the_whole_tracks_slices(tmp_path):
    """Holes in a video's sound, read as audio: one at the start (an MP4 keeping only its priming packet there:
    time 0 is the first sample, for a window as for the whole track; windows were 0.32 s off), one of 12 s (more
    than a live source's leap: a file's is a hole however long; the sound after it was put 12 s early, off its
    frames), and windows that start within 5 ms of a hole's end (the silence before the sound was dropped)."""
    src = write_video(tmp_path / "v.mp4", seconds=30.0, fps=5, spans=[(0.0, 6.0), (6.05, 10.0), (22.0, 30.0)])
    holed = _without_sound(src, tmp_path / "holed.mp4", 0.0, 0.3)
    for path in (holed, src):
        whole = q.fetch_audio({"audio": str(path)})
        assert whole[:4].any(), "the whole track starts with its first sample"
        holes = [(a / SR, b / SR) for a, b in _silences(whole)]
        assert any(b - a > 11.5 for a, b in holes), holes  # (the 12 s hole, kept)
        starts = [1.0, 7.0, 20.0, 25.0] + [b - 0.001 for a, b in holes if a > 0] + [b - 0.004 for a, b in holes]
        for start in starts:
            part = q.fetch_audio({"audio": str(path), "audio_start": start, "audio_end": start + 0.5})
            ref = whole[round(start * SR) : round(start * SR) + len(part)]
            assert len(part) == round(0.5 * SR) and np.abs(part[32:] - ref[32:]).max() < 0.01, (path.name, start)
    sound = q.process_mm_info(_message({"type": "video", "video": str(src)}), use_audio_in_video=True)[0][0]
    assert lag(sound[23 * SR : 29 * SR], stepped(30.0)[23 * SR : 29 * SR]) == 0  # with its frames after the hole


def _ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def _pitch(sound: np.ndarray) -> float:
    """The frequency of the loudest tone in the first second."""
    spectrum = np.abs(np.fft.rfft(sound[:SR]))
    return float(np.argmax(spectrum)) * SR / len(sound[:SR])


def test_sound_that_is_not_there_is_a_typed_error(tmp_path):
    """An audio track that decodes to no sample, and a window shorter than a sample, gave empty arrays (on which
    the Omni feature extractors fail); an M4A with cover art given as a video gave 2 frames at 180,000 fps and
    no sound."""
    pictures = ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=3"]
    empty = tmp_path / "empty.mp4"
    _ffmpeg(*pictures, "-f", "lavfi", "-i", "sine=r=48000:d=3", "-c:v", "libx264", "-c:a", "aac",
            "-af", "atrim=end_sample=1", str(empty))  # fmt: skip
    with pytest.raises(q.DecodeError, match="empty.mp4 holds no sound"):
        q.fetch_audio({"audio": str(empty)})
    wav = write_audio(tmp_path / "a.wav", "pcm_s16le", 16000, 1)
    with pytest.raises(q.InvalidOptionError, match="shorter than one sample"):
        q.fetch_audio({"audio": str(wav), "audio_start": 1.0, "audio_end": 1.00001})
    with pytest.raises(q.InvalidOptionError, match="shorter than one sample"):
        q.fetch_audio({"audio": np.zeros(SR, np.float32), "audio_start": 1e-9, "audio_end": 2e-9})
    cover = tmp_path / "cover.png"
    Image.new("RGB", (64, 64), "red").save(cover)
    m4a = tmp_path / "cover.m4a"
    _ffmpeg("-i", str(wav), "-i", str(cover), "-map", "0:a", "-map", "1", "-c:a", "aac", "-c:v", "png",
            "-disposition:v", "attached_pic", str(m4a))  # fmt: skip
    assert len(q.fetch_audio({"audio": str(m4a)})) > 2 * SR
    for call in (
        lambda: q.process_mm_info(_message({"type": "video", "video": str(m4a)}), use_audio_in_video=True),
        lambda: q.process_vision_info(_message({"type": "video", "video": str(m4a)})),
        lambda: next(iter(q.stream_video({"video": str(m4a)}, audio=True))),
    ):
        with pytest.raises(q.DecodeError, match="cover picture, not a video; give it as audio"):
            call()


def test_of_several_audio_tracks_the_one_ffmpeg_picks(tmp_path):
    """A video with two audio tracks (440 Hz, then 1000 Hz): the sound is the track FFmpeg's command line picks, as
    qwen-omni-utils gets it through it: the default one (it was always the first), else the one with the most
    channels, else the first; the same for a file, a video's sound and a stream."""
    tones = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=3"]
    tones += ["-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=44100:duration=3"]
    two = tmp_path / "two.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=3", *tones, "-map", "0", "-map", "1",
            "-map", "2", "-c:v", "libx264", "-c:a", "aac", str(two))  # fmt: skip
    second = tmp_path / "second.mp4"
    _ffmpeg("-i", str(two), "-map", "0", "-c", "copy", "-disposition:a:0", "0", "-disposition:a:1", "default",
            str(second))  # fmt: skip
    stereo = tmp_path / "stereo.mkv"
    _ffmpeg("-i", str(two), "-map", "0", "-c:v", "copy", "-c:a", "aac", "-ac:a:1", "2", "-disposition:a:0", "0",
            str(stereo))  # fmt: skip
    for path in (two, second, stereo):
        cmd = ["ffmpeg", "-v", "error", "-i", str(path), "-vn", "-ar", str(SR), "-ac", "1", "-f", "f32le", "-"]
        theirs = _pitch(np.frombuffer(subprocess.run(cmd, check=True, capture_output=True).stdout, np.float32))
        ele = {"type": "video", "video": str(path), "fps": 2.0}
        sounds = [
            q.fetch_audio({"audio": str(path)}),
            q.process_mm_info(_message(ele), use_audio_in_video=True)[0][0],
            np.concatenate([c.audio for c in q.stream_video(ele, 1.0, audio=True)]),
        ]
        assert [round(_pitch(s)) for s in sounds] == [round(theirs)] * 3, path.name
    assert round(_pitch(q.fetch_audio({"audio": str(second)}))) == 1000
    # the header's facts are the picked track's: Matroska states its length in a tag per track (the container's
    # duration is the longest track's, 6 s, and inspect said 150 tokens for 2 s of sound)
    mka = tmp_path / "two.mka"
    tones = [
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=6",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=1000:duration=2",
    ]
    flags = ["-disposition:a:0", "0", "-disposition:a:1", "default"]
    _ffmpeg(*tones, "-map", "0", "-map", "1", "-c:a", "libopus", *flags, str(mka))
    sound = q.fetch_audio({"audio": str(mka)})
    res = subprocess.run([sys.executable, "-m", "qwen_vl_utils", "inspect", str(mka), "--json"], capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    out = json.loads(res.stdout)[0]
    assert round(_pitch(sound)) == 1000 and out["duration"] == pytest.approx(len(sound) / SR, abs=0.02)
    assert out["audio_tokens"]["qwen2.5-omni"] == q.audio_token_count(len(sound))
