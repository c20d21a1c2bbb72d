"""``filter``: the clean set, in the input's own format, from a (resumable) count of it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .._errors import InvalidOptionError
from ._output import atomic_writer, check_output_file, record_index, refuse_overwriting
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
    notes: list = field(default_factory=list)  # the count's notes (rule sets)

    @property
    def exit_code(self) -> int:
        """0; 1 when the data holds no sample at all (nothing to keep is no success)."""
        return 0 if self.kept or self.dropped else 1

    def describe(self) -> str:
        reasons = ", ".join(f"{n} {code}" for code, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        text = f"kept {self.kept} samples, dropped {sum(self.dropped.values())}"
        return text + (f" ({reasons})" if reasons else "") + f" [{self.seconds:.1f} s]"


def filter_dataset(
    data: str,
    output: str,
    max_len: Optional[int] = None,
    drop: Optional[list] = None,
    visual_only: bool = False,
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
    if max_len is not None and not visual_only and not options.get("tokenizer"):
        raise InvalidOptionError(
            "--max-len without --tokenizer would filter by visual tokens alone (text would count as 0): give "
            "--tokenizer, or pass --visual-only to filter by visual tokens anyway"
        )
    if drop is not None and not drop:
        raise InvalidOptionError("--drop names no problem code (give codes, comma-separated, or leave it out: all)")
    fmt = detect_format(data)
    stem = output[: -len(".json")] if output.endswith(".json") and not output.endswith(".jsonl") else output
    counts = sibling(stem, "counts.jsonl")
    refuse_overwriting([data], [output, counts])
    check_output_file(output)
    counted = count(data, counts, **options)
    problems = _problem_codes(counted.outputs["problems"])
    tokens = _tokens(counts)
    dropped: dict = {}
    kept = 0
    with open(data, "rb") as f:
        eol = b"\r\n" if f.readline().endswith(b"\r\n") else b"\n"  # lines end as the input's do
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
                out.write(raw + eol)
            kept += 1
        out.write(b"\n]\n" if fmt == "json" else b"")
    outputs = {"clean": output, "counts": counts, "problems": counted.outputs["problems"]}
    return FilterSummary(kept, dropped, time.monotonic() - started, outputs, counted.notes)


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
