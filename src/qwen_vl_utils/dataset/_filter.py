"""``filter``: the clean set, in the input's own format, from a (resumable) count of it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .._errors import InvalidOptionError
from ._output import atomic_writer, record_index, refuse_overwriting
from ._records import detect_format, iter_records
from ._run import count, sibling
from ._work import PROBLEM_CODES

__all__ = ["FilterSummary", "filter_dataset"]


@dataclass
class FilterSummary:
    kept: int
    dropped: dict  # reason (a problem code, or too_long) -> samples
    seconds: float
    outputs: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0

    def describe(self) -> str:
        reasons = ", ".join(f"{n} {code}" for code, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        text = f"kept {self.kept} samples, dropped {sum(self.dropped.values())}"
        return text + (f" ({reasons})" if reasons else "") + f" [{self.seconds:.1f} s]"


def filter_dataset(
    data: str,
    output: str,
    max_len: Optional[int] = None,
    drop: Optional[list] = None,
    **options: Any,
) -> FilterSummary:
    """Write to ``output`` the samples of ``data`` that have none of the problems in ``drop`` (a list of
    problem codes; None: every code) and, with ``max_len``, at most that many tokens, each exactly as the input
    holds it (JSONL lines, or a JSON array for an array). The counts behind it go to ``<output stem>.counts.jsonl``
    (and its problems file), resumable like :func:`count`; ``options`` are :func:`count`'s (a ``tokenizer`` makes
    ``max_len`` count text too)."""
    started = time.monotonic()
    unknown = sorted(set(drop or ()) - set(PROBLEM_CODES))
    if unknown:
        codes = ", ".join(PROBLEM_CODES)
        raise InvalidOptionError(f"--drop {','.join(unknown)}: not problem codes (they are: {codes})")
    if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
        raise InvalidOptionError(f"--max-len must be a positive number of tokens, got {max_len!r}")
    fmt = detect_format(data)
    counts = sibling(output, "counts.jsonl")
    refuse_overwriting([data], [output, counts])
    counted = count(data, counts, **options)
    problems = _problem_codes(counted.outputs["problems"])
    tokens = _tokens(counts)
    dropped: dict = {}
    kept = 0
    with atomic_writer(output) as out:
        out.write(b"[\n" if fmt == "json" else b"")
        for record in iter_records(data, 0, fmt):
            reason = "malformed" if record.raw is None else _reason(record.index, problems, tokens, drop, max_len)
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            raw = record.raw
            if fmt == "json":
                out.write((b",\n" if kept else b"") + raw)
            else:
                out.write(raw.rstrip(b"\r\n") + b"\n")
            kept += 1
        out.write(b"\n]\n" if fmt == "json" else b"")
    outputs = {"clean": output, "counts": counts, "problems": counted.outputs["problems"]}
    return FilterSummary(kept, dropped, time.monotonic() - started, outputs)


def _reason(index: int, problems: dict, tokens: dict, drop: Optional[list], max_len: Optional[int]) -> Optional[str]:
    code = problems.get(index)
    if code is not None:
        return code if drop is None or code in drop else None  # a problem not asked about: kept as it is
    if max_len is not None and tokens.get(index, 0) > max_len:
        return "too_long"
    return None


def _problem_codes(path: str) -> dict:
    out = {}
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                record = json.loads(line)
                out[record_index(record)] = record["problem"]
    return out


def _tokens(path: str) -> dict:
    out = {}
    with open(path, "rb") as f:
        for line in f:
            record = json.loads(line)
            out[record_index(record)] = record["num_tokens"]
    return out
