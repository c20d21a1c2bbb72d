"""Generate every test medium with PyAV and Pillow: nothing is downloaded or committed."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import numpy as np
from PIL import Image

CODEC_OPTIONS = {
    "libx264": {"bf": "3", "g": "12", "preset": "veryfast"},
    "libx265": {"preset": "ultrafast", "x265-params": "log-level=none:keyint=12"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "g": "12"},
    "libsvtav1": {"preset": "12", "g": "12"},
    "mpeg4": {"g": "12", "bf": "1"},
}


def frame_pattern(i: int, width: int, height: int) -> np.ndarray:
    """A frame that identifies its index: a bright block whose position moves with i, and i in the green level."""
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 1] = (i * 7) % 256
    bw, bh = max(8, width // 8), max(8, height // 4)
    x = (i * 4) % max(1, width - bw)
    a[: height // 4 + bh // 2, x : x + bw, 0] = 255
    a[height // 2 :, : width // 4, 2] = 200  # an asymmetric corner, so that rotation is visible
    return a


def make_video(
    path: Path,
    *,
    codec: str = "libx264",
    frames: int = 48,
    width: int = 160,
    height: int = 96,
    fps: int = 24,
    container: Optional[str] = None,
    rotation: Optional[int] = None,
    audio: bool = False,
    faststart: bool = False,
    pts: Optional[list] = None,
    rate: Optional[Fraction] = None,
    gop: Optional[int] = None,
) -> Path:
    """Encode ``frames`` pattern frames. ``pts`` (in 1/1000 s) makes a variable-frame-rate file."""
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=container, options=options) as out:
        stream = out.add_stream(codec, rate=rate or fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(CODEC_OPTIONS.get(codec, {}))
        if gop is not None:
            stream.options["g"] = str(gop)
        if pts is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        astream = None
        if audio:
            astream = out.add_stream("aac", rate=16000)
            astream.layout = "mono"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, width, height), format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if astream is not None:
            _encode_audio(out, astream, seconds=frames / fps)
    return path


def _encode_audio(out: av.container.OutputContainer, astream: av.AudioStream, seconds: float) -> None:
    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, len(samples), 1024):
        chunk = samples[start : start + 1024]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        for packet in astream.encode(frame):
            out.mux(packet)
    for packet in astream.encode():
        out.mux(packet)


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        astream = out.add_stream("aac", rate=16000)
        astream.layout = "mono"
        _encode_audio(out, astream, seconds=1.0)
    return path


def image_bytes(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 97, height: int = 61, mode: str = "RGB") -> Image.Image:
    """A deterministic non-trivial image (gradients + a block) in any mode."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) * 3) % 256], -1)
    rgb = rgb.astype(np.uint8)
    rgb[height // 3 : height // 2, width // 4 : width // 2] = (250, 20, 30)
    img = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = ((x * 255) // max(1, width - 1)).astype(np.uint8)
        img.putalpha(Image.fromarray(alpha))
    elif mode != "RGB":
        img = img.convert(mode)
    return img
