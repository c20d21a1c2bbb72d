"""Video decoder backends: plain data here, modules imported only when used.

A backend module defines::

    NAME: str
    APPLIES_ROTATION: bool                          # True if its frames come out upright already
    def unsupported(info: VideoInfo) -> str | None  # why it cannot decode this stream, or None
    def read(source, info, indices, threads) -> Iterator[tuple[int, np.ndarray | Callable[[], np.ndarray]]]
        # yield (index, HxWx3 uint8 RGB frame, or a callable returning one) for each of the sorted,
        # unique ``indices``, in order

Backends only decode: they never choose frames (``video.plan_frames`` does, from the one probe in
``container/_probe``) and never resize. They import ``container/``, ``sources/`` and the leaf modules; never
planning, streaming or the command line.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

from .._errors import InvalidOptionError

__all__ = ["BACKENDS", "AUTO_ORDER", "BackendSpec", "available_backends", "load_backend"]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    requires: str
    install_hint: str


BACKENDS: dict[str, BackendSpec] = {
    "pyav": BackendSpec("pyav", "qwen_vl_utils.backends._pyav", "av", "pip install av"),
    "torchcodec": BackendSpec(
        "torchcodec",
        "qwen_vl_utils.backends._torchcodec",
        "torchcodec",
        "pip install 'qwen-vl-utils[torchcodec]' (needs torch and FFmpeg's libraries: apt-get install ffmpeg)",
    ),
    "decord": BackendSpec("decord", "qwen_vl_utils.backends._decord", "decord", "pip install 'qwen-vl-utils[decord]'"),
    "torchvision": BackendSpec(
        "torchvision", "qwen_vl_utils.backends._torchvision", "av", "pip install av (PyAV decodes)"
    ),
}

#: the automatic choice: the first that really loads (measured fastest first, see benchmarks/README.md)
AUTO_ORDER = ("pyav", "torchcodec", "decord")

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failures: dict[str, str] = {}


def load_backend(name: str) -> ModuleType:
    """Import a backend (really importing its decoder, not trusting find_spec); clear error if it cannot."""
    spec = BACKENDS.get(name)
    if spec is None:
        raise InvalidOptionError(
            f"unknown video reader backend {name!r}; available: {', '.join(available_backends()) or 'none'} "
            f"(known: {', '.join(BACKENDS)})"
        )
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _failures:
            raise InvalidOptionError(_failures[name])
        try:
            importlib.import_module(spec.requires)
            module = importlib.import_module(spec.module)
        except Exception as exc:  # an installed but broken decoder raises anything from ImportError to OSError
            _failures[name] = _load_failure(spec, exc)
            if not (isinstance(exc, ModuleNotFoundError) and exc.name == spec.requires):  # installed, but broken
                logging.getLogger("qwen_vl_utils").warning("%s; the automatic choice skips it", _failures[name])
            raise InvalidOptionError(_failures[name]) from exc
        _loaded[name] = module
        return module


#: what to install for a module a backend's decoder needs and pip did not bring (torch is never pinned by an extra)
TORCH_HINT = (
    "pip install torch (a CPU-only machine: pip install torch --index-url https://download.pytorch.org/whl/cpu, "
    "a small CPU build; with a GPU, the CUDA build for it from pytorch.org)"
)
_MISSING_HINTS = {"torch": TORCH_HINT}


def _load_failure(spec: BackendSpec, exc: Exception) -> str:
    """Why a backend does not load, with what to install: the decoder itself, or what it needs and lacks."""
    missing = exc.name.split(".")[0] if isinstance(exc, ModuleNotFoundError) and exc.name else None
    if missing is not None and missing != spec.requires:
        hint = _MISSING_HINTS.get(missing, f"pip install {missing}")
        return (
            f"video reader backend {spec.name!r} cannot be loaded: {spec.requires} is installed but needs {missing}, "
            f"which is not; install it with: {hint}, or choose another of: {', '.join(BACKENDS)}"
        )
    return (
        f"video reader backend {spec.name!r} cannot be loaded ({type(exc).__name__}: {exc}); "
        f"install it with: {spec.install_hint}, or choose another of: {', '.join(BACKENDS)}"
    )


def available_backends() -> list[str]:
    """The backends that really load here, in the automatic order, then the rest."""
    names = []
    for name in (*AUTO_ORDER, *[n for n in BACKENDS if n not in AUTO_ORDER]):
        try:
            load_backend(name)
        except InvalidOptionError:
            continue
        names.append(name)
    return names


def auto_backend() -> Optional[str]:
    for name in AUTO_ORDER:
        try:
            load_backend(name)
        except InvalidOptionError:
            continue
        return name
    return None
