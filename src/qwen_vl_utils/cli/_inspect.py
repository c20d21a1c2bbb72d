"""``inspect``, ``preview`` and ``demo``: what the model receives from each source, decoded for real."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from .._errors import QwenVLError
from .._progress import Progress
from .._version import __version__
from ._common import EXIT_OK, EXIT_SOURCE_FAILED, element_from_args, error_line

# --- inspecting one source -----------------------------------------------------------------------------------


def inspect_source(
    source: str, args: argparse.Namespace, on_frame: Optional[Callable[[int, int], None]] = None
) -> dict:
    """Everything the model will receive from one source, as a JSON-able dict (decodes it for real)."""
    from ..sources._policy import get_fetch_policy
    from ..sources._resolve import resolve_source, sniff_media

    start = time.perf_counter()
    # resolve once (a URL is downloaded once, under the fetch policy), then decide image or video from the bytes
    with resolve_source(source, "video", get_fetch_policy()) as src:
        kind = sniff_media(src.head(256)) or "video"  # unknown magic: the video prober decides
        return _inspect_resolved(source, src.path if src.path is not None else src.data, kind, args, on_frame, start)


def _inspect_resolved(
    source: str, value: Any, kind: str, args: argparse.Namespace, on_frame: Any, start: float
) -> dict:
    from ..image import fetch_image, open_image, visual_tokens
    from ..sources._policy import get_fetch_policy
    from ..sources._resolve import resolve_source
    from ..video import FRAME_FACTOR, decode_video, qwen3_timestamps

    patch = args.patch_size
    factor = patch * 2
    ele = element_from_args(args, kind, value)
    if kind == "image":
        policy = get_fetch_policy()
        with resolve_source(value, "image", policy) as src:
            img = open_image(src, policy)
            fmt, mode, (width, height) = img.format, img.mode, img.size
        out = fetch_image(ele, patch)
        tokens = visual_tokens(out.height, out.width, factor)
        return {
            "source": source,
            "kind": "image",
            "format": fmt,
            "mode": mode,
            "width": width,
            "height": height,
            "resized_height": out.height,
            "resized_width": out.width,
            "tokens": tokens,
            "seconds": round(time.perf_counter() - start, 4),
            "_image": out,
        }
    from ..audio import describe_audio, token_counts

    with resolve_source(value, "video", get_fetch_policy()) as src:
        sound = describe_audio(src)
    if sound is not None and not sound.pop("has_video"):
        return {
            "source": source,
            "kind": "audio",
            **sound,
            "audio_tokens": token_counts(sound["duration"]),
            "seconds": round(time.perf_counter() - start, 4),
        }
    decoded = decode_video(ele, patch, backend=ele.get("video_reader"), on_frame=on_frame)
    info, meta = decoded.info, decoded.metadata
    t, h, w = decoded.frames.shape[:3]
    fps = meta["fps"]
    width, height = info.display_size
    return {
        "source": source,
        "kind": "video",
        "container": info.container,
        "codec": info.codec,
        "duration": round(info.duration, 4),
        "source_fps": round(fps, 4),
        "total_frames": meta["total_num_frames"],
        "width": width,
        "height": height,
        "rotation": info.rotation,
        "resized_height": h,
        "resized_width": w,
        "frames": t,
        "sample_fps": round(decoded.sample_fps, 4),
        "frames_indices": list(meta["frames_indices"]),
        "frame_times": [round(i / fps, 4) for i in meta["frames_indices"]],
        "qwen3_timestamps": [round(x, 4) for x in qwen3_timestamps(meta["frames_indices"], fps)],
        "tokens": visual_tokens(h, w, factor, t, FRAME_FACTOR),
        "backend": meta["video_backend"],
        "audio": None
        if sound is None
        else {
            **{k: v for k, v in sound.items() if k != "has_video"},
            # what use_audio_in_video gives: the sound of the frames' window
            "tokens": token_counts((meta["frames_indices"][-1] + 1 - meta["frames_indices"][0]) / fps),
        },
        "seconds": round(time.perf_counter() - start, 4),
        "_frames": decoded.frames,
    }


# --- output --------------------------------------------------------------------------------------------------


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _table(result: dict) -> str:
    r = result
    rows = [("source", r["source"]), ("kind", r["kind"])]
    if r["kind"] == "audio":
        rows += [
            ("codec", r["codec"]),
            ("sample rate / channels", f"{r['sample_rate']} Hz / {r['channels']}"),
            ("duration", f"{r['duration']:.3f} s"),
            ("audio tokens", ", ".join(f"{m} {n}" for m, n in r["audio_tokens"].items())),
            ("time", f"{r['seconds'] * 1000:.0f} ms"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    if r["kind"] == "image":
        rows += [
            ("format / mode", f"{r['format']} / {r['mode']}"),
            ("original", f"{r['width']}x{r['height']}"),
            ("resized", f"{r['resized_width']}x{r['resized_height']}"),
        ]
    else:
        rows += [
            ("container / codec", f"{r['container']} / {r['codec']}"),
            ("duration", f"{r['duration']:.3f} s"),
            ("source fps / frames", f"{r['source_fps']:g} / {r['total_frames']}"),
            ("original", f"{r['width']}x{r['height']}" + (f" (rotated {r['rotation']})" if r["rotation"] else "")),
            ("resized", f"{r['resized_width']}x{r['resized_height']} x {r['frames']} frames"),
            ("sampled frames", " ".join(f"{i}@{t:g}s" for i, t in zip(r["frames_indices"], r["frame_times"]))),
            ("Qwen3-VL timestamps", " ".join(f"<{t:.1f} seconds>" for t in r["qwen3_timestamps"])),
            ("backend", r["backend"]),
        ]
        if r.get("audio"):
            a = r["audio"]
            tokens = ", ".join(f"{m} {n}" for m, n in a["tokens"].items())
            rows.append(("audio", f"{a['codec']} {a['sample_rate']} Hz x {a['channels']}, {a['duration']:.3f} s"))
            rows.append(("audio tokens (frames' window)", tokens))
    rows += [("visual tokens", str(r["tokens"])), ("time", f"{r['seconds'] * 1000:.0f} ms")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _run_sources(args: argparse.Namespace, sources: list, each: Callable[[str, dict], None]) -> int:
    progress = Progress(not args.quiet)
    status = EXIT_OK
    for n, source in enumerate(sources):
        progress.update(n, len(sources), source)
        try:
            result = inspect_source(source, args, on_frame=lambda d, t, s=source: progress.update(d, t, s))
        except (QwenVLError, OSError, ValueError) as exc:
            progress.close()
            print(error_line(source, exc, args.debug), file=sys.stderr)
            status = EXIT_SOURCE_FAILED
            continue
        progress.close()
        each(source, result)
    return status


def cmd_inspect(args: argparse.Namespace) -> int:
    results: list = []
    status = _run_sources(args, args.sources, lambda s, r: results.append(r))
    if args.json:
        print(json.dumps([_public(r) for r in results], indent=2))
    else:
        print("\n\n".join(_table(r) for r in results))
    return status


def contact_sheet(result: dict, tile_width: int = 320) -> Any:
    """A PIL image: every sampled frame (or the resized image) with its time drawn on it."""
    from PIL import Image, ImageDraw

    if result["kind"] == "image":
        tiles = [(result["_image"], f"{result['resized_width']}x{result['resized_height']}")]
    else:
        tiles = [
            (Image.fromarray(f), f"{t:.2f}s  #{i}")
            for f, i, t in zip(result["_frames"], result["frames_indices"], result["frame_times"])
        ]
    w0, h0 = tiles[0][0].size
    scale = min(1.0, tile_width / w0)
    tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    cols = max(1, min(len(tiles), math.ceil(math.sqrt(len(tiles)))))
    rows = math.ceil(len(tiles) / cols)
    pad = 4
    sheet = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for n, (img, label) in enumerate(tiles):
        x, y = pad + (n % cols) * (tw + pad), pad + (n // cols) * (th + pad)
        sheet.paste(img.resize((tw, th)) if (tw, th) != img.size else img, (x, y))
        box = draw.textbbox((x + 3, y + 3), label)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((x + 3, y + 3), label, fill=(255, 255, 0))
    sheet.info["qwen_vl_utils_tiles"] = len(tiles)
    return sheet


def cmd_preview(args: argparse.Namespace) -> int:
    def save(source: str, result: dict) -> None:
        contact_sheet(result).save(args.output, format="PNG")
        if not args.quiet:
            print(_table(result))
            print(f"contact sheet: {args.output}")

    return _run_sources(args, [args.source], save)


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate a sample video and image, then inspect and preview them."""
    folder = tempfile.mkdtemp(prefix="qwen-vl-utils-demo-")
    video, image = make_sample_video(os.path.join(folder, "sample.mp4")), os.path.join(folder, "sample.png")
    make_sample_image(image)
    print(f"qwen-vl-utils {__version__} demo: sample media in {folder}\n")
    for patch in (14, 16):
        args.patch_size = patch
        print(f"== Qwen{'2.5' if patch == 14 else '3'}-VL (patch {patch}) ==")
        status = cmd_inspect(_with(args, sources=[video, image], json=False))
        print()
        if status:
            return status
    args.patch_size = 16
    sheet = os.path.join(folder, "sheet.png")
    status = cmd_preview(_with(args, source=video, output=sheet, quiet=True))
    print(f"contact sheet of the sampled frames: {sheet}")
    return status


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    new = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def make_sample_video(path: str, seconds: float = 4.0, fps: int = 24, width: int = 320, height: int = 180) -> str:
    """A short H.264 clip of a moving block with its frame number, made with PyAV."""
    import av
    import numpy as np

    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            a = np.zeros((height, width, 3), np.uint8)
            a[..., 2] = 60 + (i * 3) % 120
            x = int((width - 40) * (i / (seconds * fps)))
            a[height // 2 - 20 : height // 2 + 20, x : x + 40] = (255, 220, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_sample_image(path: str) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 427), (40, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((220, 110, 420, 310), fill=(250, 200, 40))
    draw.text((20, 20), "qwen-vl-utils sample", fill=(255, 255, 255))
    img.save(path)
    return path
