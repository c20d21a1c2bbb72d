"""The per-sample work, the same in every engine: parse, check tags, measure each medium, count text tokens.

Runs in worker processes (the local pool, Ray workers): everything it needs arrives as arguments, and what it
keeps (a tokenizer, a cache of measured media) lives in this module per process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import OrderedDict
from typing import Any, Optional

from .. import _errors as errors
from .._errors import InvalidOptionError
from ..sources._policy import get_fetch_policy
from ._output import INDEX_OF_OWN
from ._samples import Problem, Settings, parse_sample, plain_text, template_messages

__all__ = ["PROBLEM_CODES", "classify", "load_text_counter", "process_batch"]

#: every problem code a check or count can report, and what it means
PROBLEM_CODES = {
    "malformed": "not a valid record: bad JSON, neither 'conversations' nor 'messages', wrong types",
    "tag_mismatch": "the <image>/<video> tags in the human turns differ from the number of images/videos",
    "tag_in_response": "media tags (or media elements) in an assistant turn",
    "missing": "a media file that does not exist (or an HTTP 404/410)",
    "undecodable": "not a readable image or video: truncated, corrupt, no video stream, an aspect ratio over 200",
    "invalid_option": "an element key or setting that cannot be honoured for this medium (e.g. nframes > frames)",
    "too_large": "over a fetch-policy limit (bytes, pixels, seconds, frames)",
    "not_allowed": "refused by the fetch policy (scheme, host, local paths, media_root)",
    "outside_root": "a media path outside the dataset's media root (../, an absolute path elsewhere, a link out)",
    "unreachable": "a network error or timeout",
    "unreadable": "the file exists but cannot be read (a directory, permissions)",
    "no_answer": "no assistant turn: nothing for a trainer to learn from",
    "empty_answer": "an assistant turn with no text",
    "starts_with_assistant": "the conversation starts with the assistant turn (system turns aside)",
    "duplicate_media": "one medium twice in a sample under different paths (the same content, found by hash)",
    "duplicate_sample": "the same sample (every field equal) as an earlier one, named in the message",
    "trainer_fails": "--rules: the trainer's own code fails on the sample (it drops it or stops), as the message says",
    "trainer_drops_media": "--rules: the trainer keeps the sample's tokens but drops a medium's pixels: corrupt input",
    "timeout": "the sample took longer than the per-sample time limit (--sample-timeout, 300 s by default)",
    "crashed": "the worker process died on the sample (a decoder's segmentation fault, the out-of-memory killer)",
    "error": "an unexpected error (please report it): the sample is left out and the run goes on",
}

_CODES = (  # the first class that matches decides
    (errors.SourceNotFoundError, "missing"),
    (errors.AspectRatioError, "undecodable"),
    (errors.DecodeError, "undecodable"),
    (errors.SourceNotAllowedError, "not_allowed"),
    (errors.SourceTooLargeError, "too_large"),
    (errors.FetchTimeoutError, "unreachable"),
    (errors.NetworkError, "unreachable"),
    (errors.InvalidOptionError, "invalid_option"),
    (errors.SourceError, "unreadable"),
    (OSError, "unreadable"),
)
_GONE = re.compile(r"\bHTTP (404|410)\b")


def classify(exc: BaseException) -> Problem:
    """The problem code of an exception raised while measuring a medium."""
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), "error")
    if code == "unreachable" and (getattr(exc, "status", None) in (404, 410) or _GONE.search(str(exc))):
        code = "missing"
    return Problem(code, f"{type(exc).__name__}: {exc}")


# --- measuring media -----------------------------------------------------------------------------------------

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 65536


def measure(kind: str, ele: dict, settings: Settings) -> dict:
    """Tokens and facts of one medium, or raises its :class:`Problem`; cached per process (datasets reuse
    media: one video, many questions). The cache holds small dicts and problems, never decoded data."""
    rules = json.dumps(settings.rules, sort_keys=True) if settings.rules else None
    medium = json.dumps(ele, sort_keys=True, default=repr)
    key = (kind, medium, settings.patch_size, settings.deep, rules, settings.audio_model)
    hit = _CACHE.get(key)
    if hit is None:
        try:
            hit = _measure(kind, ele, settings)
        except Problem as p:  # a rule set's verdict on the medium (trainer_fails)
            hit = p
        except MemoryError:
            raise
        except Exception as exc:
            hit = classify(exc)
        _CACHE[key] = hit
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    if isinstance(hit, Problem):
        raise hit
    return hit


def _measure(kind: str, ele: dict, settings: Settings) -> dict:
    policy = get_fetch_policy(settings.policy)
    if settings.rules is not None:
        from ._rules import measure_by_rules

        return measure_by_rules(kind, ele, settings.rules, policy)
    if kind == "audio":
        return _audio_facts(ele, policy, settings.audio_model, settings.deep)
    measure = _image_facts if kind == "image" else _video_facts
    facts = measure(ele, policy, settings.patch_size)
    if settings.deep:
        facts["tokens"] = _decoded_tokens(kind, ele, settings.patch_size, policy)
    return facts


def _audio_facts(ele: dict, policy: Any, model: str, deep: bool = False) -> dict:
    """Duration and the Omni processor's audio tokens, from the container header (nothing decoded); a window
    (audio_start / audio_end) counts its own length. ``deep``: from the samples ``fetch_audio`` decodes (exact
    where the header's duration is an estimate, and a damaged file fails here)."""
    from ..audio import SAMPLE_RATE, audio_source, audio_token_count, audio_window, describe_audio, fetch_audio
    from ..sources._resolve import resolve_source

    start, end = audio_window(ele)
    if deep:
        samples = len(fetch_audio(ele, policy=policy))
        tokens = audio_token_count(samples, model)
        return {
            "kind": "audio",
            "duration": round(samples / SAMPLE_RATE, 3),
            "sample_rate": SAMPLE_RATE,
            "tokens": tokens,
        }
    with resolve_source(audio_source(ele), "audio", policy) as source:
        facts = describe_audio(source)
    if facts is None:
        raise errors.DecodeError(f"audio {audio_source(ele)!r} has no audio stream")
    seconds = max(0.0, min(end if end is not None else facts["duration"], facts["duration"]) - start)
    tokens = audio_token_count(round(seconds * SAMPLE_RATE), model)
    return {"kind": "audio", "duration": round(seconds, 3), "sample_rate": facts["sample_rate"], "tokens": tokens}


def _image_facts(ele: dict, policy: Any, patch_size: int) -> dict:
    """Size and tokens from the image's header, read once (what ``count_visual_tokens`` reads)."""
    from ..image import describe_image

    facts = describe_image(ele, patch_size, policy=policy)
    return {"kind": "image", "width": facts.width, "height": facts.height, "tokens": facts.tokens}


def _video_facts(ele: dict, policy: Any, patch_size: int) -> dict:
    """Size, duration, tokens and the planned frames' times (they feed Qwen3-VL's timestamp tokens), from one
    probe (the costly part: opening the container and decoding one frame) through the library's own plan."""
    from ..video import describe_video, qwen3_timestamps

    facts = describe_video(ele, patch_size, policy=policy)
    out = {"kind": "video", "duration": round(facts.duration, 3), "frames": facts.frames, "tokens": facts.tokens}
    if not isinstance(ele.get("video"), list):
        out.update(width=facts.width, height=facts.height)
    out["_times"] = qwen3_timestamps(facts.frames_indices, facts.fps)
    return out


def _decoded_tokens(kind: str, ele: dict, patch_size: int, policy: Any) -> int:
    """--deep: decode the medium fully, as process_vision_info does, and count its actual output."""
    from ..image import _patch_factor, fetch_image, visual_tokens
    from ..video import FRAME_FACTOR, decode_video

    factor = _patch_factor(patch_size, policy)
    if kind == "image":
        img = fetch_image(ele, patch_size, policy=policy)
        return visual_tokens(img.height, img.width, factor)
    frames = decode_video(ele, patch_size, policy=policy).frames
    t, h, w = frames.shape[:3]
    return visual_tokens(h, w, factor, t, FRAME_FACTOR)


# --- text tokens ---------------------------------------------------------------------------------------------


class TextCounter:
    """Text tokens of a conversation with a local tokenizer folder.

    With a chat template: the messages rendered by it (media as ``{"type": "image"|"video"}``, which Qwen's
    templates write as ``<|vision_start|><|image_pad|><|vision_end|>``), expanded as the processor expands it,
    minus the ``<|image_pad|>`` / ``<|video_pad|>`` placeholders that become the visual tokens. For Qwen3-VL
    (patch 16) the processor replaces a video's whole ``<|vision_start|><|video_pad|><|vision_end|>`` wrapper
    with, per temporal group, a ``<t seconds>`` timestamp and a vision start/end pair around the group's pads:
    the expanded conversation is tokenized whole, so a timestamp's BPE merges with the text beside it are the
    processor's (one pad per group stands for the group: pads are special tokens and never merge). So
    ``text_tokens + visual_tokens`` is the length of the processor's ``input_ids``. Without a chat template:
    the turns' text joined by newlines, media tags as written.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.encode, self.render, vocab = _load(path)
        pads = ("<|image_pad|>", "<|video_pad|>", "<|AUDIO|>", "<|audio_pad|>", "<|IMAGE|>", "<|VIDEO|>")
        self.pads = {vocab[t] for t in pads if t in vocab}
        self.video_pad = "<|video_pad|>" in vocab

    def count(self, samples: list, facts: list, patch_size: int) -> list:
        """(text tokens, assistant tokens) of each sample. The assistant tokens are the trainable ones when a
        trainer masks the prompt, as qwen-vl-finetune's labels do: of each assistant turn, its content, its
        ``<|im_end|>`` and the newline after it (with a template); without one, each assistant turn's text."""
        if self.render is None:
            totals = [len(ids) for ids in self.encode([plain_text(s) for s in samples])]
            answers = [[t for r, t in _turn_texts(s) if r == "assistant"] for s in samples]
            flat = self.encode([t for ts in answers for t in ts]) if any(answers) else []
            sizes, out, k = [len(ids) for ids in flat], [], 0
            for total, ts in zip(totals, answers):
                out.append((total, sum(sizes[k : k + len(ts)])))
                k += len(ts)
            return out
        texts = [self.render(template_messages(s.messages)) for s in samples]
        if patch_size == 16 and self.video_pad:
            texts = [_qwen3_expanded(text, f) for text, f in zip(texts, facts)]
        out = []
        for text, (ids, offsets) in zip(texts, self.encode(texts, offsets=True)):
            spans = [m.span(1) for m in _ASSISTANT.finditer(text)]
            kept = [(i, o) for i, o in zip(ids, offsets) if i not in self.pads]
            trained = sum(1 for _, (a, b) in kept if any(s <= a and b <= e for s, e in spans))
            out.append((len(kept), trained))
        return out


#: an assistant turn as Qwen's chat templates write it: what follows its header, up to and with its end and the
#: newline after it (qwen-vl-finetune's label mask: from two tokens past "assistant" to one past <|im_end|>)
_ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n?)", re.DOTALL)


