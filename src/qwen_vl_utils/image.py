"""Images: sizing rules shared with video (``smart_resize``) and ``fetch_image``.

Inside the library images are PIL images and numpy arrays; torch is never imported here.
"""

from __future__ import annotations

import functools
import io
import math
import threading
import warnings
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from PIL import Image

from . import _cancel
from ._errors import AspectRatioError, DecodeError, InvalidOptionError, QwenVLError, SourceTooLargeError
from ._options import SPATIAL_MERGE_SIZE, ImageOptions, as_image_options, image_options, patch_factor
from ._slots import Slots, bounded
from ._util import env_flag, usable_cpus
from .sources._policy import FetchPolicy, get_fetch_policy
from .sources._resolve import HEIF_BRANDS, Source, resolve_source, sniff_media

__all__ = [
    "IMAGE_MAX_TOKEN_NUM",
    "IMAGE_MIN_TOKEN_NUM",
    "MAX_RATIO",
    "SPATIAL_MERGE_SIZE",
    "ceil_by_factor",
    "fetch_image",
    "floor_by_factor",
    "round_by_factor",
    "smart_resize",
]

MAX_RATIO = 200
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384


def _decode_capacity() -> int:
    n = get_fetch_policy().max_concurrent_decodes
    return n if n is not None else usable_cpus()


#: image decodes and resizes in flight at once, process-wide (``FetchPolicy.max_concurrent_decodes``, default
#: one per usable core). They are CPU-bound: more than the cores only adds memory and page faults (a 12 MP
#: decode touches 48 MB), 10-20% of the time here. Downloads are not limited by it.
_DECODE_SLOTS = Slots("image decodes", _decode_capacity)

#: compressed bytes a decoder is fed at a time while a caller may cancel it (Pillow's default is 64 KiB): a
#: cancelled decode stops within one such block
_CANCELLABLE_BLOCK = 1 << 14

