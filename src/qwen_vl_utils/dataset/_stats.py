"""``stats``: a text summary and a PNG of histograms (tokens per sample, image sizes, video durations)."""

from __future__ import annotations

import json
import os
from array import array
from typing import Any, Optional

import numpy as np

from .._errors import InvalidOptionError
from ._output import atomic_writer, check_output_dir, refuse_overwriting

__all__ = ["stats"]

INSTALL_HINT = "pip install 'qwen-vl-utils[dataset]' (or pip install matplotlib)"


def _collect(path: str) -> dict:
    cols: dict = {k: array("q") for k in ("num_tokens", "visual_tokens", "text_tokens", "images", "videos")}
    cols.update({k: array("d") for k in ("image_width", "image_height", "video_duration", "video_frames")})
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                n = record["num_tokens"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: stats describe the counted samples
            cols["num_tokens"].append(n)
            cols["visual_tokens"].append(record.get("visual_tokens", 0))
            if "text_tokens" in record:
                cols["text_tokens"].append(record["text_tokens"])
            media = record.get("media_info") or []
            cols["images"].append(sum(m.get("kind") == "image" for m in media))
            cols["videos"].append(sum(m.get("kind") == "video" for m in media))
            for m in media:
                if m.get("kind") == "image" and "width" in m:
                    cols["image_width"].append(m["width"])
                    cols["image_height"].append(m["height"])
                elif m.get("kind") == "video":
                    cols["video_duration"].append(m.get("duration") or 0.0)
                    cols["video_frames"].append(m.get("frames") or 0)
    return {k: np.frombuffer(v, dtype=np.int64 if v.typecode == "q" else np.float64) for k, v in cols.items()}


def _describe(values: np.ndarray) -> Optional[dict]:
    if values.size == 0:
        return None
    p = np.percentile(values, [50, 90, 99])
    return {
        "count": int(values.size),
        "min": float(values.min()),
        "p50": float(p[0]),
        "p90": float(p[1]),
        "p99": float(p[2]),
        "max": float(values.max()),
        "mean": round(float(values.mean()), 2),
        "total": float(values.sum()),
    }


def summarize(cols: dict) -> dict:
    pixels = cols["image_width"] * cols["image_height"]
    return {
        "samples": int(cols["num_tokens"].size),
        "num_tokens": _describe(cols["num_tokens"]),
        "visual_tokens": _describe(cols["visual_tokens"]),
        "text_tokens": _describe(cols["text_tokens"]),
        "images_per_sample": _describe(cols["images"]),
        "videos_per_sample": _describe(cols["videos"]),
        "image_width": _describe(cols["image_width"]),
        "image_height": _describe(cols["image_height"]),
        "image_megapixels": _describe(pixels / 1e6),
        "video_seconds": _describe(cols["video_duration"]),
        "video_sampled_frames": _describe(cols["video_frames"]),
    }


def counted_by(counted: str) -> Optional[str]:
    """The rules a count was made by, from the settings it left beside itself (None where it left none)."""
    from ._run import sibling

    try:
        with open(sibling(counted, "settings.json"), encoding="utf-8") as f:
            settings = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    rules = settings.get("rules")
    if not rules:
        return f"qwen-vl-utils (patch size {settings.get('patch_size')})"
    given = {k: v for k, v in rules["args"].items() if v is not None}
    return f"{rules['name']} for {rules['model']}, trainer arguments {json.dumps(given, sort_keys=True)}"


def to_text(summary: dict) -> str:
    lines = [f"samples: {summary['samples']}"]
    if summary.get("counted_by"):
        lines.append(f"counted by: {summary['counted_by']}")
    head = f"{'':22}{'count':>10}{'min':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'mean':>11}"
    lines.append(head)
    for key, value in summary.items():
        if isinstance(value, dict):
            row = "".join(f"{value[c]:>10g}" for c in ("count", "min", "p50", "p90", "p99", "max"))
            lines.append(f"{key:22}{row}{value['mean']:>11g}")
        elif value is None and key not in ("samples", "counted_by"):
            lines.append(f"{key:22}{'-':>10}")
    return "\n".join(lines) + "\n"


def _plot(cols: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.hist(cols["num_tokens"], bins=60, color="#4477aa", label="num_tokens")
    if cols["text_tokens"].size:
        ax.hist(cols["visual_tokens"], bins=60, color="#ee6677", alpha=0.6, label="visual_tokens")
    ax.set(title="tokens per sample", xlabel="tokens", ylabel="samples")
    ax.legend()
    ax = axes[1]
    if cols["image_width"].size:
        h = ax.hist2d(cols["image_width"], cols["image_height"], bins=40, cmap="viridis", cmin=1)
        fig.colorbar(h[3], ax=ax, label="images")
    ax.set(title=f"image sizes ({cols['image_width'].size} images)", xlabel="width", ylabel="height")
    ax = axes[2]
    if cols["video_duration"].size:
        ax.hist(cols["video_duration"], bins=40, color="#228833")
    ax.set(title=f"video durations ({cols['video_duration'].size} videos)", xlabel="seconds", ylabel="videos")
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def stats(counted: str, output_dir: str) -> dict:
    """Write ``summary.txt``, ``summary.json`` and ``stats.png`` into ``output_dir``; return the summary, with
    ``"png"``: the PNG's path, or None when matplotlib is not installed (the text is written anyway)."""
    if not os.path.isfile(counted):
        raise InvalidOptionError(f"counted file {counted} does not exist")
    names = ("summary.json", "summary.txt", "stats.png")
    refuse_overwriting([counted], [os.path.join(output_dir, name) for name in names])
    check_output_dir(output_dir)
    cols = _collect(counted)
    if not len(cols["num_tokens"]):
        raise InvalidOptionError(f"{counted} holds no counted samples: nothing to describe")
    summary = {"counted_by": counted_by(counted), **summarize(cols)}
    with atomic_writer(os.path.join(output_dir, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode() + b"\n")
    with atomic_writer(os.path.join(output_dir, "summary.txt")) as f:
        f.write(to_text(summary).encode())
    png: Any = os.path.join(output_dir, "stats.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png = None
    else:
        _plot(cols, png)
    return {**summary, "png": png}
