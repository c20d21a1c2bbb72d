"""Outputs that survive being killed: JSONL appended a whole line per ``write(2)``, in input order.

A kill (even SIGKILL) between two writes leaves only complete lines; a write cut short by a crash of the
machine can leave a torn last line, which opening the file again drops. Because every line goes out in input
order, whichever file it belongs to, everything up to the highest ``index`` found in the outputs is done, and
a re-run starts after it. Whole-file outputs (pack, stats) are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Optional

from .._errors import InvalidOptionError

__all__ = [
    "INDEX_OF_OWN",
    "JsonlOutput",
    "atomic_writer",
    "check_output_dir",
    "check_output_file",
    "check_settings",
    "record_index",
    "refuse_overwriting",
]

#: where a run writes a sample's index when the sample has an ``index`` field of its own (kept as it is)
INDEX_OF_OWN = "qwen_vl_index"


def record_index(record: dict) -> int:
    """The run's index of an output record: ``qwen_vl_index`` where the sample brought its own ``index``."""
    return int(record[INDEX_OF_OWN] if INDEX_OF_OWN in record else record["index"])


_TAIL = 1 << 16


class JsonlOutput:
    """An append-only JSONL file of records that carry an ``index``."""

    def __init__(self, path: str, overwrite: bool = False) -> None:
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if overwrite else 0)
        try:
            self.fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise InvalidOptionError(f"cannot write {path}: {exc.strerror}") from exc
        self.lines, self.last_index = _repair(path)

    def write(self, lines: list) -> None:
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.lines += len(lines)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> JsonlOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _repair(path: str) -> tuple[int, int]:
    """Drop a torn last line; return (complete lines, the last line's ``index`` or -1)."""
    size = os.path.getsize(path)
    with open(path, "rb+") as f:
        end = _rfind_newline(f, size) + 1  # just after the last complete line
        if end != size:
            f.truncate(end)
        if end == 0:
            return 0, -1
        start = _rfind_newline(f, end - 1) + 1
        f.seek(start)
        last = f.read(end - start)
        lines = _count_lines(f, end)
    try:
        index = record_index(json.loads(last))
    except (ValueError, KeyError, TypeError):
        raise InvalidOptionError(
            f"{path} is not an output of this tool (its last line has no 'index'); give another output path"
        ) from None
    return lines, index


def _rfind_newline(f: Any, end: int) -> int:
    """The offset of the last newline before ``end``, or -1."""
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL)
        f.seek(start)
        cut = f.read(pos - start).rfind(b"\n")
        if cut >= 0:
            return start + cut
        pos = start
    return -1


def _count_lines(f: Any, size: int) -> int:
    f.seek(0)
    n = 0
    while True:
        block = f.read(1 << 22)
        if not block:
            return n
        n += block.count(b"\n")


def refuse_overwriting(inputs: list, outputs: list) -> None:
    """An output that is an input (the same file, by inode: ``count d.jsonl -o d.jsonl --overwrite``, checking
    ``valid.jsonl`` into its own folder) would be truncated before it is read: refused."""
    for out in outputs:
        for inp in inputs:
            if os.path.exists(out) and os.path.exists(inp) and os.path.samefile(out, inp):
                raise InvalidOptionError(
                    f"the output {out} is the input {inp}: it would be overwritten before it is read; "
                    "write to another path"
                )


def check_output_file(path: str) -> None:
    """A file output that can be written: not a folder, its folder a folder (made if missing); else a usage error
    now, not after the work (exit 2, one line)."""
    if os.path.isdir(path):
        raise InvalidOptionError(f"cannot write {path}: it is a folder; give a file path")
    check_output_dir(os.path.dirname(os.path.abspath(path)))


def check_output_dir(path: str) -> None:
    """A folder output that can be written into (made if missing); else a usage error now."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise InvalidOptionError(f"cannot write into {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise InvalidOptionError(f"cannot write into {path}: permission denied")


def check_settings(path: str, wanted: dict, outputs: list, overwrite: bool) -> None:
    """Refuse to resume outputs made with other settings; record the settings of a new run."""
    has_output = any(os.path.exists(p) and os.path.getsize(p) > 0 for p in outputs)
    if has_output and not overwrite and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                found = json.load(f)
            except ValueError:
                found = None
        if found != wanted:
            raise InvalidOptionError(
                f"{outputs[0]} was written with other settings (see {path}); resuming would mix them. "
                "Pass --overwrite to start again, or choose another output"
            )
    elif has_output and not overwrite:
        raise InvalidOptionError(
            f"{outputs[0]} exists and has no {os.path.basename(path)}: it was not written by this command. "
            "Pass --overwrite to replace it, or choose another output"
        )
    with atomic_writer(path) as f:
        f.write(json.dumps(wanted, indent=2, sort_keys=True).encode() + b"\n")


@contextlib.contextmanager
def atomic_writer(path: str, tmp: Optional[str] = None) -> Any:
    """A binary file that replaces ``path`` only when the block completes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
