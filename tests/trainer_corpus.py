"""The generated set every trainer rule set is checked on: images (EXIF-rotated, CMYK, palette, tiny, odd sizes,
large), videos (odd lengths and rates, WebM/MKV without a frame count in the header, variable frame rate,
display rotation) and samples that combine them (multi-image, mixed, two videos, text only).

``build(folder)`` writes the media under ``folder/media`` and returns the samples in qwen-vl-finetune's format
(``image`` / ``video`` lists of absolute paths, ``conversations`` with ``<image>`` / ``<video>`` tags), each with
an ``id``. Deterministic: the header facts every rule set reads (sizes, frame counts, rates, durations) are the
same on every machine, whatever the encoder's bytes. ``scripts/trainers/goldens.py`` runs the trainers' own
code on it; the tests compare ``dataset count --rules`` with what it recorded.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from media import exif_stored, gradient, make_video

IMAGES = {
    # name: (width, height, mode, format, EXIF orientation)
    "rgb.png": (97, 61, "RGB", "PNG", None),
    "photo.jpg": (640, 480, "RGB", "JPEG", None),
    "exif6.jpg": (320, 200, "RGB", "JPEG", 6),  # shown 320x200, stored turned (200x320)
    "exif8.jpg": (500, 300, "RGB", "JPEG", 8),
    "cmyk.jpg": (300, 200, "CMYK", "JPEG", None),
    "palette.png": (123, 77, "P", "PNG", None),
    "tiny.png": (12, 9, "RGB", "PNG", None),
    "odd.png": (1001, 333, "RGB", "PNG", None),
    "large.jpg": (2000, 1500, "RGB", "JPEG", None),
    "rgba.png": (200, 150, "RGBA", "PNG", None),
    "gray.png": (150, 100, "L", "PNG", None),
    "tall.webp": (90, 700, "RGB", "WEBP", None),
    "line.png": (600000, 1, "L", "PNG", None),  # an aspect ratio far over 200
    "strip.png": (9000, 20, "RGB", "PNG", None),
    "square.png": (1000, 1000, "RGB", "PNG", None),
    "mid.png": (500, 300, "RGB", "PNG", None),
}

VIDEOS = {
    # name: make_video keyword arguments
    "v30.mp4": dict(frames=60, width=320, height=240, fps=30),
    "v25odd.mp4": dict(frames=83, width=320, height=240, fps=25),
    "v24.webm": dict(frames=60, width=256, height=144, fps=24, codec="libvpx-vp9"),
    "v30.mkv": dict(frames=45, width=320, height=180, fps=30, container="matroska"),
    "rot90.mp4": dict(frames=48, width=320, height=192, fps=24, rotation=90),
    "vfr.mp4": dict(
        frames=40, width=256, height=160, fps=30, pts=[round(i * 1000 / 30 + (i % 3) * 9) for i in range(40)]
    ),
    "ntsc.mp4": dict(frames=50, width=352, height=240, fps=30, rate=Fraction(30000, 1001)),
    "v10.avi": dict(frames=41, width=320, height=240, fps=10, codec="mpeg4", container="avi"),
    "one.mp4": dict(frames=1, width=160, height=96, fps=24),
    "hd.mp4": dict(frames=30, width=1280, height=720, fps=30),
    "long.mp4": dict(frames=150, width=192, height=108, fps=5),
    "v25.ts": dict(frames=50, width=320, height=240, fps=25, container="mpegts"),  # a duration, no frame count
    "v24.mov": dict(frames=37, width=320, height=240, fps=24, container="mov"),
    "v30.flv": dict(frames=33, width=320, height=240, fps=30, codec="flv", container="flv"),
    "v25.ogv": dict(frames=31, width=320, height=240, fps=25, codec="libvpx", container="ogg"),  # no average rate
    "thin.mp4": dict(frames=24, width=1000, height=30, fps=24),
    "big.mp4": dict(frames=300, width=320, height=240, fps=30),
    "audio.mp4": dict(frames=48, width=320, height=240, fps=24, audio=True),
    "wide.mkv": dict(frames=20, width=1280, height=64, fps=20, container="matroska"),
    "long.mkv": dict(frames=200, width=160, height=96, fps=25, container="matroska"),
}

Q, A = "What happens here?", "It shows a scene."


def _sample(sid: str, images: list, videos: list, folder: Path, turns: Optional[list] = None) -> dict:
    """A sample; ``turns``: the human turns' texts (default: one turn, its tags first)."""
    tags = "".join("<image>\n" for _ in images) + "".join("<video>\n" for _ in videos)
    sample: dict = {"id": sid}
    if images:
        sample["image"] = [str(folder / "media" / n) for n in images]
    if videos:
        sample["video"] = [str(folder / "media" / n) for n in videos]
    conversations = []
    for text in turns or [tags + Q]:
        conversations += [{"from": "human", "value": text}, {"from": "gpt", "value": A}]
    sample["conversations"] = conversations
    return sample


