"""The frame resize every video path shares (``fetch_video``, ``decode_video``, ``stream_video``): torchvision's
bicubic with antialias, exactly as 0.0.14 resizes frames, computed fast and written where the caller wants it."""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
from PIL import Image

from ._util import env_int, usable_cpus

_WEIGHTS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=32)
def _aa_weights(n_in: int, n_out: int, channels: int, planar: bool = False) -> Any:
    """torch's antialiased bicubic weights from ``n_in`` to ``n_out`` samples as a sparse CSR matrix
    (``n_out*channels`` x ``n_in*channels``, for samples with ``channels`` interleaved values; ``planar``: the
    output's rows channel by channel instead, ``c * n_out + j``).

    Read off torch's own kernel by resizing one-hot rows, so the weights are torch's to the last bit."""
    torch = sys.modules["torch"]
    rows, cols, vals = [], [], []
    for c0 in range(0, n_in, 512):  # bounded memory for any width
        n = min(n_in, c0 + 512) - c0
        eye = torch.zeros((1, n, 1, n_in))
        eye[0, torch.arange(n), 0, torch.arange(c0, c0 + n)] = 1
        w = torch.nn.functional.interpolate(eye, size=(1, n_out), mode="bicubic", antialias=True)[0, :, 0, :]
        src, dst = torch.nonzero(w, as_tuple=True)
        for c in range(channels):
            rows.append(dst + c * n_out if planar else dst * channels + c)
            cols.append((src + c0) * channels + c)
            vals.append(w[src, dst])
    with _WEIGHTS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        coo = torch.sparse_coo_tensor(
            torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (n_out * channels, n_in * channels)
        )
        return coo.coalesce().to_sparse_csr()


#: floats of a frame's rows resized at a time: a strip's passes and transposes stay in the core's cache
_STRIP_FLOATS = 1 << 17


