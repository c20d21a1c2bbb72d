"""The command line: thin argparse faces over library functions (``inspect``, ``preview``, ``demo``,
``dataset``, ``stream``). Modules here may import anything in the package; nothing outside ``cli/`` imports them
(``__main__.py`` is the one entry point)."""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
