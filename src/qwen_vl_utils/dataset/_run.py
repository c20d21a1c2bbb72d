"""``check`` and ``count``: stream the data file through an engine into resumable outputs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .._errors import InvalidOptionError
from .._progress import Progress
from ..sources._policy import FetchPolicy, get_fetch_policy
from ._engines import local_engine, ray_engine
from ._output import INDEX_OF_OWN, JsonlOutput, check_output_file, check_settings, record_index, refuse_overwriting
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
    notes: list = field(default_factory=list)  # what the user should know about the counts (rule sets)

    @property
    def records(self) -> int:
        return self.valid + sum(self.problems.values())

    @property
    def exit_code(self) -> int:
        """0 when every sample is valid, 1 when some had problems or there were none at all."""
        return 1 if self.problems or not self.records else 0

    def describe(self) -> str:
        codes = ", ".join(f"{n} {code}" for code, n in sorted(self.problems.items(), key=lambda kv: -kv[1]))
        if not self.records:
            return f"no samples: the data file holds none [{self.seconds:.1f} s]"
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
    patch_size: Optional[int] = None,
    rules: Optional[str] = None,
    trainer_args: Optional[str] = None,
    model: Optional[str] = None,
    processor: Optional[str] = None,
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
    allow_outside_root: bool = False,
    sample_timeout: Optional[float] = 300.0,
    audio_model: str = "qwen2.5-omni",
) -> Settings:
    """Settings from keyword arguments named after the CLI flags (each becomes the element key it names), checked
    first: a value no sample could be processed with is an InvalidOptionError naming the flag.
    ``rules`` counts by a trainer's rules (:mod:`._rules`), configured by ``trainer_args`` (the trainer's own
    argument names: a JSON object or a JSON/YAML file) and the model (``model``: a built-in checkpoint's
    configs, or ``processor``: a local model folder); ``rules["notes"]`` say what the user should know."""
    image = {"min_pixels": image_min_pixels, "max_pixels": image_max_pixels}
    video = {
        "min_pixels": video_min_pixels,
        "max_pixels": video_max_pixels,
        "total_pixels": video_total_pixels,
        "fps": fps,
        "min_frames": min_frames,
        "max_frames": max_frames,
    }
    from ._rules import resolve_rules

    resolved, patch_size = resolve_rules(rules, trainer_args, model, processor, patch_size)
    if resolved is not None and deep:
        raise InvalidOptionError(
            f"--deep decodes as this library does; with --rules {rules} the counts follow the trainer (from headers "
            "and packet headers): leave --deep out"
        )
    if resolved is not None:
        given = [_flag_name(kind, k) for kind, keys in (("image", image), ("video", video))
                 for k, v in keys.items() if v is not None]  # fmt: skip
        if given:
            raise InvalidOptionError(
                f"{', '.join(given)}: with --rules {rules} the trainer's own arguments decide; give them with "
                "--trainer-args (its names: see qwen-vl-utils dataset rules)"
            )
    _check_flags(patch_size, image, video)
    root = media_root if media_root is not None else os.path.dirname(os.path.abspath(data))
    return Settings(
        media_root=os.path.abspath(root),
        patch_size=patch_size,
        image_keys={k: v for k, v in image.items() if v is not None},
        video_keys={k: v for k, v in video.items() if v is not None},
        tokenizer=os.path.abspath(tokenizer) if tokenizer else None,
        deep=deep,
        policy=get_fetch_policy(policy),  # the caller's policy travels to every worker, wherever it runs
        allow_outside_root=allow_outside_root,
        sample_timeout=_check_timeout(sample_timeout),
        rules=resolved,
        audio_model=_check_audio_model(audio_model),
    )


def _check_audio_model(model: str) -> str:
    from ..audio import OMNI_MODELS

    if model not in OMNI_MODELS:
        raise InvalidOptionError(f"--audio-model {model}: choose one of {', '.join(OMNI_MODELS)}")
    return model


def _flag_name(kind: str, key: str) -> str:
    """The CLI flag that sets an element key: --image-max-pixels, --video-total-pixels, --fps, --max-frames."""
    return f"--{kind}-{key.replace('_', '-')}" if key.endswith("pixels") else f"--{key.replace('_', '-')}"


def _check_timeout(seconds: Optional[float]) -> Optional[float]:
    if seconds is None or seconds == 0:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 1e9:
        raise InvalidOptionError(f"--sample-timeout {seconds}: give seconds > 0 (0: no limit)")
    return float(seconds)


def _check_flags(patch_size: int, image: dict, video: dict) -> None:
    """Flags no sample could be processed with (``--fps 0``, ``nan``, ``--max-frames 1``, ``--image-max-pixels
    10``) fail before the run, not as an ``invalid_option`` on every sample."""
    from .._options import check_number
    from ..video import FRAME_FACTOR

    for kind, keys in (("image", image), ("video", video)):
        for key, value in keys.items():
            if value is None:
                continue
            try:
                check_number(value, key)
            except InvalidOptionError as exc:
                raise InvalidOptionError(f"{_flag_name(kind, key)} {value}: {exc}") from None
    smallest = (2 * patch_size) ** 2  # one merged patch: the least a resized frame has
    for kind, keys in (("image", image), ("video", video)):
        low, high = keys.get("min_pixels"), keys.get("max_pixels")
        if high is not None and high < smallest:
            raise InvalidOptionError(
                f"--{kind}-max-pixels {high}: below one merged patch ({smallest} pixels at patch size {patch_size}); "
                "no image could be resized to it"
            )
        if low is not None and high is not None and low > high:
            raise InvalidOptionError(f"--{kind}-min-pixels {low} is over --{kind}-max-pixels {high}")
    low, high = video.get("min_frames"), video.get("max_frames")
    for name, value in (("--min-frames", low), ("--max-frames", high)):
        if value is not None and value < FRAME_FACTOR:
            raise InvalidOptionError(f"{name} {value}: a video needs at least {FRAME_FACTOR} frames (one patch)")
    if low is not None and high is not None and low > high:
        raise InvalidOptionError(f"--min-frames {low} is over --max-frames {high}")


def data_identity(path: str) -> dict:
    """What says the data file is the one an output was made from: its size, its modification time and a hash
    of its first and last MiB (of all of it when it is small)."""
    info = os.stat(path)
    digest = hashlib.sha256()
    block = 1 << 20
    with open(path, "rb") as f:
        digest.update(f.read(block))
        if info.st_size > 2 * block:
            f.seek(info.st_size - block)
        digest.update(f.read())
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256_head_tail": digest.hexdigest()}


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
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise InvalidOptionError(f"--jobs {jobs}: give a number of worker processes >= 1")
    root = options.get("media_root")
    if root is not None and not os.path.isdir(root):
        raise InvalidOptionError(f"--media-root {root} is not a folder")
    if engine not in ("local", "ray"):
        raise InvalidOptionError(f"engine must be 'local' or 'ray', got {engine!r}")
    fmt = detect_format(data)
    if engine == "ray" and fmt != "jsonl":
        raise InvalidOptionError(
            f"--engine ray reads JSONL, and {data} is a JSON array: convert it first "
            f"(jq -c '.[]' {data} > data.jsonl) or use --engine local"
        )
    settings = make_settings(data, **options)
    notes = list(settings.rules["notes"]) if settings.rules else []
    if mode == "count":
        load_text_counter(settings.tokenizer)  # a bad tokenizer folder fails here, before any work starts
    refuse_overwriting([data], list(outputs.values()))
    for path in outputs.values():
        check_output_file(path)
    data = os.path.abspath(data)  # (a Ray worker opens it from its own directory)
    wanted = {
        "command": mode,
        "data": data,
        "data_file": data_identity(data),  # a fixed data file is not resumed from the old one's results
        "settings": settings.fingerprint(),
    }
    check_settings(outputs["settings"], wanted, [outputs["valid"], outputs["problems"]], overwrite)
    with JsonlOutput(outputs["valid"], overwrite) as valid, JsonlOutput(outputs["problems"], overwrite) as bad:
        start = max(valid.last_index, bad.last_index) + 1
        resumed = valid.lines + bad.lines
        dedup = _Duplicates(outputs["valid"] if valid.lines else None)
        _stream(mode, data, fmt, start, settings, engine, address, jobs, progress, valid, bad, dedup)
    problems = _problem_codes(outputs["problems"])
    return RunSummary(valid.lines, problems, resumed, time.monotonic() - started, outputs, notes)


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
    dedup: _Duplicates,
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
            _write_in_order(dedup.mark(batch), valid, bad)
            done += len(batch)
            bar.update(done, total)
    finally:
        bar.close()


#: the fields a run adds to a sample (not part of what makes two samples the same)
_ADDED = ("index", "visual_tokens", "audio_tokens", "text_tokens", "assistant_tokens", "num_tokens", "media_info")


class _Duplicates:
    """Samples equal to an earlier one (every field): the first is kept, the others become ``duplicate_sample``
    problems naming it. Judged on the driver, in input order, so that every engine gives the same answer; a
    resumed run first reads the samples already written."""

    def __init__(self, written: Optional[str]) -> None:
        self.seen: dict = {}
        if written is not None:
            with open(written, "rb") as f:
                for line in f:
                    self._first(line)

    def _first(self, line: Any) -> Optional[int]:
        record = json.loads(line)
        own = INDEX_OF_OWN in record  # then "index" is the sample's own field, part of what it is
        same = {k: v for k, v in record.items() if (k not in _ADDED or (own and k == "index")) and k != INDEX_OF_OWN}
        key = hashlib.sha256(json.dumps(same, sort_keys=True, ensure_ascii=False).encode()).digest()
        return self.seen.setdefault(key, record_index(record))

    def mark(self, batch: list) -> list:
        out = []
        for index, kind, line in batch:
            first = self._first(line) if kind == "valid" else index
            if first != index:
                message = f"the same sample as index {first} (every field equal): it would be trained on twice"
                problem = {"problem": "duplicate_sample", "message": message}
                kind, line = "problem", json.dumps({"index": index, **problem, "problems": [problem]})
            out.append((index, kind, line))
        return out


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