_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def round_by_factor(number: float, factor: int) -> int:
    """The closest integer to ``number`` that is divisible by ``factor``."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    """The smallest integer >= ``number`` that is divisible by ``factor``."""
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    """The largest integer <= ``number`` that is divisible by ``factor``."""
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
) -> tuple[int, int]:
    """Scale ``(height, width)`` so that both sides are multiples of ``factor``, the area lies within
    ``[min_pixels, max_pixels]`` and the aspect ratio is kept as closely as possible.

    Same arithmetic as qwen-vl-utils 0.0.14, except that a side is never 0 and the result never exceeds
    ``max_pixels`` (0.0.14 can return 0 for very elongated inputs, and exceed the budget when the two
    bounds are close). Raises :class:`AspectRatioError` past ``MAX_RATIO`` and
    :class:`InvalidOptionError` for impossible budgets.
    """
    factor = int(factor)
    if factor <= 0:
        raise InvalidOptionError(f"factor must be a positive integer, got {factor}")
    max_pixels = max_pixels if max_pixels is not None else IMAGE_MAX_TOKEN_NUM * factor**2
    min_pixels = min_pixels if min_pixels is not None else IMAGE_MIN_TOKEN_NUM * factor**2
    if not (height > 0 and width > 0):
        raise InvalidOptionError(f"height and width must be positive, got {height}x{width}")
    if max_pixels < min_pixels:
        raise InvalidOptionError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    if max_pixels < factor * factor:
        raise InvalidOptionError(
            f"max_pixels ({max_pixels}) is below one {factor}x{factor} patch group; raise it to at least {factor**2}"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise AspectRatioError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio:.1f}")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    # Over the budget (rounding, or min_pixels close to max_pixels after ceiling): scale down to it.
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
        # a side pinned at one factor (very elongated input) can still overshoot: shorten the other side
        if h_bar * w_bar > max_pixels:
            if h_bar == factor:
                w_bar = floor_by_factor(max_pixels / factor, factor)
            else:
                h_bar = floor_by_factor(max_pixels / factor, factor)
    return h_bar, w_bar


# --- decoding ---------------------------------------------------------------------------------------------


def _image_source(ele: dict) -> Any:
    if "image" in ele and ele["image"] is not None:
        return ele["image"]
    value = ele.get("image_url")
    if isinstance(value, dict):  # OpenAI form {"type": "image_url", "image_url": {"url": ...}}
        value = value.get("url")
    if value is None:
        raise InvalidOptionError(f"image element has no 'image' or 'image_url' value: keys {sorted(ele)}")
    return value


def array_to_pil(value: Any, name: str) -> Image.Image:
    """A numpy HWC/HW uint8 array or a torch CHW/HWC uint8 tensor as a PIL image."""
    is_torch = type(value).__module__.startswith("torch")
    if is_torch:
        value = value.detach().cpu()
        if value.ndim == 3 and value.shape[0] in (1, 3, 4) and value.shape[-1] not in (1, 3, 4):
            value = value.permute(1, 2, 0)
        value = value.numpy()
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InvalidOptionError(
            f"image array {name} has shape {arr.shape}; expected HxW, HxWx3 or HxWx4 (or CxHxW for tensors)"
        )
    if arr.dtype != np.uint8:
        raise InvalidOptionError(
            f"image array {name} has dtype {arr.dtype}; convert it to uint8 0..255 first, "
            "e.g. (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    return Image.fromarray(np.ascontiguousarray(arr))


def _pil_open(source: Source) -> Image.Image:
    stream = io.BytesIO(source.data) if source.data is not None else source.path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(stream)


def open_image(source: Source, policy: FetchPolicy) -> Image.Image:
    """Open (lazily: header only) the image behind a resolved source, checking the pixel budget."""
    if source.obj is not None:
        img = source.obj if isinstance(source.obj, Image.Image) else array_to_pil(source.obj, source.name)
        _check_pixels(img.size, source.name, policy)
        return img
    try:
        try:
            img = _pil_open(source)
        except Image.UnidentifiedImageError:
            if not _add_heif_opener(source):
                raise
            img = _pil_open(source)  # a HEIC/HEIF file, and pillow-heif's opener was just registered
    except Image.DecompressionBombError as exc:
        raise SourceTooLargeError(f"image {source.name} is a decompression bomb: {exc}") from exc
    except (MemoryError, QwenVLError):
        raise
    except Exception as exc:  # Pillow's plugins raise anything from SyntaxError to struct.error on bad bytes
        raise DecodeError(f"{source.name} is not a decodable image ({exc}).{_undecodable_hint(source)}") from exc
    _check_pixels(img.size, source.name, policy)
    return img


def _undecodable_hint(source: Source) -> str:
    head = source.head()
    if sniff_media(head) == "video":
        return " It looks like a video: use {'type': 'video', 'video': ...}."
    if _heif_family(head) == "avif":
        from PIL import features

        if not features.check("avif"):
            return " It is an AVIF image, and this Pillow build cannot read AVIF: upgrade it (pip install -U pillow)."
    return ""


# --- HEIC/HEIF (iPhone photos): pillow-heif's Pillow plugin, registered on the first such file ----------------

_HEVC_BRANDS = frozenset((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"))
_heif_lock = threading.Lock()
_heif_registered = False


def _heif_family(head: bytes) -> Optional[str]:
    """'heif' (HEVC-coded, what pillow-heif reads) or 'avif' (what Pillow reads), from the ftyp box's major and
    compatible brands; None for anything else."""
    if head[4:8] != b"ftyp":
        return None
    end = min(int.from_bytes(head[:4], "big"), len(head))
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & {b"avif", b"avis"} and not brands & _HEVC_BRANDS:
        return "avif"
    return "heif" if brands & set(HEIF_BRANDS) else None


def _add_heif_opener(source: Source) -> bool:
    """True if ``source`` is HEIF, once pillow-heif's opener is registered (on the first such file: never at
    import); a DecodeError with the install hint if pillow-heif is missing."""
    global _heif_registered
    if _heif_family(source.head()) != "heif":
        return False
    with _heif_lock:
        if not _heif_registered:
            try:
                import pillow_heif

                pillow_heif.register_heif_opener()
            except Exception as exc:  # not installed (ImportError), or an installed but broken libheif
                raise DecodeError(
                    f"{source.name} is a HEIC/HEIF image (the iPhone photo format); decoding it needs the optional "
                    f"pillow-heif package ({type(exc).__name__}: {exc}): pip install 'qwen-vl-utils[heif]'"
                ) from exc
            _heif_registered = True
    return True


def _check_pixels(size: tuple, name: str, policy: FetchPolicy) -> None:
    w, h = size
    if w * h > policy.max_image_pixels:
        raise SourceTooLargeError(
            f"image {name} is {w}x{h} = {w * h} pixels, over the decompression-bomb limit of "
            f"{policy.max_image_pixels} (raise FetchPolicy.max_image_pixels or QWENVL_MAX_IMAGE_PIXELS)"
        )


@functools.lru_cache(maxsize=1)
def _pillow_orients_tiff() -> bool:
    """Whether this Pillow turns TIFFs upright itself (recent ones: the size at open, the pixels at load)."""
    exif = Image.Exif()
    exif[_ORIENTATION] = 6
    buf = io.BytesIO()
    Image.new("L", (2, 1)).save(buf, format="TIFF", exif=exif)
    return Image.open(buf).size == (1, 2)


def exif_orientation(img: Image.Image) -> int:
    if img.format == "TIFF" and _pillow_orients_tiff():
        return 1  # already applied by Pillow: applying it again would turn the image twice
    try:
        if img.format == "PNG" and "exif" not in img.info and getattr(img, "fp", None) is not None:
            exif = Image.Exif()  # Pillow's PNG getexif() decodes all pixels to reach an eXIf after the data
            exif.load(_png_exif_chunk(img.fp) or b"")
        else:
            exif = img.getexif()
        return int(exif.get(_ORIENTATION, 1))
    except Exception:  # malformed EXIF must not make a readable image unreadable
        return 1


def _png_exif_chunk(fp: Any) -> Optional[bytes]:
    """A PNG's eXIf chunk, found by walking the chunk headers (the image data is skipped, not decompressed)."""
    pos = fp.tell()
    try:
        fp.seek(8)
        while True:
            head = fp.read(8)
            if len(head) < 8 or head[4:] == b"IEND":
                return None
            length = int.from_bytes(head[:4], "big")
            if head[4:] == b"eXIf":
                return fp.read(length)
            fp.seek(length + 4, io.SEEK_CUR)  # data and CRC
    finally:
        fp.seek(pos)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, after EXIF orientation; from the header only."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with every kind of transparency composited onto white; first frame of animations."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img if mode == "RGB" else img.convert("RGB")


