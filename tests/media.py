"""Generate every test medium with PyAV and Pillow: nothing is downloaded or committed."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import av
import numpy as np
from PIL import Image


def load_script(relative: str) -> Any:
    """A script of the repository (``scripts/...``, not a package) imported as a module: the golden checks read
    the same settings, and build media the same way, as the scripts that regenerate their files."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


#: frame numbers as full-height black/white stripes: STRIPE_BITS bits (most significant first), then STRIPE_CHECK
#: stripes holding how many of those bits are set, so that a misread frame is an error rather than a wrong number
STRIPE_BITS, STRIPE_CHECK = 12, 4
STRIPES = STRIPE_BITS + STRIPE_CHECK


def _stripe_bits(n: int) -> list[int]:
    bits = [(n >> b) & 1 for b in reversed(range(STRIPE_BITS))]
    return bits + [(sum(bits) >> b) & 1 for b in reversed(range(STRIPE_CHECK))]


def numbered_frame(n: int, width: int, height: int) -> np.ndarray:
    """A frame that carries its own number ``n`` (0 <= n < 4096) as stripes that survive lossy coding and
    resizing down to 2 pixels a stripe; :func:`frame_number` reads it back exactly."""
    if not 0 <= n < 2**STRIPE_BITS:
        raise ValueError(f"frame number {n} does not fit in {STRIPE_BITS} bits")
    columns = np.array(_stripe_bits(n), np.uint8)[np.arange(width) * STRIPES // width] * 255
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = columns[None, :, None]
    return frame


def frame_number(frame: object) -> int:
    """The number :func:`numbered_frame` wrote into ``frame`` (HxWx3, 3xHxW or HxW, any size or dtype);
    ValueError if the frame does not read as one (a stripe neither black nor white, or a failed check)."""
    a = np.asarray(frame, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(axis=0 if a.shape[0] == 3 and a.shape[-1] != 3 else 2)
    h, w = a.shape
    band = a[h // 4 : h - h // 4]
    bits = []
    for k in range(STRIPES):  # the middle half of each stripe, away from the blurred edges
        lo, hi = -(-(4 * k + 1) * w // (4 * STRIPES)), (4 * k + 3) * w // (4 * STRIPES) + 1
        level = float(band[:, lo:hi].mean())
        if 64 < level < 192:
            raise ValueError(f"stripe {k} reads {level:.0f}, neither black nor white: not a numbered frame")
        bits.append(int(level >= 128))
    if bits != _stripe_bits(int("".join(map(str, bits[:STRIPE_BITS])), 2)):
        raise ValueError(f"the stripes {bits} fail their check: not a numbered frame")
    return int("".join(map(str, bits[:STRIPE_BITS])), 2)


def displayed_frame_numbers(path: Path) -> list[int]:
    """The numbers of the frames FFmpeg's own command-line decoder shows for ``path``, in order: every frame it
    decodes after applying the container's edit list, none dropped or repeated to fit a rate
    (``-fps_mode passthrough``), each scaled to one size whatever its own (so resolution changes read too)."""
    w, h = 8 * STRIPES, 8
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough"]
    command += ["-vf", f"scale={w}:{h}", "-f", "rawvideo", "-pix_fmt", "gray", "-"]
    raw = subprocess.run(command, capture_output=True, check=True, timeout=120).stdout
    return [frame_number(f) for f in np.frombuffer(raw, np.uint8).reshape(-1, h, w)]


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
    pattern: Callable[[int, int, int], np.ndarray] = frame_pattern,
    options: Optional[dict] = None,
) -> Path:
    """Encode ``frames`` frames of ``pattern(i, width, height)``. ``pts`` (in 1/1000 s) makes a variable-frame-rate
    file; ``options`` are added to the codec's options."""
    mux_options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=container, options=mux_options) as out:
        stream = out.add_stream(codec, rate=rate or fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(CODEC_OPTIONS.get(codec, {}))
        if gop is not None:
            stream.options["g"] = str(gop)
        stream.options.update(options or {})
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
            frame = av.VideoFrame.from_ndarray(pattern(i, width, height), format="rgb24")
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


def make_intra_refresh(
    path: Path, frames: int = 240, width: int = 320, height: int = 192, bframes: int = 0, container: Any = None
) -> Path:
    """H.264 with x264's intra refresh (as low-latency encoders write it): one IDR frame, then every 24 frames a
    keyframe that is only a recovery point. Noise that moves, so that a frame decoded without its references
    is visibly wrong."""
    base = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

    def textured(i: int, w: int, h: int) -> np.ndarray:
        frame = np.roll(base, i * 3, axis=1)
        frame[: 20 + i % 150, :40] = (i * 5) % 256
        return frame

    options = {"x264-params": "intra-refresh=1:keyint=24", "bf": str(bframes), "g": "24"}
    return make_video(
        path, frames=frames, width=width, height=height, pattern=textured, options=options, container=container
    )


def played_frames(path: Path) -> list[np.ndarray]:
    """Every frame of ``path`` as RGB, decoded from the first packet to the last (as a player shows them)."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def keyframe_starts(path: Path) -> list[bool]:
    """For each keyframe packet of ``path``: does its picture start as an IDR frame (H.264, read independently
    of the library: length-prefixed NAL units as MP4 stores them, else Annex B start codes)?"""
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if not (packet.size and packet.is_keyframe):
                continue
            data = bytes(packet)
            if container.format.name.startswith(("mov", "matroska")):
                kinds, i = [], 0
                while i + 4 < len(data):
                    kinds.append(data[i + 4] & 0x1F)
                    i += 4 + int.from_bytes(data[i : i + 4], "big")
            else:
                kinds = [nal[0] & 0x1F for nal in data.split(b"\x00\x00\x01")[1:] if nal]
            out.append(next(k for k in kinds if 1 <= k <= 5) == 5)
    return out


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


#: how a camera stores the pixels of an upright HxWx3 picture for each EXIF orientation (TIFF/EXIF tag 0x0112:
#: where row 0 and column 0 of the stored image are shown), so that applying the orientation shows the picture
EXIF_STORED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda d: d[:, ::-1],  # mirrored left-right
    3: lambda d: d[::-1, ::-1],  # turned 180
    4: lambda d: d[::-1],  # mirrored top-bottom
    5: lambda d: d.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda d: np.rot90(d, 1),  # shown turned 90 clockwise
    7: lambda d: np.rot90(d, 2).transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda d: np.rot90(d, -1),  # shown turned 90 counter-clockwise
}


def exif_stored(upright: np.ndarray, orientation: int) -> tuple[Image.Image, Image.Exif]:
    """The stored image and the EXIF block a camera writes for ``upright`` shown with ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = EXIF_STORED[orientation](upright) if orientation != 1 else upright
    return Image.fromarray(np.ascontiguousarray(pixels)), exif
