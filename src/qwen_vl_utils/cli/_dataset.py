"""``qwen-vl-utils dataset check|count|pack|stats``: argparse wiring over :mod:`qwen_vl_utils.dataset`.

Exit codes: 0 every sample fine; 1 some samples had problems (check, count; a sample whose worker process
died is one, ``crashed``), were too long (pack), or the PNG could not be drawn (stats: matplotlib missing), the
rest of the output being complete; 2 a usage error (bad flags, a missing data file, a tokenizer folder that
does not load, outputs written with other settings, worker processes that cannot start).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ._common import EXIT_OK, EXIT_SOURCE_FAILED, EXIT_USAGE

__all__ = ["add_dataset_parser"]

EXIT_PROBLEMS = EXIT_SOURCE_FAILED  # 1: some samples failed, the rest of the output is complete

_ELEMENT_FLAGS = (
    ("--image-min-pixels", int, "image min_pixels (qwen-vl-finetune: min_pixels)"),
    ("--image-max-pixels", int, "image max_pixels (qwen-vl-finetune: max_pixels)"),
    ("--video-min-pixels", int, "video min_pixels per frame (qwen-vl-finetune: video_min_pixels)"),
    ("--video-max-pixels", int, "video max_pixels per frame (qwen-vl-finetune: video_max_pixels)"),
    ("--video-total-pixels", int, "video total_pixels"),
    ("--fps", float, "video fps (qwen-vl-finetune: video_fps, or 1/base_interval)"),
    ("--min-frames", int, "video min_frames (qwen-vl-finetune: video_min_frames)"),
    ("--max-frames", int, "video max_frames (qwen-vl-finetune: video_max_frames)"),
)


def _sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="qwen-vl-finetune JSON/JSONL, or JSONL of {'messages': [...]}")
    p.add_argument("--media-root", help="folder relative media paths are resolved against (default: DATA's folder)")
    p.add_argument(
        "--patch-size", type=int, choices=(14, 16), help="14: Qwen2.5-VL (default), 16: Qwen3-VL; --model sets it"
    )
    p.add_argument(
        "--rules",
        metavar="TRAINER",
        help="count as this trainer preprocesses: qwen-vl-utils (default), qwen-vl-finetune, "
        "qwen-vl-finetune-legacy, llamafactory, ms-swift (see: dataset rules)",
    )
    p.add_argument(
        "--trainer-args",
        metavar="JSON|FILE",
        help="--rules: the trainer's own arguments, a JSON object or a JSON/YAML file (a LLaMA-Factory training "
        "YAML; ms-swift: its environment variables)",
    )
    p.add_argument(
        "--model", choices=("qwen2.5-vl", "qwen3-vl"), help="--rules: the checkpoint's processor configs (built in)"
    )
    p.add_argument("--processor", metavar="DIR", help="--rules: a local model folder's processor configs instead")
    p.add_argument(
        "--audio-model",
        choices=("qwen2.5-omni", "qwen3-omni"),
        default="qwen2.5-omni",
        help="whose audio tokens audio media (<audio> tags, audio elements) count (default qwen2.5-omni)",
    )
    for flag, kind, text in _ELEMENT_FLAGS:
        p.add_argument(flag, type=kind, help=text + "; a sample's own element keys win")
    p.add_argument("--deep", action="store_true", help="decode every medium fully instead of headers and probes")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local process pool, or Ray Data")
    p.add_argument("--address", help="--engine ray: the cluster (auto, ray://host:10001, or host:6379)")
    p.add_argument("--jobs", type=int, help="--engine local: worker processes (default: usable cores)")
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming the outputs")
    p.add_argument(
        "--sample-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds one sample may take before it is reported as timeout and the run goes on (0: no limit)",
    )
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="read media paths outside --media-root (absolute paths elsewhere, ../, links out); default: outside_root",
    )


def _options(args: argparse.Namespace) -> dict:
    keys = ("media_root", "patch_size", "deep", "engine", "address", "jobs", "overwrite", "allow_outside_root")
    keys += ("sample_timeout", "rules", "trainer_args", "model", "processor", "audio_model")
    keys += tuple(flag[2:].replace("-", "_") for flag, _, _ in _ELEMENT_FLAGS)
    return {k: getattr(args, k) for k in keys} | {"progress": not args.quiet}


def _guard(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        from .._errors import InvalidOptionError

        try:
            return run(args)
        except InvalidOptionError as exc:
            if args.debug:
                raise
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return wrapped


def _notes(summary: Any) -> None:
    for note in getattr(summary, "notes", ()):
        print(f"note: {note}", file=sys.stderr)


def cmd_rules(args: argparse.Namespace) -> int:
    from ..dataset._rules import describe_rule_sets

    print(describe_rule_sets(), end="")
    return EXIT_OK


@_guard
def cmd_check(args: argparse.Namespace) -> int:
    from ..dataset import check

    summary = check(args.data, args.output, **_options(args))
    print(summary.describe())
    _notes(summary)
    print(f"valid: {summary.outputs['valid']}\nproblems: {summary.outputs['problems']}")
    return summary.exit_code


@_guard
def cmd_count(args: argparse.Namespace) -> int:
    from ..dataset import count

    if args.tokenizer is None:
        print("note: no --tokenizer: num_tokens counts the visual tokens only", file=sys.stderr)
    summary = count(args.data, args.output, problems=args.problems, tokenizer=args.tokenizer, **_options(args))
    print(summary.describe())
    _notes(summary)
    print(f"counted: {summary.outputs['valid']}\nproblems: {summary.outputs['problems']}")
    return summary.exit_code


@_guard
def cmd_filter(args: argparse.Namespace) -> int:
    from ..dataset import filter_dataset

    drop = None if args.drop in (None, "all") else [c.strip() for c in args.drop.split(",") if c.strip()]
    summary = filter_dataset(
        args.data,
        args.output,
        max_len=args.max_len,
        drop=drop,
        visual_only=args.visual_only,
        tokenizer=args.tokenizer,
        **_options(args),
    )
    print(summary.describe())
    _notes(summary)
    print(f"clean: {summary.outputs['clean']}\ncounts: {summary.outputs['counts']}")
    return summary.exit_code


@_guard
def cmd_pack(args: argparse.Namespace) -> int:
    from ..dataset import pack

    summary = pack(args.counted, args.output, args.max_len, problems=args.problems, visual_only=args.visual_only)
    print(summary.describe())
    return summary.exit_code


@_guard
def cmd_stats(args: argparse.Namespace) -> int:
    from ..dataset._stats import INSTALL_HINT, stats, to_text

    summary = stats(args.counted, args.output)
    print(to_text(summary), end="")
    if summary["png"] is None:
        print(f"error: the histograms need matplotlib: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"histograms: {summary['png']}")
    return EXIT_OK


def add_dataset_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``dataset`` and its subcommands to the main parser's subparsers."""
    text = "check, count, pack and describe a fine-tuning set"
    ds = sub.add_parser("dataset", help=text, description=text[0].upper() + text[1:] + ".")
    dsub = ds.add_subparsers(dest="dataset_command", required=True)

    def command(name: str, text: str, func: Callable) -> argparse.ArgumentParser:
        cmd = dsub.add_parser(name, parents=[common], help=text, description=text[0].upper() + text[1:] + ".")
        cmd.set_defaults(func=func)
        return cmd

    check = command("check", "write valid.jsonl and problems.jsonl", cmd_check)
    _sample_flags(check)
    check.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the outputs")
    count = command("count", "count each valid sample's tokens", cmd_count)
    _sample_flags(count)
    count.add_argument("-o", "--output", required=True, metavar="OUT.jsonl", help="the counted samples (JSONL)")
    count.add_argument("--problems", metavar="PATH", help="default: OUT's stem + .problems.jsonl")
    count.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder (text_tokens)")
    pack = command("pack", "pack counted samples into groups of at most --max-len tokens", cmd_pack)
    pack.add_argument("counted", metavar="COUNTED", help="the output of dataset count")
    pack.add_argument("--max-len", type=int, required=True, metavar="N", help="tokens per group, at most")
    pack.add_argument("-o", "--output", required=True, metavar="OUT.json", help="the groups (qwen-vl-finetune's)")
    pack.add_argument("--problems", metavar="PATH", help="too long samples (default: OUT's stem + .problems.jsonl)")
    pack.add_argument(
        "--visual-only",
        action="store_true",
        help="pack counts made without --tokenizer (by visual tokens alone; refused otherwise)",
    )
    filt = command("filter", "write the clean set, in the input's format", cmd_filter)
    _sample_flags(filt)
    filt.add_argument("-o", "--output", required=True, metavar="CLEAN", help="the clean set (JSONL, or JSON as DATA)")
    filt.add_argument("--max-len", type=int, metavar="N", help="drop samples of more tokens (too_long)")
    filt.add_argument(
        "--drop",
        metavar="CODES",
        help="problem codes to drop, comma-separated (default: all; samples with other problems are kept)",
    )
    filt.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder (text_tokens)")
    filt.add_argument(
        "--visual-only", action="store_true", help="with --max-len and no --tokenizer: filter by visual tokens alone"
    )
    command("rules", "the trainers --rules can count for: their arguments, defaults and sources", cmd_rules)
    stats = command("stats", "histograms and a summary of a counted set", cmd_stats)
    stats.add_argument("counted", metavar="COUNTED", help="the output of dataset count")
    stats.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the summary and stats.png")
