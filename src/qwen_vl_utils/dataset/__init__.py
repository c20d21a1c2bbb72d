"""Dataset tools: check, count, pack and describe a fine-tuning set (qwen-vl-finetune JSON/JSONL or chat
``messages``), on one machine or on a Ray cluster. The same as ``qwen-vl-utils dataset check|count|pack|stats``.

Counts are exact: ``visual_tokens`` is what :func:`~qwen_vl_utils.process_vision_info` produces for the
sample's media under the same settings, computed from headers and the container probe (``deep=True``
decodes fully). See the README's "Datasets" section.

Imports the core (``vision_process``, ``image``, ``video``) and ``sources/``; never the command line, whose
``dataset`` commands (``cli/_dataset``) are thin faces over these functions.
"""

from ._filter import FilterSummary, filter_dataset
from ._pack import PackSummary, best_fit_decreasing, pack
from ._records import detect_format, iter_records
from ._run import RunSummary, check, count, make_settings
from ._samples import Problem, Settings, to_messages
from ._stats import stats
from ._work import PROBLEM_CODES

__all__ = [
    "PROBLEM_CODES",
    "FilterSummary",
    "PackSummary",
    "Problem",
    "RunSummary",
    "Settings",
    "best_fit_decreasing",
    "check",
    "count",
    "detect_format",
    "filter_dataset",
    "iter_records",
    "make_settings",
    "pack",
    "stats",
    "to_messages",
]
