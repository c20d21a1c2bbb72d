"""The benchmark suite: ``python benchmarks/run.py`` (``--quick`` for a short run).

Generates its media, times every installed backend end to end against qwen-vl-utils 0.0.14 (when a python
with it is found, see README.md) and FFmpeg's own decode, and writes results.md/.json/.png here.
"""

import os
import sys

from qwen_vl_utils._bench import main

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_0014 = os.path.join(HERE, ".venv-0014", "bin", "python")

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--python-0014" not in argv and os.path.exists(VENV_0014):
        argv += ["--python-0014", VENV_0014]
    if "--out" not in argv:
        argv += ["--out", HERE]
    if "--media" not in argv:
        argv += ["--media", os.path.join(HERE, "media")]
    sys.exit(main(argv))