def samples(folder: Path) -> list:
    out = [_sample(f"image:{n}", [n], [], folder) for n in IMAGES]
    out += [_sample(f"video:{n}", [], [n], folder) for n in VIDEOS]
    out.append(_sample("multi-image", ["photo.jpg", "exif6.jpg", "palette.png"], [], folder))
    out.append(_sample("mixed", ["rgb.png"], ["v30.mp4"], folder))
    out.append(_sample("mixed-webm", ["cmyk.jpg", "odd.png"], ["v24.webm"], folder))
    out.append(_sample("two-videos", [], ["v30.mp4", "v25odd.mp4"], folder))
    out.append(_sample("text-only", [], [], folder))
    out.append(_sample("video-in-second-turn", [], ["v24.mov"], folder, ["Hi", "<video>\n" + Q]))
    out.append(_sample("a-video-per-turn", [], ["v24.mov", "big.mp4"], folder, ["<video>\n" + Q] * 2))
    out.append(_sample("two-videos-long-first", [], ["big.mp4", "v24.mov"], folder))
    out.append(_sample("video-then-image", ["mid.png"], ["v24.mov"], folder, ["<video>\n<image>\n" + Q]))
    for name in DERIVED:
        out.append(_sample(f"video:{name}", [], [name], folder))
    out.append(_sample("image:photo.heic", ["photo.heic"], [], folder))
    uri = _sample("image:file-uri", ["photo.jpg"], [], folder)
    uri["image"] = [(folder / "media" / "photo.jpg").as_uri()]
    out.append(uri)
    return out


#: videos made from others by the ffmpeg command line or by editing their bytes: name -> how
DERIVED = {
    "cut.mp4": "a stream copy cut at 1.3 s of an x264 file with B-frames: an edit list hides 3 of its 84 frames",
    "liar.avi": "v10.avi (41 frames) with its header's frame counts patched to 200",
    "raw.h264": "v30.mp4's H.264 as a raw Annex B elementary stream: no container, no timestamps",
    "anim.gif": "an animated GIF of 12 frames at 10 fps",
}


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def _derived(media: Path) -> None:
    if not (media / "cut.mp4").exists():
        src = media / "bframes.src.mp4"
        _ffmpeg("-f", "lavfi", "-i", "testsrc=size=320x240:rate=30", "-frames:v", "120", "-c:v", "libx264",
                "-g", "12", "-bf", "3", "-pix_fmt", "yuv420p", str(src))  # fmt: skip
        _ffmpeg("-ss", "1.3", "-i", str(src), "-c", "copy", str(media / "cut.mp4"))
        src.unlink()
    if not (media / "liar.avi").exists():
        data = bytearray((media / "v10.avi").read_bytes())
        avih = data.index(b"avih") + 8
        struct.pack_into("<I", data, avih + 16, 200)  # dwTotalFrames
        strh = data.index(b"strh") + 8
        struct.pack_into("<I", data, strh + 32, 200)  # dwLength
        (media / "liar.avi").write_bytes(bytes(data))
    if not (media / "raw.h264").exists():
        _ffmpeg("-i", str(media / "v30.mp4"), "-c:v", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "h264",
                str(media / "raw.h264"))  # fmt: skip
    if not (media / "anim.gif").exists():
        from PIL import Image

        frames = [Image.fromarray(np.full((90, 120, 3), 20 * i, np.uint8)) for i in range(12)]
        frames[0].save(media / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    if not (media / "photo.heic").exists():
        import pillow_heif

        pillow_heif.register_heif_opener()
        gradient(640, 480).save(media / "photo.heic", format="HEIF")


def build(folder: Path) -> list:
    """Write the media (once: existing files are kept) and return the samples."""
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    for name, (w, h, mode, fmt, orientation) in IMAGES.items():
        path = media / name
        if path.exists():
            continue
        if orientation:
            img, exif = exif_stored(np.asarray(gradient(w, h)), orientation)
            img.save(path, format=fmt, exif=exif)
        else:
            gradient(w, h, mode).save(path, format=fmt)
    for name, kwargs in VIDEOS.items():
        path = media / name
        if not path.exists():
            make_video(path, **kwargs)
    _derived(media)
    return samples(folder)


if __name__ == "__main__":
    folder = Path(sys.argv[1]).resolve()
    built = build(folder)
    with open(folder / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in built)
    print(folder / "samples.jsonl")
