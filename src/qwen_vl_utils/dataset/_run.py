"""``check`` and ``count``: stream the data file through an engine into resumable outputs."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .._errors import InvalidOptionError
from .._progress import Progress
from ..sources._policy import FetchPolicy, get_fetch_policy
from ._engines import local_engine, ray_engine
from ._output import JsonlOutput, check_settings
from ._records import count_records, detect_format, iter_records
from ._samples import Settings
from ._work import load_text_counter

__all__ = ["RunSummary", "check", "count", "make_settings", "sibling"]


@dataclass
class RunSummary:
    """What a run left in its outputs (resumed records included)."""

    valid: int
    problems: dict  # code -> samples whose first problem has that code
    resumed: int  # records that were already in the outputs before this run
    seconds: float
    outputs: dict = field(default_factory=dict)

    @property
    def records(self) -> int:
        return self.valid + sum(self.problems.values())

    @property
    def exit_code(self) -> int:
        """0 when every sample is valid, 1 when some had problems."""
        return 1 if self.problems else 0

    def describe(self) -> str:
        codes = ", ".join(f"{n} {code}" for code, n in sorted(self.problems.items(), key=lambda kv: -kv[1]))
        text = f"{self.records} samples: {self.valid} valid, {sum(self.problems.values())} with problems"
        text += f" ({codes})" if codes else ""
        if self.resumed:
            text += f"; {self.resumed} were already done by an earlier run"
        return text + f" [{self.seconds:.1f} s]"


def sibling(path: str, suffix: str) -> str:
    """``out.jsonl`` -> ``out.<suffix>``."""
    stem = path[: -len(".jsonl")] if path.endswith(".jsonl") else path
    return f"{stem}.{suffix}"


def make_settings(
    data: str,
    *,
    media_root: Optional[str] = None,
    patch_size: int = 14,
    image_min_pixels: Optional[int] = None,
    image_max_pixels: Optional[int] = None,
    video_min_pixels: Optional[int] = None,
    video_max_pixels: Optional[int] = None,
    video_total_pixels: Optional[int] = None,
    fps: Optional[float] = None,
    min_frames: Optional[int] = None,
    max_frames: Optional[int] = None,
    tokenizer: Optional[str] = None,
    deep: bool = False,
    policy: Optional[FetchPolicy] = None,
) -> Settings:
    """Settings from keyword arguments named after the CLI flags (each becomes the element key it names)."""
    image = {"min_pixels": image_min_pixels, "max_pixels": image_max_pixels}
    video = {
        "min_pixels": video_min_pixels,
        "max_pixels": video_max_pixels,
        "total_pixels": video_total_pixels,
        "fps": fps,
        "min_frames": min_frames,
        "max_frames": max_frames,
    }
    root = media_root if media_root is not None else os.path.dirname(os.path.abspath(data))
    return Settings(
        media_root=os.path.abspath(root),
        patch_size=patch_size,
        image_keys={k: v for k, v in image.items() if v is not None},
        video_keys={k: v for k, v in video.items() if v is not None},
        tokenizer=os.path.abspath(tokenizer) if tokenizer else None,
        deep=deep,
        policy=get_fetch_policy(policy),  # the caller's policy travels to every worker, wherever it runs
    )


def check(data: str, output_dir: str, **options: Any) -> RunSummary:
    """Validate every sample of ``data``: ``output_dir/valid.jsonl`` gets the valid samples (plus ``index``),
    ``output_dir/problems.jsonl`` one record per invalid sample (``index``, ``problem``, ``message``,
    ``problems``). Options: those of :func:`make_settings` (``deep=True`` decodes fully) and of :func:`count`'s
    engine (``engine``, ``address``, ``jobs``, ``overwrite``, ``progress``)."""
    outputs = {
        "valid": os.path.join(output_dir, "valid.jsonl"),
        "problems": os.path.join(output_dir, "problems.jsonl"),
        "settings": os.path.join(output_dir, "settings.json"),
    }
    return _run("check", data, outputs, **options)


def count(data: str, output: str, problems: Optional[str] = None, **options: Any) -> RunSummary:
    """Count the tokens of every valid sample of ``data`` into ``output`` (JSONL, input order): each record
    gains ``index``, ``visual_tokens``, ``text_tokens`` (with ``tokenizer=``), ``num_tokens`` and
    ``media_info``. Invalid samples go to ``problems`` (default ``<output stem>.problems.jsonl``)."""
    outputs = {
        "valid": output,
        "problems": problems or sibling(output, "problems.jsonl"),
        "settings": sibling(output, "settings.json"),
    }
    return _run("count", data, outputs, **options)


def _run(
    mode: str,
    data: str,
    outputs: dict,
    *,
    engine: str = "local",
    address: Optional[str] = None,
    jobs: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = False,
    **options: Any,
) -> RunSummary:
    started = time.monotonic()
    if engine not in ("local", "ray"):
        raise InvalidOptionError(f"engine must be 'local' or 'ray', got {engine!r}")
    fmt = detect_format(data)
    if engine == "ray" and fmt != "jsonl":
        raise InvalidOptionError(
            f"--engine ray reads JSONL, and {data} is a JSON array: convert it first "
            f"(jq -c '.[]' {data} > data.jsonl) or use --engine local"
        )
    settings = make_settings(data, **options)
    if mode == "count":
        load_text_counter(settings.tokenizer)  # a bad tokenizer folder fails here, before any work starts
    wanted = {"command": mode, "data": os.path.abspath(data), "settings": settings.fingerprint()}
    check_settings(outputs["settings"], wanted, [outputs["valid"], outputs["problems"]], overwrite)
    with JsonlOutput(outputs["valid"], overwrite) as valid, JsonlOutput(outputs["problems"], overwrite) as bad:
        start = max(valid.last_index, bad.last_index) + 1
        resumed = valid.lines + bad.lines
        _stream(mode, data, fmt, start, settings, engine, address, jobs, progress, valid, bad)
    problems = _problem_codes(outputs["problems"])
    return RunSummary(valid.lines, problems, resumed, time.monotonic() - started, outputs)


def _stream(
    mode: str,
    data: str,
    fmt: str,
    start: int,
    settings: Settings,
    engine: str,
    address: Optional[str],
    jobs: Optional[int],
    progress: bool,
    valid: JsonlOutput,
    bad: JsonlOutput,
) -> None:
    bar = Progress(progress, unit="sample")
    # the bar's total: a JSONL file's records, counted once a bar shows; a JSON array has none (count and rate)
    total = (lambda: count_records(data, start)) if fmt == "jsonl" else None
    if engine == "ray":
        batches = ray_engine(data, start, settings, mode, address)
    else:
        batches = local_engine(iter_records(data, start, fmt), settings, mode, jobs)
    done = 0
    try:
        for batch in batches:
            _write_in_order(batch, valid, bad)
            done += len(batch)
            bar.update(done, total)
    finally:
        bar.close()


def _write_in_order(batch: list, valid: JsonlOutput, bad: JsonlOutput) -> None:
    """Runs of lines bound for the same file go out in one write each, in input order across both files."""
    run: list = []
    target = None
    for _, kind, line in batch:
        out = valid if kind == "valid" else bad
        if out is not target and run:
            target.write(run)
            run = []
        target = out
        run.append(line)
    if run:
        target.write(run)


def _problem_codes(path: str) -> dict:
    codes: dict = {}
    with open(path, "rb") as f:
        for line in f:
            code = json.loads(line)["problem"]
            codes[code] = codes.get(code, 0) + 1
    return codes