def decode_rgb(img: Image.Image, name: str) -> Image.Image:
    """Fully decode to upright RGB (EXIF applied), converting decoder failures to DecodeError."""
    try:
        orientation = exif_orientation(img)
        rgb = to_rgb(img)
        for op in _TRANSPOSE.get(orientation, ()):
            rgb = rgb.transpose(op)
        rgb.load()
    except Image.DecompressionBombError as exc:
        raise SourceTooLargeError(f"image {name} is a decompression bomb: {exc}") from exc
    except (MemoryError, QwenVLError):  # (a cancellation, from the reader the decoder is fed through)
        raise
    except Exception as exc:  # any decoder failure on hostile bytes is a DecodeError, never a bare builtin
        raise DecodeError(
            f"image {name} could not be decoded ({type(exc).__name__}: {exc}); the file may be truncated or corrupt"
        ) from exc
    return rgb


def image_target_size(ele: Union[dict, ImageOptions], width: int, height: int, factor: int) -> tuple[int, int]:
    """(resized_height, resized_width) for an image element (or its checked options), as 0.0.14 computes it."""
    options = as_image_options(ele)
    if options.resized is not None:
        return smart_resize(*options.resized, factor=factor)
    min_pixels = IMAGE_MIN_TOKEN_NUM * factor**2 if options.min_pixels is None else options.min_pixels
    max_pixels = IMAGE_MAX_TOKEN_NUM * factor**2 if options.max_pixels is None else options.max_pixels
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


_patch_factor = patch_factor  # the name the rest of the package imports


def _draft(img: Image.Image, options: ImageOptions, rh: int, rw: int) -> None:
    """Opt-in JPEG draft decoding (DCT scaling) to at least the target size: faster, slightly different."""
    draft = options.jpeg_draft
    if img.format != "JPEG" or not (env_flag("QWENVL_JPEG_DRAFT") if draft is None else draft):
        return
    if exif_orientation(img) in (5, 6, 7, 8):
        rh, rw = rw, rh
    img.draft("RGB", (rw, rh))


def fetch_image(
    ele: dict[str, Any],
    image_patch_size: int = 14,
    *,
    policy: Optional[FetchPolicy] = None,
) -> Image.Image:
    """Load, orient, convert to RGB and resize one image element, as qwen-vl-utils 0.0.14 does.

    ``ele`` holds ``image`` (or ``image_url``, a string or ``{"url": ...}``) plus optional ``min_pixels``,
    ``max_pixels``, ``resized_height``/``resized_width`` and ``jpeg_draft``. Returns an RGB PIL image whose
    sides are multiples of ``image_patch_size * 2``.
    """
    factor = _patch_factor(image_patch_size, policy)
    policy = get_fetch_policy(policy)
    options = image_options(ele)  # a bad option fails here, before any download
    with resolve_image(ele, policy) as source:
        return load_image(source, options, factor, policy)