def _turn_texts(sample: Any) -> list:
    """(role, text) of each turn, for a sample read without a chat template."""
    if "conversations" in sample.record:
        from ._samples import _ROLES

        return [(_ROLES.get(t["from"], t["from"]), t["value"]) for t in sample.record["conversations"]]
    out = []
    for msg in sample.messages:
        content = msg.get("content")
        if isinstance(content, list):
            content = "".join(str(e.get("text", "")) for e in content if isinstance(e, dict))
        out.append((msg["role"], content or ""))
    return out


#: what a Qwen chat template writes for a video, and what a Qwen3-VL processor writes for each temporal group
_VIDEO_WRAPPER = "<|vision_start|><|video_pad|><|vision_end|>"


def _qwen3_expanded(text: str, facts: list) -> str:
    """``text`` with each video's wrapper replaced, in order, as Qwen3VLProcessor replaces it (a bare
    ``<|video_pad|>`` where a template wrote no wrapper)."""
    pos = 0
    for fact in facts:
        if fact["kind"] != "video":
            continue
        groups = "".join(f"<{t:.1f} seconds>{_VIDEO_WRAPPER}" for t in fact.get("_times", ()))
        at = text.find(_VIDEO_WRAPPER, pos)
        old = _VIDEO_WRAPPER
        if at < 0:
            at, old = text.find("<|video_pad|>", pos), "<|video_pad|>"
            if at < 0:
                break
        text = text[:at] + groups + text[at + len(old) :]
        pos = at + len(groups)
    return text


