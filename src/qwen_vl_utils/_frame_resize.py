"""The frame resize every video path shares (``fetch_video``, ``decode_video``, ``stream_video``): torchvision's
bicubic with antialias, exactly as 0.0.14 resizes frames, computed fast and written where the caller wants it."""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from typing import Any, Optional

import numpy as np
from PIL import Image

from ._util import env_int, usable_cpus

_WEIGHTS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=32)
def _aa_weights(n_in: int, n_out: int, channels: int) -> Any:
    """torch's antialiased bicubic weights from ``n_in`` to ``n_out`` samples as a sparse CSR matrix
    (``n_out*channels`` x ``n_in*channels``, for samples with ``channels`` interleaved values).

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
            rows.append(dst * channels + c)
            cols.append((src + c0) * channels + c)
            vals.append(w[src, dst])
    with _WEIGHTS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        coo = torch.sparse_coo_tensor(
            torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (n_out * channels, n_in * channels)
        )
        return coo.coalesce().to_sparse_csr()


_scratch = threading.local()


def _buffer(name: str, shape: tuple[int, int]) -> Any:
    """A float32 scratch tensor kept per thread: fresh 25 MB temporaries per 1080p frame cost more in page
    faults than the arithmetic."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or tuple(buf.shape) != shape:
        buf = buffers[name] = sys.modules["torch"].empty(shape)
    return buf


def resize_frame(frame: np.ndarray, width: int, height: int, out: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Bicubic with antialias, as torchvision resizes uint8 frames for 0.0.14: in float, rounded once.

    Returns the (height, width, 3) uint8 frame; with ``out`` (a (3, height, width) array of any dtype), writes
    it there channels-first instead and returns None (with torch, straight from the last pass: no uint8 copy).

    With torch loaded (``fetch_video`` returns tensors, so it is), torch's own weights applied as two
    sparse matrix products on the interleaved frame (no transposes): about 2x faster than torch's
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
        x = _buffer("in", (h_in, w_in * 3))
        np.copyto(x.numpy().reshape(frame.shape), frame, casting="unsafe")  # any strides, read-only too
        if h_in != height:  # rows
            x = torch.mm(_aa_weights(h_in, height, 1), x, out=_buffer("rows", (height, w_in * 3)))
        if w_in != width:  # columns, channels interleaved: on the transposed frame
            xt = _buffer("t", (w_in * 3, height)).copy_(x.T)
            x = torch.mm(_aa_weights(w_in, width, 3), xt, out=_buffer("cols", (width * 3, height)))
        x.round_().clamp_(0, 255).add_(0.0)  # where contiguous; + 0.0: a rounded undershoot (-0.0) as 0.0
        hwc = (x.T if w_in != width else x).view(height, width, 3)
        if out is not None:
            torch.from_numpy(out).copy_(hwc.permute(2, 0, 1))
            return None
        return torch.empty((height, width, 3), dtype=torch.uint8).copy_(hwc).numpy()
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


def resize_threads() -> int:
    return max(1, env_int("QWENVL_RESIZE_THREADS", min(4, usable_cpus())))
