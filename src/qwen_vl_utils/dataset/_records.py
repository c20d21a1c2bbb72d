"""Reading a data file as a stream of raw records: JSONL line by line, a top-level JSON array element by element.

Nothing here holds more than one record (plus a read-ahead chunk) in memory, so a 10-million-line file streams.
Records come out as ``(index, raw, error)``: ``index`` is the 0-based line (JSONL) or array position (JSON),
``raw`` the record's text as bytes (parsed later, in the workers), ``error`` a message when the file itself
cannot be read past this point (a broken JSON array).
"""

from __future__ import annotations

import codecs
import json
import os
from typing import BinaryIO, Iterator, NamedTuple, Optional

from .._errors import InvalidOptionError

__all__ = ["RawRecord", "detect_format", "iter_records", "jsonl_chunks"]

_CHUNK = 1 << 20
#: the largest single record a JSON array may hold (a guard against reading a whole broken file as one)
MAX_RECORD_BYTES = 64 << 20
_BOM = codecs.BOM_UTF8


class RawRecord(NamedTuple):
    index: int
    raw: Optional[bytes]
    error: Optional[str] = None


def detect_format(path: str) -> str:
    """``"json"`` when the file's first non-blank character opens an array, else ``"jsonl"``."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            while head and not head.lstrip().lstrip(_BOM).lstrip():
                more = f.read(4096)
                if not more:
                    break
                head += more
    except FileNotFoundError:
        raise InvalidOptionError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidOptionError(f"data file {path} is a directory; give a .json or .jsonl file") from None
    stripped = head.lstrip()
    stripped = stripped[len(_BOM) :].lstrip() if stripped.startswith(_BOM) else stripped
    return "json" if stripped.startswith(b"[") else "jsonl"


def iter_records(
    path: str, start: int = 0, fmt: Optional[str] = None, progress: Optional[list] = None
) -> Iterator[RawRecord]:
    """Every record of the data file from index ``start`` on; blank JSONL lines are skipped (they keep their
    line number). ``progress``, when given, is a one-item list updated with the bytes read so far."""
    fmt = fmt or detect_format(path)
    with open(path, "rb") as f:
        if fmt == "jsonl":
            yield from _jsonl(f, start, progress)
        else:
            yield from _json_array(f, path, start, progress)


def _jsonl(f: BinaryIO, start: int, progress: Optional[list]) -> Iterator[RawRecord]:
    done = 0
    for index, line in enumerate(f):
        done += len(line)
        if index == 0 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if index < start:
            continue
        if progress is not None:
            progress[0] = done
        if line.strip():
            yield RawRecord(index, line.rstrip(b"\r\n"))


def count_records(path: str, start: int = 0) -> int:
    """The records of a JSONL file from index ``start`` on (its non-blank lines): one pass, no parsing."""
    with open(path, "rb") as f:
        return sum(1 for index, line in enumerate(f) if index >= start and line.strip())


def jsonl_chunks(path: str, start: int, lines: int) -> Iterator[tuple[int, int, int]]:
    """``(first index, byte offset, line count)`` for consecutive chunks of ``lines`` lines from ``start`` on:
    what a distributed reader needs to read each chunk on its own (one pass over the file, no parsing)."""
    offset = 0
    chunk_start, chunk_offset, n = start, None, 0
    with open(path, "rb") as f:
        for index, line in enumerate(f):
            if index >= start:
                if chunk_offset is None:
                    chunk_start, chunk_offset = index, offset
                n += 1
                if n == lines:
                    yield chunk_start, chunk_offset, n
                    chunk_offset, n = None, 0
            offset += len(line)
    if chunk_offset is not None and n:
        yield chunk_start, chunk_offset, n


def read_jsonl_chunk(path: str, first: int, offset: int, lines: int) -> list:
    """The non-blank records of one chunk from :func:`jsonl_chunks`, as ``(index, raw bytes)`` pairs."""
    out = []
    with open(path, "rb") as f:
        f.seek(offset)
        for k in range(lines):
            line = f.readline()
            if not line:
                break
            if first + k == 0 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            if line.strip():
                out.append((first + k, line.rstrip(b"\r\n")))
    return out


class _Chars:
    """A UTF-8 text buffer over a binary file, filled on demand, that knows how many bytes it consumed."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
        self.buf = ""
        self.pos = 0
        self.bytes_read = 0
        self.eof = False

    def fill(self) -> bool:
        """Read one more chunk; False at the end of the file."""
        if self.eof:
            return False
        data = self.f.read(_CHUNK)
        self.bytes_read += len(data)
        if not data:
            self.eof = True
            self.buf = self.buf[self.pos :] + self.decoder.decode(b"", final=True)
        else:
            self.buf = self.buf[self.pos :] + self.decoder.decode(data)
        self.pos = 0
        return True

    def skip_space(self) -> str:
        """The next non-whitespace character ('' at the end), not consumed."""
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < n:
                return self.buf[self.pos]
            if not self.fill():
                return ""


def _json_array(f: BinaryIO, path: str, start: int, progress: Optional[list]) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array, decoded one at a time with ``raw_decode`` on a sliding buffer."""
    chars = _Chars(f)
    decoder = json.JSONDecoder()
    index = 0
    try:
        chars.skip_space()
        chars.pos += 1  # the '['
        if chars.skip_space() == "]":
            return
        while True:
            text = _next_element(chars, decoder)
            if index >= start:
                if progress is not None:
                    progress[0] = chars.bytes_read
                yield RawRecord(index, text.encode("utf-8"))
            index += 1
            sep = chars.skip_space()
            chars.pos += 1
            if sep == "]":
                return
            if sep != ",":
                raise ValueError(
                    f"expected ',' or ']' after element {index - 1}, found {sep or 'the end of the file'!r}"
                )
    except (ValueError, UnicodeDecodeError) as exc:
        yield RawRecord(
            index,
            None,
            f"{os.path.basename(path)} is not a valid JSON array from here on ({exc}); "
            "records after this point cannot be read",
        )


def _next_element(chars: _Chars, decoder: json.JSONDecoder) -> str:
    chars.skip_space()
    while True:
        try:
            _, end = decoder.raw_decode(chars.buf, chars.pos)
        except json.JSONDecodeError:
            # most often the element runs past the buffer: read on, unless there is nothing more to read
            if len(chars.buf) - chars.pos > MAX_RECORD_BYTES or not chars.fill():
                raise
            continue
        if end == len(chars.buf) and not chars.eof:  # a number could go on in the next chunk
            chars.fill()
            continue
        text = chars.buf[chars.pos : end]
        chars.pos = end
        return text