def _has_template_file(path: str) -> bool:
    if os.path.exists(os.path.join(path, "chat_template.jinja")) or os.path.exists(
        os.path.join(path, "chat_template.json")
    ):
        return True
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def _load(path: str) -> tuple:
    if not os.path.isdir(path):
        raise InvalidOptionError(f"--tokenizer {path}: not a folder (give a local Hugging Face tokenizer folder)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return _load_tokenizers(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for unusable folders
        raise InvalidOptionError(f"--tokenizer {path}: cannot load a tokenizer from it ({exc})") from exc

    def encode(texts: list, offsets: bool = False) -> Any:
        out = tok(texts, add_special_tokens=False, return_offsets_mapping=offsets)
        return list(zip(out["input_ids"], out["offset_mapping"])) if offsets else out["input_ids"]

    render = None
    if getattr(tok, "chat_template", None):

        def render(messages: list) -> str:
            return tok.apply_chat_template(messages, tokenize=False)

    return encode, render, tok.get_vocab()


def _load_tokenizers(path: str) -> tuple:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise InvalidOptionError("--tokenizer needs transformers (or tokenizers): pip install transformers") from exc
    if _has_template_file(path):
        raise InvalidOptionError(
            f"--tokenizer {path} has a chat template, which needs transformers to render: pip install transformers"
        )
    try:
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    except Exception as exc:
        raise InvalidOptionError(f"--tokenizer {path}: cannot load tokenizer.json ({exc})") from exc

    def encode(texts: list, offsets: bool = False) -> Any:
        encoded = tok.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encoded] if offsets else [e.ids for e in encoded]

    return encode, None, tok.get_vocab()


