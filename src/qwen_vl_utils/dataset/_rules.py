"""Counting by a trainer's rules (``--rules``): how many visual tokens the trainer that reads a dataset will feed.

Trainers do not preprocess as ``process_vision_info`` does: each configures the processors its own way, picks
frames its own way and takes its defaults from the checkpoint (the model's ``preprocessor_config.json`` and
``video_preprocessor_config.json``). A rule set reproduces one trainer's preprocessing from the media's headers
(sizes, EXIF orientation, the container's frame count, rate and duration as the trainer's decoder reports
them) and reports the same tokens, frames and timestamps; a sample the trainer's own code fails on is a problem
(``trainer_fails``, ``trainer_drops_media``) instead of a count.

Each rule set names the code and the version it was checked against; ``scripts/trainers/goldens.py`` runs that
code on a generated set and the tests compare every sample with what it recorded.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .._errors import InvalidOptionError

__all__ = ["MODELS", "RULE_SETS", "load_trainer_args", "resolve_rules"]

#: the built-in models: name -> patch size (their checkpoints' processor configs are copied under _MODEL_DIR)
MODELS = {"qwen2.5-vl": 14, "qwen3-vl": 16}
_MODEL_DIR = os.path.join(os.path.dirname(__file__), "models")
_MODEL_TYPES = {
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen2_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_vl_moe": "qwen3-vl",
}


@dataclass(frozen=True)
class RuleSet:
    name: str
    summary: str
    source: str  # the code it reproduces, with the version / commit it was checked against
    defaults: dict  # the trainer's own argument names -> (type, default): the ones that change counts
    configure: Callable[[dict, dict, str], dict]  # (args, processor configs, model) -> the config below
    image: Callable[[ImageHead, dict], Planned]  # (image header, config) -> what the trainer feeds
    video: Callable[[VideoHead, dict], Planned]
    # (the sample, its media's facts, the message index of each medium, config) -> (code, message) or None
    sample: Optional[Callable[[Any, list, list, dict], Optional[tuple]]] = None
    environment: bool = False  # the trainer reads its arguments from the environment (ms-swift)
    fallbacks: Optional[dict] = None  # what the trainer uses for an argument left unset, where the default is None
    # (kind, source value) -> why the trainer cannot open it, or None: what its loaders read
    opens: Callable[[str, str], Optional[str]] = lambda kind, value: None
    untagged_media: bool = False  # media without tags are put before the first user text (not tag_mismatch)
    decodes: Callable[[Any], Optional[str]] = lambda head: None  # (video head) -> why its decoder fails, or None


RULE_SETS: dict = {}


def _rule_set(rs: RuleSet) -> RuleSet:
    RULE_SETS[rs.name] = rs
    return rs


# --- trainer arguments -----------------------------------------------------------------------------------------


def load_trainer_args(value: Any) -> dict:
    """``--trainer-args``: a JSON object, or a JSON / YAML file (a LLaMA-Factory training YAML as it is); from
    Python, a dict too. The names must be text."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return _named(dict(value), "trainer_args")
    if not isinstance(value, str):
        raise InvalidOptionError(f"trainer_args must be a dict, a JSON object or a file, got {type(value).__name__}")
    return _named(_load_text(value), f"--trainer-args {value if len(value) < 60 else value[:57] + '...'}")


def _named(args: dict, where: str) -> dict:
    bad = [repr(k) for k in args if not isinstance(k, str)]
    if bad:
        raise InvalidOptionError(
            f"{where}: argument names must be text, got {', '.join(bad)} (YAML reads on/off/yes/no and numbers as "
            "other types: quote them)"
        )
    return args


def _load_text(value: str) -> dict:
    text, where = value, "--trainer-args"
    if not value.lstrip().startswith("{"):
        if not os.path.isfile(value):
            raise InvalidOptionError(
                f"--trainer-args {value}: neither a JSON object nor a file; give '{{\"name\": value}}' or a "
                "JSON/YAML file of the trainer's arguments"
            )
        try:
            with open(value, encoding="utf-8") as f:
                text, where = f.read(), f"--trainer-args {value}"
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidOptionError(f"--trainer-args {value}: cannot read it as text ({exc})") from None
        if value.endswith((".yaml", ".yml")):
            return _yaml(text, where)
    try:
        args = json.loads(text)
    except ValueError as exc:
        if where != "--trainer-args":
            return _yaml(text, where)
        raise InvalidOptionError(f"{where}: not a JSON object ({exc})") from None
    if not isinstance(args, dict):
        raise InvalidOptionError(f"{where}: give a JSON object of the trainer's argument names and values")
    return args


def _yaml(text: str, where: str) -> dict:
    try:
        import yaml
    except ImportError:
        raise InvalidOptionError(
            f"{where}: reading YAML needs PyYAML: pip install 'qwen-vl-utils[dataset]' (or pyyaml)"
        ) from None
    try:
        args = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidOptionError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(args, dict):
        raise InvalidOptionError(f"{where}: give a mapping of the trainer's argument names and values")
    return args


#: integer arguments their trainer reads with int(float(...)) (qwen-vl-utils 0.0.14's MODEL_SEQ_LEN): 1e5 is fine
_FLOAT_READ = {"MODEL_SEQ_LEN"}


