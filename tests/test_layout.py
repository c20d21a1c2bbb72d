"""The package's layout: the public import paths, and the flow its folders promise (sources -> container ->
backends -> planning -> stream/dataset -> cli), read from the source's import statements (lazy ones too)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qwen_vl_utils

PACKAGE = Path(qwen_vl_utils.__file__).parent
README = Path(__file__).resolve().parent.parent / "README.md"

#: every import path the README documents, every 0.0.14 path, and the subpackages' public names
PUBLIC_PATHS = {
    "qwen_vl_utils": list(qwen_vl_utils.__all__),
    "qwen_vl_utils.vision_process": [
        "process_vision_info",
        "extract_vision_info",
        "fetch_image",
        "fetch_video",
        "smart_resize",
        "smart_nframes",
        "round_by_factor",
        "ceil_by_factor",
        "floor_by_factor",
        "get_video_reader_backend",
        "VIDEO_READER_BACKENDS",
        "FPS",
        "FPS_MIN_FRAMES",
        "FPS_MAX_FRAMES",
        "MODEL_SEQ_LEN",
        "MAX_RATIO",
    ],
    "qwen_vl_utils.stream": ["stream_video", "VideoChunk", "VideoStream", "READ_AHEAD"],
    "qwen_vl_utils.aio": ["acount_visual_tokens", "afetch_image", "afetch_video", "aprocess_vision_info", "stats"],
    "qwen_vl_utils.dataset": [
        "PROBLEM_CODES",
        "PackSummary",
        "Problem",
        "RunSummary",
        "Settings",
        "best_fit_decreasing",
        "check",
        "count",
        "detect_format",
        "iter_records",
        "make_settings",
        "pack",
        "stats",
        "to_messages",
    ],
    "qwen_vl_utils.backends": ["BACKENDS", "AUTO_ORDER", "available_backends", "load_backend"],
    "qwen_vl_utils.__main__": ["main"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC_PATHS))
def test_public_import_paths_keep_working(module):
    imported = importlib.import_module(module)
    missing = [name for name in PUBLIC_PATHS[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"
    if hasattr(imported, "__all__") and module != "qwen_vl_utils":
        assert set(PUBLIC_PATHS[module]) <= set(imported.__all__), module


def test_every_import_the_readme_shows_works():
    statements = re.findall(r"^\s*(from qwen_vl_utils[\w.]* import [\w, ]+)$", README.read_text(), re.MULTILINE)
    statements += [
        f"from {m} import {', '.join(n.strip() for n in names.split(','))}"
        for m, names in re.findall(r"`from (qwen_vl_utils[\w.]*) import ([\w, ]+)`", README.read_text())
    ]
    assert len(statements) >= 4, statements
    for statement in statements:
        exec(statement, {})


def test_the_console_script_and_python_m_reach_the_same_main():
    res = subprocess.run(
        [sys.executable, "-m", "qwen_vl_utils", "--version"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.split() == ["qwen-vl-utils", qwen_vl_utils.__version__], res
    from qwen_vl_utils.__main__ import main
    from qwen_vl_utils.cli import main as cli_main

    assert main is cli_main


# --- the import graph --------------------------------------------------------------------------------------------


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["qwen_vl_utils", *path.relative_to(PACKAGE).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(name: str, path: Path, is_package: bool, modules: dict) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            found.add(node.value)  # importlib.import_module("qwen_vl_utils.backends._pyav"), if a module
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def _room(module: str) -> str:
    """The folder (or top-level module) a module belongs to: 'sources', 'cli', 'video', '_errors'..."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


LEAVES = {"_errors", "_util", "_cancel", "_version", "_progress", "_slots"}
#: room -> the rooms it may import (besides itself and the leaves); the rooms' __init__ docstrings say the same
MAY_IMPORT = {
    "sources": set(),
    "container": {"sources"},
    "backends": {"container", "sources"},
    "_options": {"backends", "sources"},  # backend names, checked lazily; the policy's patch sizes
    "_frame_resize": set(),
    "image": {"_options", "sources"},
    "audio": {"_options", "container", "sources"},
    "video": {"audio", "image", "_options", "_frame_resize", "backends", "container", "sources"},
    "vision_process": {"image", "video", "_options", "sources"},
    "aio": {"vision_process", "image", "video", "_options", "sources"},
    "omni_process": {"vision_process", "audio", "video", "_options", "sources"},
    "stream": {"video", "audio", "_options", "_frame_resize", "backends", "container", "sources"},
    "dataset": {"vision_process", "image", "video", "audio", "_options", "sources"},
}


def test_no_module_outside_cli_imports_cli(graph):
    reaching_up = sorted(
        f"{m} -> {t}" for m, targets in graph.items() for t in targets if _room(t) == "cli" and _room(m) != "cli"
    )
    assert reaching_up == ["qwen_vl_utils.__main__ -> qwen_vl_utils.cli"], reaching_up


def test_each_room_imports_only_what_lies_below_it(graph):
    wrong = []
    for module, targets in graph.items():
        room = _room(module)
        allowed = MAY_IMPORT.get(room)
        if room in LEAVES:
            allowed = set()
        if allowed is None:  # the top, the cli and __main__ may import anything
            continue
        wrong += [f"{module} -> {t}" for t in targets if _room(t) not in allowed | LEAVES | {room}]
    assert not wrong, wrong


def test_no_import_circle(graph):
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_every_folder_says_what_it_is_for():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower(), (
            f"{init} needs a docstring saying what the folder is for and may import"
        )


def test_the_top_level_holds_only_the_core():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == [
        "__init__.py",
        "__main__.py",
        "_cancel.py",
        "_errors.py",
        "_frame_resize.py",
        "_options.py",
        "_progress.py",
        "_slots.py",
        "_util.py",
        "_version.py",
        "aio.py",
        "audio.py",
        "image.py",
        "omni_process.py",
        "video.py",
        "vision_process.py",
    ]
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders == ["backends", "cli", "container", "dataset", "sources", "stream"]