_COUNTERS: dict = {}


def load_text_counter(path: Optional[str]) -> Optional[TextCounter]:
    if path is None:
        return None
    if path not in _COUNTERS:
        _COUNTERS[path] = TextCounter(path)
    return _COUNTERS[path]


# --- one batch ---------------------------------------------------------------------------------------------


def _problem_line(index: int, problems: list) -> dict:
    first = problems[0]
    return {
        "index": index,
        "problem": first.code,
        "message": first.message,
        "problems": [{"problem": p.code, "message": p.message} for p in problems],
    }


class _SampleTimeout(BaseException):
    """Raised into a sample's work by the alarm: a BaseException, so that no ``except Exception`` on the way
    (a decoder's, a network library's) takes it for the medium's own error."""


@contextlib.contextmanager
def _time_limit(seconds: Optional[float]) -> Any:
    """Interrupt the block after ``seconds`` (SIGALRM: in a worker's main thread, where the samples run; elsewhere,
    and on systems without it, no limit). A blocking read or wait is interrupted too."""
    import signal
    import threading

    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise _SampleTimeout

    before = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _examine(raw: Optional[bytes], error: Optional[str], settings: Settings) -> tuple:
    """(sample, facts, problems) of one raw record; a sample over ``settings.sample_timeout``: ``timeout``."""
    try:
        with _time_limit(settings.sample_timeout):
            return _examine_in_time(raw, error, settings)
    except _SampleTimeout:
        message = (
            f"the sample took over {settings.sample_timeout:g} s (--sample-timeout): a medium that never "
            "delivers (a stalled server, a mount that does not answer)?"
        )
        return None, [], [Problem("timeout", message)]


def _examine_in_time(raw: Optional[bytes], error: Optional[str], settings: Settings) -> tuple:
    if error is not None:
        return None, [], [Problem("malformed", error)]
    try:
        sample = parse_sample(raw, settings)
    except Problem as p:
        return None, [], [p]
    except RecursionError as exc:  # absurdly nested JSON
        return None, [], [Problem("malformed", f"not a valid record: {exc}")]
    except Exception as exc:  # a record shaped like nothing foreseen must not stop a 10-million-line run
        return None, [], [classify(exc)]
    problems = list(sample.problems)
    facts = []
    for kind, ele in sample.media:
        try:
            facts.append(measure(kind, ele, settings))
        except Problem as p:
            problems.append(p)
    if not problems and settings.rules is not None:
        from ._rules import trainer_problems

        problems += trainer_problems(sample, facts, _media_turns(sample), settings.rules)
    if not problems:
        problems += _duplicate_media(sample.media)
    return sample, facts, problems


