"""One sample: its format, its media as library elements, its tag checks, and its conversation as messages.

Two formats are read:

- qwen-vl-finetune's: ``{"image": path or [paths], "video": path or [paths], "conversations": [{"from":
  "human"|"gpt"|"system", "value": "... <image> ..."}]}``. The n-th ``<image>`` tag of the human turns is the
  n-th image, as qwen-vl-finetune's data processor assigns them.
- the chat format :func:`~qwen_vl_utils.process_vision_info` reads: ``{"messages": [{"role": ..., "content":
  str or [elements]}]}``; an element's own keys win over the settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional

from ..sources._policy import FetchPolicy

__all__ = ["Problem", "Sample", "Settings", "parse_sample", "to_messages"]

#: environment variables whose values change what a count gives: part of a run's fingerprint
COUNTING_ENVIRONMENT = ("MODEL_SEQ_LEN", "FORCE_QWENVL_VIDEO_READER", "QWENVL_VIDEO_DTYPE")

_TAG = re.compile(r"(<image>|<video>|<audio>)")
_USER_ROLES = {"human": "user", "user": "user"}
_ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "model": "assistant"}
_SYSTEM_ROLES = {"system": "system"}
_ROLES = {**_USER_ROLES, **_ASSISTANT_ROLES, **_SYSTEM_ROLES}


@dataclass(frozen=True)
class Settings:
    """How samples are read and counted; the element keys are the ones :func:`process_vision_info` reads.

    ``image_keys`` / ``video_keys`` are added to every image / video element (``min_pixels``,
    ``max_pixels``, ``total_pixels``, ``fps``, ``min_frames``, ``max_frames``, ...); a sample's own element
    keys win. ``media_root``: the folder relative media paths are resolved against.
    """

    media_root: str = "."
    patch_size: int = 14
    image_keys: dict = field(default_factory=dict)
    video_keys: dict = field(default_factory=dict)
    tokenizer: Optional[str] = None
    deep: bool = False
    policy: Optional[FetchPolicy] = None
    # media paths may leave media_root (absolute paths elsewhere, ../, symlinks out); by default: outside_root
    allow_outside_root: bool = False
    # seconds one sample may take (its media never delivering: a stalled server, a mount that hangs); None: no limit
    sample_timeout: Optional[float] = 300.0
    # counting by a trainer's rules (--rules): resolved by dataset._rules.resolve_rules; None: the library's own
    rules: Optional[dict] = None
    # whose audio tokens audio media count: qwen2.5-omni or qwen3-omni (their processors differ)
    audio_model: str = "qwen2.5-omni"

    def fingerprint(self) -> dict:
        """What decides the output (not how it is computed): stored next to an output to make resuming safe.
        The fetch policy is part of it (a stricter policy refuses media an earlier run accepted)."""
        out = dataclasses.asdict(self)
        policy = out.pop("policy")
        out["policy"] = json.loads(json.dumps(policy, sort_keys=True, default=repr)) if policy else None
        out["media_root"] = os.path.abspath(self.media_root)
        out["tokenizer"] = os.path.abspath(self.tokenizer) if self.tokenizer else None
        # settings read from the environment that change counts (0.0.14's MODEL_SEQ_LEN budget, the backend)
        out["environment"] = {name: os.environ.get(name) for name in COUNTING_ENVIRONMENT}
        if self.rules is None:
            del out["rules"]  # (outputs written before rule sets existed stay resumable)
        if self.audio_model == "qwen2.5-omni":
            del out["audio_model"]  # (the default: outputs written before audio was counted stay resumable)
        return json.loads(json.dumps(out, sort_keys=True))


class Problem(Exception):
    """A sample-level problem: ``code`` (``malformed``, ``tag_mismatch``, ...) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Sample:
    record: dict
    messages: list  # chat messages; media elements carry resolved sources and the settings' keys
    media: list  # (kind, element) in conversation order
    problems: list  # Problems found without touching the media (tags)


