"""``python -m qwen_vl_utils``: the command line (see ``qwen_vl_utils.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