def _media_turns(sample: Any) -> list:
    """The index of the message holding each medium, in media order, system turns left out."""
    turns = []
    for n, msg in enumerate(m for m in sample.messages if m.get("role") != "system"):
        content = msg.get("content")
        if isinstance(content, list):
            turns += [n for e in content if isinstance(e, dict) and e.get("type") in ("image", "video", "audio")]
    return turns


def _duplicate_media(media: list) -> list:
    """One medium given twice in a sample under different paths (a copy pasted in), found by content: files of
    equal size are hashed, no other is read. The same path twice is left alone (a sample may compare a medium
    with itself on purpose); media reused across samples are normal (one video, many questions)."""
    import hashlib

    paths = []
    for n, (kind, ele) in enumerate(media):
        value = ele.get("image", ele.get("image_url")) if kind == "image" else ele.get(kind)
        if isinstance(value, str) and "://" not in value[:12] and not value.startswith("data:"):
            with contextlib.suppress(OSError):
                paths.append((os.path.getsize(value), os.path.realpath(value), n, kind))
    by_size: dict = {}
    for size, path, n, kind in paths:
        by_size.setdefault(size, []).append((path, n, kind))
    seen: dict = {}
    for group in by_size.values():
        if len({path for path, _, _ in group}) < 2:
            continue
        for path, n, kind in group:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            first = seen.setdefault(digest.digest(), (path, n))
            if first[0] != path:
                return [
                    Problem(
                        "duplicate_media",
                        f"{kind} {n + 1} of the sample ({path}) has the same content as medium {first[1] + 1} "
                        f"({first[0]}): the same picture twice under two names",
                    )
                ]
    return []


def process_batch(records: list, settings: Settings, mode: str) -> list:
    _import_decoders()
    with _quiet_warnings():
        return _process_batch(records, settings, mode)


def _import_decoders() -> None:
    """Import what measuring media imports lazily (PyAV, the image and video modules), outside any sample's time
    limit: an alarm landing in the middle of an import leaves the module half made for the rest of the
    process (every later video ``undecodable``)."""
    import av
    import av.error  # noqa: F401

    from .. import image, video  # noqa: F401 - (they import the container layer in turn)


@contextlib.contextmanager
def _quiet_warnings() -> Any:
    """0.0.14's per-video log lines ("The given max_pixels exceeds limit") are facts a run records, not news for
    each of a million samples: silenced while a batch runs."""
    log = logging.getLogger("qwen_vl_utils")
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def _process_batch(records: list, settings: Settings, mode: str) -> list:
    """``[(index, raw bytes, reader error), ...]`` -> ``[(index, "valid"|"problem", JSON line), ...]``, in order.

    ``mode``: ``"check"`` (valid samples as they are, plus ``index``) or ``"count"`` (plus ``visual_tokens``,
    ``text_tokens`` with a tokenizer, ``num_tokens`` and ``media_info``)."""
    results: list = []
    valid: list = []  # (position in results, sample, facts)
    for index, raw, error in records:
        sample, facts, problems = _examine(raw, error, settings)
        if problems:
            results.append((index, "problem", _problem_line(index, problems)))
        else:
            valid.append((len(results), sample, facts))
            results.append((index, "valid", None))
    counter = load_text_counter(settings.tokenizer) if mode == "count" else None
    texts = counter.count([s for _, s, _ in valid], [f for _, _, f in valid], settings.patch_size) if counter else None
    for k, (pos, sample, facts) in enumerate(valid):
        out = dict(sample.record)
        out[INDEX_OF_OWN if "index" in out else "index"] = results[pos][0]  # a sample's own index is kept
        if mode == "count":
            visual = sum(f["tokens"] for f in facts if f["kind"] != "audio")
            sound = sum(f["tokens"] for f in facts if f["kind"] == "audio")
            out["visual_tokens"] = visual
            if sound or any(f["kind"] == "audio" for f in facts):
                out["audio_tokens"] = sound
            if texts is not None:
                out["text_tokens"], out["assistant_tokens"] = texts[k]
            out["num_tokens"] = visual + sound + (texts[k][0] if texts is not None else 0)
            out["media_info"] = [{k2: v for k2, v in f.items() if not k2.startswith("_")} for f in facts]
        results[pos] = (results[pos][0], "valid", out)
    return [(i, kind, json.dumps(obj, ensure_ascii=False)) for i, kind, obj in results]
