"""``qwen-vl-utils stream SOURCE``: one line per chunk of :func:`~qwen_vl_utils.stream.stream_video`, as it
arrives. ``SOURCE`` ``-`` reads standard input (``ffmpeg ... -f mpegts - | qwen-vl-utils stream -``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .._errors import InvalidOptionError, QwenVLError
from ._common import EXIT_OK, EXIT_SOURCE_FAILED, EXIT_USAGE, add_element_flags, element_from_args, error_line


def add_stream_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    text = "chunks of a long or live video, one line each as it is decoded"
    cmd = sub.add_parser("stream", help=text, description=text[0].upper() + text[1:] + ".")  # (no progress bar)
    cmd.set_defaults(func=cmd_stream)
    cmd.add_argument(
        "source",
        metavar="SOURCE",
        help="path, URL, HLS playlist URL, udp://HOST:PORT, rtsp/rtmp/srt URL, or - for standard input",
    )
    cmd.add_argument("--chunk", type=float, default=1.0, help="seconds per chunk (default 1.0)")
    cmd.add_argument("--json", action="store_true", help="one JSON object per line")
    cmd.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="SCHEME",
        help="also allow this URL scheme (udp: live MPEG-TS datagrams; a store such as s3); repeatable",
    )
    cmd.add_argument("--read-timeout", type=float, metavar="S", help="seconds a live source may stay silent")
    cmd.add_argument(
        "--on-lag",
        choices=("block", "drop"),
        default="block",
        help="a live source outpacing the reader: hold it back (block, default) or drop the oldest chunks (drop)",
    )
    cmd.add_argument("--audio", action="store_true", help="decode each chunk's sound too (16 kHz mono, for Qwen-Omni)")
    cmd.add_argument("--debug", action="store_true", help="print tracebacks")
    add_element_flags(cmd, stream=True)  # only the element keys a stream uses


def cmd_stream(args: argparse.Namespace) -> int:
    from ..sources._policy import get_fetch_policy
    from ..stream import stream_video

    source: Any = sys.stdin.buffer if args.source == "-" else args.source
    ele = element_from_args(args, "video", source)
    try:
        policy = get_fetch_policy()
        changes: dict = {}
        if args.allow:
            schemes = [s.strip().lower().rstrip(":/") for s in args.allow]
            changes["allowed_schemes"] = tuple(dict.fromkeys([*policy.allowed_schemes, *schemes]))
        if args.read_timeout is not None:
            changes["read_timeout"] = args.read_timeout
        policy = policy.replace(**changes) if changes else policy
    except (QwenVLError, ValueError) as exc:  # a bad --read-timeout: a usage error
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        stream = stream_video(ele, args.chunk, args.patch_size, policy=policy, on_lag=args.on_lag, audio=args.audio)
    except InvalidOptionError as exc:  # the flags cannot be honoured: a usage error
        print(error_line(args.source, exc, args.debug), file=sys.stderr)
        return EXIT_USAGE
    except (QwenVLError, ValueError) as exc:
        print(error_line(args.source, exc, args.debug), file=sys.stderr)
        return EXIT_SOURCE_FAILED
    last = time.perf_counter()
    with stream:
        try:
            for chunk in stream:
                now = time.perf_counter()
                print(_line(chunk, now - last, args.json), flush=True)
                last = now
        except BrokenPipeError:  # the reader went away (| head): a quiet end
            raise
        except (QwenVLError, OSError) as exc:
            print(error_line(args.source, exc, args.debug), file=sys.stderr)
            return EXIT_SOURCE_FAILED
    return EXIT_OK


def _line(chunk: Any, seconds: float, as_json: bool) -> str:
    meta = chunk.metadata
    if as_json:
        return json.dumps(
            {
                "index": chunk.index,
                "start": round(chunk.start, 6),
                "end": round(chunk.end, 6),
                "frames_indices": meta["frames_indices"],
                "frame_times": [round(i / meta["fps"], 6) for i in meta["frames_indices"]],
                "fps": meta["fps"],
                "total_num_frames": meta["total_num_frames"],
                "shape": list(chunk.frames.shape),
                "seconds": round(seconds, 4),
                "dropped": chunk.dropped,
                **_sound(chunk),
            }
        )
    frames = " ".join(str(i) for i in meta["frames_indices"])
    shape = "x".join(str(n) for n in chunk.frames.shape)
    dropped = f"  ({chunk.dropped} chunks dropped before it)" if chunk.dropped else ""
    window = f"{chunk.start:.2f}-{chunk.end:.2f} s"
    sound = ""
    if chunk.audio is not None:
        facts = _sound(chunk)
        sound = f"  audio {facts['audio_samples']} samples, peak {facts['audio_peak']:.3f}"
    return f"chunk {chunk.index}  {window}  frames {frames}  {shape}{sound}  {seconds:.3f} s{dropped}"


def _sound(chunk: Any) -> dict:
    """A chunk's sound in numbers: its samples (16 kHz) and its peak level; nothing without audio."""
    if chunk.audio is None:
        return {}
    peak = float(abs(chunk.audio).max()) if len(chunk.audio) else 0.0
    return {"audio_samples": len(chunk.audio), "audio_peak": round(peak, 4)}