def _number(args: dict, name: str, kind: type, where: str) -> Any:
    value = args[name]
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value) if kind is float or name in _FLOAT_READ else int(value)
        except ValueError:
            raise InvalidOptionError(f"{where} {name}={value!r}: not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidOptionError(f"{where} {name}={value!r}: give a positive number")
    if kind is int:
        if value != int(value):
            raise InvalidOptionError(f"{where} {name}={value!r}: give a whole number")
        value = int(value)
    return value


def effective_args(rs: RuleSet, given: dict, where: str = "--trainer-args") -> tuple[dict, list]:
    """(the trainer's defaults overridden by ``given``, the given names that do not change counts)."""
    out = {name: default for name, (_, default) in rs.defaults.items()}
    ignored = []
    for name, value in given.items():
        if name not in rs.defaults:
            ignored.append(name)
            continue
        out[name] = value
    for name, (kind, _) in rs.defaults.items():
        if out[name] is None:
            continue
        if kind is str:
            out[name] = str(out[name])
        elif kind is bool:
            out[name] = _flag(out[name], name, where)
        else:
            out[name] = _number(out, name, kind, where)
    return out, sorted(ignored)


def _flag(value: Any, name: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise InvalidOptionError(f"{where} {name}={value!r}: give true or false")


# --- models ----------------------------------------------------------------------------------------------------


def processor_configs(folder: str, where: str) -> dict:
    """The processor configs of a model folder: ``{"image": {...}, "video": {...} or None, "model": name}``."""
    if not os.path.isdir(folder):
        raise InvalidOptionError(f"{where}: not a folder (give a local model folder with preprocessor_config.json)")
    out: dict = {}
    for key, name in (("image", "preprocessor_config.json"), ("video", "video_preprocessor_config.json")):
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                out[key] = json.load(f)
        except FileNotFoundError:
            if key == "image":
                raise InvalidOptionError(f"{where}: no preprocessor_config.json in {folder}") from None
            out[key] = None
        except (OSError, ValueError) as exc:
            raise InvalidOptionError(f"{where}: cannot read {path} ({exc})") from None
        if out[key] is not None and not isinstance(out[key], dict):
            raise InvalidOptionError(f"{where}: {path} is not a JSON object")
    model = None
    config_path = os.path.join(folder, "config.json")
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError, UnicodeDecodeError) as exc:
            raise InvalidOptionError(f"{where}: cannot read {config_path} ({exc})") from None
        model = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        if model is None:
            raise InvalidOptionError(
                f"{where}: config.json's model_type is {json.dumps(model_type)[:40]}, not a Qwen2.5-VL or Qwen3-VL "
                f"model ({', '.join(sorted(_MODEL_TYPES))})"
            )
    else:
        model = {14: "qwen2.5-vl", 16: "qwen3-vl"}.get(out["image"].get("patch_size"))
        if model is None:
            raise InvalidOptionError(f"{where}: no config.json, and its patch_size is neither 14 nor 16")
    if out["image"].get("patch_size", MODELS[model]) != MODELS[model]:
        raise InvalidOptionError(f"{where}: patch_size {out['image'].get('patch_size')!r} is not {model}'s")
    for key in ("image", "video"):
        if out[key] is not None:
            _processor_limits(out[key], where)
    out["model"] = model
    return out


def resolve_rules(
    name: Optional[str],
    trainer_args: Optional[str],
    model: Optional[str],
    processor: Optional[str],
    patch_size: Optional[int],
) -> tuple[Optional[dict], int]:
    """(the rules a run counts by, as plain data for its workers, with ``notes`` for the user; the patch size).
    ``qwen-vl-utils`` (the default) is ``None``: the library's own rules."""
    notes: list = []
    if name in (None, "qwen-vl-utils"):
        for flag, value in (("--trainer-args", trainer_args), ("--model", model), ("--processor", processor)):
            if value is not None:
                raise InvalidOptionError(f"{flag} needs --rules TRAINER (one of: {', '.join(sorted(RULE_SETS))})")
        return None, patch_size or 14
    rs = RULE_SETS.get(name)
    if rs is None:
        choices = ", ".join(["qwen-vl-utils", *sorted(RULE_SETS)])
        raise InvalidOptionError(f"--rules {name}: unknown; choose one of: {choices}")
    given = load_trainer_args(trainer_args)
    if rs.environment:  # ms-swift reads its settings from the environment: what the shell exports counts too
        exported = {k: os.environ[k] for k in rs.defaults if k.isupper() and k in os.environ and k not in given}
        if exported:
            notes.append(f"read from the environment, as {name} reads it: " + ", ".join(f"{k}={v}" for k, v in
                         sorted(exported.items())))  # fmt: skip
            given = {**exported, **given}
    if model is not None and processor is not None:
        raise InvalidOptionError("--model and --processor both name the model: give one")
    named = _model_from_template(given) if name == "llamafactory" else None
    if processor is not None:
        configs = processor_configs(processor, f"--processor {processor}")
        model = configs["model"]
    else:
        if model is None:
            model = named or ("qwen3-vl" if patch_size == 16 else "qwen2.5-vl")
            notes.append(f"counting for {model} (its built-in processor configs); --model or --processor to change")
        if model not in MODELS:
            raise InvalidOptionError(f"--model {model}: unknown; choose one of: {', '.join(MODELS)}")
        configs = processor_configs(os.path.join(_MODEL_DIR, model), f"--model {model}")
    if named is not None and named != model:
        raise InvalidOptionError(
            f"--trainer-args template {given['template']} is LLaMA-Factory's template for {named}, not {model}"
        )
    patch = MODELS[model]
    if patch_size is not None and patch_size != patch:
        raise InvalidOptionError(f"--patch-size {patch_size} contradicts {model} (patch size {patch}): leave it out")
    args, ignored = effective_args(rs, given)
    if ignored:
        notes.append(
            f"--trainer-args: {', '.join(ignored)} do not change what {name} counts (ignored; check the spelling: "
            "the trainer refuses names it does not know)"
        )
    config = rs.configure(args, configs, model)
    notes += config.pop("notes", [])
    rules = {"name": name, "model": model, "args": args, "processor": configs, "config": config, "notes": notes}
    rules["untagged_media"] = rs.untagged_media
    return rules, patch


#: LLaMA-Factory's templates whose plugin a rule set reproduces (its template registry: qwen3_5 runs Qwen3-VL's)
_TEMPLATES = {"qwen2_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl", "qwen3_vl_nothink": "qwen3-vl", "qwen3_5": "qwen3-vl"}


def _model_from_template(args: dict) -> Optional[str]:
    """The model a LLaMA-Factory YAML's ``template`` implies; a template of another plugin is refused."""
    template = args.get("template")
    if template is None:
        return None
    if template not in _TEMPLATES:
        raise InvalidOptionError(
            f"--trainer-args template {template!r}: the llamafactory rule set reproduces the Qwen2-VL and Qwen3-VL "
            f"plugins (templates {', '.join(sorted(_TEMPLATES))})"
        )
    return _TEMPLATES[template]


# --- what the trainers read from a medium ------------------------------------------------------------------------


class TrainerFails(Exception):
    """The trainer's own code raises on this medium (the sample is dropped or the run stops, by trainer)."""


@dataclass(frozen=True)
class ImageHead:
    """An image as a trainer may see it: its stored size, and the size shown after its EXIF orientation."""

    stored: tuple  # (width, height) as stored
    shown: tuple  # (width, height) after the EXIF orientation
    format: str = ""  # Pillow's name of the file format


@dataclass(frozen=True)
class VideoHead:
    """A video's container facts, as the trainers' decoders report them (from the library's probe)."""

    header_frames: int  # the frame count the header states (0: none, as in WebM and Matroska)
    fps: float  # the stream's average frame rate
    duration: float  # seconds (the stream's, else the container's)
    stream_duration: Optional[float]  # the stream's own duration field, where the header has one
    coded: tuple  # (width, height) as coded
    shown: tuple  # (width, height) after the display rotation
    rate_in_header: bool = True  # the stream states an average frame rate
    codec: str = ""
    container: str = ""
    span: Any = None  # the packet scan (packets, begin, end seconds, all packets): what the trainers' decoders count


@dataclass(frozen=True)
class Planned:
    """What a trainer makes of one medium: frames fed (1 for an image), resized (height, width), and for videos
    the frame indices and rate its processor's timestamps come from."""

    frames: int
    size: tuple
    indices: Optional[list] = None
    fps: Optional[float] = None


def _is_uri(value: str) -> bool:
    return "://" in value[:16] or value[:5].lower() == "file:"


def _local_only(kind: str, value: str) -> Optional[str]:
    if _is_uri(value):
        return (
            f"qwen-vl-finetune joins every media path to its data_path: a URL or file:// URI ({value[:60]}) becomes "
            "a path that does not exist"
        )
    return None


def _images_by_path(kind: str, value: str) -> Optional[str]:
    if kind == "image" and _is_uri(value):
        return f"it opens images with Image.open(path): a URL or file:// URI ({value[:60]}) is not a path"
    return None


def _swift_opens(kind: str, value: str) -> Optional[str]:
    if value[:5].lower() == "file:":
        return f"ms-swift reads http(s) URLs and paths, not file:// URIs ({value[:60]})"
    return None


def resize_0014(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, max_ratio: float) -> tuple:
    """qwen-vl-utils 0.0.14's ``smart_resize``, as ms-swift calls it (no guard against a side of 0)."""
    if max_pixels < min_pixels:
        raise TrainerFails("the max_pixels of image must be greater than or equal to min_pixels (AssertionError)")
    ratio = max(height, width) / min(height, width)
    if ratio > max_ratio:
        raise TrainerFails(f"absolute aspect ratio must be smaller than {max_ratio}, got {ratio} (ValueError)")
    from ..image import ceil_by_factor, floor_by_factor, round_by_factor

    h, w = max(factor, round_by_factor(height, factor)), max(factor, round_by_factor(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = floor_by_factor(height / beta, factor), floor_by_factor(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = ceil_by_factor(height * beta, factor), ceil_by_factor(width * beta, factor)
    if h <= 0 or w <= 0:
        raise TrainerFails(f"the image resizes to {w}x{h}: a side of 0 pixels")
    return h, w


def linspace_indices(total: int, n: int) -> list:
    """``numpy.linspace(0, total - 1, n).round()`` as integers (numpy rounds halves to even)."""
    import numpy as np

    return [int(i) for i in np.linspace(0, total - 1, n).round()]


def resize_hf(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple:
    """transformers' Qwen2-VL ``smart_resize`` (4.53 and later): the budget test first, then the minimum."""
    return _hf_resize(height, width, factor, min_pixels, max_pixels)


def resize_hf_video(frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple:
    """transformers' Qwen3-VL video ``smart_resize``: one budget over all the frames together."""
    if frames < 2:
        raise TrainerFails(f"t:{frames} must be larger than temporal_factor:2 (ValueError): a video of one frame")
    if height < factor or width < factor:
        raise TrainerFails(f"height:{height} or width:{width} must be larger than factor:{factor} (ValueError)")
    return _hf_resize(height, width, factor, min_pixels, max_pixels, frames, round(frames / 2) * 2)


def _hf_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 1, padded: int = 1
) -> tuple:
    """The arithmetic both transformers functions share: the budget covers ``padded`` frames (``frames`` in the
    scale), tested before the minimum; a side scaled down stays at least one factor."""
    from ..image import ceil_by_factor, floor_by_factor, round_by_factor

    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise TrainerFails(f"absolute aspect ratio must be smaller than 200, got {ratio} (ValueError)")
    h, w = round_by_factor(height, factor), round_by_factor(width, factor)
    if padded * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, floor_by_factor(height / beta, factor))
        w = max(factor, floor_by_factor(width / beta, factor))
    elif padded * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h, w = ceil_by_factor(height * beta, factor), ceil_by_factor(width * beta, factor)
    return h, w


# --- qwen-vl-finetune ---------------------------------------------------------------------------------------------

_FINETUNE_COMMIT = "96588727e44c78b25ba03ea03b8e12f7e64fd0da"
_LEGACY_COMMIT = "ffcd6e4b2e4b10904dc98ec6f5c25a61b4a760da"


def _finetune_configure(args: dict, configs: dict, model: str) -> dict:
    """``update_processor_pixels`` overwrites the checkpoint's image and video settings with the trainer's
    arguments, so only they count; what stays the checkpoint's is whether its video processor samples frames (a
    checkpoint without ``video_preprocessor_config.json``, as Qwen2.5-VL's, gets Qwen2-VL's, which does not)."""
    c = dict(args, factor=MODELS[model] * 2, model=model, notes=[])
    video = configs.get("video") or {}
    c["sample_frames"] = bool(video.get("do_sample_frames", model == "qwen3-vl"))
    if model == "qwen2.5-vl" and c["sample_frames"]:
        raise InvalidOptionError(
            "--processor: a Qwen2.5-VL folder whose video processor samples frames (do_sample_frames true) is not "
            "what its checkpoint ships, and its Qwen2-VL frame sampling is not reproduced: count without it"
        )
    if not c["sample_frames"]:
        which = "its checkpoint has no video processor config, so" if model == "qwen2.5-vl" else "its processor's"
        c["notes"].append(
            f"qwen-vl-finetune feeds {model} EVERY frame of a video: {which} do_sample_frames is off (video_fps, "
            "video_min_frames and video_max_frames are set but unused); a 2 s 1080p clip at 30 fps is 30,240 "
            "tokens for Qwen2.5-VL"
        )
    return c


def _finetune_image(head: ImageHead, c: dict) -> Planned:
    """transformers' ``load_image`` applies the EXIF orientation; the image processor resizes within the
    trainer's ``min_pixels`` / ``max_pixels``."""
    width, height = head.shown
    return Planned(1, resize_hf(height, width, c["factor"], c["min_pixels"], c["max_pixels"]))


def _finetune_video(head: VideoHead, c: dict) -> Planned:
    """transformers reads the video with torchcodec in exact mode (every packet indexed, frames display-rotated).
    Without frame sampling (Qwen2.5-VL's checkpoint): every frame; Qwen2.5-VL resizes each within
    video_min/max_pixels, Qwen3-VL within one budget over all. With it (Qwen3-VL's): ``int(N / fps * video_fps)``
    frames (fps: N over the packets' time span) within video_min/max_frames, one pixel budget over all of them."""
    width, height = head.shown
    n_all, f = head.span.packets, c["factor"]
    if head.span.end <= head.span.begin:
        raise TrainerFails("torchcodec finds no time span in its packets (no timestamps): it cannot index them")
    fps = n_all / (head.span.end - head.span.begin)
    if not c["sample_frames"]:
        n = n_all
    else:
        n = int(n_all / fps * c["video_fps"])
        n = min(min(max(n, c["video_min_frames"]), c["video_max_frames"]), n_all)
    if c["model"] == "qwen2.5-vl":
        return Planned(n, resize_hf(height, width, f, c["video_min_pixels"], c["video_max_pixels"]))
    size = resize_hf_video(n, height, width, f, c["video_min_pixels"], c["video_max_pixels"])
    return Planned(n, size, linspace_indices(n_all, n), fps)


def _finetune_sample(sample: Any, facts: list, turns: list, c: dict) -> Optional[tuple]:
    kinds = [kind for kind, _ in sample.media]
    for n, turn in enumerate(sample.record.get("conversations") or []):
        if turn.get("from") != "human" and "<" in turn.get("value", "") and _TAGS.search(turn["value"]):
            return (
                "trainer_fails",
                f"qwen-vl-finetune: turn {n} is from {turn.get('from')!r}, which it reads as the assistant (only "
                "'human' is the user): its media tags are never consumed (ValueError: media remain unused)",
            )
    if c["model"] == "qwen2.5-vl" and kinds.count("video") > 1:
        return (
            "trainer_fails",
            "qwen-vl-finetune: a Qwen2.5-VL sample with more than one video fails in its get_rope_index_25 "
            "(IndexError: its data processor keeps one second_per_grid_ts for all the videos); in training the "
            "sample is silently replaced by the next one",
        )
    return None


_TAGS = re.compile(r"<(image|video)>")


QWEN_VL_FINETUNE = _rule_set(
    RuleSet(
        "qwen-vl-finetune",
        "QwenLM/Qwen3-VL's qwen-vl-finetune: transformers' processors configured by its DataArguments",
        f"QwenLM/Qwen3-VL@{_FINETUNE_COMMIT[:12]} qwen-vl-finetune/qwenvl/data/data_processor.py "
        "(update_processor_pixels, preprocess_qwen_visual) with transformers 4.57 (4.53+) and torchcodec 0.11+",
        {
            "max_pixels": (int, 28 * 28 * 576),
            "min_pixels": (int, 28 * 28 * 16),
            "video_max_frames": (int, 8),
            "video_min_frames": (int, 4),
            "video_max_pixels": (int, 1024 * 28 * 28),
            "video_min_pixels": (int, 256 * 28 * 28),
            "video_fps": (float, 2.0),
        },
        _finetune_configure,
        _finetune_image,
        _finetune_video,
        _finetune_sample,
        opens=_local_only,
    )
)


def _legacy_configure(args: dict, configs: dict, model: str) -> dict:
    if model != "qwen2.5-vl":
        raise InvalidOptionError(
            "--rules qwen-vl-finetune-legacy: its data_qwen.py predates Qwen3-VL (it would build a Qwen2-VL model "
            "around it); count with --rules qwen-vl-finetune for Qwen3-VL"
        )
    return dict(args, factor=MODELS[model] * 2, model=model, notes=[])


def _legacy_image(head: ImageHead, c: dict) -> Planned:
    """``Image.open(...).convert("RGB")``: no EXIF orientation; the image processor resizes."""
    width, height = head.stored
    return Planned(1, resize_hf(height, width, c["factor"], c["min_pixels"], c["max_pixels"]))


def _legacy_video(head: VideoHead, c: dict) -> Planned:
    """decord: ``round(seconds / base_interval)`` frames within video_min/max_frames (seconds: frames over the
    header's average rate), unique truncated linspace indices, each frame within the per-frame pixel budget."""
    total, fps = head.span.all_packets, head.fps  # decord counts every packet of the stream
    n = min(max(round(total / fps / c["base_interval"]), c["video_min_frames"]), c["video_max_frames"])
    import numpy as np

    indices = sorted({int(i) for i in np.linspace(0, total - 1, n, dtype=int)})
    width, height = head.shown
    size = resize_hf(height, width, c["factor"], c["video_min_frame_pixels"], c["video_max_frame_pixels"])
    return Planned(len(indices), size, indices, fps)


def _legacy_sample(sample: Any, facts: list, turns: list, c: dict) -> Optional[tuple]:
    kinds = [kind for kind, _ in sample.media]
    if not kinds:
        return (
            "trainer_fails",
            "qwen-vl-finetune-legacy: a text-only sample fails in its data_qwen.py (TypeError: "
            "preprocess_qwen_2_visual() got an unexpected keyword argument 'grid_thw')",
        )
    if kinds.count("video") > 1:
        return (
            "trainer_fails",
            "qwen-vl-finetune-legacy: a Qwen2.5-VL sample with more than one video fails in get_rope_index_25 "
            "(TypeError: its second_per_grid_ts becomes a tuple of lists)",
        )
    if "image" in kinds and "video" in kinds:
        return (
            "trainer_drops_media",
            "qwen-vl-finetune-legacy: in a sample with images and a video its data_qwen.py returns the images' "
            "pixels only: the video's tokens stay in the sequence with no pixels behind them",
        )
    return None


QWEN_VL_FINETUNE_LEGACY = _rule_set(
    RuleSet(
        "qwen-vl-finetune-legacy",
        "qwen-vl-finetune's older data_qwen.py (Qwen2.5-VL): decord frames, a per-frame budget, no EXIF",
        f"QwenLM/Qwen3-VL@{_LEGACY_COMMIT[:12]} qwen-vl-finetune/qwenvl/data/data_qwen.py (the last version "
        "before f4c06f4) with transformers 4.53+ and decord 0.6.0",
        {
            "max_pixels": (int, 28 * 28 * 576),
            "min_pixels": (int, 28 * 28 * 16),
            "video_max_frames": (int, 8),
            "video_min_frames": (int, 4),
            "video_max_frame_pixels": (int, 32 * 28 * 28),
            "video_min_frame_pixels": (int, 4 * 28 * 28),
            "base_interval": (float, 2.0),
        },
        _legacy_configure,
        _legacy_image,
        _legacy_video,
        _legacy_sample,
        opens=_images_by_path,
        untagged_media=True,
    )
)


# --- LLaMA-Factory --------------------------------------------------------------------------------------------------


def _processor_limits(config: dict, where: str = "the processor config") -> tuple:
    """(min_pixels, max_pixels) a transformers processor takes from its config: ``size`` (shortest_edge /
    longest_edge) where given, else ``min_pixels`` / ``max_pixels``; checked."""
    size = config.get("size") or {}
    if not isinstance(size, dict):
        raise InvalidOptionError(f"{where}: 'size' must be an object with shortest_edge / longest_edge")
    low = size.get("shortest_edge", config.get("min_pixels"))
    high = size.get("longest_edge", config.get("max_pixels"))
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (low, high))
    if not ok or low > high:
        raise InvalidOptionError(
            f"{where}: pixel limits {low!r}..{high!r} are not two positive whole numbers, the first the smaller "
            "(size's shortest_edge / longest_edge, or min_pixels / max_pixels)"
        )
    return low, high


def _llamafactory_configure(args: dict, configs: dict, model: str) -> dict:
    """LLaMA-Factory keeps the checkpoint's processor limits and shrinks or grows media to its own
    ``image_*_pixels`` / ``video_*_pixels`` before them (``patch_processor`` only sets attributes)."""
    for kind in ("image", "video"):
        if args[f"{kind}_max_pixels"] < args[f"{kind}_min_pixels"]:
            raise InvalidOptionError(
                f"--trainer-args {kind}_max_pixels {args[f'{kind}_max_pixels']} is below {kind}_min_pixels "
                f"{args[f'{kind}_min_pixels']} (LLaMA-Factory refuses it)"
            )
    c = dict(args, factor=MODELS[model] * 2, model=model, notes=[])
    c["image_limits"] = _processor_limits(configs["image"])
    c["video_limits"] = _processor_limits(configs.get("video") or configs["image"])
    return c


def _lf_shrink(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple:
    """LLaMA-Factory's ``_preprocess_image``: scale down to ``max_pixels`` or up to ``min_pixels`` (sides
    truncated), sides of at least 28, an aspect ratio over 200 cut to 180."""
    if width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = int(width * f), int(height * f)
        if width <= 0 or height <= 0:
            raise TrainerFails("its image_max_pixels shrinks a side to 0 pixels (ValueError)")
    if width * height < min_pixels:
        f = math.sqrt(min_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
    if width / height > 200:
        width = height * 180
    if height / width > 200:
        height = width * 180
    return width, height


def _llamafactory_image(head: ImageHead, c: dict) -> Planned:
    """PIL's stored size (no EXIF orientation), LLaMA-Factory's pre-resize, then the processor's."""
    width, height = _lf_shrink(*head.stored, c["image_max_pixels"], c["image_min_pixels"])
    return Planned(1, resize_hf(height, width, c["factor"], *c["image_limits"]))


def _llamafactory_video(head: VideoHead, c: dict) -> Planned:
    """Frames: ``floor(duration * video_fps)`` (the stream's duration) within video_maxlen and the header's frame
    count, by truncated linspace; a header without a frame count: every frame up to video_maxlen. The frames fed
    are those of the indices a decoder reaches (an edit list or a header that overstates hides the last ones); an
    odd count is padded by one. When the text's tokens (from the header) are not the features', the model's
    forward fails. Sizes: the coded size (no rotation), LLaMA-Factory's pre-resize, then the processor's
    (Qwen3-VL: one budget over all frames)."""
    maxlen, decodable = c["video_maxlen"], head.span.packets
    if not head.rate_in_header:
        raise TrainerFails("the video stream states no average frame rate (TypeError: float() of None)")
    if head.header_frames == 0:
        fed = min(decodable, maxlen)
        indices = list(range(fed))
        written = maxlen if head.stream_duration is not None else fed  # the text's count, from the header
    else:
        if head.stream_duration is None:
            raise TrainerFails("the video stream states a frame count but no duration (TypeError)")
        n = min(head.header_frames, maxlen, max(1, math.floor(head.stream_duration * c["video_fps"])))
        wanted = [int(i) for i in linspace_indices_trunc(head.header_frames, n)]
        indices = [i for i in wanted if i < decodable]
        fed, written = len(indices), len(wanted)
    frames = fed + fed % 2
    if written + written % 2 != frames:
        raise TrainerFails(
            f"LLaMA-Factory writes {written + written % 2} frames' tokens into the text (from the header) and feeds "
            f"the {frames} it decodes: the model's forward fails (video features and video tokens do not match)"
        )
    if not fed:
        raise TrainerFails("no frame of the video can be decoded")
    width, height = _lf_shrink(*head.coded, c["video_max_pixels"], c["video_min_pixels"])
    if c["model"] == "qwen3-vl":
        size = resize_hf_video(frames, height, width, c["factor"], *c["video_limits"])
    else:
        size = resize_hf(height, width, c["factor"], *c["video_limits"])
    return Planned(frames, size, indices, head.fps)


def linspace_indices_trunc(total: int, n: int) -> list:
    """``numpy.linspace(0, total - 1, n).astype(int)``: truncated."""
    import numpy as np

    return [int(i) for i in np.linspace(0, total - 1, n).astype(np.int32)]


def _llamafactory_sample(sample: Any, facts: list, turns: list, c: dict) -> Optional[tuple]:
    """Its converter skips conversations that do not alternate user / assistant from the user (a system turn
    aside) and end with the assistant. Qwen3-VL: the plugin writes every video's tokens with the first video's
    temporal length, and takes each video's timestamps from the metadata at the index of the message holding it."""
    kinds = [kind for kind, _ in sample.media]
    roles = [m["role"] for m in sample.messages if m["role"] != "system"]
    tags = [t.get("from") for t in sample.record.get("conversations") or []]
    if any(tag not in ("human", "gpt", "system") for tag in tags):
        return (
            "trainer_fails",
            "llamafactory: its sharegpt converter takes the turns' 'from' as human / gpt (system first): it skips "
            f"a conversation with {sorted({t for t in tags if t not in ('human', 'gpt', 'system')})}",
        )
    if len(roles) % 2 or any(r != ("user" if n % 2 == 0 else "assistant") for n, r in enumerate(roles)):
        return (
            "trainer_fails",
            "llamafactory: its sharegpt converter skips a conversation that does not alternate user and assistant "
            "turns from the user to an assistant turn ('Invalid message count' / 'Invalid role tag')",
        )
    if c["model"] != "qwen3-vl":
        return None
    groups = [-(-f["frames"] // 2) for f in facts if f.get("kind") == "video"]
    at = [turn for kind, turn in zip(kinds, turns) if kind == "video"]
    for turn in at:
        if turn >= len(groups) or groups[turn] < groups[0]:
            return (
                "trainer_fails",
                "llamafactory: its Qwen3-VL plugin looks a video's timestamps up by the index of its message "
                f"({turn}) among the sample's {len(groups)} video(s) (IndexError): put videos in the first turns, "
                "one each",
            )
    if len(set(groups)) > 1:
        return (
            "trainer_fails",
            "llamafactory: its Qwen3-VL plugin writes every video's tokens with the first video's length "
            f"({groups[0]} temporal groups, here {groups}): the model's forward fails (video features and video "
            "tokens do not match)",
        )
    return None


LLAMAFACTORY = _rule_set(
    RuleSet(
        "llamafactory",
        "LLaMA-Factory's qwen2_vl / qwen3_vl plugins: its own pre-resize and frame sampling, the checkpoint's limits",
        "hiyouga/LLaMA-Factory 0.9.5 (src/llamafactory/data/mm_plugin.py Qwen2VLPlugin, Qwen3VLPlugin; "
        "hparams/model_args.py ProcessorArguments) with transformers 5.6 and PyAV",
        {
            "image_max_pixels": (int, 768 * 768),
            "image_min_pixels": (int, 32 * 32),
            "video_max_pixels": (int, 256 * 256),
            "video_min_pixels": (int, 16 * 16),
            "video_fps": (float, 2.0),
            "video_maxlen": (int, 128),
            "template": (str, None),
        },
        _llamafactory_configure,
        _llamafactory_image,
        _llamafactory_video,
        _llamafactory_sample,
        opens=_images_by_path,
    )
)


# --- ms-swift -------------------------------------------------------------------------------------------------------

#: qwen-vl-utils 0.0.14's constants ms-swift sets from the environment, with the values they keep when unset
_SWIFT_CONSTANTS = {
    "MAX_RATIO": 200,
    "FRAME_FACTOR": 2,
    "FPS_MIN_FRAMES": 4,
    "FPS_MAX_FRAMES": 768,
    "IMAGE_MAX_TOKEN_NUM": 16384,
    "IMAGE_MIN_TOKEN_NUM": 4,
    "SPATIAL_MERGE_SIZE": 2,
    "VIDEO_MAX_TOKEN_NUM": 768,
    "VIDEO_MIN_TOKEN_NUM": 128,
    "MODEL_SEQ_LEN": 128000,
    "FPS": 2.0,
}
_SWIFT_PIXELS = {
    "MAX_PIXELS": "IMAGE_MAX_TOKEN_NUM",
    "MIN_PIXELS": "IMAGE_MIN_TOKEN_NUM",
    "VIDEO_MAX_PIXELS": "VIDEO_MAX_TOKEN_NUM",
    "VIDEO_MIN_PIXELS": "VIDEO_MIN_TOKEN_NUM",
}


def _swift_configure(args: dict, configs: dict, model: str) -> dict:
    """ms-swift's environment variables as qwen-vl-utils 0.0.14's constants: a pixel variable becomes its token
    variable (``value // factor**2``) where that is not set itself (``compat_qwen_vl_utils``); the others set the
    constant of their name (``patch_qwen_vl_utils``). ``MODEL_SEQ_LEN`` is 0.0.14's own."""
    where = "--trainer-args (ms-swift)"
    patch = MODELS[model]
    c: dict = {name: args[name] if args[name] is not None else default for name, default in _SWIFT_CONSTANTS.items()}
    merge = c["SPATIAL_MERGE_SIZE"]
    factor = patch * merge
    c.update(factor=factor, patch=patch, notes=[])
    for pixels, tokens in _SWIFT_PIXELS.items():
        if args[pixels] is not None and args[tokens] is None:
            c[tokens] = args[pixels] // factor**2
    if merge != 2:
        c["notes"].append(
            f"SPATIAL_MERGE_SIZE={merge}: ms-swift resizes to multiples of {factor} but its processor merges by 2; "
            "media whose patch grid has an odd side fail in ms-swift (trainer_fails)"
        )
    if c["VIDEO_MAX_TOKEN_NUM"] < c["VIDEO_MIN_TOKEN_NUM"]:
        floor = int(c["VIDEO_MIN_TOKEN_NUM"] * factor**2 * 1.05) // factor**2
        c["notes"].append(
            f"{where}: the video maximum ({c['VIDEO_MAX_TOKEN_NUM']} tokens per frame) is below the minimum "
            f"({c['VIDEO_MIN_TOKEN_NUM']}): ms-swift (qwen-vl-utils 0.0.14) then allows about {floor} tokens per "
            "frame (1.05 x the minimum), which is what is counted"
        )
    if c["IMAGE_MAX_TOKEN_NUM"] < c["IMAGE_MIN_TOKEN_NUM"]:
        c["notes"].append(f"{where}: the image maximum is below the minimum: ms-swift fails on every image")
    reader = args["FORCE_QWENVL_VIDEO_READER"]
    if reader not in (None, "decord", "torchcodec", "torchvision"):
        raise InvalidOptionError(f"{where} FORCE_QWENVL_VIDEO_READER={reader}: give decord, torchcodec or torchvision")
    c["torchvision_reader"] = reader == "torchvision"
    if reader == "torchcodec":
        c["notes"].append("FORCE_QWENVL_VIDEO_READER=torchcodec: counted as decord reads (the same frames)")
    c["max_pixels"] = args["max_pixels"]
    return c


def _swift_image(head: ImageHead, c: dict) -> Planned:
    """ms-swift opens the image with PIL and converts it to RGB, without its EXIF orientation (its template's
    ``--max_pixels`` shrinks it first); 0.0.14 resizes."""
    width, height = head.stored
    if c["max_pixels"] is not None and width * height > c["max_pixels"]:
        ratio = width / height
        side = math.sqrt(c["max_pixels"] / ratio)
        width, height = int(side * ratio), int(side)
        if width <= 0 or height <= 0:
            raise TrainerFails(
                f"its --max_pixels shrinks the image to {width}x{height} (ValueError: height and width must be > 0)"
            )
    f = c["factor"]
    size = resize_0014(
        height, width, f, c["IMAGE_MIN_TOKEN_NUM"] * f * f, c["IMAGE_MAX_TOKEN_NUM"] * f * f, c["MAX_RATIO"]
    )
    return Planned(1, _swift_merged(size, c))


def _swift_merged(size: tuple, c: dict) -> tuple:
    """ms-swift's processor merges patches by 2 whatever ``SPATIAL_MERGE_SIZE`` says: an odd grid side fails."""
    if c["SPATIAL_MERGE_SIZE"] != 2 and (size[0] // c["patch"] % 2 or size[1] // c["patch"] % 2):
        raise TrainerFails(
            f"SPATIAL_MERGE_SIZE={c['SPATIAL_MERGE_SIZE']}: the patch grid {size[0] // c['patch']}x"
            f"{size[1] // c['patch']} has an odd side, which the processor's merge by 2 cannot take (RuntimeError)"
        )
    return size


def _swift_video(head: VideoHead, c: dict) -> Planned:
    """0.0.14 through decord: frames from ``FPS`` within ``FPS_MIN_FRAMES..FPS_MAX_FRAMES``, a per-frame budget
    from ``VIDEO_MAX_TOKEN_NUM`` and ``MODEL_SEQ_LEN`` floored at 1.05 x the minimum."""
    if c["torchvision_reader"]:
        raise TrainerFails(
            "FORCE_QWENVL_VIDEO_READER=torchvision: qwen-vl-utils 0.0.14 reads with torchvision.io.read_video, "
            "which torchvision 0.25 and later do not have (AttributeError)"
        )
    if not head.rate_in_header:
        raise TrainerFails(
            "the video stream states no average frame rate, which decord needs; qwen-vl-utils 0.0.14's torchvision "
            "fallback (torchvision.io.read_video, gone since torchvision 0.25) fails too"
        )
    ff, total, fps = c["FRAME_FACTOR"], head.span.all_packets, head.fps  # decord counts every packet
    min_f = math.ceil(c["FPS_MIN_FRAMES"] / ff) * ff
    max_f = math.floor(min(c["FPS_MAX_FRAMES"], total) / ff) * ff
    n = math.floor(min(max(total / fps * c["FPS"], min_f), max_f, total) / ff) * ff
    if not ff <= n <= total:
        raise TrainerFails(
            f"qwen-vl-utils 0.0.14 samples {n} frames of {total} (nframes should be in [{ff}, {total}]): decord "
            "fails, and its torchvision fallback (torchvision.io.read_video, gone since torchvision 0.25) fails too"
        )
    f = c["factor"]
    min_px = c["VIDEO_MIN_TOKEN_NUM"] * f * f
    total_px = c["MODEL_SEQ_LEN"] * f * f * 0.9
    max_px = max(min(c["VIDEO_MAX_TOKEN_NUM"] * f * f, total_px / n * ff), int(min_px * 1.05))
    width, height = head.shown
    size = _swift_merged(resize_0014(height, width, f, min_px, max_px, c["MAX_RATIO"]), c)
    return Planned(n, size, linspace_indices(total, n), fps)


def _decord_decodes(head: VideoHead) -> Optional[str]:
    """What decord 0.6 cannot open (then 0.0.14's torchvision fallback fails too: no io.read_video since 0.25)."""
    what = None
    if head.container == "gif":
        what = "an animated GIF"
    elif head.codec in ("av1", "libdav1d", "libaom-av1"):
        what = "AV1"
    elif head.container in ("mpegvideo", "m4v", "obu"):
        what = "a raw elementary stream"
    if what:
        return f"decord 0.6 cannot read {what}, and qwen-vl-utils 0.0.14's torchvision fallback fails too"
    return None


MS_SWIFT = _rule_set(
    RuleSet(
        "ms-swift",
        "ms-swift's Qwen2.5-VL / Qwen3-VL templates: qwen-vl-utils 0.0.14 configured by environment variables",
        "modelscope/ms-swift 4.6.0 (swift/model/models/qwen.py compat_qwen_vl_utils, patch_qwen_vl_utils; "
        "swift/template/templates/qwen.py) with qwen-vl-utils 0.0.14 and decord 0.6.0",
        {
            **{name: (type(v), None) for name, v in _SWIFT_CONSTANTS.items()},
            **{name: (int, None) for name in _SWIFT_PIXELS},
            "FORCE_QWENVL_VIDEO_READER": (str, None),
            "max_pixels": (int, None),  # the template's --max_pixels (an argument, not an environment variable)
        },
        _swift_configure,
        _swift_image,
        _swift_video,
        opens=_swift_opens,
        untagged_media=True,
        decodes=_decord_decodes,
        environment=True,
        fallbacks=_SWIFT_CONSTANTS,
    )
)


# --- measuring by a rule set -------------------------------------------------------------------------------------


#: containers of raw elementary streams (no timestamps, no index): every trainer's decoder fails on them
_RAW_STREAM = {
    name: "a raw elementary stream (no container): torchcodec cannot seek it, decord cannot open it, LLaMA-Factory's "
    "reader fails to rewind it"
    for name in ("h264", "hevc", "vvc")
}


def _trainer_path(kind: str, ele: dict, rs: RuleSet) -> None:
    """Trainers read media by path or URL from their own format: what cannot be written there is not counted."""
    name = rs.name
    value = ele.get(kind) if kind == "video" else ele.get("image", ele.get("image_url"))
    if isinstance(value, dict):  # {"image_url": {"url": ...}}
        value = value.get("url")
    if not isinstance(value, str) or value.startswith("data:"):
        form = "a list of frames" if isinstance(value, (list, tuple)) else "an inline or in-memory medium"
        raise TrainerFails(
            f"{name} reads media by path or URL: this {kind} is {form}, which its data format cannot hold"
        )
    if kind == "video" and any(k in ele for k in ("video_start", "video_end")):
        raise TrainerFails(f"{name} reads whole videos: video_start / video_end cannot be given to it")
    why = rs.opens(kind, value)
    if why:
        raise TrainerFails(why)


def measure_by_rules(kind: str, ele: dict, rules: dict, policy: Any) -> dict:
    """Facts of one medium by ``rules``: tokens, frames fed, sizes and (videos) the times of the processor's
    timestamps; raises the medium's Problem (a trainer failing on it: ``trainer_fails``)."""
    from ._samples import Problem

    rs = RULE_SETS[rules["name"]]
    config = rules["config"]
    factor = MODELS[rules["model"]] * 2
    try:
        if kind == "audio":
            raise TrainerFails("the rule sets reproduce Qwen2.5-VL and Qwen3-VL trainers, which read no audio")
        _trainer_path(kind, ele, rs)
        if kind == "image":
            head = _image_head(ele, policy)
            if head.format in ("HEIF", "HEIC"):
                raise TrainerFails(f"{rs.name} opens images with Pillow alone, which cannot read HEIF/HEIC")
            planned = rs.image(head, config)
            width, height = head.shown
        else:
            info = _video_head(ele, policy)
            why = _RAW_STREAM.get(info.container) or rs.decodes(info)
            if why:
                raise TrainerFails(why)
            planned = rs.video(info, config)
            width, height = info.shown
    except TrainerFails as exc:
        raise Problem("trainer_fails", f"{rs.name}: {exc}") from None
    rh, rw = planned.size
    tokens = -(-planned.frames // 2) * (rh // factor) * (rw // factor)
    out: dict = {"kind": kind, "width": width, "height": height, "tokens": tokens}
    if kind == "video":
        from ..video import qwen3_timestamps

        out.update(duration=round(info.duration, 3), frames=planned.frames)
        out["_times"] = qwen3_timestamps(planned.indices, planned.fps) if planned.indices else []
    out["resized"] = [rh, rw]
    return out


def _image_head(ele: dict, policy: Any) -> ImageHead:
    from ..image import image_options, open_image, oriented_size, resolve_image

    image_options(ele)
    with resolve_image(ele, policy) as source:
        img = open_image(source, policy)
        return ImageHead(tuple(img.size), oriented_size(img), str(img.format or ""))


def _video_head(ele: dict, policy: Any) -> VideoHead:
    """The probe and the packet scan: the trainers' decoders count packets, which headers do not always tell."""
    from ..video import probe_element

    info, scanned = probe_element(ele, policy=policy, span=True)
    return VideoHead(
        header_frames=info.header_frames,
        fps=info.fps,
        duration=info.duration,
        stream_duration=info.stream_duration,
        coded=(info.width, info.height),
        shown=info.display_size,
        rate_in_header=info.rate_in_header,
        codec=info.codec,
        container=info.container,
        span=scanned,
    )


def trainer_problems(sample: Any, facts: list, turns: list, rules: dict) -> list:
    """Problems of a whole sample under ``rules``: what the trainer's own code does with this mix of media
    (``turns``: the index of the message holding each medium, system turns left out)."""
    from ._samples import Problem

    rs = RULE_SETS[rules["name"]]
    if rs.sample is None:
        return []
    message = rs.sample(sample, facts, turns, rules["config"])
    return [Problem(*message)] if message else []


def describe_rule_sets() -> str:
    """``qwen-vl-utils dataset rules``: each rule set, what it reproduces, and its arguments with their defaults."""
    lines = ["qwen-vl-utils (default): this library's own rules, what process_vision_info produces", ""]
    for rs in RULE_SETS.values():
        lines += [f"{rs.name}: {rs.summary}", f"  checked against: {rs.source}", "  --trainer-args (default):"]
        for name, (kind, default) in rs.defaults.items():
            default = (rs.fallbacks or {}).get(name, default)
            shown = "unset" if default is None else json.dumps(default)
            lines.append(f"    {name} ({kind.__name__}): {shown}")
        lines.append("")
    return "\n".join(lines)
