"""The release check fails on purpose: wheels built from broken copies of this tree must fail the smoke test.

Each case copies the tree (the files a build sees: tracked and untracked-but-not-ignored), breaks the copy, and
runs ``.ci/release-check --source COPY``: the same build, archive checks, fresh no-extras venv and smoke test
that CI runs on the real tree. The intact copy must pass, so a smoke test that always fails cannot make the
broken cases pass; each broken case must fail in the smoke step (not earlier: the archive checks cannot see
these mistakes) with the planted fault in its output.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="the release tooling needs Python 3.11+")

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / ".ci" / "release-check"
needs_checkout = pytest.mark.skipif(
    not CHECK.exists() or not (ROOT / ".git").exists() or shutil.which("git") is None,
    reason="needs the git checkout with .ci/release-check (not shipped in the sdist)",
)


def load_check():
    loader = importlib.machinery.SourceFileLoader("release_check", str(CHECK))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def copy_tree(dest: Path) -> Path:
    listed = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():  # a tracked file someone deleted in the working tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def move_dependency_to_extra(tree: Path, name: str) -> None:
    """Take the runtime dependency `name` out of [project].dependencies and declare it in a new extra."""
    path = tree / "pyproject.toml"
    text = path.read_text()
    (req,) = [r for r in tomllib.loads(text)["project"]["dependencies"] if re.match(rf"{name}\b", r, re.I)]
    block = re.search(r"^dependencies = \[\n.*?^\]", text, re.M | re.S)
    kept = block.group(0).replace(f'    "{req}",\n', "")
    text = text[: block.start()] + kept + text[block.end() :]
    text = text.replace("[project.optional-dependencies]\n", f'[project.optional-dependencies]\nmoved = ["{req}"]\n')
    path.write_text(text)
    project = tomllib.loads(text)["project"]
    assert req not in project["dependencies"] and project["optional-dependencies"]["moved"] == [req]


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    return tmp_path_factory.mktemp("release-tools") / "venv"  # created by the first run, reused by the others


def release_check(source: Path, tools: Path) -> str:
    skip = "imports,python-versions,smoke-torch"  # the static checks and torch are not what is tested here
    res = subprocess.run(
        [sys.executable, CHECK, "--source", source, "--tools", tools, "--skip", skip],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return f"exit status {res.returncode}\n{res.stdout}{res.stderr}"


BREAKS = {
    # a module only the console script imports: `import qwen_vl_utils` alone would not notice
    "module removed": (
        lambda tree: (tree / "src/qwen_vl_utils/cli/_main.py").unlink(),
        "No module named 'qwen_vl_utils.cli._main'",
    ),
    # imported by `import qwen_vl_utils`
    "pillow in an extra": (lambda tree: move_dependency_to_extra(tree, "pillow"), "No module named 'PIL'"),
    # imported lazily by the video probe and the default backend
    "av in an extra": (lambda tree: move_dependency_to_extra(tree, "av"), "No module named 'av'"),
}


@pytest.mark.slow
@needs_checkout
def test_intact_tree_passes(tmp_path, tools):
    out = release_check(copy_tree(tmp_path), tools)
    assert out.startswith("exit status 0\n") and "smoke: passed (no extras)" in out, out


@pytest.mark.slow
@needs_checkout
@pytest.mark.parametrize("case", list(BREAKS))
def test_broken_wheel_fails_the_smoke_test(tmp_path, tools, case):
    breaks, planted = BREAKS[case]
    tree = copy_tree(tmp_path)
    breaks(tree)
    out = release_check(tree, tools)
    assert out.startswith("exit status 1\n"), out
    assert "release-check: archives ok" in out and "FAILED at step 'smoke'" in out, out
    smoke = out[out.index("release-check: smoke ...") :]
    assert planted in smoke and "smoke: passed" not in smoke, out


@needs_checkout
def test_runtime_unions_are_flagged_for_python_39(tmp_path):
    check = load_check()
    cases = {
        # evaluated at runtime on 3.9: flagged
        "alias.py": ("from typing import Any\nAlias = int | None\n", ["int | None"]),
        "isinstance.py": ("def f(x):\n    return isinstance(x, (list[int] | str))\n", ["list[int] | str"]),
        "eager.py": ("def f(x: 'str', y: dict | None = None) -> int: ...\n", ["dict | None"]),
        # annotations never evaluated, bitwise ors: not flagged
        "lazy.py": ("from __future__ import annotations\ndef f(x: int | None) -> list[str] | None: ...\n", []),
        "flags.py": ("import os\nflags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if x else 0)\nm = a[0] | b\n", []),
    }
    for name, (source, expected) in cases.items():
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        assert [hit.split(": ", 1)[1] for hit in check.pep604_unions(path)] == expected, name


@needs_checkout
def test_undeclared_imports_are_found(tmp_path):
    check = load_check()
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("import os\nfrom . import sub\nfrom pkg.sub import x\n")
    lazy = "def f():\n    import numpy.linalg\n    from PIL import Image\n    import urllib3\n    import torchvision\n"
    (package / "sub" / "x.py").write_text(lazy)
    requires = ["numpy>=1.22", "pillow>=10; extra == 'images'"]  # PIL is the import name of pillow
    assert check.undeclared_imports(package, requires) == ["urllib3 (pkg/sub/x.py:4)"]
    assert check.undeclared_imports(package, [*requires, "urllib3>=2"]) == []
    assert check.undeclared_imports(package, ["numpy"]) == ["PIL (pkg/sub/x.py:3)", "urllib3 (pkg/sub/x.py:4)"]
