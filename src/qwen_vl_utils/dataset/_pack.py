"""``pack``: best-fit-decreasing bin packing of counted samples into groups of at most ``max_len`` tokens.

The whole set is packed at once (not in batches of 256, as qwen-vl-finetune's ``pack_data.py`` does). Only
``(index, num_tokens, byte offset)`` of each sample is held in memory; the groups are then written by reading
each sample's line back from the counted file, so the output is the samples exactly as counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from array import array
from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from .._errors import InvalidOptionError
from ._output import atomic_writer, check_output_file, record_index, refuse_overwriting

__all__ = ["PackSummary", "best_fit_decreasing", "pack"]


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list:
    """Groups (lists of positions into ``sizes``) whose sizes sum to at most ``capacity``.

    Items go in decreasing size (ties by position, so the result is deterministic), each into the open group
    with the least room that still fits it, else a new group. Open groups are kept by remaining room: a
    sorted list of the distinct room values (at most ``capacity`` of them) and a stack of groups per value,
    so each item costs one bisection: O(n log n) in all. Every size must be at most ``capacity``.
    """
    # decreasing size, ties by position (a stable sort of the negated sizes): deterministic, and 16 bytes a sample
    order = np.argsort(-np.asarray(sizes, dtype=np.int64), kind="stable").tolist()
    if order and sizes[order[0]] > capacity:
        raise InvalidOptionError(f"an item of size {sizes[order[0]]} does not fit a capacity of {capacity}")
    smallest = sizes[order[-1]] if order else 0
    rooms: list = []  # sorted distinct remaining room of open groups
    groups_by_room: dict = {}
    groups: list = []
    for i in order:
        size = sizes[i]
        k = bisect_left(rooms, size)
        if k < len(rooms):
            room = rooms[k]
            stack = groups_by_room[room]
            g = stack.pop()
            if not stack:
                del groups_by_room[room]
                del rooms[k]
        else:
            room, g = capacity, len(groups)
            groups.append([])
        groups[g].append(i)
        left = room - size
        if left >= max(smallest, 1):  # room nothing left to place could use is closed for good
            stack = groups_by_room.get(left)
            if stack is None:
                groups_by_room[left] = [g]
                insort(rooms, left)
            else:
                stack.append(g)
    return groups


@dataclass
class PackSummary:
    groups: int
    samples: int  # packed
    too_long: int
    malformed: int
    tokens: int  # packed
    max_len: int
    seconds: float
    not_convertible: int = 0  # chat samples qwen-vl-finetune's format cannot hold

    @property
    def fill(self) -> float:
        """Packed tokens over the room of all groups."""
        return self.tokens / (self.groups * self.max_len) if self.groups else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.too_long or self.malformed or self.not_convertible else 0

    def describe(self) -> str:
        text = (
            f"packed {self.samples} samples into {self.groups} groups of at most {self.max_len} tokens: "
            f"fill {self.fill:.2%}"
        )
        if self.too_long:
            text += f"; {self.too_long} samples longer than {self.max_len} left out"
        if self.malformed:
            text += f"; {self.malformed} records without a valid num_tokens left out"
        if self.not_convertible:
            text += f"; {self.not_convertible} chat samples qwen-vl-finetune's format cannot hold left out"
        return text + f" [{self.seconds:.1f} s]"


def finetune_form(record: dict) -> dict:
    """A chat-format sample (``messages``) in qwen-vl-finetune's own format, which its trainer reads: ``image``
    and ``video`` lists, ``conversations`` of ``human``/``gpt`` turns with an ``<image>``/``<video>`` tag where
    each medium stood; the other fields kept. Element keys (``max_pixels``, ``fps``...) have no place there and
    are left out (the trainer's own arguments decide). ValueError for what it cannot hold: a system turn (its
    loader makes every turn that is not the human's an assistant turn), media in an assistant turn, text that
    already holds a tag."""
    from ._samples import _ASSISTANT_ROLES, _USER_ROLES, _chat_kind

    images, videos, turns = [], [], []
    for n, msg in enumerate(record["messages"]):
        role, content = msg.get("role"), msg.get("content")
        if role in _USER_ROLES:
            frm = "human"
        elif role in _ASSISTANT_ROLES:
            frm = "gpt"
        else:
            raise ValueError(f"message {n} is a {role} turn, which qwen-vl-finetune reads as an assistant turn")
        parts = []
        for ele in content if isinstance(content, list) else [{"type": "text", "text": content or ""}]:
            kind = _chat_kind(ele)
            if kind is None:
                text = str(ele.get("text", "")) if isinstance(ele, dict) else ""
                if "<image>" in text or "<video>" in text:
                    raise ValueError(f"message {n}'s text holds an <image> or <video> tag of its own")
                parts.append(text)
                continue
            if frm != "human":
                raise ValueError(f"message {n} is an assistant turn with a {kind}")
            source = ele.get("video") if kind == "video" else ele.get("image", ele.get("image_url"))
            source = source.get("url") if isinstance(source, dict) else source
            if not isinstance(source, str) or source.startswith("data:"):
                raise ValueError(f"message {n}: a {kind} that is not a file path (a frame list, inline data)")
            window = [k for k in ("video_start", "video_end") if ele.get(k) is not None]
            if window:
                raise ValueError(f"message {n}: a video window ({', '.join(window)}) the format cannot say")
            (videos if kind == "video" else images).append(source)
            parts.append(f"<{kind}>")
        turns.append({"from": frm, "value": "\n".join(p for p in parts if p)})
    out = {k: v for k, v in record.items() if k != "messages"}
    if images:
        out["image"] = images if len(images) > 1 else images[0]
    if videos:
        out["video"] = videos if len(videos) > 1 else videos[0]
    out["conversations"] = turns
    return out


def _scan(path: str, max_len: int, problems: list) -> tuple:
    """(offsets, lengths, tokens, samples without text tokens, chat samples in qwen-vl-finetune's format by
    offset) of the packable lines; the others become problem records."""
    offsets, lengths, tokens = array("q"), array("q"), array("q")
    converted: dict = {}
    offset = textless = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f):
            try:
                record = json.loads(line)
                index = record_index(record) if "index" in record else n
                size = record["num_tokens"]
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise TypeError(f"num_tokens must be a non-negative integer, got {size!r}")
                textless += "text_tokens" not in record
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if line.strip():
                    problems.append({"line": n, "problem": "malformed", "message": f"not a counted sample ({exc})"})
                offset += len(line)
                continue
            if "messages" in record and size <= max_len:
                try:
                    converted[offset] = json.dumps(finetune_form(record), ensure_ascii=False).encode()
                except (ValueError, TypeError, AttributeError) as exc:
                    message = f"a chat sample qwen-vl-finetune cannot read: {exc}"
                    problems.append({"index": index, "problem": "not_convertible", "message": message})
                    offset += len(line)
                    continue
            if size > max_len:
                message = f"{size} tokens, over --max-len {max_len}"
                problems.append({"index": index, "problem": "too_long", "message": message, "num_tokens": size})
            else:
                offsets.append(offset)
                lengths.append(len(line.rstrip(b"\r\n")))
                tokens.append(size)
            offset += len(line)
    return offsets, lengths, tokens, textless, converted


def pack(
    counted: str, output: str, max_len: int, problems: Optional[str] = None, visual_only: bool = False
) -> PackSummary:
    """Pack the samples of ``counted`` (a :func:`count` output) into ``output``: a JSON list of groups, each a
    list of samples, as qwen-vl-finetune's packed data. Samples over ``max_len`` go to ``problems`` (default
    ``<output stem>.problems.jsonl``) with code ``too_long``. Both files are replaced atomically."""
    started = time.monotonic()
    if not isinstance(max_len, int) or max_len <= 0:
        raise InvalidOptionError(f"max_len must be a positive number of tokens, got {max_len!r}")
    if not os.path.isfile(counted):
        raise InvalidOptionError(f"counted file {counted} does not exist")
    stem = output[: -len(".json")] if output.endswith(".json") else output
    problems = problems or f"{stem}.problems.jsonl"
    refuse_overwriting([counted], [output, problems])
    check_output_file(output)
    check_output_file(problems)
    with _as_jsonl(counted) as counted:
        return _pack(counted, output, max_len, problems, visual_only, started)


@contextlib.contextmanager
def _as_jsonl(counted: str) -> Iterator[str]:
    """The counted samples as JSONL: the file itself, or a JSON array (as qwen-vl-finetune's tools write
    them) streamed into a temporary JSONL beside nothing else."""
    from ._records import detect_format, iter_records

    if detect_format(counted) == "jsonl":
        yield counted
        return
    fd, path = tempfile.mkstemp(suffix=".jsonl", prefix="counted-")
    try:
        with os.fdopen(fd, "wb") as out:
            for record in iter_records(counted, 0, "json"):
                if record.raw is None:
                    raise InvalidOptionError(f"{counted}: {record.error}")
                out.write(b" ".join(record.raw.splitlines()) + b"\n")
        yield path
    finally:
        os.unlink(path)


def _pack(counted: str, output: str, max_len: int, problems: str, visual_only: bool, started: float) -> PackSummary:
    problem_records: list = []
    offsets, lengths, tokens, textless, converted = _scan(counted, max_len, problem_records)
    if textless and not visual_only:
        raise InvalidOptionError(
            f"{textless} samples of {counted} have no text_tokens (counted without --tokenizer): their num_tokens "
            "are visual tokens only, and text-only samples would pack as 0 tokens. Count with --tokenizer, or "
            "pass --visual-only to pack by visual tokens anyway"
        )
    groups = best_fit_decreasing(tokens, max_len)
    with open(counted, "rb") as src, atomic_writer(output) as out:
        out.write(b"[\n")
        for g, group in enumerate(groups):
            out.write(b",\n" if g else b"")
            lines = (converted.get(offsets[i]) or _line(src, offsets[i], lengths[i]) for i in group)
            out.write(b"[" + b",".join(lines) + b"]")
        out.write(b"\n]\n")
    with atomic_writer(problems) as f:
        f.writelines(json.dumps(p).encode() + b"\n" for p in problem_records)
    return PackSummary(
        groups=len(groups),
        samples=len(tokens),
        too_long=sum(p["problem"] == "too_long" for p in problem_records),
        malformed=sum(p["problem"] == "malformed" for p in problem_records),
        not_convertible=sum(p["problem"] == "not_convertible" for p in problem_records),
        tokens=sum(tokens),
        max_len=max_len,
        seconds=time.monotonic() - started,
    )


def _line(f: object, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)
