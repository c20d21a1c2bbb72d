"""``qwen-vl-utils`` / ``python -m qwen_vl_utils``: see what the model will receive before running it.

Every number comes from the library's own functions; the flags become element keys in one place
(:func:`~qwen_vl_utils.cli._common.element_from_args`), so the CLI has no second implementation of sampling or
resizing.

Exit codes: 0 success, 1 when a source failed (the others are still reported), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import Callable, Optional

from .._version import __version__
from ._common import EXIT_OK, add_element_flags
from ._dataset import add_dataset_parser
from ._inspect import cmd_demo, cmd_inspect, cmd_preview
from ._stream import add_stream_parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-vl-utils", description="See what a Qwen-VL model receives.")
    p.add_argument("--version", action="version", version=f"qwen-vl-utils {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_argument("--debug", action="store_true", help="print tracebacks")

    def command(name: str, text: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=text, description=text[0].upper() + text[1:] + ".")
        cmd.set_defaults(func=func)
        return cmd

    ins = command("inspect", "what the model receives from each source", cmd_inspect)
    ins.add_argument("sources", nargs="+", metavar="SOURCE", help="path, file://, http(s)://, or data: URI")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    add_element_flags(ins)
    pre = command("preview", "a contact sheet of the sampled frames", cmd_preview)
    pre.add_argument("source", metavar="SOURCE")
    pre.add_argument("-o", "--output", required=True, help="PNG file to write")
    add_element_flags(pre)
    add_element_flags(command("demo", "inspect and preview a generated sample", cmd_demo))
    add_dataset_parser(sub, common)  # dataset check|count|pack|stats
    add_stream_parser(sub, common)  # stream SOURCE: chunks as they are decoded
    return p


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a usage error
    if getattr(args, "resized_height", None) is not None and getattr(args, "resized_width", None) is None:
        parser.error("--resized-height needs --resized-width")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = " (run the same command again to resume)" if getattr(args, "command", None) == "dataset" else ""
        with contextlib.suppress(OSError, ValueError):
            print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (| head): a quiet end, not an error
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        sys.stderr = io.StringIO()
        return EXIT_OK
