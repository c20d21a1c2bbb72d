"""The benchmark suite: ``python benchmarks/run.py [--setup-0014] [--quick] [--reps N]``.

Generates its media, checks that every implementation returns the same frames, then times every installed
backend end to end against qwen-vl-utils 0.0.14 (from ``benchmarks/.venv-0014``, which ``--setup-0014``
creates) and FFmpeg's own decode, and writes results.md/.json/.png next to this file.
"""

import os
import subprocess
import sys

from suite import main

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_0014 = os.path.join(HERE, ".venv-0014")
PYTHON_0014 = os.path.join(VENV_0014, "bin", "python")


def setup_0014() -> None:
    """qwen-vl-utils 0.0.14 imports torchvision, which needs the registry's (CUDA) torch build: it runs on
    the CPU too. It lives in its own virtualenv so that it never meets this environment's torch."""
    if not os.path.exists(PYTHON_0014):
        subprocess.run([sys.executable, "-m", "venv", VENV_0014], check=True)
    pkgs = ["qwen-vl-utils==0.0.14", "torch", "torchvision", "torchcodec", "decord", "av"]
    subprocess.run([PYTHON_0014, "-m", "pip", "install", "-q", *pkgs], check=True)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--setup-0014" in argv:
        argv.remove("--setup-0014")
        setup_0014()
    if "--python-0014" not in argv and os.path.exists(PYTHON_0014):
        argv += ["--python-0014", PYTHON_0014]
    if "--out" not in argv:
        argv += ["--out", HERE]
    if "--media" not in argv:
        argv += ["--media", os.path.join(HERE, "media")]
    sys.exit(main(argv))
