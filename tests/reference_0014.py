"""qwen-vl-utils 0.0.14's documented arithmetic, restated from its specification for comparison.

Only the parts where 0.0.14 is right are compared against; the fixes are tested separately.
"""

from __future__ import annotations

import math

from PIL import Image


def smart_resize_0014(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    # sides rounded to the factor (at least one factor), then scaled down/up by sqrt of the area ratio
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = math.floor(height / scale / factor) * factor
        w = math.floor(width / scale / factor) * factor
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def nframes_0014(total: int, video_fps: float, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768) -> int:
    lo = math.ceil(min_frames / 2) * 2
    hi = math.floor(min(max_frames, total) / 2) * 2
    n = min(min(max(total / video_fps * fps, lo), hi), total)
    return math.floor(n / 2) * 2


def fetch_image_0014(img: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    if img.mode == "RGBA":
        rgb = Image.new("RGB", img.size, (255, 255, 255))
        rgb.paste(img, mask=img.split()[3])
    else:
        rgb = img.convert("RGB")
    h, w = smart_resize_0014(rgb.height, rgb.width, factor, min_pixels, max_pixels)
    return rgb.resize((w, h))