def parse_sample(raw: bytes, settings: Settings) -> Sample:
    """Parse one raw record; raises :class:`Problem` ``malformed`` when it is not a valid sample."""
    try:
        record = json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem("malformed", f"not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise Problem("malformed", f"a sample must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return _finetune_sample(record, settings)
    if "messages" in record and _sharegpt(record):
        return _sharegpt_sample(record, settings)
    if "messages" in record:
        return _chat_sample(record, settings)
    raise Problem("malformed", "a sample needs 'conversations' (qwen-vl-finetune) or 'messages' (chat format)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400: written back, it would be JSON's non-standard Infinity
        raise ValueError(f"the number {text} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not standard JSON")


def to_messages(record: dict, settings: Optional[Settings] = None) -> list:
    """The chat messages of a sample in either format, ready for :func:`process_vision_info`: relative media
    paths resolved against ``settings.media_root`` and the settings' element keys added (the element's own
    keys win). Raises :class:`Problem` for a sample that is not valid."""
    settings = settings or Settings()
    sample = parse_sample(json.dumps(record).encode(), settings)
    if sample.problems:
        raise sample.problems[0]
    return sample.messages


# --- media sources -------------------------------------------------------------------------------------------


def resolve_path(value: Any, root: str) -> Any:
    """A relative local path joined to ``root``; URLs, ``data:`` URIs and absolute paths as they are."""
    if not isinstance(value, str) or not value or value.startswith("data:") or "://" in value:
        return value
    return value if os.path.isabs(value) else os.path.join(root, value)


def _element(kind: str, ele: dict, settings: Settings) -> dict:
    keys = {"image": settings.image_keys, "video": settings.video_keys}.get(kind, {})
    out = {**keys, **ele}

    def local(value: Any) -> Any:
        return _inside_root(resolve_path(value, settings.media_root), value, settings)

    if kind == "video" and isinstance(out.get("video"), list):
        out["video"] = [local(v) for v in out["video"]]
    elif kind in ("video", "audio"):
        key = kind if out.get(kind) is not None or f"{kind}_url" not in out else f"{kind}_url"
        if isinstance(out.get(key), str):
            out[key] = local(out.get(key))
    elif isinstance(out.get("image_url"), dict) and "image" not in out:
        out["image_url"] = {**out["image_url"], "url": local(out["image_url"].get("url"))}
    else:
        key = "image" if out.get("image") is not None else "image_url"
        out[key] = local(out.get(key))
    return out


def _inside_root(path: Any, given: Any, settings: Settings) -> Any:
    """``path`` (resolved) if it is a local path inside the media root (symlinks followed), else Problem
    ``outside_root`` (``../../etc/passwd``, an absolute path elsewhere, a link out of the folder); URLs and
    ``data:`` as they are. ``allow_outside_root`` lets every local path through."""
    if settings.allow_outside_root or not isinstance(path, str) or not path:
        return path
    local = path
    if path[:5].lower() == "file:":
        local = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
    elif path.startswith("data:") or "://" in path:
        return path
    if "\x00" in local:
        raise Problem("malformed", f"the media path {given!r} holds a NUL character")
    from ..sources._resolve import path_within

    if path_within(settings.media_root, local) is None:
        root, real = os.path.realpath(settings.media_root), os.path.realpath(local)
        raise Problem(
            "outside_root",
            f"{given!r} is outside the media root {root} (resolved: {real}); give paths inside it, or allow "
            "others with --allow-outside-root",
        )
    return path


def _media_list(record: dict, key: str) -> list:
    """The paths under ``key`` (qwen-vl-finetune's "image"), else under its plural (LLaMA-Factory's "images")."""
    key = key if key in record or f"{key}s" not in record else f"{key}s"
    value = record.get(key)
    if value is None or value == "":
        return []
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, str) or not v:
            raise Problem("malformed", f"'{key}' must be a path or a list of paths, got {json.dumps(value)[:80]}")
    return values


# --- LLaMA-Factory's and ms-swift's format ---------------------------------------------------------------------


def _sharegpt(record: dict) -> bool:
    """``{"messages": [{"role", "content": text with <image>/<video> tags}], "images": [...], "videos": [...]}``:
    LLaMA-Factory's multimodal format (its mllm_demo), which ms-swift reads too."""
    messages = record.get("messages")
    return (
        ("images" in record or "videos" in record)
        and isinstance(messages, list)
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
    )


def _sharegpt_sample(record: dict, settings: Settings) -> Sample:
    """Read as qwen-vl-finetune's format is (the n-th tag of the user turns is the n-th medium); the record kept."""
    turns = []
    for n, msg in enumerate(record["messages"]):
        role = msg.get("role")
        if role not in _ROLES:
            raise Problem("malformed", f"message {n} has role {json.dumps(role)[:40]}: give user, assistant or system")
        turns.append({"from": role, "value": msg["content"]})
    media = {key: record[key] for key in ("images", "videos", "audios") if key in record}
    return dataclasses.replace(_finetune_sample({"conversations": turns, **media}, settings), record=record)


# --- qwen-vl-finetune --------------------------------------------------------------------------------------


def _finetune_sample(record: dict, settings: Settings) -> Sample:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise Problem("malformed", "'conversations' must be a non-empty list of {'from', 'value'} turns")
    images, videos, audios = (_media_list(record, key) for key in ("image", "video", "audio"))
    pools = {
        "<image>": [_element("image", {"type": "image", "image": p}, settings) for p in images],
        "<video>": [_element("video", {"type": "video", "video": p}, settings) for p in videos],
        "<audio>": [_element("audio", {"type": "audio", "audio": p}, settings) for p in audios],
    }
    problems, messages, media = [], [], []
    tags = {"<image>": 0, "<video>": 0, "<audio>": 0}
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in _ROLES:
            raise Problem(
                "malformed",
                f"turn {n} must be {{'from': 'human'|'gpt'|'system', 'value': text}}, got {json.dumps(turn)[:80]}",
            )
        role = _ROLES[turn["from"]]
        text = turn["value"]
        if role != "user":
            found = _TAG.findall(text)
            if found and role == "assistant":
                problems.append(
                    Problem("tag_in_response", f"turn {n} ({turn['from']}) has {len(found)} media tag(s) {found[0]}")
                )
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
            continue
        content = []
        for seg in _TAG.split(text):
            if seg in tags:
                pool = pools[seg]
                if tags[seg] < len(pool):
                    content.append(pool[tags[seg]])
                    media.append((seg[1:-1], pool[tags[seg]]))
                tags[seg] += 1
            elif seg.strip():
                content.append({"type": "text", "text": seg.strip()})
        messages.append({"role": role, "content": content})
    if not any(tags.values()) and settings.rules and settings.rules.get("untagged_media"):
        _media_first(messages, media, pools)  # the trainer puts untagged media before the first user text
        tags = {tag: len(pool) for tag, pool in pools.items()}
    for tag, pool in pools.items():
        if tags[tag] != len(pool):
            problems.append(
                Problem(
                    "tag_mismatch",
                    f"{tags[tag]} {tag} tag(s) in the human turns for {len(pool)} {tag[1:-1]}(s) in the sample",
                )
            )
    problems += _conversation_problems([(_ROLES[t["from"]], t["value"]) for t in turns])
    return Sample(record, messages, media, problems)


def _media_first(messages: list, media: list, pools: dict) -> None:
    """A sample without tags, as ms-swift and the legacy qwen-vl-finetune loader read it: every image, then every
    video, at the start of the first user turn."""
    first = next((m for m in messages if m["role"] == "user"), None)
    eles = [(tag[1:-1], ele) for tag in ("<image>", "<video>", "<audio>") for ele in pools[tag]]
    if first is not None:
        first["content"] = [ele for _, ele in eles] + first["content"]
    media.extend(eles)


def _conversation_problems(turns: list) -> list:
    """What a trainer cannot learn from, as (role, text or content) turns: no assistant turn (``no_answer``), an
    assistant turn with nothing in it (``empty_answer``), a conversation that starts with the assistant
    (``starts_with_assistant``; system turns aside)."""
    roles = [_ROLES.get(role, role) for role, _ in turns]
    problems = []
    if "assistant" not in roles:
        problems.append(Problem("no_answer", "no assistant turn: nothing to learn from (a trainer masks the prompt)"))
    for n, (role, content) in enumerate(turns):
        if _ROLES.get(role, role) == "assistant" and not _has_content(content):
            problems.append(Problem("empty_answer", f"turn {n} is an assistant turn with no text"))
            break
    first = next((r for r in roles if r != "system"), None)
    if first == "assistant":
        problems.append(Problem("starts_with_assistant", "the conversation starts with the assistant, not the user"))
    return problems


def _has_content(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):
        return any(not isinstance(e, dict) or _chat_kind(e) or str(e.get("text", "")).strip() for e in content)
    return False


# --- chat messages -------------------------------------------------------------------------------------------


def _chat_kind(ele: Any) -> Optional[str]:
    if not isinstance(ele, dict):
        return None
    if "video" in ele or ele.get("type") == "video":
        return "video"
    if "image" in ele or "image_url" in ele or ele.get("type") in ("image", "image_url"):
        return "image"
    if "audio" in ele or "audio_url" in ele or ele.get("type") == "audio":
        return "audio"
    return None


def _chat_sample(record: dict, settings: Settings) -> Sample:
    raw_messages = record["messages"]
    if not isinstance(raw_messages, list) or not raw_messages:
        raise Problem("malformed", "'messages' must be a non-empty list of {'role', 'content'} messages")
    problems, messages, media = [], [], []
    for n, msg in enumerate(raw_messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise Problem(
                "malformed", f"message {n} must be {{'role': ..., 'content': ...}}, got {json.dumps(msg)[:80]}"
            )
        content = msg.get("content")
        if isinstance(content, str) or content is None:
            messages.append(msg)
            continue
        if not isinstance(content, list):
            raise Problem("malformed", f"message {n}: 'content' must be text or a list of elements")
        new_content = []
        for ele in content:
            kind = _chat_kind(ele)
            if kind is None:
                if not isinstance(ele, dict):
                    raise Problem(
                        "malformed", f"message {n}: an element must be an object, got {json.dumps(ele)[:80]}"
                    )
                new_content.append(ele)
                continue
            source = (
                ele.get("image", ele.get("image_url")) if kind == "image" else ele.get(kind, ele.get(f"{kind}_url"))
            )
            if source is None or source == "" or source == []:
                raise Problem("malformed", f"message {n}: a {kind} element without a source: {json.dumps(ele)[:80]}")
            element = _element(kind, ele, settings)
            new_content.append(element)
            media.append((kind, element))
            if msg["role"] in _ASSISTANT_ROLES:
                problems.append(Problem("tag_in_response", f"message {n} ({msg['role']}) holds a {kind} element"))
        messages.append({**msg, "content": new_content})
    problems += _conversation_problems([(m["role"], m.get("content")) for m in raw_messages])
    return Sample(record, messages, media, problems)


# --- the conversation as text ------------------------------------------------------------------------------


def template_messages(messages: list) -> list:
    """Messages for a chat template: media elements reduced to ``{"type": "image"|"video"}``, as Qwen's
    processors pass them to the template (which writes a vision placeholder for each)."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            content = [{"type": k} if (k := _chat_kind(e)) else e for e in content]
        out.append({"role": msg["role"], "content": content if content is not None else ""})
    return out


def plain_text(sample: Sample) -> str:
    """The conversation without a chat template, turns joined by newlines: qwen-vl-finetune's turn values as
    written (tags included); chat messages' text with ``<image>``/``<video>`` where their media stand."""
    if "conversations" in sample.record:
        return "\n".join(turn["value"] for turn in sample.record["conversations"])
    turns = []
    for msg in sample.messages:
        content = msg.get("content")
        if isinstance(content, list):
            content = "".join(f"<{k}>" if (k := _chat_kind(e)) else str(e.get("text", "")) for e in content)
        turns.append(content or "")
    return "\n".join(turns)