@functools.lru_cache(maxsize=32)
def _strips(h_in: int, h_out: int, row_floats: int) -> tuple:
    """The output rows in strips, as ``(r0, r1, a, b, weights)``: output rows ``[r0, r1)`` come from input rows
    ``[a, b)`` through ``weights`` (the rows' part of the CSR matrix; None when the height does not change)."""
    size = max(8, min(64, _STRIP_FLOATS // row_floats))
    if h_in == h_out:
        return tuple((r0, min(h_out, r0 + size), r0, min(h_out, r0 + size), None) for r0 in range(0, h_out, size))
    torch = sys.modules["torch"]
    weights = _aa_weights(h_in, h_out, 1)
    crow, col, val = weights.crow_indices(), weights.col_indices(), weights.values()
    strips = []
    for r0 in range(0, h_out, size):
        r1 = min(h_out, r0 + size)
        lo, hi = int(crow[r0]), int(crow[r1])
        a, b = int(col[lo:hi].min()), int(col[lo:hi].max()) + 1
        with _WEIGHTS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            part = torch.sparse_csr_tensor(crow[r0 : r1 + 1] - lo, col[lo:hi] - a, val[lo:hi], (r1 - r0, b - a))
        strips.append((r0, r1, a, b, part))
    return tuple(strips)


_scratch = threading.local()


def _buffer(name: str, shape: tuple[int, int]) -> Any:
    """A float32 scratch tensor of ``shape``, from storage kept per thread and grown as needed: fresh 25 MB
    temporaries per 1080p frame cost more in page faults than the arithmetic. Views are kept too (a strip's
    buffers are asked for thousands of times a second)."""
    views = _scratch.__dict__.setdefault("views", {})
    view = views.get((name, shape))
    if view is None:
        if len(views) > 64:  # many sizes seen: start over
            views.clear()
        buffers = _scratch.__dict__.setdefault("buffers", {})
        n = shape[0] * shape[1]
        buf = buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = buffers[name] = sys.modules["torch"].empty(n)
            for key in [k for k in views if k[0] == name]:  # views of the old storage: let it go
                del views[key]
        view = views[(name, shape)] = buf[:n].view(shape)
    return view


def resize_frame(frame: np.ndarray, width: int, height: int, out: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Bicubic with antialias, as torchvision resizes uint8 frames for 0.0.14: in float, rounded once.

    Returns the (height, width, 3) uint8 frame; with ``out`` (a (3, height, width) array of any dtype), writes
    it there channels-first instead and returns None (with torch, straight from the last pass: no uint8 copy).

    With torch loaded (``fetch_video`` returns tensors, so it is), torch's own weights applied as two
    sparse matrix products, strip by strip (:func:`_resize_strips`): about 2.5x faster than torch's
    ``interpolate`` and equal to it except where float summation order decides a rounding (about 1 value in
    100,000, by one level). Without torch (the numpy path), Pillow on float32 channels: the same a=-0.5
    kernel, within 0.001 levels on average. (Pillow's uint8 resize rounds between its two passes: 0.16 levels
    off on textured 1080p frames, outside the 0.1 this library promises.)
    """
    h_in, w_in = frame.shape[:2]
    torch = sys.modules.get("torch")
    if w_in == width and h_in == height:
        result = frame
    elif torch is not None:
        return _resize_strips(torch, frame, width, height, out)
    else:
        channels = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(frame[..., c], dtype=np.float32), mode="F").resize(
                    (width, height), Image.Resampling.BICUBIC
                )
            )
            for c in range(3)
        ]
        result = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
    if out is not None:
        out[...] = result.transpose(2, 0, 1)
        return None
    return result


def _resize_strips(torch: Any, frame: np.ndarray, width: int, height: int, out: Optional[np.ndarray]) -> Any:
    """The two passes a strip of output rows at a time, so that each strip's data stays in cache: the rows'
    weights on the interleaved input rows, a transpose, the columns' weights (their output channel by channel),
    rounded, written straight into ``out`` (3xHxW) or into a fresh HxWx3 uint8 frame (returned)."""
    h_in, w_in = frame.shape[:2]
    x = _buffer("in", (h_in, w_in * 3))
    np.copyto(x.numpy().reshape(frame.shape), frame, casting="unsafe")  # any strides, read-only too
    result = np.empty((height, width, 3), dtype=np.uint8) if out is None else None
    columns = _aa_weights(w_in, width, 3, True) if w_in != width else None
    for r0, r1, a, b, rows in _strips(h_in, height, w_in * 3):
        n = r1 - r0
        y = x[a:b] if rows is None else torch.mm(rows, x[a:b], out=_buffer("rows", (n, w_in * 3)))
        if columns is None:  # rows only: (n, width, 3)
            y.round_().clamp_(0, 255).add_(0.0)  # + 0.0: a rounded undershoot (-0.0) as 0.0
            hwc = y.numpy().reshape(n, width, 3)
            chw = hwc.transpose(2, 0, 1)
        else:
            yt = _buffer("t", (w_in * 3, n))
            np.copyto(yt.numpy(), y.numpy().T)
            z = torch.mm(columns, yt, out=_buffer("cols", (3 * width, n)))
            z.round_().clamp_(0, 255).add_(0.0)
            chw = z.numpy().reshape(3, width, n).transpose(0, 2, 1)
            hwc = chw.transpose(1, 2, 0)
        if out is not None:
            np.copyto(out[:, r0:r1], chw, casting="unsafe")
        else:
            np.copyto(result[r0:r1], hwc, casting="unsafe")
    return result


def resize_threads() -> int:
    return max(1, env_int("QWENVL_RESIZE_THREADS", min(4, usable_cpus())))


def resize_pool(name: str) -> ThreadPoolExecutor:
    """The threads that resize frames, :func:`resize_threads` of them, each running torch on one thread: the
    pool is the parallelism. torch's own threads inside each would spin against the pool and the decoders
    (measured on 2 cores: twice the CPU per frame for no gain on the calling thread, 2.5x the time on a pool
    thread)."""
    return ThreadPoolExecutor(max_workers=resize_threads(), thread_name_prefix=name, initializer=_torch_on_one_thread)


def _torch_on_one_thread() -> None:
    """On a pool thread as it starts: torch's OpenMP and MKL threads for this thread only set to one."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    # One pool thread at a time: another one starting in between would read the 1 set here as the default
    # and put it back for good.
    with _TORCH_THREADS_LOCK:
        default = torch.get_num_threads()  # what threads get by default (the process's setting, or the cores)
        torch.set_num_threads(1)  # this thread's own setting; it also becomes the default of later threads,
        restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="qwen-vl-torch-threads")
        restore.start()  # which a passing thread puts back (its own setting goes with it)
        restore.join()


_TORCH_THREADS_LOCK = threading.Lock()