def resolve_image(ele: dict, policy: FetchPolicy) -> Source:
    """The I/O half of ``fetch_image``: resolve (download, read) the element's source. Its options are checked
    before, by the caller (:func:`~qwen_vl_utils._options.image_options`), so a bad one fails before any
    download."""
    return resolve_source(_image_source(ele), "image", policy)


def check_output_size(height: int, width: int, policy: FetchPolicy, what: str) -> None:
    """An output over ``FetchPolicy.max_output_pixels`` (min_pixels, resized_* and the patch size come from
    requests) is refused before anything is decoded."""
    if height * width > policy.max_output_pixels:
        raise SourceTooLargeError(
            f"{what}: the output would be {width}x{height} = {width * height} pixels, over the limit of "
            f"{policy.max_output_pixels} (FetchPolicy.max_output_pixels); ask for fewer pixels (min_pixels, "
            "resized_height/resized_width)"
        )


def load_image(source: Source, options: ImageOptions, factor: int, policy: FetchPolicy) -> Image.Image:
    """The CPU half of ``fetch_image``: size from the header, then decode and resize in a decode slot."""
    img = open_image(source, policy)
    width, height = oriented_size(img)
    try:
        rh, rw = image_target_size(options, width, height, factor)
    except AspectRatioError as exc:
        raise AspectRatioError(f"image {source.name}: {exc}") from None
    check_output_size(rh, rw, policy, f"image {source.name}")
    _draft(img, options, rh, rw)
    return bounded(_DECODE_SLOTS, lambda: _decode_and_resize(img, source.name, rw, rh))


def _decode_and_resize(img: Image.Image, name: str, width: int, height: int) -> Image.Image:
    _cancel.check()  # a cancelled caller's images are not decoded
    if _cancel.current() is not None and getattr(img, "fp", None) is not None:
        img.fp = _Cancellable(img.fp)  # checked before each block of compressed bytes
        img.decodermaxblock = _CANCELLABLE_BLOCK
    rgb = decode_rgb(img, name)
    _cancel.check()
    return rgb if rgb.size == (width, height) else rgb.resize((width, height), Image.Resampling.BICUBIC)


class _Cancellable:
    """A file the decoder reads through, which stops it (Cancelled) once its caller is cancelled."""

    def __init__(self, fp: Any) -> None:
        self._fp = fp

    def read(self, *args: Any) -> bytes:
        _cancel.check()
        return self._fp.read(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fp, name)


def visual_tokens(height: int, width: int, factor: int, frames: int = 1, temporal_patch: int = 2) -> int:
    """Tokens for ``frames`` frames of ``height`` x ``width``: ceil(frames / temporal_patch) * (H/f) * (W/f)."""
    return -(-frames // temporal_patch) * (height // factor) * (width // factor)


class ImageFacts(NamedTuple):
    """What :func:`fetch_image` would return for an element, known from the image's header."""

    tokens: int
    resized_height: int
    resized_width: int
    width: int  # the source's displayed (EXIF-oriented) size
    height: int


def describe_image(
    ele: dict[str, Any], image_patch_size: int = 14, *, policy: Optional[FetchPolicy] = None
) -> ImageFacts:
    """Tokens and sizes of ``ele``'s output, from the image's header only (nothing is decoded)."""
    factor = _patch_factor(image_patch_size, policy)
    policy = get_fetch_policy(policy)
    options = image_options(ele)
    with resolve_image(ele, policy) as source:
        width, height = oriented_size(open_image(source, policy))
    rh, rw = image_target_size(options, width, height, factor)
    check_output_size(rh, rw, policy, f"image {source.name}")
    return ImageFacts(visual_tokens(rh, rw, factor), rh, rw, width, height)


def image_token_count(
    ele: dict[str, Any], image_patch_size: int = 14, *, policy: Optional[FetchPolicy] = None
) -> tuple[int, int, int]:
    """(tokens, resized_height, resized_width) for an image element, from its header only."""
    facts = describe_image(ele, image_patch_size, policy=policy)
    return facts.tokens, facts.resized_height, facts.resized_width
