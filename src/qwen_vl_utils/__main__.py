"""``python -m qwen_vl_utils``: the command line (see ``qwen_vl_utils._cli``)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
